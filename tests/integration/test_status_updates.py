"""Business status updates end to end: real hub and node processes, real mTLS on loopback.

A status update is a signed letter of kind STATUS_UPDATE about an earlier letter. Here B
reports on A's letter and A sees it in ``track``, verified offline down to a saved bundle;
A asks for a recall and B answers; each node refuses an update that does not fit its
letter and stores nothing; and agency C, which has no node (the tests act as its node on
the hub), sends a signed "update" about a letter between A and B: A's node delivers it as
a letter and never links it, and an auditor's verifier refuses it if it is slipped into a
bundle.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
import uuid
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from certs.pki import load_certs
from client_sdk import (
    ExchangeClient,
    InvalidArgument,
    Letter,
    NotFound,
    PermissionDenied,
    Tracking,
    pb,
)
from client_sdk.shams import format_shams, parse_shams
from client_sdk.signing import ENVELOPE_PAYLOAD_TYPE, Signer, sha256
from client_sdk.trust import TrustStore, VerificationError
from node.cluster import Cluster
from node.demo import EXPECTED_CHAIN, wait_for_chain
from tests.conftest import AGENCY_A, AGENCY_B, AGENCY_C, HUB_PEER_OPTIONS, db_count
from tests.conftest import node_tls as _tls

pytestmark = pytest.mark.integration

A, B, C = AGENCY_A, AGENCY_B, AGENCY_C


def _client(cluster: Cluster, code: str) -> ExchangeClient:
    return ExchangeClient(cluster.nodes[code].address, cluster.credentials(code))


def _node_db(cluster: Cluster, code: str) -> Path:
    return cluster.root / f"node-{code}" / "node.db"


async def _next_letter(client: ExchangeClient, shams: str, timeout: float = 20.0) -> Letter:
    async def find() -> Letter:
        async for letter in client.inbox():
            if letter.shams == shams:
                return letter
        raise AssertionError("inbox stream ended")

    return await asyncio.wait_for(find(), timeout)


async def _tracked(
    client: ExchangeClient, shams: str, updates: int, timeout: float = 20.0
) -> Tracking:
    """``track`` once the node holds ``updates`` status updates about the letter."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        tracking = await client.track(shams)
        if len(tracking.status_updates) >= updates:
            return tracking
        assert asyncio.get_running_loop().time() < deadline, tracking.status_updates
        await asyncio.sleep(0.1)


async def test_b_reports_accepted_then_completed_and_a_verifies_both_down_to_a_saved_bundle(
    cluster: Cluster,
) -> None:
    async with _client(cluster, A) as a, _client(cluster, B) as b:
        sent = await a.send(to=[B], subject="Budget 2026", body="Please confirm.")
        letter = await _next_letter(b, sent.shams)
        await letter.ack()
        accepted = await b.send_status(sent.shams, "accepted")
        completed = await b.send_status(sent.shams, "completed", note="Approved as proposed.")

        # Each update is a letter in A's inbox, and travels like one.
        for receipt, status in ((accepted, "ACCEPTED"), (completed, "COMPLETED")):
            update = await _next_letter(a, receipt.shams)
            assert (update.kind, update.status, update.in_reply_to) == (
                "STATUS_UPDATE",
                status,
                sent.shams,
            )
            assert update.recipients == (A,)  # addressed by B's node: the letter's sender
            await update.ack()
        chain = await wait_for_chain(b, completed.shams)
        events = [v.event for v in chain.verify(cluster.credentials(B).trust_store())]
        assert events[: len(EXPECTED_CHAIN)] == list(EXPECTED_CHAIN)

        tracking = await _tracked(a, sent.shams, 2)
        assert [(u.agency, u.status, u.shams) for u in tracking.status_updates] == [
            (B, "ACCEPTED", accepted.shams),
            (B, "COMPLETED", completed.shams),
        ]
        # Without its note, which the update's own track gives, checked against its digest.
        assert tracking.status_updates[1].note is None
        own = await a.track(completed.shams)
        own.verify(cluster.credentials(A).trust_store())
        assert own.envelope.body == b"Approved as proposed."
        assert tracking.business_statuses == {B: "COMPLETED"}
        tracking.verify(cluster.credentials(A).trust_store())
        # B's node keeps what B reported about the letter too.
        mine = await b.track(sent.shams)
        assert [(u.agency, u.status) for u in mine.status_updates] == [
            (B, "ACCEPTED"),
            (B, "COMPLETED"),
        ]
        mine.verify(cluster.credentials(B).trust_store())

        # An auditor's file of the letter carries the updates and checks with the root alone.
        bundle = (await a.evidence_bundle(sent.shams)).SerializeToString()
    saved = Tracking.from_bundle(bundle)
    assert [u.status for u in saved.status_updates] == ["ACCEPTED", "COMPLETED"]
    saved.verify(TrustStore.from_pem_files(cluster.pki.root_cert))


async def test_a_recall_request_reaches_the_recipient_linked_and_its_answer_comes_back(
    cluster: Cluster,
) -> None:
    async with _client(cluster, A) as a, _client(cluster, B) as b:
        sent = await a.send(to=[B], subject="Sent in error", body="x")
        await (await _next_letter(b, sent.shams)).ack()
        recall = await a.send_status(sent.shams, "recall-requested", note="Wrong draft.")
        request = await _next_letter(b, recall.shams)
        assert (request.sender, request.status) == (A, "RECALL_REQUESTED")
        await request.ack()
        at_b = await _tracked(b, sent.shams, 1)
        assert [(u.agency, u.status) for u in at_b.status_updates] == [(A, "RECALL_REQUESTED")]
        assert at_b.business_statuses == {}  # a received letter: no recipients' states
        at_b.verify(cluster.credentials(B).trust_store())

        agreed = await b.send_status(sent.shams, "15")
        await (await _next_letter(a, agreed.shams)).ack()
        at_a = await _tracked(a, sent.shams, 2)
        assert [(u.agency, u.status) for u in at_a.status_updates] == [
            (A, "RECALL_REQUESTED"),
            (B, "RECALL_AGREED"),
        ]
        assert at_a.business_statuses == {B: "RECALL_AGREED"}
        at_a.verify(cluster.credentials(A).trust_store())


async def test_on_a_letter_to_itself_an_agency_reports_as_a_recipient_and_recalls_as_sender(
    cluster: Cluster,
) -> None:
    # A letter from A to A and B is in both of A's boxes. Without ``to``, A's node used
    # to address every update as the letter's sender (to A and B), so A's own ACCEPTED,
    # a recipient's status, was refused as STATUS_WRONG_DIRECTION.
    async with _client(cluster, A) as a, _client(cluster, B) as b:
        sent = await a.send(to=[A, B], subject="To ourselves and B", body="x")
        await (await _next_letter(a, sent.shams)).ack()
        await (await _next_letter(b, sent.shams)).ack()
        accepted = await a.send_status(sent.shams, "accepted")
        recall = await a.send_status(sent.shams, "recall-requested")
        assert [r.agency for r in (await a.track(accepted.shams)).header.recipients] == [A]
        assert [r.agency for r in (await a.track(recall.shams)).header.recipients] == [A, B]
        for client, update in ((a, accepted), (a, recall), (b, recall)):
            await (await _next_letter(client, update.shams)).ack()
        tracking = await _tracked(a, sent.shams, 2)
        assert sorted(u.status for u in tracking.status_updates) == [
            "ACCEPTED",
            "RECALL_REQUESTED",
        ]
        assert tracking.business_statuses == {A: "ACCEPTED"}
        tracking.verify(cluster.credentials(A).trust_store())


def _stored(cluster: Cluster, code: str) -> tuple[int, int]:
    """Letters in a node's outbox and the highest SHAMS sequence it gave out."""
    db = _node_db(cluster, code)
    return (
        db_count(db, "SELECT count(*) FROM outbox"),
        db_count(db, "SELECT coalesce(max(last), 0) FROM shams_counter"),
    )


