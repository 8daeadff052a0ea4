"""The hub's signed word in its welcome (ConnectWelcome.attestation), as a node checks it
(node.rpc.hub_link.check_hub_attestation): only a hub's signing key, chained to the node's
roots and not revoked, for the node's own nonce and agency, and of the hub this node
accepts (the one its saved directory names, or node.hub_name before it holds one). TLS
alone admitted any server certificate of the exchange's CA, an agency node's too, and then
any hub certificate of the CA (a review's findings)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from certs.pki import PkiLayout, init_pki, issue_party, load_certs
from client_sdk import pb
from client_sdk.identity import Identity
from client_sdk.signing import HUB_ATTESTATION_PAYLOAD_TYPE, Signer
from client_sdk.trust import TrustStore, set_timestamp
from node import metrics, server
from node.agency import Agency
from node.cluster import Cluster
from node.config import load_hub_config
from node.hub import Hub, build_directory
from node.rpc.hub_link import HUB_CLOCK_WARN_S, HubLink, _NotTheHub, check_hub_attestation
from node.storage.hub_store import HubStore

A, B = "000.00.00.G22", "10861234567"
NONCE = b"n" * 32
NATIONAL = "urn:chapar:hub:national"
STAGING = "urn:chapar:hub:staging"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiLayout:
    layout = init_pki(tmp_path_factory.mktemp("attest") / "pki", hub="national", agencies=[A, B])
    # What `chapar pki issue --dir pki --hub staging` makes: a second hub identity from the
    # same CA (a staging or test hub, a hub renamed, an operator's slip).
    issue_party(layout.root, Identity.for_hub("staging"))
    return layout


def _trust(pki: PkiLayout) -> TrustStore:
    return TrustStore(load_certs(pki.root_cert), load_certs(pki.intermediate_cert))


def _signer(folder: Path) -> Signer:
    return Signer.from_files(folder / "signing.key", folder / "signing.crt")


def _welcome(
    signer: Signer, *, hub: str, agency: str, nonce: bytes, ahead_s: float = 0.0
) -> pb.ConnectWelcome:
    """A welcome signed by ``signer``, attested at its clock's now: ``ahead_s`` ahead of ours."""
    content = pb.HubAttestationContent(hub=hub, agency=agency, nonce=nonce)
    set_timestamp(content.attest_time, dt.datetime.now(dt.UTC) + dt.timedelta(seconds=ahead_s))
    raw = content.SerializeToString()
    welcome = pb.ConnectWelcome(hub=hub)
    welcome.attestation.CopyFrom(
        pb.HubAttestation(
            content=raw,
            signature=signer.sign(HUB_ATTESTATION_PAYLOAD_TYPE, raw),
            certificates=[signer.certificate.public_bytes(serialization.Encoding.DER)],
        )
    )
    return welcome


def test_the_hubs_attestation_for_this_node_and_nonce_is_taken(pki: PkiLayout) -> None:
    hub = _signer(pki.hub_dir("national"))
    trust = _trust(pki)
    welcome = _welcome(hub, hub="urn:chapar:hub:national", agency=A, nonce=NONCE)
    assert check_hub_attestation(trust, welcome, A, NONCE) == "urn:chapar:hub:national"
    assert trust.certificate(hub.key_id) is None  # its certificates never enter the store


@pytest.mark.parametrize(
    "case",
    ["none", "relayed-for-another-agency", "another-nonce", "an-agency-signs", "revoked",
     "malformed", "not-the-signed-content"],
)  # fmt: skip
def test_anything_else_is_not_the_hub(pki: PkiLayout, case: str) -> None:
    hub = _signer(pki.hub_dir("national"))
    trust = _trust(pki)
    uri = "urn:chapar:hub:national"
    welcome = _welcome(hub, hub=uri, agency=A, nonce=NONCE)
    if case == "none":
        welcome = pb.ConnectWelcome(hub=uri)
    elif case == "relayed-for-another-agency":
        # B's server dials the real hub as B and hands A the hub's welcome with A's nonce.
        welcome = _welcome(hub, hub=uri, agency=B, nonce=NONCE)
    elif case == "another-nonce":
        welcome = _welcome(hub, hub=uri, agency=A, nonce=b"o" * 32)
    elif case == "an-agency-signs":
        welcome = _welcome(_signer(pki.agency_dir(B)), hub=uri, agency=A, nonce=NONCE)
    elif case == "revoked":
        trust.set_revoked({hub.certificate.serial_number})
    elif case == "malformed":
        del welcome.attestation.certificates[:]
        welcome.attestation.certificates.append(b"not a certificate")
    else:
        welcome.attestation.content += b"\x10\x01"  # more than was signed
    with pytest.raises(_NotTheHub):
        check_hub_attestation(trust, welcome, A, NONCE)


