"""Request and response bodies."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from email_validator import EmailNotValidError, validate_email
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
)

from auth.models import User

MIN_PASSWORD_LENGTH = 8
# argon2 hashes any length, but a megabyte "password" is a cheap DoS
MAX_PASSWORD_LENGTH = 1024

Role = Literal["admin", "user"]
# no control characters (PostgreSQL text cannot even hold NUL)
DisplayName = Annotated[
    str,
    StringConstraints(
        strip_whitespace=True, min_length=1, max_length=100, pattern=r"^[^\x00-\x1f\x7f]*$"
    ),
]


def normalise_email(value: str) -> str:
    """Syntax-checked, normalised (IDNA, Unicode NFC) and lower-cased as a whole:
    `Alice@Example.COM` and `alice@example.com` are one account."""
    return validate_email(value.strip(), check_deliverability=False).normalized.lower()


def login_email(value: str) -> str:
    """The form's username as an account key; malformed input just matches no one."""
    try:
        return normalise_email(value)
    except EmailNotValidError:
        # never stored, so it matches no account; NUL cannot even be queried
        return value.strip().lower().replace("\x00", "")


# any string, as the account key it would be (a request that must not tell
# whether an account exists accepts what no account could have)
AccountEmail = Annotated[str, StringConstraints(max_length=320), AfterValidator(login_email)]

PASSWORD_IS_EMAIL = "the password must not be the email address"


def is_the_email(password: str, email: str) -> bool:
    """A password that only spells the account's (normalised) email."""
    return password.strip().lower() == email


Password = Annotated[
    str, StringConstraints(min_length=MIN_PASSWORD_LENGTH, max_length=MAX_PASSWORD_LENGTH)
]


class RegisterIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: Annotated[str, StringConstraints(max_length=320)]
    display_name: DisplayName
    password: Password

    @field_validator("email")
    @classmethod
    def _normalise_email(cls, value: str) -> str:
        try:
            return normalise_email(value)
        except EmailNotValidError as error:
            raise ValueError(f"not a valid email address: {error}") from None

    @field_validator("password")
    @classmethod
    def _not_the_email(cls, value: str, info: ValidationInfo) -> str:
        email = info.data.get("email")
        if email is not None and is_the_email(value, email):
            raise ValueError(PASSWORD_IS_EMAIL)
        return value


class UserOut(BaseModel):
    id: uuid.UUID
    email: str
    display_name: str
    roles: list[str]
    is_active: bool
    email_verified: bool
    created_at: datetime

    @classmethod
    def of(cls, user: User) -> UserOut:
        return cls(
            id=user.id,
            email=user.email,
            display_name=user.display_name,
            roles=list(user.roles),
            is_active=user.is_active,
            email_verified=user.email_verified_at is not None,
            created_at=user.created_at,
        )


class UserPage(BaseModel):
    items: list[UserOut]
    next_cursor: str | None


class UserPatch(BaseModel):
    """Only the fields sent are changed (`exclude_unset`)."""

    model_config = ConfigDict(extra="forbid")

    roles: Annotated[list[Role], Field(min_length=1, max_length=2)] | None = None
    is_active: bool | None = None
    display_name: DisplayName | None = None

    @field_validator("roles", "is_active", "display_name")
    @classmethod
    def _not_null(cls, value: object) -> object:
        if value is None:
            raise ValueError("may be omitted but not null")
        return value


class TokenPair(BaseModel):
    """A token response (RFC 6749 section 5.1). `refresh_token` is absent for
    a machine client (client_credentials); `scope` is what was granted."""

    access_token: str
    # absent when it was delivered as a cookie (auth.cookies)
    refresh_token: str | None = None
    token_type: Literal["bearer"] = "bearer"
    expires_in: int
    scope: str


class TokenRequest(BaseModel):
    """The token endpoint's form (`application/x-www-form-urlencoded`).

    Every field is optional here so that a missing or malformed one is
    answered as RFC 6749 asks (400 `invalid_request`, `unsupported_grant_type`)
    rather than with a 422; parameters it does not know are ignored.
    """

    grant_type: str | None = Field(
        default=None, description="`password`, `refresh_token` or `client_credentials`"
    )
    username: str | None = Field(default=None, description="password grant: the email")
    password: str | None = Field(default=None, description="password grant")
    refresh_token: str | None = Field(default=None, description="refresh_token grant")
    scope: str | None = Field(
        default=None,
        description="space-separated; users: `openid profile email` (always granted whole); "
        "machine clients: a subset of their own scopes (all of them when omitted)",
    )
    client_id: str | None = Field(default=None, description="client_secret_post or a public client")
    client_secret: str | None = Field(default=None, description="client_secret_post")


class TokenLookup(BaseModel):
    """The form of revocation (RFC 7009) and introspection (RFC 7662)."""

    token: str | None = None
    token_type_hint: str | None = Field(
        default=None, description="`access_token` or `refresh_token`; only speeds the lookup"
    )
    client_id: str | None = None
    client_secret: str | None = None


class Introspection(BaseModel):
    """RFC 7662 section 2.2. An inactive token is `{"active": false}` alone;
    the other members describe an active one (`name`, `roles` and `sid` are
    this system's claims, for resource servers that do not read the JWT)."""

    active: bool
    scope: str | None = None
    client_id: str | None = None
    token_type: str | None = None
    exp: int | None = None
    iat: int | None = None
    sub: str | None = None
    aud: str | list[str] | None = None
    iss: str | None = None
    jti: str | None = None
    name: str | None = None
    roles: list[str] | None = None
    sid: str | None = None


class UserInfo(BaseModel):
    """OpenID Connect Core section 5.3: the standard claims the token's scope
    allows (`profile`: name, updated_at; `email`: email, email_verified)."""

    sub: str
    name: str | None = None
    updated_at: int | None = None
    email: str | None = None
    email_verified: bool | None = None


class RefreshIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    refresh_token: Annotated[str, StringConstraints(min_length=1, max_length=256)]


class PasswordForgotIn(BaseModel):
    """Asks for a reset email; any string is accepted as the email, and one
    that matches no account simply gets no email."""

    model_config = ConfigDict(extra="forbid")

    email: AccountEmail


class PasswordResetIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    password: Password


class ServerMetadata(BaseModel):
    """RFC 8414 authorization-server metadata, which is also what OpenID
    Connect Discovery reads. No authorization endpoint (there is no
    browser-redirect flow), so `response_types_supported` is empty and no ID
    tokens are issued; `access_token_signing_alg_values_supported` (an
    extension member) names the algorithms access tokens are signed with."""

    issuer: str
    token_endpoint: str
    jwks_uri: str
    revocation_endpoint: str
    introspection_endpoint: str
    userinfo_endpoint: str
    service_documentation: str
    grant_types_supported: list[str]
    response_types_supported: list[str]
    scopes_supported: list[str]
    claims_supported: list[str]
    subject_types_supported: list[str]
    token_endpoint_auth_methods_supported: list[str]
    revocation_endpoint_auth_methods_supported: list[str]
    introspection_endpoint_auth_methods_supported: list[str]
    access_token_signing_alg_values_supported: list[str]


class EmailVerifyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: Annotated[str, StringConstraints(min_length=1, max_length=256)]


class EmailResendIn(BaseModel):
    """Asks for another verification email; like a reset request, any string is
    accepted as the email, and one that matches no unverified account gets none."""

    model_config = ConfigDict(extra="forbid")

    email: AccountEmail