async def test_an_update_that_does_not_fit_its_letter_is_refused_and_nothing_is_stored(
    cluster: Cluster,
) -> None:
    async with _client(cluster, A) as a, _client(cluster, B) as b:
        sent = await a.send(to=[B], subject="For B", body="x")
        await (await _next_letter(b, sent.shams)).ack()
        unknown = f"{A}/O/{dt.datetime.now(dt.UTC).year}/9999999"
        cases = [
            (b, lambda: b.send(to=[A], subject="s", body="x", in_reply_to=sent.shams,
                               status="accepted"),
             InvalidArgument, "UNEXPECTED_STATUS"),
            (b, lambda: b.send(to=[A], subject="s", body="x", in_reply_to=sent.shams,
                               kind="status_update"),
             InvalidArgument, "MISSING_STATUS"),
            (b, lambda: b.send_status(unknown, "accepted"), NotFound, "IN_REPLY_TO_NOT_FOUND"),
            (b, lambda: b.send_status(sent.shams, "accepted", to=[C]), PermissionDenied,
             "NOT_A_PARTY"),
            (b, lambda: b.send_status(sent.shams, "accepted", to=[A, C]), PermissionDenied,
             "NOT_A_PARTY"),
            (a, lambda: a.send_status(sent.shams, "recall-requested", to=[C]), PermissionDenied,
             "NOT_A_PARTY"),
            (b, lambda: b.send_status(sent.shams, "recall-requested"), InvalidArgument,
             "STATUS_WRONG_DIRECTION"),
            (a, lambda: a.send_status(sent.shams, "completed"), InvalidArgument,
             "STATUS_WRONG_DIRECTION"),
        ]  # fmt: skip
        for client, submit, error, reason in cases:
            code = A if client is a else B
            before = _stored(cluster, code)
            with pytest.raises(error) as refused:
                await submit()
            assert refused.value.reason == reason
            assert _stored(cluster, code) == before, reason


async def test_no_status_is_reported_about_a_status_update_so_back_ends_cannot_loop(
    cluster: Cluster,
) -> None:
    # A back-end that reports a status on every letter of its inbox (the README's loop)
    # would otherwise answer the other side's updates, and it its, for ever.
    async with _client(cluster, A) as a, _client(cluster, B) as b:
        sent = await a.send(to=[B], subject="Loop?", body="x")
        await (await _next_letter(b, sent.shams)).ack()
        accepted = await b.send_status(sent.shams, "accepted")
        update = await _next_letter(a, accepted.shams)
        await update.ack()
        for client, status in ((a, "received"), (b, "recall-requested")):
            code = A if client is a else B
            before = _stored(cluster, code)
            with pytest.raises(InvalidArgument) as refused:
                await client.send_status(update.shams, status)
            assert refused.value.reason == "STATUS_ABOUT_STATUS_UPDATE"
            assert _stored(cluster, code) == before


def _update_from_c(
    cluster: Cluster,
    about: str,
    to: str,
    status: pb.BusinessStatus.ValueType = pb.BusinessStatus.BUSINESS_STATUS_COMPLETED,
) -> pb.Envelope:
    """A status update signed with C's own (valid, listed) key, about a letter C is no
    party of: what a hostile or broken node of C could send."""
    return _signed_by_c(cluster, None, to, about, status)