def test_a_node_refuses_a_hub_other_than_the_one_its_directory_names(pki: PkiLayout) -> None:
    # A review's proof (F2): any urn:chapar:hub:* signing key of the CA was the hub. A
    # holder of a second hub certificate that answered the node's dial was attested, then
    # its directory (revocations, hub keys) applied and the node's letters sent to it.
    trust = _trust(pki)
    # The hub this node has always talked to (its held directory says hub = this URI).
    national = _signer(pki.hub_dir("national"))
    held = pb.Directory(version=1, hub=NATIONAL)
    trust.add_certificates([national.certificate])
    staging = _signer(pki.hub_dir("staging"))
    welcome = _welcome(staging, hub=STAGING, agency=A, nonce=NONCE)
    with pytest.raises(_NotTheHub, match=f"signed by {STAGING}, not by {NATIONAL}"):
        check_hub_attestation(trust, welcome, A, NONCE, held.hub)
    ours = _welcome(national, hub=NATIONAL, agency=A, nonce=NONCE)
    assert check_hub_attestation(trust, ours, A, NONCE, held.hub) == NATIONAL
    # A node that knows no hub yet (no directory, no node.hub_name) takes the first to
    # attest: trust on first use, as SECURITY.md says.
    assert check_hub_attestation(trust, welcome, A, NONCE, None) == STAGING


async def test_the_hub_accepted_is_the_saved_directorys_then_node_hub_name(agency: Agency) -> None:
    uri = "urn:chapar:hub:"
    assert agency.hub_identity is None  # no node.hub_name, no directory saved: the first
    pinned = Agency(
        dataclasses.replace(agency.config, hub_name="national"),
        agency.store,
        agency.signer,
        agency.trust,
    )
    assert pinned.hub_identity == NATIONAL
    for node in (agency, pinned):
        await node.set_directory(pb.Directory(version=2, hub=NATIONAL))  # saved: fetched
        assert node.hub_identity == NATIONAL
        # What an unattested server's directory would say is never saved, and counts not.
        await node.set_directory(pb.Directory(version=3, hub=STAGING), persist=False)
        assert node.hub_identity == NATIONAL
        # A name no hub can attest as would shut the node out for good: not taken.
        await node.set_directory(pb.Directory(version=4, hub=f"urn:chapar:agency:{A}"))
        assert node.hub_identity == NATIONAL
        # The hub accepted names another in a directory it publishes: a rename.
        await node.set_directory(pb.Directory(version=5, hub=f"{uri}national-2"))
        assert node.hub_identity == f"{uri}national-2"
    # At a start, the directory the node saved counts over node.hub_name (which is for a
    # node holding none): node.server.serve_node holds the hub of the one it loads.
    restarted = Agency(pinned.config, agency.store, agency.signer, agency.trust)
    saved = await agency.store.load_directory()
    assert saved is not None
    restarted.hold_hub_of(saved)
    assert restarted.hub_identity == f"{uri}national-2"


def _dialled(
    monkeypatch: pytest.MonkeyPatch, signer: Signer, hub: str, ahead_s: float = 0.0
) -> None:
    """The link's dial answered by a welcome of ``hub`` signed by ``signer``, whose clock is
    ``ahead_s`` ahead of ours."""

    class Call:
        hello: pb.ConnectRequest | None = None

        async def write(self, frame: pb.ConnectRequest) -> None:
            self.hello = frame

        async def read(self) -> pb.ConnectResponse:
            assert self.hello is not None
            welcome = _welcome(
                signer, hub=hub, agency=A, nonce=self.hello.hello.nonce, ahead_s=ahead_s
            )
            return pb.ConnectResponse(welcome=welcome)

        def cancel(self) -> None:
            pass

    class Channel:
        def stream_stream(self, *args: Any, **kwargs: Any) -> Any:
            return Call

    @asynccontextmanager
    async def secure_channel(*args: Any, **kwargs: Any) -> AsyncIterator[Channel]:
        yield Channel()

    monkeypatch.setattr(grpc.aio, "secure_channel", secure_channel)
    monkeypatch.setattr(pb, "HubServiceStub", lambda _: object())


