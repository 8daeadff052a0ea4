"""Hostile peers at the transport layer, against the real hub and node processes on loopback.

Every peer is treated as possibly hostile, including a legitimate node. Each case is tried
with real clients: raw gRPC, the SDK (``ExchangeClient``, nodes only: the SDK does not talk
to the hub) and ``openssl s_client``. Certificates are forged with ``certs.pki`` under the
cluster's own intermediate CA (or a fresh, foreign root).

Two layers refuse:

* The TLS handshake (BoringSSL inside gRPC checks chain and validity): no client
  certificate, self-signed, another CA, expired, not yet valid, TLS older than 1.2. gRPC
  clients see ``UNAVAILABLE``. The server's gRPC core logs the BoringSSL reason in the
  server's log, which the tests read to prove the refusal happened for the right reason.
* The servers' own check after the handshake (``node/rpc/peer.py``): no Chapar SAN URI,
  wrong key usage, wrong identity for the service. These are ``UNAUTHENTICATED`` /
  ``PERMISSION_DENIED`` with an ErrorInfo reason.

What ``openssl s_client`` (OpenSSL 3.0) shows, observed by hand and asserted below: the gRPC
server never sends a TLS alert when it refuses; it simply closes the TCP connection. So no
"unknown ca" / "certificate expired" / "protocol version" text ever appears on the client.
The only alert in the transcript is ``>>> ... Alert ... fatal decode_error``, which OpenSSL
itself *sends* after reading the unexpected EOF ("unexpected eof while reading"). The
honest evidence is therefore:

* TLS 1.2: the server sends its ChangeCipherSpec + Finished only after it has accepted the
  client's certificate. ``-msg`` prints ``<<< TLS 1.2, Handshake [length 0010], Finished``
  for an accepted client (the positive control, exit code 0) and never for a refused one
  (exit code 1, "unexpected eof while reading"). With TLS 1.3 the client's handshake
  completes before the server has looked at the client certificate, and with stdin closed
  s_client may exit 0 before it sees the server hang up, so TLS 1.3 transcripts cannot tell
  the cases apart; the tests use ``-tls1_2``.
* ``-alpn h2`` is needed for the positive control: the gRPC server drops a connection that
  did not negotiate HTTP/2 right after the handshake.
* ``-cert`` sends only the first certificate of a file; the chain up to (not including) the
  root must be given with ``-cert_chain``, like the dev PKI's ``tls.crt`` files carry it.
* TLS 1.0/1.1: with ``-cipher DEFAULT@SECLEVEL=0`` OpenSSL does send a TLS 1.1 (1.0)
  ClientHello (``>>> TLS 1.1, Handshake [...], ClientHello``); the server answers nothing at
  all (no ``<<<`` record, not even a ServerHello or alert) and closes: the refusal is the
  server's. Its log says ``UNSUPPORTED_PROTOCOL``. gRPC clients cannot be forced below
  TLS 1.2 (no such option in grpcio), so this row is tried with openssl only.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import re
import shutil
import stat
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from certs.pki import (
    PrivateKey,
    generate_key,
    issue_certificate,
    load_certs,
    load_key,
    write_certs,
    write_key,
)
from client_sdk import Draft, ExchangeClient, SyncExchangeClient, pb
from client_sdk.credentials import Credentials
from client_sdk.errors import (
    FailedPrecondition,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    from_rpc_error,
)
from client_sdk.signing import ENVELOPE_PAYLOAD_TYPE, Signer
from client_sdk.trust import VerificationError
from node.cluster import Cluster, ServerProcess
from node.core.letters import build_header
from tests.conftest import AGENCY_A, AGENCY_B, AGENCY_C, client_credentials, db_count

pytestmark = pytest.mark.integration

TARGETS = ["hub", "node"]
OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")

# The BoringSSL reason the server's gRPC core logs for each handshake refusal (observed).
HANDSHAKE_REFUSALS = {
    "no-certificate": "PEER_DID_NOT_RETURN_A_CERTIFICATE",
    "self-signed": "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate",
    "other-ca": "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate",
    "expired": "CERTIFICATE_VERIFY_FAILED: certificate has expired",
    "not-yet-valid": "CERTIFICATE_VERIFY_FAILED: certificate is not yet valid",
}
SERVER_FINISHED = re.compile(r"<<< TLS 1\.2, Handshake \[length [0-9a-f]+\], Finished")


# -- material -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsMaterial:
    """A client key and certificate chain, as bytes for gRPC and as files for openssl."""

    key_pem: bytes
    chain_pem: bytes  # leaf first, then the CA certificates that travel with it
    key_file: Path
    leaf_file: Path
    extra_file: Path | None  # the CA certificates after the leaf (openssl -cert_chain)

    def grpc_credentials(self, cluster: Cluster) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=cluster.pki.root_cert.read_bytes(),
            private_key=self.key_pem,
            certificate_chain=self.chain_pem,
        )

    def sdk_credentials(self, cluster: Cluster) -> Credentials:
        return Credentials(
            root_certificates=cluster.pki.root_cert.read_bytes(),
            private_key=self.key_pem,
            certificate_chain=self.chain_pem,
        )

    def openssl_args(self) -> list[str]:
        args = ["-cert", str(self.leaf_file), "-key", str(self.key_file)]
        if self.extra_file is not None:
            args += ["-cert_chain", str(self.extra_file)]
        return args


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _material(
    directory: Path, name: str, key_file: Path, chain: list[x509.Certificate]
) -> TlsMaterial:
    leaf_file = directory / f"{name}.leaf.crt"
    write_certs(leaf_file, chain[:1])
    extra_file = None
    if len(chain) > 1:
        extra_file = directory / f"{name}.chain.crt"
        write_certs(extra_file, chain[1:])
    return TlsMaterial(
        key_pem=key_file.read_bytes(),
        chain_pem=b"".join(_pem(c) for c in chain),
        key_file=key_file,
        leaf_file=leaf_file,
        extra_file=extra_file,
    )


def _issued(
    directory: Path, name: str, issuer: tuple[x509.Certificate, PrivateKey], **kwargs: Any
) -> TlsMaterial:
    issuer_cert, issuer_key = issuer
    key = generate_key("ecdsa-p256")
    cert = issue_certificate(
        issuer_cert=issuer_cert,
        issuer_key=issuer_key,
        subject_key=key,
        **kwargs,
    )
    key_file = directory / f"{name}.key"
    write_key(key_file, key)
    return _material(directory, name, key_file, [cert, issuer_cert])


@pytest.fixture(scope="module")
def forged(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> dict[str, TlsMaterial]:
    """Client certificates for agency A's identity that must not get anyone in."""
    d = tmp_path_factory.mktemp("forged")
    uri = f"urn:chapar:agency:{AGENCY_A}"
    ours = (load_certs(cluster.pki.intermediate_cert)[0], load_key(cluster.pki.intermediate_key))
    now = dt.datetime.now(dt.UTC)
    out: dict[str, TlsMaterial] = {}

    # Self-signed: a perfect profile and identity, but nobody vouches for it.
    key = generate_key("ecdsa-p256")
    cert = issue_certificate(
        issuer_cert=None, issuer_key=key, subject_key=key, identity_uri=uri, kind="tls"
    )
    write_key(d / "self-signed.key", key)
    out["self-signed"] = _material(d, "self-signed", d / "self-signed.key", [cert])

    # Another CA: a whole root -> intermediate -> leaf chain the servers do not trust.
    other_root_key = generate_key("ecdsa-p256")
    other_root = issue_certificate(
        issuer_cert=None,
        issuer_key=other_root_key,
        subject_key=other_root_key,
        identity_uri=None,
        kind="root",
    )
    other_int_key = generate_key("ecdsa-p256")
    other_int = issue_certificate(
        issuer_cert=other_root,
        issuer_key=other_root_key,
        subject_key=other_int_key,
        identity_uri=None,
        kind="intermediate",
    )
    out["other-ca"] = _issued(
        d, "other-ca", (other_int, other_int_key), identity_uri=uri, kind="tls"
    )

    out["expired"] = _issued(
        d,
        "expired",
        ours,
        identity_uri=uri,
        kind="tls",
        not_before=now - dt.timedelta(days=2),
        not_after=now - dt.timedelta(days=1),
    )
    out["not-yet-valid"] = _issued(
        d,
        "not-yet-valid",
        ours,
        identity_uri=uri,
        kind="tls",
        not_before=now + dt.timedelta(days=1),
        not_after=now + dt.timedelta(days=30),
    )
    # Issued by our own CA with a perfect TLS profile, but no urn:chapar: SAN URI.
    out["no-identity"] = _issued(d, "no-identity", ours, identity_uri=None, kind="tls")
    # A signing-profile certificate (digitalSignature + contentCommitment, no EKU) for A,
    # exactly what `chapar pki` issues with --signing-algorithm ecdsa-p256.
    out["ecdsa-signing"] = _issued(d, "ecdsa-signing", ours, identity_uri=uri, kind="signing")
    return out


