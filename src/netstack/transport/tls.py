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


def _no_password() -> bytes:
    return b""  # an encrypted key fails to load instead of prompting on the terminal


def _read(field: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(
            f"{field}: cannot read {path}: {exc.strerror or exc}", field=field
        ) from None


def frontend_context(
    certfile: str,
    keyfile: str,
    *,
    ca_certs: str | None = None,
    alpn: tuple[str, ...] = (),
) -> ssl.SSLContext:
    """A server context terminating TLS 1.2+ with the standard library's safe defaults.

    Args:
        certfile: PEM certificate chain.
        keyfile: PEM private key (not encrypted).
        ca_certs: when given, clients must present a certificate signed by one of these.
        alpn: protocols offered by ALPN, e.g. ``("http/1.1",)``.

    Raises:
        ConfigError: naming the setting and the file: missing or unreadable, not PEM, an
            encrypted key, or a key that does not match the certificate.
    """
    cert = _read("certfile", certfile)
    key = _read("keyfile", keyfile)
    if b"-----BEGIN CERTIFICATE-----" not in cert:
        raise ConfigError(f"certfile: {certfile} holds no PEM certificate", field="certfile")
    if b"PRIVATE KEY-----" not in key:
        raise ConfigError(f"keyfile: {keyfile} holds no PEM private key", field="keyfile")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(certfile, keyfile, password=_no_password)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            raise ConfigError(
                f"keyfile: {keyfile} does not match the certificate in {certfile}",
                field="keyfile",
            ) from None
        raise ConfigError(
            f"certfile/keyfile: cannot load {certfile} / {keyfile}: {exc}", field="certfile"
        ) from None
    except OSError as exc:  # pragma: no cover - both were just read
        raise ConfigError(f"certfile: cannot load {certfile}: {exc}", field="certfile") from None
    if ca_certs is not None:
        _read("ca_certs", ca_certs)
        try:
            ctx.load_verify_locations(ca_certs)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"ca_certs: {ca_certs} holds no usable PEM CA certificate: {exc}",
                field="ca_certs",
            ) from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx
