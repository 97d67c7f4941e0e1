"""The refresh token as a cookie, for browsers.

A page that keeps its refresh token where scripts can read it hands it to any
script injected into the page. So a client that sends
`Refresh-Token-Delivery: cookie` to `/auth/token` or `/auth/refresh` gets the
refresh token as an HttpOnly, SameSite=Strict cookie scoped to
`/auth/refresh` (Secure when the request came over HTTPS), and the JSON body
leaves it out; on `/auth/refresh` such a client sends no body and the cookie
is read instead. Without the header nothing changes: API clients keep the
JSON flow. Logout clears the cookie. This module is the one place that sets,
clears and reads it.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request, Response

from auth.schemas import TokenPair

COOKIE_NAME = "bazaar_refresh"
COOKIE_PATH = "/auth/refresh"
DELIVERY_HEADER = "Refresh-Token-Delivery"


class RefreshCookie:
    def __init__(
        self,
        request: Request,
        response: Response,
        delivery: Annotated[
            str | None,
            Header(
                alias=DELIVERY_HEADER,
                description="`cookie`: the refresh token travels as an HttpOnly cookie, "
                "not in the body (browsers)",
            ),
        ] = None,
    ) -> None:
        self.wanted = delivery == "cookie"
        self.response = response
        # the gateway says how the client connected (X-Forwarded-Proto)
        self.secure = request.url.scheme == "https"
        self.value = request.cookies.get(COOKIE_NAME) if self.wanted else None

    def deliver(self, pair: TokenPair, *, max_age: int) -> TokenPair:
        """The pair as the client asked for it: the refresh token in the body,
        or in the cookie and left out of the body."""
        if not self.wanted or pair.refresh_token is None:
            return pair
        self.response.set_cookie(
            COOKIE_NAME,
            pair.refresh_token,
            max_age=max_age,
            path=COOKIE_PATH,
            secure=self.secure,
            httponly=True,
            samesite="strict",
        )
        return pair.model_copy(update={"refresh_token": None})

    def clear(self, response: Response) -> None:
        response.delete_cookie(
            COOKIE_NAME, path=COOKIE_PATH, secure=self.secure, httponly=True, samesite="strict"
        )


RefreshCookieDep = Annotated[RefreshCookie, Depends()]