def _agency_material(cluster: Cluster, code: str, stem: str) -> TlsMaterial:
    """A dev-PKI credential of ``code`` (tls, client or signing) with its chain."""
    folder = cluster.pki.agency_dir(code)
    chain = load_certs(folder / f"{stem}.crt")
    if len(chain) == 1:  # signing.crt holds the leaf alone
        chain.append(load_certs(cluster.pki.intermediate_cert)[0])
    return TlsMaterial(
        key_pem=(folder / f"{stem}.key").read_bytes(),
        chain_pem=b"".join(_pem(c) for c in chain),
        key_file=folder / f"{stem}.key",
        leaf_file=folder / f"{stem}.crt",  # openssl -cert reads only the first certificate
        extra_file=cluster.pki.intermediate_cert,
    )


def _server(cluster: Cluster, target: str) -> ServerProcess:
    return cluster.hub if target == "hub" else cluster.nodes[AGENCY_A]


class KeyFragments:
    """The base64 lines of private key PEMs. Its repr hides them: pytest prints fixture
    values in a failure report, and this test file must not leak keys either."""

    def __init__(self, *directories: Path) -> None:
        self._lines: set[str] = set()
        for directory in directories:
            for key_file in directory.rglob("*.key"):
                for line in key_file.read_text().splitlines():
                    if line and not line.startswith("-----"):
                        self._lines.add(line)

    def __repr__(self) -> str:
        return f"<KeyFragments: {len(self._lines)} lines, redacted>"

    def found_in(self, text: str) -> int:
        return sum(1 for line in self._lines if line in text)


@pytest.fixture(scope="module")
def key_fragments(cluster: Cluster, forged: dict[str, TlsMaterial]) -> KeyFragments:
    return KeyFragments(cluster.pki.root, *{m.key_file.parent for m in forged.values()})


def assert_no_key_material(text: str, fragments: KeyFragments) -> None:
    pem_header = "PRIVATE KEY" in text  # not in the assert: pytest would print the text
    assert not pem_header, "a PEM private key header in the output (not shown)"
    leaked = fragments.found_in(text)
    assert leaked == 0, f"{leaked} lines of private key PEM in the output (not shown)"


# -- clients --------------------------------------------------------------------------------


async def _raw_call(address: str, creds: grpc.ChannelCredentials, target: str) -> None:
    async with grpc.aio.secure_channel(address, creds) as channel:
        if target == "hub":
            await pb.HubServiceStub(channel).GetDirectory(pb.GetDirectoryRequest(), timeout=10)
        else:
            await pb.NodeServiceStub(channel).ListAgencies(pb.ListAgenciesRequest(), timeout=10)


async def _raw_refusal(
    address: str, creds: grpc.ChannelCredentials, target: str
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _raw_call(address, creds, target)
    return err.value


def _no_cert_credentials(cluster: Cluster) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=cluster.pki.root_cert.read_bytes())


