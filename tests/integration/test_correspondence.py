"""The correspondence tree at the hub (``HubService.Track``) and through a node
(``NodeService.TrackCorrespondence``): real hub and node processes, real mTLS on loopback.

A sends letter X to B; B answers with REPLY Y and reports ACCEPTED about X (status update
U); B writes to C letter Z in reply to Y. Each party sees in full the letters it is a party
of and the others as numbers; an auditor sees all; an agency of none of them is refused;
a tampered answer does not verify; the tree outlives the hub's retention.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from cryptography import x509

from client_sdk import (
    Correspondence,
    Credentials,
    ExchangeClient,
    Letter,
    NotFound,
    pb,
)
from client_sdk.errors import from_rpc_error
from client_sdk.identity import identity_of_certificate
from client_sdk.shams import format_shams_checked, parse_shams
from client_sdk.trust import TrustStore, VerificationError
from node.cluster import Cluster
from tests.conftest import AGENCY_A, AGENCY_B, AGENCY_C, client_credentials, node_tls

pytestmark = pytest.mark.integration

A, B, C = AGENCY_A, AGENCY_B, AGENCY_C
D = "ORG-D"  # in the directory, no node: the tests speak as its node to the hub
_SETTINGS = """
[[clients]]
name = "registry"
mailboxes = ["registry"]
"""


@pytest.fixture(scope="module")
def tree_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("tree")
    started = asyncio.run(
        Cluster.start(root, [A, B, C, D], node_settings=_SETTINGS, without_node=[D])
    )
    try:
        yield started
    finally:
        codes = started.stop()
        assert all(code == 0 for code in codes.values()), codes


def _client(cluster: Cluster, code: str, credentials: Credentials | None = None) -> ExchangeClient:
    return ExchangeClient(cluster.nodes[code].address, credentials or cluster.credentials(code))


def _auditor_tls(cluster: Cluster) -> grpc.ChannelCredentials:
    d = cluster.pki.auditor_dir("auditor")
    return grpc.ssl_channel_credentials(
        root_certificates=cluster.pki.root_cert.read_bytes(),
        private_key=(d / "client.key").read_bytes(),
        certificate_chain=(d / "client.crt").read_bytes(),
    )


async def _hub_track(
    cluster: Cluster, credentials: grpc.ChannelCredentials, shams: str | pb.Shams
) -> pb.TrackResponse:
    number = parse_shams(shams) if isinstance(shams, str) else shams
    async with grpc.aio.secure_channel(cluster.hub.address, credentials) as channel:
        response: pb.TrackResponse = await pb.HubServiceStub(channel).Track(
            pb.TrackRequest(shams=number), timeout=10
        )
        return response


async def _refusal(
    cluster: Cluster, credentials: grpc.ChannelCredentials, shams: str | pb.Shams
) -> tuple[grpc.StatusCode, str, list[tuple[str, str]]]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _hub_track(cluster, credentials, shams)
    error = from_rpc_error(caught.value)
    return caught.value.code(), error.reason, error.field_violations


async def _next_letter(client: ExchangeClient, shams: str, timeout: float = 20.0) -> Letter:
    async def find() -> Letter:
        async for letter in client.inbox():
            if letter.shams == shams:
                return letter
        raise AssertionError("inbox stream ended")

    return await asyncio.wait_for(find(), timeout)


async def _grown(client: ExchangeClient, shams: str, letters: int) -> Correspondence:
    """The node's tree once the hub holds ``letters`` letters in it (NOT_FOUND until the
    node has relayed the letter)."""
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        shown: list[str] = []
        with contextlib.suppress(NotFound):
            with_all = await client.track_correspondence(shams)
            if len(with_all.letters) >= letters:
                return with_all
            shown = [t.shams for t in with_all.letters]
        assert asyncio.get_running_loop().time() < deadline, shown
        await asyncio.sleep(0.1)


@dataclass
class _Thread:
    x: str
    y: str
    update: str
    z: str


async def _thread(cluster: Cluster) -> _Thread:
    """X (A to B), Y (B's reply), U (B's ACCEPTED about X), Z (B to C, in reply to Y),
    each delivered and handed over."""
    async with _client(cluster, A) as a, _client(cluster, B) as b, _client(cluster, C) as c:
        x = await a.send(to=[B], subject="Budget 2026", body="Please confirm.")
        await (await _next_letter(b, x.shams)).ack()
        y = await b.send(to=[A], subject="Re: Budget", body="Confirmed.", kind="reply",
                         in_reply_to=x.shams)  # fmt: skip
        update = await b.send_status(x.shams, "accepted")
        for number in (y.shams, update.shams):
            await (await _next_letter(a, number)).ack()
        z = await b.send(to=[C], subject="For your records", body="See Y.", in_reply_to=y.shams)
        await (await _next_letter(c, z.shams)).ack()
        await _grown(a, x.shams, 4)
    deadline = asyncio.get_running_loop().time() + 20
    while True:  # every handover recorded at the hub (receipts trail their letters)
        tree = Correspondence.from_response(
            await _hub_track(cluster, _auditor_tls(cluster), x.shams)
        )
        if all(t.last_event == "HANDOVER" for t in tree.letters):
            break
        assert asyncio.get_running_loop().time() < deadline, [t.last_event for t in tree.letters]
        await asyncio.sleep(0.1)
    return _Thread(x.shams, y.shams, update.shams, z.shams)


def _shown(tree: Correspondence) -> dict[str, bool]:
    """Each letter's number: True if shown in full."""
    return {t.shams: not t.redacted for t in tree.letters}


