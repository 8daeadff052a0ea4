"""``/metrics`` over mutual TLS asks whether a client certificate is revoked from the
metrics server's own threads: the answer must not need the event loop, which may be
stuck or, while the process shuts down, already closed. A scrape then got a 500 and
wsgiref's traceback on stderr."""

from __future__ import annotations

import asyncio
import urllib.error
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509

from certs.pki import generate_key, issue_certificate, write_certs, write_key
from client_sdk.trust import TrustStore
from node.config import TlsConfig
from node.metrics import serve_metrics
from node.server import _metrics_refusal
from node.status import client_context, fetch


def _pki(tmp_path: Path) -> tuple[TrustStore, TlsConfig, x509.Certificate]:
    """A root CA (the trust store's), the server's TLS files, and an operator's client
    certificate without a Chapar identity (``client.crt``/``client.key`` in tmp_path)."""
    root_key = generate_key("ecdsa-p256")
    root = issue_certificate(
        issuer_cert=None, issuer_key=root_key, subject_key=root_key, identity_uri=None,
        kind="root",
    )  # fmt: skip
    files: dict[str, Path] = {}
    for name, kind in (("server", "tls"), ("client", "client")):
        key = generate_key("ecdsa-p256")
        cert = issue_certificate(
            issuer_cert=root, issuer_key=root_key, subject_key=key, identity_uri=None, kind=kind
        )
        write_certs(tmp_path / f"{name}.crt", [cert])
        write_key(tmp_path / f"{name}.key", key)
        files[name] = tmp_path / f"{name}.crt"
    write_certs(tmp_path / "ca.crt", [root])
    tls = TlsConfig(tmp_path / "ca.crt", tmp_path / "server.crt", tmp_path / "server.key")
    client = x509.load_pem_x509_certificate(files["client"].read_bytes())
    return TrustStore([root]), tls, client


def test_metrics_refusal_answers_with_the_event_loop_closed(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    trust, tls, client = _pki(tmp_path)

    async def made() -> Callable[[bytes], str]:
        return _metrics_refusal(trust)

    loop = asyncio.new_event_loop()
    refusal = loop.run_until_complete(made())
    loop.close()  # as at shutdown, the metrics thread still serving
    server, _, url = serve_metrics("127.0.0.1:0", tls, refusal)
    try:
        context = client_context(tls.ca, tmp_path / "client.crt", tmp_path / "client.key")
        assert fetch(url, tls=context).value("chapar_ready") is not None
        # A revocation in force after the server started holds, without the loop too.
        trust.set_revoked({client.serial_number})
        with pytest.raises(urllib.error.HTTPError) as scraped:
            fetch(url, tls=context)
        assert scraped.value.code == 403
        assert scraped.value.read() == b"CERTIFICATE_REVOKED: client certificate refused\n"
        trust.set_revoked(set())
        assert fetch(url, tls=context).value("chapar_ready") is not None
    finally:
        server.shutdown()
        server.server_close()
    assert capfd.readouterr().err == ""