class LogWatch:
    """Lines a server appends to its log from now on (its gRPC core logs TLS failures)."""

    def __init__(self, server: ServerProcess) -> None:
        self.path = server.log_file
        self.start = self.path.stat().st_size

    def new_text(self) -> str:
        with self.path.open("rb") as f:
            f.seek(self.start)
            return f.read().decode(errors="replace")

    async def expect(self, text: str, timeout: float = 10.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while text not in self.new_text():
            assert asyncio.get_running_loop().time() < deadline, (
                f"{self.path.name} did not log {text!r} (is GRPC_VERBOSITY lowered?); "
                f"new lines:\n{self.new_text()[-2000:]}"
            )
            await asyncio.sleep(0.05)


@dataclass(frozen=True)
class OpensslResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def transcript(self) -> str:
        return f"exit {self.returncode}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


def _s_client(address: str, root_cert: Path, *args: str) -> OpensslResult:
    """``openssl s_client -msg`` with stdin closed: it handshakes, then says goodbye."""
    assert OPENSSL is not None
    host, _, port = address.rpartition(":")
    result = subprocess.run(
        [
            OPENSSL,
            "s_client",
            "-connect",
            f"{host}:{port}",
            "-CAfile",
            str(root_cert),
            "-servername",
            "localhost",
            "-alpn",
            "h2",
            "-msg",
            *args,
        ],
        input=b"",
        capture_output=True,
        timeout=30,
        check=False,
    )
    return OpensslResult(
        result.returncode,
        result.stdout.decode(errors="replace"),
        result.stderr.decode(errors="replace"),
    )


def assert_openssl_refused_by_server(result: OpensslResult) -> None:
    """The server accepted by openssl, then hung up before finishing the TLS 1.2 handshake."""
    # openssl itself verified the server: the failure is not on the client's side.
    assert "Verify return code: 0 (ok)" in result.stdout, result.transcript
    assert not SERVER_FINISHED.search(result.stdout), result.transcript
    assert "unexpected eof while reading" in result.stderr, result.transcript
    assert result.returncode != 0, result.transcript


# -- handshake-level refusals ---------------------------------------------------------------


async def test_valid_tls_certificate_is_accepted_by_hub_and_node(cluster: Cluster) -> None:
    """Positive control for the raw gRPC refusals: agency A's own node certificate works."""
    good = _agency_material(cluster, AGENCY_A, "tls")
    for target in TARGETS:
        await _raw_call(_server(cluster, target).address, good.grpc_credentials(cluster), target)


@pytest.mark.parametrize("case", list(HANDSHAKE_REFUSALS))
@pytest.mark.parametrize("target", TARGETS)
async def test_handshake_refuses_bad_client_certificate_over_raw_grpc(
    cluster: Cluster,
    forged: dict[str, TlsMaterial],
    key_fragments: KeyFragments,
    target: str,
    case: str,
) -> None:
    server = _server(cluster, target)
    watch = LogWatch(server)
    creds = (
        _no_cert_credentials(cluster)
        if case == "no-certificate"
        else forged[case].grpc_credentials(cluster)
    )
    error = await _raw_refusal(server.address, creds, target)
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    await watch.expect(HANDSHAKE_REFUSALS[case])
    assert_no_key_material(str(error.details()), key_fragments)


@pytest.mark.parametrize("case", list(HANDSHAKE_REFUSALS))
async def test_handshake_refuses_bad_client_certificate_from_sdk(
    cluster: Cluster, forged: dict[str, TlsMaterial], key_fragments: KeyFragments, case: str
) -> None:
    node = cluster.nodes[AGENCY_A]
    watch = LogWatch(node)
    if case in ("expired", "not-yet-valid"):
        # The SDK says so itself, not retryable: the node's refusal reaches a client only as
        # Unavailable, which a back-end retries for ever.
        with pytest.raises(FailedPrecondition) as early:
            ExchangeClient(node.address, forged[case].sdk_credentials(cluster), timeout=10)
        assert early.value.reason == "CLIENT_CERTIFICATE_NOT_VALID"
        assert not early.value.retryable
    if case in ("self-signed", "other-ca"):
        # Nor is a chain that does not lead to the root loaded: the SDK names the issuer
        # missing (the handshake would say only Unavailable).
        with pytest.raises(ValueError, match="does not chain to the root certificates"):
            forged[case].sdk_credentials(cluster)
    # No certificate (Credentials insists on one), or one the SDK will not dial with: the
    # node's own refusal, through a channel made without the SDK's checks.
    creds = (
        _no_cert_credentials(cluster)
        if case == "no-certificate"
        else forged[case].grpc_credentials(cluster)
    )
    async with grpc.aio.secure_channel(node.address, creds) as ch:
        client = ExchangeClient.from_channel(ch, timeout=10)
        with pytest.raises(Unavailable) as err:
            await client.agencies()
    await watch.expect(HANDSHAKE_REFUSALS[case])
    assert_no_key_material(str(err.value), key_fragments)


# Seconds a short-lived client certificate stays valid; the test below waits it out.
SHORT_LIFE_S = 3
# A call that could only fail must fail well within this (a retry loop would not).
REFUSED_WITHIN_S = 10.0


def _assert_not_valid(error: FailedPrecondition, expiry: dt.datetime) -> None:
    assert error.reason == "CLIENT_CERTIFICATE_NOT_VALID", error
    assert not error.retryable
    assert f"expired at {expiry:%Y-%m-%d %H:%M:%S} UTC" in error.message, error.message
    assert "chapar pki renew" in error.message, error.message


async def test_calls_after_the_client_certificate_expired_fail_as_not_valid_not_unavailable(
    cluster: Cluster,
) -> None:
    """A back-end whose certificate expires while it runs: once its connection is gone (idle
    here; a node restart or a network break does the same), the node refuses every new
    handshake, which gRPC reports as retryable ``Unavailable`` for ever. Every kind of call,
    async and blocking, raises ``FailedPrecondition`` (``CLIENT_CERTIFICATE_NOT_VALID``, not
    retryable, saying when it expired) instead, as the client's construction would."""
    node = cluster.nodes[AGENCY_A]
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    expiry = now + dt.timedelta(seconds=SHORT_LIFE_S)
    credentials = client_credentials(
        cluster, AGENCY_A, "short-lived", not_before=now - dt.timedelta(minutes=1), not_after=expiry
    )
    # The channel lets its connection go after a second without calls, so the calls after
    # the expiry make new handshakes.
    idle = [("grpc.client_idle_timeout_ms", 1000)]

    def draft(subject: str) -> Draft:
        return Draft(to=[AGENCY_B], subject=subject, body="x", request_id=str(uuid.uuid4()))

    async def send_stream() -> None:
        sent = draft("send_stream")
        with pytest.raises(FailedPrecondition) as err:
            async for _ in client.send_stream([sent]):
                pass
        assert err.value.unanswered == (sent,)
        raise err.value

    async def shared_stream() -> None:
        async with client.shared_stream() as shared:
            await shared.send(draft("shared_stream"))

    async def inbox() -> None:
        async with contextlib.aclosing(client.inbox()) as letters:
            await anext(letters)

    async with ExchangeClient(node.address, credentials, timeout=10, options=idle) as client:
        blocking = SyncExchangeClient(node.address, credentials, timeout=10, options=idle)
        try:
            await client.send(to=[AGENCY_B], subject="before expiry", body="x")
            await asyncio.to_thread(
                blocking.send, to=[AGENCY_B], subject="before expiry (blocking)", body="x"
            )
            await asyncio.sleep((expiry - dt.datetime.now(dt.UTC)).total_seconds() + 1.5)

            calls = {
                "send": lambda: client.send(to=[AGENCY_B], subject="after expiry", body="x"),
                "send_many": lambda: client.send_many([draft("a"), draft("b")]),
                "send_stream": send_stream,
                "shared_stream": shared_stream,
                "inbox": inbox,
                "agencies": client.agencies,
                "blocking send": lambda: asyncio.to_thread(
                    blocking.send, to=[AGENCY_B], subject="after expiry", body="x"
                ),
                "blocking inbox": lambda: asyncio.to_thread(lambda: next(iter(blocking.inbox()))),
            }
            for name, call in calls.items():
                with pytest.raises(FailedPrecondition) as err:
                    await asyncio.wait_for(call(), REFUSED_WITHIN_S)
                _assert_not_valid(err.value, expiry)
                assert err.value.__cause__ is not None, name  # the node's refusal, kept
        finally:
            await asyncio.to_thread(blocking.close)


@needs_openssl
@pytest.mark.parametrize("target", TARGETS)
def test_openssl_completes_tls12_handshake_with_valid_client_certificate(
    cluster: Cluster, target: str
) -> None:
    """Positive control: the server's Finished arrives and the session ends cleanly."""
    good = _agency_material(cluster, AGENCY_A, "tls")
    result = _s_client(
        _server(cluster, target).address, cluster.pki.root_cert, "-tls1_2", *good.openssl_args()
    )
    assert "Verify return code: 0 (ok)" in result.stdout, result.transcript
    assert SERVER_FINISHED.search(result.stdout), result.transcript
    assert "ALPN protocol: h2" in result.stdout, result.transcript
    assert result.returncode == 0, result.transcript


@needs_openssl
@pytest.mark.parametrize("case", list(HANDSHAKE_REFUSALS))
@pytest.mark.parametrize("target", TARGETS)
async def test_openssl_handshake_is_refused_for_bad_client_certificate(
    cluster: Cluster,
    forged: dict[str, TlsMaterial],
    key_fragments: KeyFragments,
    target: str,
    case: str,
) -> None:
    server = _server(cluster, target)
    watch = LogWatch(server)
    args = [] if case == "no-certificate" else forged[case].openssl_args()
    result = await asyncio.to_thread(
        _s_client, server.address, cluster.pki.root_cert, "-tls1_2", *args
    )
    assert_openssl_refused_by_server(result)
    await watch.expect(HANDSHAKE_REFUSALS[case])
    assert_no_key_material(result.transcript, key_fragments)


@needs_openssl
@pytest.mark.parametrize(
    ("version", "hello"), [("-tls1_1", "TLS 1.1"), ("-tls1", "TLS 1.0")], ids=["tls1.1", "tls1.0"]
)
@pytest.mark.parametrize("target", TARGETS)
async def test_tls_older_than_1_2_is_refused_by_the_server(
    cluster: Cluster, target: str, version: str, hello: str
) -> None:
    server = _server(cluster, target)
    watch = LogWatch(server)
    good = _agency_material(cluster, AGENCY_A, "tls")
    # SECLEVEL=0 lets OpenSSL 3 offer the old protocol at all, so a refusal is the server's.
    result = await asyncio.to_thread(
        _s_client,
        server.address,
        cluster.pki.root_cert,
        version,
        "-cipher",
        "DEFAULT@SECLEVEL=0",
        *good.openssl_args(),
    )
    assert re.search(
        rf">>> {re.escape(hello)}, Handshake \[length [0-9a-f]+\], ClientHello", result.stdout
    ), result.transcript
    # Not a single record came back: no ServerHello, and (gRPC) not even an alert.
    assert "<<<" not in result.stdout, result.transcript
    assert "unexpected eof while reading" in result.stderr, result.transcript
    assert result.returncode != 0, result.transcript
    await watch.expect("UNSUPPORTED_PROTOCOL")


# -- refused by the servers' own checks after the handshake ---------------------------------


@pytest.mark.parametrize("target", TARGETS)
async def test_ca_issued_certificate_without_chapar_uri_is_unauthenticated(
    cluster: Cluster, forged: dict[str, TlsMaterial], key_fragments: KeyFragments, target: str
) -> None:
    material = forged["no-identity"]
    error = await _raw_refusal(
        _server(cluster, target).address, material.grpc_credentials(cluster), target
    )
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
    assert from_rpc_error(error).reason == "CERTIFICATE_NO_IDENTITY"
    assert_no_key_material(str(error.details()), key_fragments)
    if target == "node":
        async with ExchangeClient(
            cluster.nodes[AGENCY_A].address, material.sdk_credentials(cluster), timeout=10
        ) as client:
            with pytest.raises(Unauthenticated) as err:
                await client.agencies()
        assert err.value.reason == "CERTIFICATE_NO_IDENTITY"


@pytest.mark.parametrize("target", TARGETS)
async def test_signing_certificate_presented_for_tls_is_refused_for_its_key_usage(
    cluster: Cluster, forged: dict[str, TlsMaterial], key_fragments: KeyFragments, target: str
) -> None:
    """An ECDSA signing certificate passes BoringSSL (no EKU means "any" in X.509) but not
    the servers' usage check: it lacks clientAuth and carries contentCommitment."""
    material = forged["ecdsa-signing"]
    error = await _raw_refusal(
        _server(cluster, target).address, material.grpc_credentials(cluster), target
    )
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
    assert from_rpc_error(error).reason == "CERTIFICATE_USAGE"
    assert_no_key_material(str(error.details()), key_fragments)
    if target == "node":
        async with ExchangeClient(
            cluster.nodes[AGENCY_A].address, material.sdk_credentials(cluster), timeout=10
        ) as client:
            with pytest.raises(Unauthenticated) as err:
                await client.agencies()
        assert err.value.reason == "CERTIFICATE_USAGE"


@pytest.mark.parametrize("target", TARGETS)
async def test_agency_ed25519_signing_key_cannot_even_complete_a_tls_handshake(
    cluster: Cluster, key_fragments: KeyFragments, target: str
) -> None:
    """The cluster's real signing certificates are Ed25519. The servers' CertificateRequest
    offers no Ed25519 signature algorithm, so the key cannot prove possession: gRPC's
    client gives up (NO_COMMON_SIGNATURE_ALGORITHMS) and openssl sends an empty
    Certificate, which the server refuses as "no certificate"."""
    material = _agency_material(cluster, AGENCY_A, "signing")
    assert isinstance(
        serialization.load_pem_private_key(material.key_pem, password=None),
        ed25519.Ed25519PrivateKey,
    ), "conftest's cluster is expected to use Ed25519 signing keys"
    server = _server(cluster, target)
    error = await _raw_refusal(server.address, material.grpc_credentials(cluster), target)
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    assert "NO_COMMON_SIGNATURE_ALGORITHMS" in str(error.details())
    assert_no_key_material(str(error.details()), key_fragments)
    if target == "node":
        async with ExchangeClient(
            server.address, material.sdk_credentials(cluster), timeout=10
        ) as client:
            with pytest.raises(Unavailable):
                await client.agencies()
    if OPENSSL is not None:
        watch = LogWatch(server)
        result = await asyncio.to_thread(
            _s_client, server.address, cluster.pki.root_cert, "-tls1_2", *material.openssl_args()
        )
        assert_openssl_refused_by_server(result)
        await watch.expect("PEER_DID_NOT_RETURN_A_CERTIFICATE")


@pytest.mark.parametrize("stem", ["client", "tls"])
async def test_agency_b_certificate_is_not_accepted_by_agency_a_node(
    cluster: Cluster, stem: str
) -> None:
    material = _agency_material(cluster, AGENCY_B, stem)
    error = await _raw_refusal(
        cluster.nodes[AGENCY_A].address, material.grpc_credentials(cluster), "node"
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error
    assert from_rpc_error(error).reason == "NOT_THIS_AGENCY"
    async with ExchangeClient(
        cluster.nodes[AGENCY_A].address, material.sdk_credentials(cluster), timeout=10
    ) as client:
        with pytest.raises(PermissionDenied) as err:
            await client.agencies()
    assert err.value.reason == "NOT_THIS_AGENCY"
    assert AGENCY_B in err.value.metadata.get("identity", "")


async def test_backend_client_certificate_cannot_connect_to_hub_as_a_node(
    cluster: Cluster,
) -> None:
    material = _agency_material(cluster, AGENCY_A, "client")
    async with grpc.aio.secure_channel(
        cluster.hub.address, material.grpc_credentials(cluster)
    ) as channel:
        call = pb.HubServiceStub(channel).Connect()
        # Only read: the hub refuses before reading any frame. Writing the hello first would
        # race the refusal, and when the write loses, grpcio's aio client replaces the hub's
        # status with INTERNAL "Internal error from Core" (grpc/grpc#36066, about 1 in 10
        # here): a client bug, not the hub's.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value
    info = from_rpc_error(err.value)
    assert info.reason == "NOT_AN_AGENCY_NODE"
    assert info.metadata.get("identity") == f"urn:chapar:client:{AGENCY_A}:backend"


# -- a TLS key used to sign a letter --------------------------------------------------------


def _letter_signed_with(signer: Signer, sender: str, to: str) -> pb.Envelope:
    body = b"signed with the wrong key"
    draft = pb.LetterDraft(
        recipients=[pb.Address(agency=to)],
        subject="usage",
        body=body,
        kind=pb.LetterKind.LETTER_KIND_LETTER,
        priority=pb.Priority.PRIORITY_NORMAL,
        content_type="text/plain; charset=utf-8",
    )
    shams = pb.Shams(
        origin=sender,
        domain=pb.ShamsDomain.SHAMS_DOMAIN_OUTGOING,
        year=2026,
        sequence=2_000_000 + uuid.uuid4().int % 1_000_000,
    )
    header = build_header(draft, sender=sender, shams=shams, now=dt.datetime.now(dt.UTC))
    return pb.Envelope(
        header=header, signature=signer.sign(ENVELOPE_PAYLOAD_TYPE, header), body=body
    )


async def test_letter_signed_with_a_tls_key_is_rejected_by_the_hub_and_not_stored(
    cluster: Cluster,
) -> None:
    c_dir = cluster.pki.agency_dir(AGENCY_C)
    tls_signer = Signer.from_files(c_dir / "tls.key", c_dir / "tls.crt")
    envelope = _letter_signed_with(tls_signer, AGENCY_C, AGENCY_B)
    hub_db = cluster.root / "hub" / "hub.db"
    letters = db_count(hub_db, "SELECT count(*) FROM letters")

    tls = _agency_material(cluster, AGENCY_C, "tls")  # connect as C's node, legitimately
    async with grpc.aio.secure_channel(cluster.hub.address, tls.grpc_credentials(cluster)) as ch:
        call = pb.HubServiceStub(ch).Connect()
        await call.write(pb.ConnectRequest(hello=pb.ConnectHello(software_version="test")))
        welcome = await call.read()
        assert welcome.WhichOneof("frame") == "welcome"
        await call.write(pb.ConnectRequest(envelopes=pb.EnvelopeBatch(envelopes=[envelope])))
        while True:
            frame = await asyncio.wait_for(call.read(), 20)
            assert frame is not grpc.aio.EOF, "stream ended without an answer"
            if frame.WhichOneof("frame") == "relay_results":
                break
        call.cancel()

    (evidence,) = frame.relay_results.evidence
    content = pb.EvidenceContent.FromString(evidence.content)
    assert content.event == pb.EvidenceEvent.EVIDENCE_EVENT_RELAY_REJECTION
    # The directory lists only signing certificates: a TLS certificate is no known signer.
    assert content.reason == "SIGNER_UNKNOWN"
    assert db_count(hub_db, "SELECT count(*) FROM letters") == letters


def test_trust_store_refuses_tls_certificate_for_signing_and_signing_certificate_for_tls(
    cluster: Cluster,
) -> None:
    trust = cluster.credentials(AGENCY_C).trust_store()
    folder = cluster.pki.agency_dir(AGENCY_C)
    tls_cert = load_certs(folder / "tls.crt")[0]
    signing_cert = load_certs(folder / "signing.crt")[0]
    # Positive controls: each certificate is fine for its own purpose.
    assert trust.verify_certificate(tls_cert, "tls").agency == AGENCY_C
    assert trust.verify_certificate(signing_cert, "signing").agency == AGENCY_C
    with pytest.raises(VerificationError) as err:
        trust.verify_certificate(tls_cert, "signing")
    assert err.value.reason == "CERTIFICATE_USAGE"
    with pytest.raises(VerificationError) as err:
        trust.verify_certificate(signing_cert, "tls")
    assert err.value.reason == "CERTIFICATE_USAGE"


# -- keys -----------------------------------------------------------------------------------


def test_dev_pki_private_keys_are_0600_and_rewriting_a_key_keeps_it_private(
    cluster: Cluster, tmp_path: Path
) -> None:
    keys = list(cluster.pki.root.rglob("*.key"))
    assert len(keys) >= 2 + 3 * 3  # CA keys, hub and agency keys at least
    for key_file in keys:
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600, key_file
    # An existing world-readable file is replaced, not written through.
    target = tmp_path / "tls.key"
    target.write_text("placeholder")
    target.chmod(0o644)
    write_key(target, generate_key("ecdsa-p256"))
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def _private_copy(cluster: Cluster, role: str, directory: Path) -> tuple[Path, dict[str, Path]]:
    """A config for ``role`` that reads copies of its keys and shares nothing with the
    running server: own database and ready file, ephemeral port, and (node) a hub address
    nobody listens on, so a node that wrongly started could not displace the real node A."""
    server = cluster.hub if role == "hub" else cluster.nodes[AGENCY_A]
    source = cluster.pki.hub_dir("national") if role == "hub" else cluster.pki.agency_dir(AGENCY_A)
    text = server.config.read_text()
    copies: dict[str, Path] = {}
    for stem in ("tls", "signing"):
        original = source / f"{stem}.key"
        copy = directory / f"{stem}.key"
        shutil.copyfile(original, copy)
        copy.chmod(0o600)
        copies[stem] = copy
        assert f'"{original}"' in text
        text = text.replace(f'"{original}"', f'"{copy}"')
    text = re.sub(r'(?m)^listen = ".*"$', 'listen = "127.0.0.1:0"', text)
    text = re.sub(r'(?m)^database = ".*"$', f'database = "{directory / "copy.db"}"', text)
    text = re.sub(r'(?m)^ready_file = ".*"$', f'ready_file = "{directory / "ready.json"}"', text)
    if role == "node":
        text = re.sub(r'(?m)^hub = ".*"$', 'hub = "127.0.0.1:9"', text)
    config = directory / f"{role}.toml"
    config.write_text(text)
    return config, copies


def _serve(role: str, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node", role, "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("role", "stem", "mode"),
    [
        ("node", "tls", 0o644),
        ("node", "tls", 0o640),
        ("node", "tls", 0o604),
        ("node", "signing", 0o644),
        ("hub", "tls", 0o644),
        ("hub", "signing", 0o644),
    ],
)
def test_server_refuses_to_start_with_a_key_readable_by_others(
    cluster: Cluster, key_fragments: KeyFragments, tmp_path: Path, role: str, stem: str, mode: int
) -> None:
    config, copies = _private_copy(cluster, role, tmp_path)
    copies[stem].chmod(mode)
    result = _serve(role, config)
    assert result.returncode == 2, result.stderr
    assert "error: configuration" in result.stderr
    assert f"{stem}.key" in result.stderr
    assert str(copies[stem]) in result.stderr
    assert "readable by others" in result.stderr
    assert not (tmp_path / "ready.json").exists()
    assert_no_key_material(result.stdout + result.stderr, key_fragments)


@pytest.mark.parametrize("role", ["node", "hub"])
def test_server_with_a_tls_key_that_does_not_match_its_certificate_names_the_key(
    cluster: Cluster, key_fragments: KeyFragments, tmp_path: Path, role: str
) -> None:
    """A private (0600) but wrong TLS key: the server must not start, must not print the
    key, and (node/config.py: "A bad file stops start-up with a ConfigError naming the key
    and what is wrong with it") must say that tls.key is the problem."""
    config, copies = _private_copy(cluster, role, tmp_path)
    wrong = cluster.pki.agency_dir(AGENCY_B) / "tls.key"  # a real key, not this server's
    copies["tls"].write_bytes(wrong.read_bytes())
    result = _serve(role, config)
    assert result.returncode == 2, result.stderr
    assert_no_key_material(result.stdout + result.stderr, key_fragments)
    assert not (tmp_path / "ready.json").exists()
    assert "tls.key" in result.stderr, result.stderr
    assert "cannot bind" not in result.stderr, result.stderr


@pytest.mark.parametrize(("role", "stem"), [("node", "tls"), ("node", "signing"), ("hub", "tls")])
def test_server_with_an_encrypted_key_names_the_file_as_encrypted(
    cluster: Cluster, key_fragments: KeyFragments, tmp_path: Path, role: str, stem: str
) -> None:
    """A key protected by a passphrase (0600, the right key): exit 2 with one line naming
    the key, its file and that it is encrypted, no traceback. It said only "not a readable
    unencrypted PEM private key", naming no file."""
    config, copies = _private_copy(cluster, role, tmp_path)
    key = serialization.load_pem_private_key(copies[stem].read_bytes(), password=None)
    copies[stem].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    result = _serve(role, config)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert f"{stem}.key: {copies[stem]} is encrypted" in result.stderr, result.stderr
    assert not (tmp_path / "ready.json").exists()
    assert_no_key_material(result.stdout + result.stderr, key_fragments)


@pytest.mark.parametrize("role", ["node", "hub"])
def test_server_with_its_tls_chain_in_the_wrong_order_names_the_order(
    cluster: Cluster, tmp_path: Path, role: str
) -> None:
    """tls.cert with the intermediate first and the server's certificate after it (two
    PEM files concatenated the other way round): the error must say the order is wrong.
    It said the file "speaks for nobody" (the intermediate carries no identity), sending
    the operator after the wrong certificate."""
    config, _ = _private_copy(cluster, role, tmp_path)
    server = cluster.hub if role == "hub" else cluster.nodes[AGENCY_A]
    source = cluster.pki.hub_dir("national") if role == "hub" else cluster.pki.agency_dir(AGENCY_A)
    leaf, intermediate = x509.load_pem_x509_certificates((source / "tls.crt").read_bytes())
    reversed_chain = tmp_path / "tls.crt"
    reversed_chain.write_bytes(_pem(intermediate) + _pem(leaf))
    text = config.read_text()
    assert f'"{source / "tls.crt"}"' in text, server.config
    config.write_text(text.replace(f'"{source / "tls.crt"}"', f'"{reversed_chain}"'))
    result = _serve(role, config)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert f"tls.cert: {reversed_chain}" in result.stderr, result.stderr
    assert "number 2 of 2" in result.stderr, result.stderr
    assert "leaf first" in result.stderr, result.stderr
    assert not (tmp_path / "ready.json").exists()


@pytest.mark.parametrize("role", ["node", "hub"])
def test_server_with_a_tls_chain_that_cannot_reach_its_ca_names_the_missing_issuer(
    cluster: Cluster, tmp_path: Path, role: str
) -> None:
    """tls.cert holding the server's certificate alone, without the intermediate that
    issued it (tls.ca holds the root only): start-up stops naming the file and the
    intermediate. The server started, and every client's and the hub's handshake with it
    failed (a node's dial to the hub too), seen only as UNAVAILABLE on the other side."""
    config, _ = _private_copy(cluster, role, tmp_path)
    source = cluster.pki.hub_dir("national") if role == "hub" else cluster.pki.agency_dir(AGENCY_A)
    leaf, intermediate = x509.load_pem_x509_certificates((source / "tls.crt").read_bytes())
    leaf_only = tmp_path / "tls.crt"
    leaf_only.write_bytes(_pem(leaf))
    text = config.read_text()
    config.write_text(text.replace(f'"{source / "tls.crt"}"', f'"{leaf_only}"'))
    result = _serve(role, config)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"tls.cert: {leaf_only} does not chain to tls.ca" in result.stderr, result.stderr
    assert intermediate.subject.rfc4514_string() in result.stderr, result.stderr
    assert not (tmp_path / "ready.json").exists()


def test_no_private_key_material_appears_in_any_server_log(
    cluster: Cluster, key_fragments: KeyFragments
) -> None:
    logs = [cluster.hub.log_file, *(n.log_file for n in cluster.nodes.values())]
    for log_file in logs:
        assert_no_key_material(log_file.read_text(errors="replace"), key_fragments)


# -- and after all that, the servers still serve --------------------------------------------


async def test_servers_still_serve_valid_clients_after_every_refusal(cluster: Cluster) -> None:
    assert cluster.hub.running
    assert all(n.running for n in cluster.nodes.values())
    good = _agency_material(cluster, AGENCY_A, "tls")
    await _raw_call(cluster.hub.address, good.grpc_credentials(cluster), "hub")
    async with ExchangeClient(cluster.nodes[AGENCY_A].address, cluster.credentials(AGENCY_A)) as a:
        receipt = await a.send(to=[AGENCY_B], subject="Still here?", body="after the attacks")
    assert receipt.shams.startswith(f"{AGENCY_A}/O/")
    assert receipt.content().event == pb.EvidenceEvent.EVIDENCE_EVENT_SUBMISSION_ACCEPTANCE
