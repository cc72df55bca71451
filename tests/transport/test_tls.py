"""TLS contexts from the TLS config group; file problems are ConfigErrors naming the field."""

from __future__ import annotations

import ssl

import pytest

from netstack.config import TLS
from netstack.errors import ConfigError
from netstack.transport.tls import client_context, server_context


def test_no_tls_means_no_context():
    assert server_context(TLS()) is None
    assert client_context(TLS()) is None


def test_contexts_load(tls_certs):
    srv = server_context(TLS(certfile=tls_certs.certfile, keyfile=tls_certs.keyfile))
    assert isinstance(srv, ssl.SSLContext)
    cli = client_context(
        TLS(cafile=tls_certs.cafile, certfile=tls_certs.certfile, keyfile=tls_certs.keyfile)
    )
    assert isinstance(cli, ssl.SSLContext)
    assert cli.verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda d, c: server_context(TLS(certfile=d, keyfile=d)), "certfile"),
        (lambda d, c: client_context(TLS(cafile=d)), "cafile"),
        (lambda d, c: client_context(TLS(cafile=c.cafile, certfile=d, keyfile=d)), "certfile"),
    ],
)
def test_bad_files_name_the_field(tmp_path, tls_certs, make, field):
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(ConfigError) as info:
        make(missing, tls_certs)
    assert info.value.field == field