async def test_each_party_sees_its_own_letters_of_the_tree_in_full_and_the_others_as_numbers(
    tree_cluster: Cluster,
) -> None:
    cluster = tree_cluster
    thread = await _thread(cluster)
    root_only = TrustStore.from_pem_files(cluster.pki.root_cert)
    async with _client(cluster, A) as a, _client(cluster, C) as c:
        at_a = await a.track_correspondence(thread.x)
        at_c = await c.track_correspondence(thread.z)
    assert _shown(at_a) == {thread.x: True, thread.y: True, thread.update: True, thread.z: False}
    assert at_a.shams == thread.x
    assert [t.shams for t in at_a.roots] == [thread.x]
    x = at_a.roots[0]
    assert [child.shams for child in x.children] == [thread.y, thread.update]
    assert [child.shams for child in x.children[0].children] == [thread.z]
    update = at_a.letter(thread.update)
    assert update is not None
    assert (update.kind, update.status, update.sender, update.recipients) == (
        "STATUS_UPDATE",
        "ACCEPTED",
        B,
        (A,),
    )
    assert x.last_event == "HANDOVER"
    assert all(t.envelope is not None and not t.envelope.body for t in at_a.letters[:3])
    redacted = at_a.letter(thread.z)
    assert redacted is not None
    assert (redacted.in_reply_to, redacted.sender, redacted.envelope, redacted.evidence) == (
        thread.y,
        None,
        None,
        [],
    )
    verified = at_a.verify(root_only)
    assert {v.event for v in verified} >= {"RELAY_ACCEPTANCE", "DELIVERY", "HANDOVER"}

    assert _shown(at_c) == {thread.z: True, thread.y: False, thread.x: False, thread.update: False}
    assert at_c.letters[0].shams == thread.z
    assert [t.shams for t in at_c.roots] == [thread.x]  # connected through the numbers
    at_c.verify(TrustStore.from_pem_files(cluster.pki.root_cert))


async def test_an_auditor_gets_the_whole_tree_from_the_hub_and_it_verifies_with_the_root_alone(
    tree_cluster: Cluster,
) -> None:
    cluster = tree_cluster
    thread = await _thread(cluster)
    response = await _hub_track(cluster, _auditor_tls(cluster), thread.z)
    tree = Correspondence.from_response(response)
    assert _shown(tree) == dict.fromkeys((thread.z, thread.y, thread.x, thread.update), True)
    assert not response.truncated
    verified = tree.verify(TrustStore.from_pem_files(cluster.pki.root_cert))
    issuers = {v.issuer for v in verified}
    assert "urn:chapar:hub:national" in issuers
    assert {f"urn:chapar:agency:{code}" for code in (A, B, C)} <= issuers

    # A header changed in the answer: its signature no longer holds.
    tampered = pb.TrackResponse()
    tampered.CopyFrom(response)
    envelope = tampered.letters[1].envelope
    header = pb.EnvelopeHeader.FromString(envelope.header)
    header.subject = "Something else"
    envelope.header = header.SerializeToString()
    with pytest.raises(VerificationError):
        Correspondence.from_response(tampered).verify(
            TrustStore.from_pem_files(cluster.pki.root_cert)
        )
    # The hub's account changed (a recipient added): it no longer matches what is signed.
    tampered.CopyFrom(response)
    tampered.letters[2].recipients.append(C)
    with pytest.raises(VerificationError) as caught:
        Correspondence.from_response(tampered).verify(
            TrustStore.from_pem_files(cluster.pki.root_cert)
        )
    assert caught.value.reason == "TRACK_MISMATCH"