def _signed_by_c(
    cluster: Cluster,
    shams: str | None,
    to: str,
    about: str | None = None,
    status: pb.BusinessStatus.ValueType = pb.BusinessStatus.BUSINESS_STATUS_UNSPECIFIED,
) -> pb.Envelope:
    """A letter signed with C's key (numbered ``shams``, or a fresh number), a status
    update when it is ``about`` a letter."""
    d = cluster.pki.agency_dir(C)
    signer = Signer.from_files(d / "signing.key", d / "signing.crt")
    note = b"Completed, says a stranger." if about else b"A letter of C's."
    header = pb.EnvelopeHeader(
        shams=parse_shams(shams)
        if shams
        else pb.Shams(
            origin=C,
            domain=pb.ShamsDomain.SHAMS_DOMAIN_OUTGOING,
            year=dt.datetime.now(dt.UTC).year,
            sequence=1_000_000 + uuid.uuid4().int % 1_000_000,
        ),
        sender=pb.Address(agency=C),
        recipients=[pb.Address(agency=to)],
        subject=f"{pb.BusinessStatus.Name(status)}: {about}" if about else "A letter",
        kind=pb.LetterKind.LETTER_KIND_STATUS_UPDATE if about else pb.LetterKind.LETTER_KIND_LETTER,
        status=status,
        priority=pb.Priority.PRIORITY_NORMAL,
        content_type="text/plain; charset=utf-8",
        body_sha256=sha256(note),
        body_size=len(note),
    )
    if about:
        header.in_reply_to.CopyFrom(parse_shams(about))
    header.create_time.FromDatetime(dt.datetime.now(dt.UTC))
    data = header.SerializeToString(deterministic=True)
    return pb.Envelope(header=data, signature=signer.sign(ENVELOPE_PAYLOAD_TYPE, data), body=note)


async def _relay_as_c(cluster: Cluster, envelope: pb.Envelope) -> pb.EvidenceContent:
    """Sends one letter to the hub as C's node; returns the hub's (relay) answer."""
    async with grpc.aio.secure_channel(
        cluster.hub.address, _tls(cluster, C), options=HUB_PEER_OPTIONS
    ) as channel:
        call = pb.HubServiceStub(channel).Connect()
        await call.write(pb.ConnectRequest(hello=pb.ConnectHello(software_version="test")))
        welcome = await call.read()
        assert welcome.WhichOneof("frame") == "welcome"
        await call.write(pb.ConnectRequest(envelopes=pb.EnvelopeBatch(envelopes=[envelope])))
        while True:
            frame = await asyncio.wait_for(call.read(), 10)
            if frame is grpc.aio.EOF:
                raise AssertionError("stream ended without an answer")
            if frame.WhichOneof("frame") == "relay_results":
                call.cancel()
                (evidence,) = frame.relay_results.evidence
                return pb.EvidenceContent.FromString(evidence.content)


def _refusal(cluster: Cluster, code: str, shams: str) -> pb.EvidenceContent | None:
    """The DELIVERY_FAILURE node ``code`` issued for letter ``shams``, if any."""
    conn = sqlite3.connect(f"file:{_node_db(cluster, code)}?mode=ro", uri=True)
    try:
        row = conn.execute(
            "SELECT evidence FROM evidence WHERE shams = ? AND event = ?",
            (shams, pb.EvidenceEvent.EVIDENCE_EVENT_DELIVERY_FAILURE),
        ).fetchone()
    finally:
        conn.close()
    return (
        None
        if row is None
        else pb.EvidenceContent.FromString(pb.Evidence.FromString(row[0]).content)
    )


