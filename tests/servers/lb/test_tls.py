"""TLS termination on balancer frontends (http and tcp), with trustme certificates."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl

import pytest
import trustme
from cryptography import x509

from netstack.config import BalancerLimits, FrontendConfig, FrontendTLS
from netstack.errors import ConfigError
from netstack.servers.lb import Balancer, load_config
from tests.helpers import TIMEOUT, apoll_until
from tests.servers.lb.http_support import http_config
from tests.servers.lb.support import TCPBackend, lb_config, reply_line
from tests.servers.lb.test_http import echo_app, fields
from tests.servers.wsgi.support import port_of, serve


def with_tls(cfg, **tls):
    fe = dataclasses.replace(cfg.frontends[0], tls=FrontendTLS(**tls))
    return dataclasses.replace(cfg, frontends=(fe,))


def client_context(cafile: str, *, alpn: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cafile)
    if alpn:
        ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx


async def https_get(port: int, ctx: ssl.SSLContext, target: str = "/") -> tuple[bytes, object]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    try:
        writer.write(
            f"GET {target} HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n".encode()
        )
        async with asyncio.timeout(TIMEOUT):
            out = await reader.read()
            while chunk := await reader.read(65536):
                out += chunk
        return out, writer.get_extra_info("ssl_object")
    finally:
        writer.close()


async def refused(port: int, ctx: ssl.SSLContext) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    try:
        writer.write(b"x\n")
        async with asyncio.timeout(TIMEOUT):
            await reader.readexactly(1)  # TLS 1.3: the refusal comes after the handshake
    finally:
        writer.close()


def serial(ssl_object) -> int:
    der = ssl_object.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


def pem_serial(cert: trustme.LeafCert) -> int:
    return x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes()).serial_number


async def test_https_frontend_to_a_plaintext_backend(tls_certs) -> None:
    async with serve(echo_app) as backend:
        cfg = with_tls(
            http_config(port_of(backend)), certfile=tls_certs.certfile, keyfile=tls_certs.keyfile
        )
        async with Balancer(cfg) as lb:
            port = lb.address()[1]
            out, sslobj = await https_get(port, client_context(tls_certs.cafile, alpn=True), "/x")
            assert sslobj.selected_alpn_protocol() == "http/1.1"  # type: ignore[attr-defined]
            assert sslobj.version() in ("TLSv1.2", "TLSv1.3")  # type: ignore[attr-defined]
            head, _, body = out.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ")
            got = fields(body)
            assert got["path"] == "/x"
            assert got["xfp"] == "https"  # what the backend saw
            assert "proto=https" in got["fwd"]
            assert "tls_handshakes_total 1\n" in lb.metrics()
        # The same config without TLS says http.
        async with Balancer(http_config(port_of(backend))) as lb:
            reader, writer = await asyncio.open_connection("127.0.0.1", lb.address()[1])
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            async with asyncio.timeout(TIMEOUT):
                assert fields((await reader.read()).partition(b"\r\n\r\n")[2])["xfp"] == "http"
            writer.close()


async def test_tcp_mode_terminates_tls_and_relays_bytes(tls_certs, caplog) -> None:
    with TCPBackend(reply_line, "b1") as backend:
        cfg = with_tls(
            lb_config(backend.port), certfile=tls_certs.certfile, keyfile=tls_certs.keyfile
        )
        async with Balancer(cfg) as lb:
            ctx = client_context(tls_certs.cafile)
            for i in range(3):
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", lb.address()[1], ssl=ctx
                )
                writer.write(b"hello %d\n" % i)
                async with asyncio.timeout(TIMEOUT):
                    assert await reader.read() == b"b1 hello %d\n" % i  # plaintext at the backend
                writer.close()
            assert backend.served == 3
    # The backend's EOF closes the TLS client (no half-close over TLS), without an error.
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_plaintext_garbage_and_slow_handshakes_are_closed_others_served(tls_certs) -> None:
    with TCPBackend(reply_line, "b1") as backend:
        cfg = with_tls(
            lb_config(backend.port),
            certfile=tls_certs.certfile,
            keyfile=tls_certs.keyfile,
            tls_handshake_timeout=0.3,
        )
        async with Balancer(cfg) as lb:
            port = lb.address()[1]
            silent = await asyncio.open_connection("127.0.0.1", port)  # never says hello
            plain_r, plain_w = await asyncio.open_connection("127.0.0.1", port)
            plain_w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(TIMEOUT):
                with contextlib.suppress(ConnectionResetError):
                    assert await plain_r.read() == b""  # closed, nothing sent back
            # A good client is served while the silent one still waits.
            ctx = client_context(tls_certs.cafile)
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
            writer.write(b"ok\n")
            async with asyncio.timeout(TIMEOUT):
                assert await reader.read() == b"b1 ok\n"
            writer.close()
            loop = asyncio.get_running_loop()
            start = loop.time()
            async with asyncio.timeout(TIMEOUT):
                with contextlib.suppress(ConnectionResetError):
                    assert await silent[0].read() == b""
            assert loop.time() - start < 2.0  # the handshake timeout, not TIMEOUT
            silent[1].close()
            plain_w.close()
            await apoll_until(lambda: lb.stats.tls_handshake_failures == 2)
            assert lb.stats.tls_handshakes == 1
            assert "netstack_lb_tls_handshake_failures_total 2\n" in lb.metrics()
            assert backend.served == 1


async def test_client_certificates_when_ca_certs_is_set(tls_certs, tmp_path) -> None:
    client = tls_certs.ca.issue_cert("client@example.test")
    cert = tmp_path / "client.pem"
    client.private_key_and_cert_chain_pem.write_to_path(str(cert))
    with TCPBackend(reply_line, "b1") as backend:
        cfg = with_tls(
            lb_config(backend.port),
            certfile=tls_certs.certfile,
            keyfile=tls_certs.keyfile,
            ca_certs=tls_certs.cafile,
        )
        async with Balancer(cfg) as lb:
            port = lb.address()[1]
            anonymous = client_context(tls_certs.cafile)
            with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
                await refused(port, anonymous)
            ctx = client_context(tls_certs.cafile)
            ctx.load_cert_chain(str(cert))
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
            writer.write(b"me\n")
            async with asyncio.timeout(TIMEOUT):
                assert await reader.read() == b"b1 me\n"
            writer.close()
            assert backend.served == 1


def test_bad_certificate_files_are_config_errors_naming_the_file(tls_certs, tmp_path) -> None:
    other = trustme.CA().issue_cert("127.0.0.1")
    wrong_key = tmp_path / "wrong.key"
    other.private_key_pem.write_to_path(str(wrong_key))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cases = [
        ({"certfile": str(tmp_path / "nope.pem")}, r"certfile: cannot read \S+/nope\.pem: No such"),
        ({"keyfile": str(wrong_key)}, r"keyfile: \S+/wrong\.key does not match the certificate"),
        ({"certfile": str(garbage)}, r"certfile: \S+/garbage\.pem holds no PEM certificate"),
        ({"keyfile": str(garbage)}, r"keyfile: \S+/garbage\.pem holds no PEM private key"),
    ]
    for tls, message in cases:
        files = {"certfile": tls_certs.certfile, "keyfile": tls_certs.keyfile, **tls}
        with pytest.raises(ConfigError, match=message) as info:
            Balancer(with_tls(lb_config(1), **files))
        assert str(info.value).startswith("frontend 'default': ")
    with pytest.raises(ConfigError, match="certfile and keyfile must be given together"):
        FrontendTLS(certfile=tls_certs.certfile)
    with pytest.raises(ConfigError, match="TLS is not available over UDP"):
        with_tls(lb_config(1, mode="udp"), certfile=tls_certs.certfile, keyfile=tls_certs.keyfile)


def test_tls_in_the_full_form_file(tls_certs) -> None:
    doc = {
        "frontends": {
            "web": {
                "listen": "127.0.0.1:0",
                "mode": "http",
                "pool": "p",
                "tls": {"certfile": tls_certs.certfile, "keyfile": tls_certs.keyfile},
            }
        },
        "pools": {"p": {"backends": ["127.0.0.1:9"]}},
    }
    cfg = load_config(doc, source="lb.toml")
    assert cfg.frontends[0].tls.certfile == tls_certs.certfile
    doc["frontends"]["web"]["tls"] = {"certfile": tls_certs.certfile, "keyfle": "x"}  # type: ignore[index]
    with pytest.raises(ConfigError, match=r"lb.toml: frontends.web.tls.keyfle: unknown key"):
        load_config(doc, source="lb.toml")
    with pytest.raises(ConfigError, match=r"--certfile: lb\.toml defines frontends and pools"):
        load_config(doc, source="lb.toml", flags={"certfile": tls_certs.certfile})


async def test_reload_swaps_the_certificate_for_new_connections_only(tls_certs, tmp_path) -> None:
    ca = tls_certs.ca
    first, second = ca.issue_cert("127.0.0.1"), ca.issue_cert("127.0.0.1")
    certfile, keyfile = tmp_path / "site.pem", tmp_path / "site.key"
    first.cert_chain_pems[0].write_to_path(str(certfile))
    first.private_key_pem.write_to_path(str(keyfile))
    async with serve(echo_app) as backend:
        cfg = with_tls(http_config(port_of(backend)), certfile=str(certfile), keyfile=str(keyfile))
        async with Balancer(cfg) as lb:
            port = lb.address()[1]
            ctx = client_context(tls_certs.cafile)
            old_r, old_w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
            assert serial(old_w.get_extra_info("ssl_object")) == pem_serial(first)
            # Renewed in place (same paths), then reloaded.
            second.cert_chain_pems[0].write_to_path(str(certfile))
            second.private_key_pem.write_to_path(str(keyfile))
            await lb.reload(cfg)
            _, sslobj = await https_get(port, ctx)
            assert serial(sslobj) == pem_serial(second)
            # The connection made before the reload keeps working, on the first certificate.
            old_w.write(b"GET /old HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            async with asyncio.timeout(TIMEOUT):
                out = await old_r.read()
            assert out.startswith(b"HTTP/1.1 200 ")
            assert fields(out.partition(b"\r\n\r\n")[2])["path"] == "/old"
            assert serial(old_w.get_extra_info("ssl_object")) == pem_serial(first)
            old_w.close()
            # A broken renewal is refused; the running certificate stays.
            keyfile.write_text("oops\n")
            with pytest.raises(ConfigError, match=r"site\.key"):
                await lb.reload(cfg)
            _, sslobj = await https_get(port, ctx)
            assert serial(sslobj) == pem_serial(second)


async def test_handshakes_in_progress_count_toward_max_connections(tls_certs) -> None:
    with TCPBackend(reply_line, "b1") as backend:
        cfg = with_tls(
            lb_config(backend.port, limits=BalancerLimits(max_connections=1)),
            certfile=tls_certs.certfile,
            keyfile=tls_certs.keyfile,
        )
        async with Balancer(cfg) as lb:
            port = lb.address()[1]
            context = next(iter(lb.listeners.values())).state.tls_context
            assert context is not None
            assert context.minimum_version is ssl.TLSVersion.TLSv1_2
            _, silent_w = await asyncio.open_connection("127.0.0.1", port)
            await apoll_until(lambda: len(lb.handshakes) == 1)
            second_r, second_w = await asyncio.open_connection("127.0.0.1", port)
            async with asyncio.timeout(TIMEOUT):
                with contextlib.suppress(ConnectionResetError):
                    assert await second_r.read() == b""  # refused at once
            assert lb.stats.refused == 1
            silent_w.close()
            second_w.close()
            # Once the silent one is gone, a real client gets in.
            await apoll_until(lambda: not lb.handshakes)
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_context(tls_certs.cafile)
            )
            writer.write(b"hi\n")
            async with asyncio.timeout(TIMEOUT):
                assert await reader.read() == b"b1 hi\n"
            writer.close()


def test_accept_proxy_with_tls_is_refused(tls_certs) -> None:
    with pytest.raises(ConfigError, match="accept_proxy: not available with TLS"):
        FrontendConfig(
            accept_proxy=True,
            tls=FrontendTLS(certfile=tls_certs.certfile, keyfile=tls_certs.keyfile),
        )


async def test_a_bug_after_the_handshake_closes_only_that_connection(
    tls_certs, caplog, monkeypatch
) -> None:
    from netstack.servers.lb.server import Listener

    real = Listener.make_protocol
    calls = []

    def flaky(self):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real(self)

    monkeypatch.setattr(Listener, "make_protocol", flaky)
    with TCPBackend(reply_line, "b1") as backend:
        cfg = with_tls(
            lb_config(backend.port), certfile=tls_certs.certfile, keyfile=tls_certs.keyfile
        )
        async with Balancer(cfg) as lb:
            ctx = client_context(tls_certs.cafile)
            for first in (True, False):
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", lb.address()[1], ssl=ctx
                )
                writer.write(b"two\n")
                async with asyncio.timeout(TIMEOUT):
                    if first:  # closed by the error
                        with contextlib.suppress(ConnectionResetError):
                            assert await reader.read() == b""
                    else:  # the next one is served
                        assert await reader.read() == b"b1 two\n"
                writer.close()
    assert "internal error; closing" in caplog.text
    assert "RuntimeError: boom" in caplog.text
