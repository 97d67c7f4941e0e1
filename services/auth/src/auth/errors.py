"""Auth's domain errors, on kit's status-mapped bases."""

from __future__ import annotations

from kit.errors import (
    Conflict,
    DomainError,
    Forbidden,
    NotFound,
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


class InvalidRefreshToken(Unauthenticated):
    def __init__(self, detail: str = "Refresh token is invalid or expired") -> None:
        super().__init__(detail)


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


class InvalidVerificationToken(DomainError):
    """One answer for an unknown, expired or spent token."""

    status, title, slug = 400, "Invalid verification token", "invalid-verification-token"

    def __init__(self) -> None:
        super().__init__("This email verification token is invalid, expired or already used")
