"""Shared fixtures: a real hub and agency nodes as processes on loopback, with real mTLS."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from certs.pki import generate_key, issue_certificate, load_certs, load_key
from client_sdk import Credentials
from node.cluster import Cluster

AGENCY_A = "000.00.00.G22"
AGENCY_B = "10861234567"
AGENCY_C = "MOFA.IR"  # in the directory with certificates, but no running node: tests act as it
# Options of a channel on which a test speaks to the hub as a node: it takes the hub's frames
# as a node does (up to 64 MiB): a push of letters queued for C by earlier tests (3 MiB ones,
# say) may be over gRPC's default 4 MiB, and may come before the answer the test waits for.
HUB_PEER_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cluster")
    started = asyncio.run(
        Cluster.start(root, [AGENCY_A, AGENCY_B, AGENCY_C], without_node=[AGENCY_C])
    )
    try:
        yield started
    finally:
        codes = started.stop()
        assert all(code == 0 for code in codes.values()), codes


def db_count(path: Path, sql: str, params: tuple[object, ...] = ()) -> int:
    """Counts rows in a server's SQLite database (read-only; WAL lets us read alongside)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(conn.execute(sql, params).fetchone()[0])
    finally:
        conn.close()


def run_module(module: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Runs ``python -m module args`` as a user would, capturing its text output."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_module_json(
    module: str, *args: str, out: Path, timeout: float = 120
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """``run_module`` with ``--json out``: asserts it succeeded, returns it and the report."""
    result = run_module(module, *args, "--json", str(out), timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    report: dict[str, Any] = json.loads(out.read_text())
    return result, report


def client_credentials(
    cluster: Cluster,
    agency: str,
    name: str,
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> Credentials:
    """A back-end client ``name`` of ``agency``, issued by the intermediate (chain: leaf + CA);
    a ``[[clients]]`` entry of that name limits it to its mailboxes. ``not_before`` and
    ``not_after`` set its validity (the PKI's defaults otherwise)."""
    intermediate = load_certs(cluster.pki.intermediate_cert)[0]
    key = generate_key("ecdsa-p256")
    cert = issue_certificate(
        issuer_cert=intermediate,
        issuer_key=load_key(cluster.pki.intermediate_key),
        subject_key=key,
        identity_uri=f"urn:chapar:client:{agency}:{name}",
        kind="client",
        not_before=not_before,
        not_after=not_after,
    )
    return Credentials(
        root_certificates=cluster.pki.root_cert.read_bytes(),
        private_key=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        certificate_chain=b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in (cert, intermediate)
        ),
    )


def node_tls(cluster: Cluster, code: str) -> grpc.ChannelCredentials:
    """The TLS identity of ``code``'s node, to talk to the hub as that node."""
    d = cluster.pki.agency_dir(code)
    return grpc.ssl_channel_credentials(
        root_certificates=cluster.pki.root_cert.read_bytes(),
        private_key=(d / "tls.key").read_bytes(),
        certificate_chain=(d / "tls.crt").read_bytes(),
    )