async def test_a_third_partys_update_about_a_held_letter_is_refused_and_never_delivered(
    cluster: Cluster,
) -> None:
    async with _client(cluster, A) as a, _client(cluster, B) as b:
        sent = await a.send(to=[B], subject="Between A and B", body="x")
        await (await _next_letter(b, sent.shams)).ack()
        genuine = await b.send_status(sent.shams, "accepted")  # the control: linked

        forged = _update_from_c(cluster, sent.shams, to=A)
        relayed = await _relay_as_c(cluster, forged)
        assert relayed.event == pb.EvidenceEvent.EVIDENCE_EVENT_RELAY_ACCEPTANCE, relayed.reason
        forged_shams = format_shams(pb.EnvelopeHeader.FromString(forged.header).shams)
        # A's node holds the letter and the update does not fit it: refused, as a letter
        # failing its checks, with the rule's reason; its back-end never sees it.
        deadline = asyncio.get_running_loop().time() + 20
        while (refusal := _refusal(cluster, A, forged_shams)) is None:
            assert asyncio.get_running_loop().time() < deadline, "no refusal"
            await asyncio.sleep(0.1)
        assert refusal.reason == "NOT_A_PARTY"
        assert refusal.envelope_sha256 == sha256(forged.header)
        assert C in refusal.detail
        hub_db = cluster.root / "hub" / "hub.db"
        query = "SELECT count(*) FROM evidence WHERE shams = ? AND event = ?"
        failure = (forged_shams, pb.EvidenceEvent.EVIDENCE_EVENT_DELIVERY_FAILURE)
        while db_count(hub_db, query, failure) == 0:  # signed with the frame: the hub takes it
            assert asyncio.get_running_loop().time() < deadline, "the hub has no refusal"
            await asyncio.sleep(0.1)
        assert (
            db_count(
                _node_db(cluster, A), "SELECT count(*) FROM inbox WHERE shams = ?", (forged_shams,)
            )
            == 0
        )
        # One about a letter A's node does not hold (a number still to come, say) fits no
        # letter A could hold when C is not its sender: refused too. Only a sender's own
        # recall may come before its letter: delivered, its sender shown, and linked to
        # the letter when that comes.
        year = dt.datetime.now(dt.UTC).year
        stray = _update_from_c(cluster, f"{B}/O/{year}/9999999", to=A)
        await _relay_as_c(cluster, stray)
        stray_shams = format_shams(pb.EnvelopeHeader.FromString(stray.header).shams)
        while (refusal := _refusal(cluster, A, stray_shams)) is None:
            assert asyncio.get_running_loop().time() < deadline, "no refusal of the stray"
            await asyncio.sleep(0.1)
        assert refusal.reason == "NOT_A_PARTY"
        unknown = f"{C}/O/{year}/9999999"
        recall = _update_from_c(
            cluster, unknown, A, pb.BusinessStatus.BUSINESS_STATUS_RECALL_REQUESTED
        )
        await _relay_as_c(cluster, recall)
        recall_shams = format_shams(pb.EnvelopeHeader.FromString(recall.header).shams)
        arrived = await _next_letter(a, recall_shams)
        assert (arrived.sender, arrived.status, arrived.in_reply_to) == (
            C,
            "RECALL_REQUESTED",
            unknown,
        )
        await arrived.ack()
        await (await _next_letter(a, genuine.shams)).ack()
        relayed = await _relay_as_c(cluster, _signed_by_c(cluster, unknown, A))
        assert relayed.event == pb.EvidenceEvent.EVIDENCE_EVENT_RELAY_ACCEPTANCE, relayed.reason
        await (await _next_letter(a, unknown)).ack()
        recalled = await _tracked(a, unknown, 1)
        assert [(u.agency, u.status) for u in recalled.status_updates] == [(C, "RECALL_REQUESTED")]
        recalled.verify(cluster.credentials(A).trust_store())

        tracking = await _tracked(a, sent.shams, 1)
        assert [(u.agency, u.status) for u in tracking.status_updates] == [(B, "ACCEPTED")]
        assert tracking.business_statuses == {B: "ACCEPTED"}
        assert (
            db_count(
                _node_db(cluster, A),
                "SELECT count(*) FROM status_links WHERE shams IN (?, ?)",
                (forged_shams, stray_shams),
            )
            == 0
        )
        tracking.verify(cluster.credentials(A).trust_store())

        # Slipped into A's evidence bundle with C's certificate, so that its signature
        # verifies, the offline verifier refuses it, saying why.
        bundle = await a.evidence_bundle(sent.shams)
    bundle.letter.status_updates.append(forged)
    c_signing = load_certs(cluster.pki.agency_dir(C) / "signing.crt")[0]
    bundle.letter.certificates.append(c_signing.public_bytes(Encoding.DER))
    doctored = Tracking.from_bundle(bundle.SerializeToString())
    with pytest.raises(VerificationError) as refused:
        doctored.verify(TrustStore.from_pem_files(cluster.pki.root_cert))
    assert refused.value.reason == "NOT_A_PARTY"
    assert str(refused.value).startswith("status update 2: ")
    assert C in str(refused.value)