async def test_the_hub_link_refuses_a_hub_the_node_does_not_accept_before_using_it(
    pki: PkiLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The staging hub answers the node's dial with a welcome it validly signed: the link
    # takes nothing from it, neither its directory nor its word on this agency.
    _dialled(monkeypatch, _signer(pki.hub_dir("staging")), STAGING)
    told: list[object] = []
    agency = SimpleNamespace(
        config=SimpleNamespace(hub="hub.example:443", keepalive_s=20.0, agency=A),
        numbers_unconfirmed=None,
        directory=None,
        trust=_trust(pki),
        hub_identity=NATIONAL,
        set_in_directory=told.append,
    )
    link = HubLink(agency, grpc.ssl_channel_credentials())  # type: ignore[arg-type]
    with pytest.raises(_NotTheHub, match=f"signed by {STAGING}, not by {NATIONAL}"):
        await link._session()
    assert (told, link.stub) == ([], None)


class _Welcomed(Exception):
    """Raised by the stand-in agency once the link has taken the hub's welcome."""


@pytest.mark.parametrize("ahead_s", [600.0, -600.0, 20.0, -20.0])
async def test_the_hubs_clock_as_its_welcome_says_is_exported_and_warned_of_when_far(
    pki: PkiLayout,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    ahead_s: float,
) -> None:
    # The hub refuses letters created more than its clock_skew_s (5 minutes) ahead of its
    # clock, and the restore margins assume clocks 5 minutes apart at most: how far the
    # hub's clock is from this node's is for its operator to see (a gauge; an alert rule in
    # ops/) and, beyond a minute, to be told in the log, once a stream.
    _dialled(monkeypatch, _signer(pki.hub_dir("national")), NATIONAL, ahead_s)

    def welcomed(_: bool) -> None:
        raise _Welcomed

    agency = SimpleNamespace(
        config=SimpleNamespace(hub="hub.example:443", keepalive_s=20.0, agency=A),
        numbers_unconfirmed=None,
        directory=None,
        trust=_trust(pki),
        hub_identity=NATIONAL,
        set_in_directory=welcomed,
    )
    link = HubLink(agency, grpc.ssl_channel_credentials())  # type: ignore[arg-type]
    metrics.HUB_CLOCK_OFFSET.set(0)
    with caplog.at_level(logging.WARNING, "chapar.link"), pytest.raises(_Welcomed):
        await link._session()
    assert metrics.HUB_CLOCK_OFFSET._value.get() == pytest.approx(ahead_s, abs=5.0)
    warned = [r.getMessage() for r in caplog.records if "clock" in r.getMessage()]
    if abs(ahead_s) < HUB_CLOCK_WARN_S:
        assert warned == []
    else:
        (line,) = warned
        side = "ahead of" if ahead_s > 0 else "behind"
        assert f"the hub's clock is 600 s {side} this node's" in line, line


async def test_a_hub_renamed_through_its_directory_is_followed_by_the_nodes_it_tells(
    agency: Agency, tmp_path: Path
) -> None:
    # The rename OPERATIONS.md describes: hub.name edited in the running hub's
    # configuration. The hub attests and signs as its old name until restarted, and its
    # next directory names the new one: a node that saves it (fetched over a stream the
    # old name attested) accepts only the new name from then on.
    cluster = Cluster.prepare(tmp_path / "cluster", [A, B])
    config = load_hub_config(cluster.hub.config)
    signer = server._signer(config.signing, config.identity)
    trust = server._trust(server._read_tls(config.tls, config.identity), config.signing)
    store = await HubStore.open(tmp_path / "hub.db", durability="normal")
    try:
        directory = build_directory(config, signer, trust.intermediates)
        hub = Hub(config, store, signer, trust, directory, cluster.hub.config)
        await agency.set_directory(hub.directory.message)
        assert agency.hub_identity == NATIONAL
        node_trust = TrustStore(load_certs(cluster.pki.root_cert))

        def welcome() -> pb.ConnectWelcome:
            return pb.ConnectWelcome(hub=hub.identity.uri, attestation=hub._attest(A, NONCE))

        assert check_hub_attestation(node_trust, welcome(), A, NONCE, agency.hub_identity)
        text = cluster.hub.config.read_text()
        assert text.count('name = "national"\n') == 1
        cluster.hub.config.write_text(text.replace('name = "national"\n', 'name = "renamed"\n'))
        hub._sources = ()  # as if the reload loop saw a new modification time
        await hub.reload_if_changed()
        assert (hub.directory.message.hub, hub.identity.uri) == ("urn:chapar:hub:renamed", NATIONAL)
        await agency.set_directory(hub.directory.message)
        assert agency.hub_identity == "urn:chapar:hub:renamed"
        with pytest.raises(_NotTheHub, match="not by urn:chapar:hub:renamed"):
            check_hub_attestation(node_trust, welcome(), A, NONCE, agency.hub_identity)
    finally:
        await store.close()
