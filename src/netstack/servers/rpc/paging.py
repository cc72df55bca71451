"""Opaque page tokens (AIP-158) for keyset paging over notes, newest first.

A token carries the last id of the previous page and a fingerprint of the query it was
issued for, base64url-encoded so clients treat it as opaque. A token replayed with another
query, or one that was tampered with, is rejected with a clear message
(INVALID_ARGUMENT), never silently reinterpreted.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Final

_VERSION: Final = "n1"


class BadPageToken(ValueError):
    """The page token is malformed or was issued for a different query."""


def _fingerprint(scope: str) -> str:
    return hashlib.sha256(scope.encode()).hexdigest()[:16]


def encode(last_id: int, scope: str) -> str:
    """The token for the page after the one that ended with ``last_id``.

    Args:
        last_id: id of the last note on the current page.
        scope: what the listing is over, e.g. ``"list"`` or ``"search:" + query``.
    """
    raw = f"{_VERSION}:{last_id}:{_fingerprint(scope)}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode(token: str, scope: str) -> int:
    """The id to continue below, from a token issued for the same ``scope``.

    Raises:
        BadPageToken: the token is not one of ours or belongs to another query.
    """
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        version, last_id, fingerprint = raw.split(":")
        before = int(last_id)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadPageToken("page_token is malformed: pass next_page_token unchanged") from None
    if version != _VERSION or before <= 0:
        raise BadPageToken("page_token is malformed: pass next_page_token unchanged")
    if fingerprint != _fingerprint(scope):
        raise BadPageToken("page_token was issued for a different query")
    return before