async def test_no_party_no_letter_and_no_number_are_refused_as_such(
    tree_cluster: Cluster,
) -> None:
    cluster = tree_cluster
    async with _client(cluster, A) as a:
        x = await a.send(to=[B], subject="Between A and B", body="private")
        await _grown(a, x.shams, 1)
    assert (await _refusal(cluster, node_tls(cluster, D), x.shams))[:2] == (
        grpc.StatusCode.PERMISSION_DENIED,
        "NOT_A_PARTY",
    )
    # A party's node may ask the hub itself.
    assert (await _hub_track(cluster, node_tls(cluster, B), x.shams)).letters[0].sender == A
    unknown = parse_shams(x.shams)
    unknown.sequence += 1_000_000
    assert (await _refusal(cluster, _auditor_tls(cluster), unknown))[:2] == (
        grpc.StatusCode.NOT_FOUND,
        "LETTER_NOT_FOUND",
    )
    assert (await _refusal(cluster, node_tls(cluster, A), unknown))[:2] == (
        grpc.StatusCode.NOT_FOUND,
        "LETTER_NOT_FOUND",
    )
    # Another agency's number not taken tells D nothing it would not hear of a taken one.
    assert (await _refusal(cluster, node_tls(cluster, D), unknown))[:2] == (
        grpc.StatusCode.PERMISSION_DENIED,
        "NOT_A_PARTY",
    )
    code, reason, fields = await _refusal(
        cluster, _auditor_tls(cluster), pb.Shams(origin="x", year=1, sequence=0)
    )
    assert (code, reason, [f for f, _ in fields]) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_SHAMS",
        ["shams"],
    )
    async with _client(cluster, A) as a:
        with pytest.raises(NotFound) as not_held:
            await a.track_correspondence(unknown)
    assert not_held.value.reason == "LETTER_NOT_FOUND"


async def test_a_mailbox_limited_client_sees_only_its_mailboxes_letters_in_full(
    tree_cluster: Cluster,
) -> None:
    cluster = tree_cluster
    registry = client_credentials(cluster, A, "registry")
    async with (
        _client(cluster, A, registry) as clerk,
        _client(cluster, A) as a,
        _client(cluster, B) as b,
    ):
        x = await clerk.send(to=[B], subject="From the registry", body="x",
                             sender_mailbox="registry")  # fmt: skip
        await (await _next_letter(b, x.shams)).ack()
        y = await b.send(to=[(A, "legal")], subject="For legal", body="y", kind="reply",
                         in_reply_to=x.shams)  # fmt: skip
        whole = await _grown(a, x.shams, 2)
        limited = await clerk.track_correspondence(x.shams)
    assert _shown(whole) == {x.shams: True, y.shams: True}
    assert _shown(limited) == {x.shams: True, y.shams: False}
    limited.verify(TrustStore.from_pem_files(cluster.pki.root_cert))


def _signers(tree: Correspondence) -> set[str]:
    """The identities the answer's certificates name."""
    return {
        str(identity_of_certificate(x509.load_der_x509_certificate(der)))
        for der in tree.certificates
    }


async def test_a_mailbox_limited_client_gets_no_certificate_of_a_letter_redacted_for_it(
    tree_cluster: Cluster,
) -> None:
    cluster = tree_cluster
    registry = client_credentials(cluster, A, "registry")
    async with (
        _client(cluster, A, registry) as clerk,
        _client(cluster, A) as a,
        _client(cluster, B) as b,
        _client(cluster, C) as c,
    ):
        x = await clerk.send(to=[B], subject="From the registry", body="x",
                             sender_mailbox="registry")  # fmt: skip
        await (await _next_letter(b, x.shams)).ack()
        # The legal department writes to C about it: not the registry's business.
        w = await a.send(to=[C], subject="Legal to C", body="w", in_reply_to=x.shams,
                         sender_mailbox="legal")  # fmt: skip
        await (await _next_letter(c, w.shams)).ack()
        deadline = asyncio.get_running_loop().time() + 20
        while True:  # C's receipts about W recorded at the hub
            whole = await _grown(a, x.shams, 2)
            letter_w = whole.letter(w.shams)
            if letter_w is not None and letter_w.last_event == "HANDOVER":
                break
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.1)
        limited = await clerk.track_correspondence(x.shams)
    assert f"urn:chapar:agency:{C}" in _signers(whole)
    assert _shown(limited) == {x.shams: True, w.shams: False}
    assert f"urn:chapar:agency:{C}" not in _signers(limited)
    limited.verify(TrustStore.from_pem_files(cluster.pki.root_cert))


