"""Verifiers bound a token's lifetime, and read whether it vouches for the email."""

from __future__ import annotations

import time

import pytest

from kit.errors import Unauthenticated
from kit.security import TokenVerifier
from kit.settings import ServiceSettings
from kit_testing import TokenMinter

MAX_LIFETIME = 3600


@pytest.fixture
def minter() -> TokenMinter:
    return TokenMinter()


@pytest.fixture
def verifier(minter: TokenMinter) -> TokenVerifier:
    settings = ServiceSettings(_env_file=None)
    assert settings.jwt_max_lifetime_seconds == MAX_LIFETIME
    return TokenVerifier.for_service(settings, redis=None, keys=minter.key_source)


async def test_a_token_within_the_maximum_lifetime_is_accepted(
    minter: TokenMinter, verifier: TokenVerifier
) -> None:
    principal = await verifier.verify(minter.token(lifetime=MAX_LIFETIME))

    assert principal.expires_at - principal.issued_at == MAX_LIFETIME


async def test_a_token_claiming_a_longer_lifetime_is_refused(
    minter: TokenMinter, verifier: TokenVerifier
) -> None:
    with pytest.raises(Unauthenticated, match="lifetime exceeds the maximum"):
        await verifier.verify(minter.token(lifetime=MAX_LIFETIME + 1))


async def test_a_long_token_backdated_to_look_short_lived_is_refused(
    minter: TokenMinter, verifier: TokenVerifier
) -> None:
    now = int(time.time())
    token = minter.token(iat=now - 10 * 24 * 3600, exp=now + 600)

    with pytest.raises(Unauthenticated, match="lifetime exceeds the maximum"):
        await verifier.verify(token)


async def test_a_token_issued_in_the_future_is_refused(
    minter: TokenMinter, verifier: TokenVerifier
) -> None:
    later = int(time.time()) + 3600
    token = minter.token(iat=later, exp=later + 900)

    with pytest.raises(Unauthenticated, match="issued in the future"):
        await verifier.verify(token)


async def test_the_principal_says_whether_the_email_is_verified(
    minter: TokenMinter, verifier: TokenVerifier
) -> None:
    assert (await verifier.verify(minter.token(email_verified=True))).email_verified
    assert not (await verifier.verify(minter.token(email_verified=False))).email_verified
    # only a literal true counts
    assert not (await verifier.verify(minter.token(email_verified="yes"))).email_verified
    assert not (await verifier.verify(minter.token())).email_verified
