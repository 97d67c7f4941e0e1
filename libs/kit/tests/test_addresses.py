"""What a per-address limit counts: an IPv4 address, an IPv6 /64."""

from __future__ import annotations

import pytest

from kit.addresses import limit_key


@pytest.mark.parametrize(
    ("address", "counted"),
    [
        ("203.0.113.7", "203.0.113.7"),
        # every host of one subscriber's /64 is one client
        ("2001:db8:1:2:a:b:c:d", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::ffff", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("unknown", "unknown"),
        ("not:an:address", "not:an:address"),
    ],
)
def test_what_a_per_address_limit_counts(address: str, counted: str) -> None:
    assert limit_key(address) == counted
