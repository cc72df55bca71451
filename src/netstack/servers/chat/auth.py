"""Passwords (hashlib.scrypt, salted, constant-time compare) and session tokens.

A stored hash is ``scrypt$N$r$p$SALT$KEY`` (base64), so parameters can be raised later
without invalidating old hashes. Tokens are 256-bit random strings; only their SHA-256
is stored, so a leaked database does not leak live sessions.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from typing import Final

# RFC 7914 §2 and OWASP: N=2**14, r=8, p=1 costs 16 MiB and ~50 ms per hash.
SCRYPT_N: Final = 2**14
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
KEY_BYTES: Final = 32
SALT_BYTES: Final = 16


def hash_password(password: str, *, n: int = SCRYPT_N) -> str:
    """Return a salted scrypt hash of ``password`` in the self-describing format above."""
    salt = secrets.token_bytes(SALT_BYTES)
    key = hashlib.scrypt(password.encode(), salt=salt, n=n, r=SCRYPT_R, p=SCRYPT_P, dklen=KEY_BYTES)
    b64 = base64.b64encode
    return f"scrypt${n}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(key).decode()}"


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches ``stored``; the key comparison is constant-time."""
    try:
        scheme, n, r, p, salt, key = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(key)
        actual = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(expected),
            maxmem=128 * 1024 * 1024,
        )
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected)


# Verified against when the nick does not exist, so a wrong nick costs as long as a wrong
# password and timing does not reveal which nicks are registered.
DUMMY_HASH: Final = (
    "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
)


def new_token() -> str:
    """A fresh session token (43 URL-safe characters)."""
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """What the store keeps for a token."""
    return hashlib.sha256(token.encode()).hexdigest()
