"""TLS contexts built from the ``TLS`` config group, with file errors named by field."""

from __future__ import annotations

import ssl

from netstack.config import TLS
from netstack.errors import ConfigError


def server_context(tls: TLS) -> ssl.SSLContext | None:
    """A server context for ``tls.certfile``/``tls.keyfile``, or ``None`` without them.

    Raises:
        ConfigError: a file is missing or is not a valid PEM certificate/key.
    """
    if tls.certfile is None or tls.keyfile is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(tls.certfile, tls.keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"certfile/keyfile: cannot load {tls.certfile} / {tls.keyfile}: {exc}",
            field="certfile",
        ) from exc
    return ctx


def client_context(tls: TLS) -> ssl.SSLContext | None:
    """A verifying client context when TLS is configured (``cafile`` or a client cert).

    Raises:
        ConfigError: ``cafile`` or the client certificate cannot be loaded.
    """
    if not tls.enabled:
        return None
    try:
        ctx = ssl.create_default_context(cafile=tls.cafile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cafile: cannot load {tls.cafile}: {exc}", field="cafile") from exc
    if tls.certfile is not None and tls.keyfile is not None:
        try:
            ctx.load_cert_chain(tls.certfile, tls.keyfile)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"certfile: cannot load {tls.certfile}: {exc}", field="certfile"
            ) from exc
    return ctx
