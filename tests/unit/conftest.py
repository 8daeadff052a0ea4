"""Fixtures of the unit tests that need a node's servicer on a real store, without a server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from certs.pki import generate_key, issue_certificate
from client_sdk import pb
from client_sdk.identity import Identity
from client_sdk.signing import Signer
from client_sdk.trust import TrustStore
from node.agency import Agency
from node.config import NodeConfig, SigningConfig, TlsConfig
from node.core.directory import DirectoryView
from node.storage.node_store import NodeStore

SENDER = "000.00.00.G22"
RECIPIENT = "10861234567"


@pytest.fixture
async def agency(tmp_path: Path) -> AsyncIterator[Agency]:
    """SENDER's node servicer, no hub link, a directory of SENDER and RECIPIENT."""
    key = generate_key("ed25519")
    certificate = issue_certificate(
        issuer_cert=None,
        issuer_key=key,
        subject_key=key,
        identity_uri=Identity.for_agency(SENDER).uri,
        kind="signing",
    )
    unused = tmp_path / "unused"
    config = NodeConfig(
        agency=SENDER,
        listen="127.0.0.1:0",
        hub="127.0.0.1:1",
        database=tmp_path / "node.db",
        tls=TlsConfig(unused, unused, unused),
        signing=SigningConfig(unused, unused),
    )
    store = await NodeStore.open(config.database, durability="normal")
    node = Agency(config, store, Signer(key, certificate), TrustStore([certificate]))
    node.directory = DirectoryView(
        pb.Directory(
            version=1,
            agencies=[
                pb.Agency(code=code, display_name=code, state=pb.AGENCY_STATE_ACTIVE)
                for code in (SENDER, RECIPIENT)
            ],
        )
    )
    yield node
    await store.close()
