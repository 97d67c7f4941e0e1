"""Authlib's OAuth 2.0 client on httpx, imported without its notice that it
would rather run on the httpx2 fork: it works on httpx, and Authlib makes its
own deprecation warnings always shown, past pytest's filters."""

from __future__ import annotations

import warnings

from authlib.deprecate import AuthlibDeprecationWarning

with warnings.catch_warnings():
    warnings.simplefilter("ignore", AuthlibDeprecationWarning)
    from authlib.integrations.httpx_client import AsyncOAuth2Client, OAuthError

__all__ = ["AsyncOAuth2Client", "OAuthError"]
