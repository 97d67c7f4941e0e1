"""ETags from the version column, and the `If-Match` / `If-None-Match` comparisons."""

from __future__ import annotations

ANY = "*"
VERSION_MAX = 2**31 - 1


def etag_for(version: int) -> str:
    """A strong ETag: one version has exactly one representation."""
    return f'"{version}"'


def _entity_tags(header: str) -> list[str]:
    return [part.strip() for part in header.split(",") if part.strip()]


def none_match(header: str, etag: str) -> bool:
    """`If-None-Match` uses the weak comparison: `W/"3"` matches `"3"`."""
    tags = _entity_tags(header)
    return ANY in tags or etag in (tag.removeprefix("W/") for tag in tags)


def if_match_versions(header: str) -> frozenset[int] | None:
    """The versions an `If-Match` accepts; None for `*` (any current version).

    The strong comparison applies: weak or malformed tags match nothing, and
    so does a number no version reaches (the column is a 32-bit integer).
    """
    tags = _entity_tags(header)
    if ANY in tags:
        return None
    versions: set[int] = set()
    for tag in tags:
        inner = tag[1:-1] if len(tag) >= 2 and tag[0] == tag[-1] == '"' else ""
        # the length first: int() of thousands of digits is refused, and slow
        if inner.isdecimal() and inner.isascii() and len(inner) <= 10:
            version = int(inner)
            if version <= VERSION_MAX:
                versions.add(version)
    return frozenset(versions)