async def test_a_letter_in_reply_to_a_thread_of_others_tells_its_sender_nothing_of_it(
    tree_cluster: Cluster,
) -> None:
    cluster = tree_cluster
    async with _client(cluster, A) as a, _client(cluster, B) as b, _client(cluster, C) as c:
        secret = await b.send(to=[C], subject="B to C only", body="private")
        await (await _next_letter(c, secret.shams)).ack()
        answer = await c.send(to=[B], subject="Re", body="re", kind="reply",
                              in_reply_to=secret.shams)  # fmt: skip
        await (await _next_letter(b, answer.shams)).ack()
        free = parse_shams(secret.shams)
        free.sequence += 500
        # A, no party of B's letters, numbers letters in reply to a number of B's taken and
        # to one not taken: its trees are alike, its own letter alone.
        on_taken = await a.send(to=[B], subject="probe", body=".", in_reply_to=secret.shams)
        on_free = await a.send(to=[B], subject="probe", body=".", in_reply_to=free)
        taken = await _grown(a, on_taken.shams, 1)
        untaken = await _grown(a, on_free.shams, 1)
        # Nor does B's thread take in A's letter.
        at_b = await b.track_correspondence(secret.shams)
    assert [(t.shams, t.in_reply_to) for t in taken.letters] == [(on_taken.shams, secret.shams)]
    assert [t.shams for t in untaken.letters] == [on_free.shams]
    assert on_taken.shams not in _shown(at_b)
    assert _shown(at_b) == {secret.shams: True, answer.shams: True}
    taken.verify(TrustStore.from_pem_files(cluster.pki.root_cert))


async def test_chapar_track_tree_prints_the_tree_and_that_it_verified(
    tree_cluster: Cluster,
) -> None:
    cluster = tree_cluster
    thread = await _thread(cluster)
    proc = await asyncio.create_subprocess_exec(
        *_cli("track", thread.x, "--tree", "--node", cluster.nodes[A].address),
        *("--pki", str(cluster.pki.root), "--agency", A),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    x, y, z, update = map(format_shams_checked, (thread.x, thread.y, thread.z, thread.update))
    assert lines[0].startswith(f"{x}  LETTER  {A} -> {B}  HANDOVER  <- asked")
    assert lines[1].startswith(f"  {y}  REPLY  {B} -> {A}")
    assert lines[2] == f"    {z}  redacted"
    assert lines[3].startswith(f"  {update}  STATUS_UPDATE  ACCEPTED  {B} -> {A}")
    assert lines[-1] == "verified"
    proc = await asyncio.create_subprocess_exec(
        *_cli("track", thread.z, "--tree", "--json", "--node", cluster.nodes[C].address),
        *("--pki", str(cluster.pki.root), "--agency", C),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    report = json.loads(out)
    assert report["verified"] is True
    assert [(r["shams"], r["redacted"]) for r in report["letters"]] == [
        (thread.x, True),
        (thread.y, True),
        (thread.z, False),
        (thread.update, True),
    ]
    assert [r["shams_checked"] for r in report["letters"]] == [x, y, z, update]


def _cli(*args: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "node", *args]


@pytest.fixture(scope="module")
def short_retention(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("tree-retention")
    started = asyncio.run(
        Cluster.start(root, [A, B], hub_settings="retention_s = 1\npurge_interval_s = 0.5")
    )
    try:
        yield started
    finally:
        codes = started.stop()
        assert all(code == 0 for code in codes.values()), codes


async def test_the_tree_outlives_the_hubs_retention_links_and_evidence_kept(
    short_retention: Cluster,
) -> None:
    cluster = short_retention
    async with _client(cluster, A) as a, _client(cluster, B) as b:
        x = await a.send(to=[B], subject="Kept", body="x" * 1000)
        await (await _next_letter(b, x.shams)).ack()
        y = await b.send(to=[A], subject="Re: Kept", body="y", kind="reply", in_reply_to=x.shams)
        await (await _next_letter(a, y.shams)).ack()
        deadline = asyncio.get_running_loop().time() + 20
        while True:  # delivered, out of the queues, past retention: envelopes gone
            tree = await a.track_correspondence(y.shams)
            if len(tree.letters) == 2 and all(t.envelope is None for t in tree.letters):
                break
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.2)
    assert [(t.shams, t.in_reply_to, t.kind) for t in tree.letters] == [
        (y.shams, x.shams, "REPLY"),
        (x.shams, None, "LETTER"),
    ]
    assert all(t.evidence and not t.signed for t in tree.letters)
    verified = tree.verify(TrustStore.from_pem_files(cluster.pki.root_cert))
    assert {v.event for v in verified} >= {"RELAY_ACCEPTANCE", "DELIVERY"}
