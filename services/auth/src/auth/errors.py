"""Auth's domain errors, on kit's status-mapped bases.

The OAuth endpoints answer RFC 6749 section 5.2 errors as problem+json with
the RFC's `error` and `error_description` members added (RFC 9457 allows
extension members), so problem-aware clients and OAuth libraries both read
them: a library recognises an error by its `error` member.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from kit.errors import (
    Conflict,
    DomainError,
    Forbidden,
    NotFound,
    RateLimited,
    ServiceUnavailable,
    Unauthenticated,
)


class EmailTaken(Conflict):
    def __init__(self) -> None:
        super().__init__("An account with this email already exists")


class InvalidCredentials(Unauthenticated):
    """One message for an unknown email, a wrong password and a disabled
    account, so the answer never tells which accounts exist."""

    def __init__(self) -> None:
        super().__init__("Incorrect email or password")
        self.extensions.update(error="invalid_grant", error_description=self.detail)


class InvalidRefreshToken(Unauthenticated):
    def __init__(self, detail: str = "Refresh token is invalid or expired") -> None:
        super().__init__(detail)
        self.extensions.update(error="invalid_grant", error_description=self.detail)


class UserNotFound(NotFound):
    def __init__(self) -> None:
        super().__init__("No such user")


class SelfLockout(Forbidden):
    def __init__(self) -> None:
        super().__init__("Admins cannot deactivate themselves or drop their own admin role")


class InvalidResetToken(DomainError):
    """One answer for an unknown, expired or spent token."""

    status, title, slug = 400, "Invalid reset token", "invalid-reset-token"

    def __init__(self) -> None:
        super().__init__("This password reset token is invalid, expired or already used")


# --- OAuth 2.0 (RFC 6749 section 5.2, RFC 6750 section 3.1) ----------------------

BASIC_CHALLENGE = 'Basic realm="bazaar", charset="UTF-8"'


class OAuthError(DomainError):
    """An RFC 6749 error; `error` is the RFC's code, the detail its description."""

    error: ClassVar[str] = "invalid_request"

    def __init__(self, description: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(
            description, headers=headers, error=self.error, error_description=description
        )


class InvalidRequest(OAuthError):
    status, title, slug, error = 400, "Invalid request", "invalid-request", "invalid_request"


class InvalidClient(OAuthError):
    """Client authentication failed: always 401 with a Basic challenge, the
    scheme clients are told to use (RFC 6749 section 5.2)."""

    status, title, slug, error = 401, "Invalid client", "invalid-client", "invalid_client"

    def __init__(self, description: str) -> None:
        super().__init__(description, headers={"WWW-Authenticate": BASIC_CHALLENGE})


class InvalidGrant(OAuthError):
    status, title, slug, error = 400, "Invalid grant", "invalid-grant", "invalid_grant"


class UnauthorizedClient(OAuthError):
    status, title, slug = 400, "Unauthorized client", "unauthorized-client"
    error = "unauthorized_client"


class UnsupportedGrantType(OAuthError):
    status, title, slug = 400, "Unsupported grant type", "unsupported-grant-type"
    error = "unsupported_grant_type"


class InvalidScope(OAuthError):
    status, title, slug, error = 400, "Invalid scope", "invalid-scope", "invalid_scope"


class InvalidToken(OAuthError):
    """RFC 6750: the bearer token is not (or no longer) good for this."""

    status, title, slug, error = 401, "Not authenticated", "unauthenticated", "invalid_token"

    def __init__(self, description: str) -> None:
        super().__init__(description, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


class InsufficientScope(OAuthError):
    status, title, slug = 403, "Insufficient scope", "insufficient-scope"
    error = "insufficient_scope"

    def __init__(self, scope: str) -> None:
        super().__init__(
            f"This needs a token with the {scope!r} scope",
            headers={"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{scope}"'},
        )


def with_oauth_error(error: DomainError) -> DomainError:
    """Gives any other problem raised at an OAuth endpoint an `error` member, so
    a library never mistakes it for a token: a throttled login (429) or a
    briefly unavailable dependency (503) is `temporarily_unavailable`, the rest
    `invalid_request`. Status, headers and detail stay as they are."""
    if "error" not in error.extensions:
        temporary = isinstance(error, RateLimited | ServiceUnavailable)
        error.extensions["error"] = "temporarily_unavailable" if temporary else "invalid_request"
        error.extensions["error_description"] = error.detail
    return error


class InvalidVerificationToken(DomainError):
    """One answer for an unknown, expired or spent token."""

    status, title, slug = 400, "Invalid verification token", "invalid-verification-token"

    def __init__(self) -> None:
        super().__init__("This email verification token is invalid, expired or already used")
