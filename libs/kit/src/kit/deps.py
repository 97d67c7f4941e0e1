"""FastAPI dependencies for the caller's identity, shared by every service."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import OAuth2PasswordBearer

from kit.errors import Forbidden, Unauthenticated
from kit.observe import remember_user
from kit.security import Principal, TokenVerifier
from kit.settings import VerifiedWritesSettings

oauth2_scheme = OAuth2PasswordBearer(tokenUrl="/auth/token", auto_error=False)


async def get_verifier(request: Request) -> TokenVerifier:
    # async: FastAPI would run a plain `def` dependency in a worker thread
    verifier: TokenVerifier = request.state.verifier
    return verifier


VerifierDep = Annotated[TokenVerifier, Depends(get_verifier)]


# Reads the verifier from `request.state` itself rather than through
# `VerifierDep`: one dependency fewer to solve on every authenticated request.
async def current_principal(
    request: Request, token: Annotated[str | None, Depends(oauth2_scheme)]
) -> Principal:
    if token is None:
        raise Unauthenticated("A bearer token is required")
    verifier: TokenVerifier = request.state.verifier
    principal = await verifier.verify(token)
    remember_user(request.scope, principal.user_id)
    return principal


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


class RequireRole:
    """A class dependency: `Depends(RequireRole("admin"))` admits only that role."""

    def __init__(self, role: str) -> None:
        self.role = role

    async def __call__(self, principal: CurrentPrincipal) -> Principal:
        if self.role not in principal.roles:
            raise Forbidden(f"The {self.role!r} role is required")
        return principal


AdminPrincipal = Annotated[Principal, Depends(RequireRole("admin"))]


class EmailNotVerified(Forbidden):
    title, slug = "Email not verified", "email-not-verified"

    def __init__(self) -> None:
        super().__init__(
            "Confirm your email address first (POST /auth/email/verify with the emailed "
            "token), then refresh your token"
        )


def ensure_may_write(principal: Principal, settings: VerifiedWritesSettings) -> None:
    """With REQUIRE_VERIFIED_EMAIL in effect, only a verified address writes."""
    if settings.verified_email_required and not principal.email_verified:
        raise EmailNotVerified


async def admin_writer(request: Request, principal: AdminPrincipal) -> Principal:
    settings: VerifiedWritesSettings = request.state.settings
    ensure_may_write(principal, settings)
    return principal


AdminWriter = Annotated[Principal, Depends(admin_writer)]
