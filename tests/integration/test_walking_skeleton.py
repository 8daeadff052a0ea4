"""The walking skeleton end to end: real hub and node processes, real mTLS on loopback."""

from __future__ import annotations

import asyncio
import datetime as dt
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
import pytest

from certs.pki import load_certs
from client_sdk import (
    AlreadyExists,
    Draft,
    ExchangeClient,
    NotFound,
    Receipt,
    ResourceExhausted,
    pb,
)
from client_sdk.errors import from_rpc_error
from client_sdk.shams import parse_shams
from client_sdk.signing import ENVELOPE_PAYLOAD_TYPE, Signer
from client_sdk.trust import VerificationError
from node.cluster import Cluster
from node.core.letters import build_header
from node.demo import EXPECTED_CHAIN, wait_for_chain
from tests.conftest import (
    AGENCY_A,
    AGENCY_B,
    AGENCY_C,
    HUB_PEER_OPTIONS,
    client_credentials,
    db_count,
)
from tests.conftest import node_tls as _tls

pytestmark = pytest.mark.integration


def _node_db(cluster: Cluster, code: str):  # type: ignore[no-untyped-def]
    return cluster.root / f"node-{code}" / "node.db"


def _outbox_and_counter(db: Path) -> tuple[int, int]:
    """Letters in a node's outbox and the highest SHAMS sequence it gave out."""
    return (
        db_count(db, "SELECT count(*) FROM outbox"),
        db_count(db, "SELECT coalesce(max(last), 0) FROM shams_counter"),
    )


def _hub_db(cluster: Cluster):  # type: ignore[no-untyped-def]
    return cluster.root / "hub" / "hub.db"


async def _next_letter(client: ExchangeClient, shams: str, timeout: float = 20.0):  # type: ignore[no-untyped-def]
    async def find():  # type: ignore[no-untyped-def]
        async for letter in client.inbox():
            if letter.shams == shams:
                return letter
        raise AssertionError("inbox stream ended")

    return await asyncio.wait_for(find(), timeout)


async def test_letter_travels_a_to_b_with_every_evidence_signature_verified(
    cluster: Cluster,
) -> None:
    async with (
        ExchangeClient(cluster.nodes[AGENCY_A].address, cluster.credentials(AGENCY_A)) as a,
        ExchangeClient(cluster.nodes[AGENCY_B].address, cluster.credentials(AGENCY_B)) as b,
    ):
        receipt = await a.send(to=[AGENCY_B], subject="Budget 2026", body="Please confirm.")
        assert receipt.shams.startswith(f"{AGENCY_A}/O/")
        assert receipt.content().event == pb.EvidenceEvent.EVIDENCE_EVENT_SUBMISSION_ACCEPTANCE

        letter = await _next_letter(b, receipt.shams)
        assert letter.sender == AGENCY_A
        assert letter.body == b"Please confirm."
        assert letter.subject == "Budget 2026"
        handover = await letter.ack()
        assert (
            pb.EvidenceContent.FromString(handover.content).event
            == pb.EvidenceEvent.EVIDENCE_EVENT_HANDOVER
        )

        tracking = await wait_for_chain(a, receipt.shams)
        trust = cluster.credentials(AGENCY_A).trust_store()
        verified = tracking.verify(trust)
        events = [v.event for v in verified]
        assert events[: len(EXPECTED_CHAIN)] == list(EXPECTED_CHAIN)
        issuers = {v.event: v.issuer for v in verified}
        assert issuers["SUBMISSION_ACCEPTANCE"] == f"urn:chapar:agency:{AGENCY_A}"
        assert issuers["RELAY_ACCEPTANCE"] == "urn:chapar:hub:national"
        assert issuers["DELIVERY"] == f"urn:chapar:agency:{AGENCY_B}"
        assert issuers["HANDOVER"] == f"urn:chapar:agency:{AGENCY_B}"
        assert tracking.statuses == {AGENCY_B: "HANDED_OVER"}

        # One flipped bit in any evidence is caught by the offline verifier.
        forged = pb.Evidence()
        forged.CopyFrom(tracking.evidence[2])
        forged.content = forged.content[:-1] + bytes([forged.content[-1] ^ 1])
        tracking.evidence[2] = forged
        with pytest.raises(VerificationError):
            tracking.verify(cluster.credentials(AGENCY_A).trust_store())


async def test_a_letter_to_its_own_agency_reaches_handed_over_for_its_sender(
    cluster: Cluster,
) -> None:
    # One node is sender and recipient: it stores the DELIVERY and HANDOVER evidence as
    # the recipient, and then the hub routes them back to it as the letter's sender.
    async with ExchangeClient(cluster.nodes[AGENCY_A].address, cluster.credentials(AGENCY_A)) as a:
        receipt = await a.send(to=[(AGENCY_A, "registry")], subject="Internal", body="memo")
        letter = await _next_letter(a, receipt.shams)
        assert (letter.sender, letter.recipients) == (AGENCY_A, (AGENCY_A,))
        await letter.ack()
        tracking = await wait_for_chain(a, receipt.shams)
        deadline = asyncio.get_running_loop().time() + 20
        while tracking.statuses != {AGENCY_A: "HANDED_OVER"}:
            assert asyncio.get_running_loop().time() < deadline, tracking.statuses
            await asyncio.sleep(0.1)
            tracking = await a.track(receipt.shams)
        events = [v.event for v in tracking.verify(cluster.credentials(AGENCY_A).trust_store())]
        assert events[: len(EXPECTED_CHAIN)] == list(EXPECTED_CHAIN)


async def test_reply_carries_in_reply_to_and_thread_root(cluster: Cluster) -> None:
    async with (
        ExchangeClient(cluster.nodes[AGENCY_A].address, cluster.credentials(AGENCY_A)) as a,
        ExchangeClient(cluster.nodes[AGENCY_B].address, cluster.credentials(AGENCY_B)) as b,
    ):
        first = await a.send(to=[AGENCY_B], subject="Inquiry", body="?", kind="inquiry")
        await (await _next_letter(b, first.shams)).ack()
        reply = await b.send(
            to=[AGENCY_A], subject="Re: Inquiry", body="!", kind="reply", in_reply_to=first.shams
        )
        got = await _next_letter(a, reply.shams)
        assert got.in_reply_to == first.shams
        assert got.header.thread_root == got.header.in_reply_to
        await got.ack()


async def test_duplicate_submit_with_same_request_id_returns_original_receipt(
    cluster: Cluster,
) -> None:
    db = _node_db(cluster, AGENCY_A)
    async with ExchangeClient(cluster.nodes[AGENCY_A].address, cluster.credentials(AGENCY_A)) as a:
        request_id = str(uuid.uuid4())
        first = await a.send(to=[AGENCY_B], subject="Once", body="only once", request_id=request_id)
        before = _outbox_and_counter(db)
        again = await a.send(to=[AGENCY_B], subject="Once", body="only once", request_id=request_id)
        assert again.shams == first.shams
        assert again.evidence.SerializeToString() == first.evidence.SerializeToString()
        assert _outbox_and_counter(db) == before


async def test_request_id_used_again_for_a_different_letter_is_refused_and_nothing_is_stored(
    cluster: Cluster,
) -> None:
    """A retry gets its receipt; another letter under a used request_id gets
    ALREADY_EXISTS / REQUEST_ID_REUSED, not the first letter's receipt (which would say it
    went when it did not), alone or in a stream frame beside other letters."""
    db = _node_db(cluster, AGENCY_A)
    async with ExchangeClient(cluster.nodes[AGENCY_A].address, cluster.credentials(AGENCY_A)) as a:
        request_id = str(uuid.uuid4())
        first = await a.send(to=[AGENCY_B], subject="First", body="one", request_id=request_id)
        before = _outbox_and_counter(db)
        with pytest.raises(AlreadyExists) as err:
            await a.send(to=[AGENCY_B], subject="Second", body="two", request_id=request_id)
        assert err.value.reason == "REQUEST_ID_REUSED"
        assert err.value.metadata.get("request_id") == request_id
        assert _outbox_and_counter(db) == before
        again = await a.send(to=[AGENCY_B], subject="First", body="one", request_id=request_id)
        assert again.shams == first.shams

        fresh = str(uuid.uuid4())
        drafts = [
            Draft(to=[AGENCY_B], subject="Third", body="three", request_id=fresh),
            Draft(to=[AGENCY_B], subject="Fourth", body="four", request_id=fresh),
            Draft(to=[AGENCY_B], subject="Second", body="two", request_id=request_id),
            Draft(to=[AGENCY_B], subject="Fifth", body="five"),
        ]
        results = [r async for r in a.send_stream(drafts)]
    third, fourth, second, fifth = results
    assert isinstance(third, Receipt)
    assert isinstance(fifth, Receipt)
    for refused in (fourth, second):
        assert isinstance(refused, AlreadyExists)
        assert refused.reason == "REQUEST_ID_REUSED"
    assert _outbox_and_counter(db) == (before[0] + 2, before[1] + 2)


async def test_each_back_end_has_its_own_request_ids(cluster: Cluster) -> None:
    """Two back-ends of one agency that pick the same request_id each get their own letter
    (their ids are their own), and each one's retry its own receipt."""
    request_id = "order-1"  # a back-end counting its own requests
    async with (
        ExchangeClient(cluster.nodes[AGENCY_A].address, cluster.credentials(AGENCY_A)) as a,
        ExchangeClient(
            cluster.nodes[AGENCY_A].address, client_credentials(cluster, AGENCY_A, "archive")
        ) as archive,
    ):
        mine = await a.send(to=[AGENCY_B], subject="Mine", body="1", request_id=request_id)
        theirs = await archive.send(
            to=[AGENCY_B], subject="Theirs", body="2", request_id=request_id
        )
        assert mine.shams != theirs.shams
        again = await archive.send(to=[AGENCY_B], subject="Theirs", body="2", request_id=request_id)
        assert again.shams == theirs.shams
        with pytest.raises(AlreadyExists) as err:
            await a.send(to=[AGENCY_B], subject="Theirs", body="2", request_id=request_id)
        assert err.value.metadata.get("request_id") == request_id


async def test_unknown_recipient_is_not_found_and_nothing_is_stored(cluster: Cluster) -> None:
    db = _node_db(cluster, AGENCY_A)
    before = _outbox_and_counter(db)
    async with ExchangeClient(cluster.nodes[AGENCY_A].address, cluster.credentials(AGENCY_A)) as a:
        with pytest.raises(NotFound) as err:
            await a.send(to=["NO.SUCH.AGENCY"], subject="Lost?", body="x")
    assert err.value.reason == "UNKNOWN_RECIPIENT"
    assert err.value.metadata.get("agency") == "NO.SUCH.AGENCY"
    assert _outbox_and_counter(db) == before


# -- a hostile or broken node, talking raw gRPC to the hub with real certificates --------


def _letter(
    cluster: Cluster, *, signer_code: str, sender: str, to: str, sequence: int
) -> pb.Envelope:
    d = cluster.pki.agency_dir(signer_code)
    signer = Signer.from_files(d / "signing.key", d / "signing.crt")
    body = b"raw letter"
    draft = pb.LetterDraft(
        recipients=[pb.Address(agency=to)],
        subject="raw",
        body=body,
        kind=pb.LetterKind.LETTER_KIND_LETTER,
        priority=pb.Priority.PRIORITY_NORMAL,
        content_type="text/plain; charset=utf-8",
    )
    shams = pb.Shams(
        origin=sender, domain=pb.ShamsDomain.SHAMS_DOMAIN_OUTGOING, year=2026, sequence=sequence
    )
    header = build_header(draft, sender=sender, shams=shams, now=dt.datetime.now(dt.UTC))
    return pb.Envelope(
        header=header, signature=signer.sign(ENVELOPE_PAYLOAD_TYPE, header), body=body
    )


async def _relay_as(
    cluster: Cluster, code: str, envelopes: list[pb.Envelope]
) -> pb.ConnectResponse:
    """Connects to the hub as ``code``'s node and sends one batch; returns the hub's answer."""
    async with grpc.aio.secure_channel(
        cluster.hub.address, _tls(cluster, code), options=HUB_PEER_OPTIONS
    ) as channel:
        call = pb.HubServiceStub(channel).Connect()
        await call.write(pb.ConnectRequest(hello=pb.ConnectHello(software_version="test")))
        welcome = await call.read()
        assert welcome.WhichOneof("frame") == "welcome"
        await call.write(pb.ConnectRequest(envelopes=pb.EnvelopeBatch(envelopes=envelopes)))
        while True:
            frame = await call.read()
            if frame is grpc.aio.EOF:
                raise AssertionError("stream ended without an answer")
            if frame.WhichOneof("frame") == "relay_results":
                call.cancel()
                return frame


async def test_valid_raw_letter_from_a_third_agency_is_relayed(cluster: Cluster) -> None:
    """Positive control for the hostile cases below: the same path accepts a good letter."""
    seq = 1_000 + uuid.uuid4().int % 1_000_000
    answer = await _relay_as(
        cluster,
        AGENCY_C,
        [_letter(cluster, signer_code=AGENCY_C, sender=AGENCY_C, to=AGENCY_B, sequence=seq)],
    )
    (evidence,) = answer.relay_results.evidence
    content = pb.EvidenceContent.FromString(evidence.content)
    assert content.event == pb.EvidenceEvent.EVIDENCE_EVENT_RELAY_ACCEPTANCE
    assert content.recipient == AGENCY_B


@pytest.mark.parametrize("signer_code", [AGENCY_C, AGENCY_A], ids=["own-key", "stolen-key"])
async def test_header_sender_other_than_tls_identity_is_permission_denied(
    cluster: Cluster, signer_code: str
) -> None:
    hub_db = _hub_db(cluster)
    letters = db_count(hub_db, "SELECT count(*) FROM letters")
    forged = _letter(
        cluster, signer_code=signer_code, sender=AGENCY_A, to=AGENCY_B, sequence=999_999
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _relay_as(cluster, AGENCY_C, [forged])
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert from_rpc_error(err.value).reason == "SENDER_MISMATCH"
    assert db_count(hub_db, "SELECT count(*) FROM letters") == letters


async def test_tampered_header_is_rejected_and_nothing_is_stored(cluster: Cluster) -> None:
    hub_db = _hub_db(cluster)
    letters = db_count(hub_db, "SELECT count(*) FROM letters")
    envelope = _letter(
        cluster, signer_code=AGENCY_C, sender=AGENCY_C, to=AGENCY_B, sequence=777_777
    )
    header = pb.EnvelopeHeader.FromString(envelope.header)
    header.subject = "raw, but changed after signing"
    envelope.header = header.SerializeToString()
    answer = await _relay_as(cluster, AGENCY_C, [envelope])
    (evidence,) = answer.relay_results.evidence
    content = pb.EvidenceContent.FromString(evidence.content)
    assert content.event == pb.EvidenceEvent.EVIDENCE_EVENT_RELAY_REJECTION
    assert content.reason == "SIGNATURE_INVALID"
    assert db_count(hub_db, "SELECT count(*) FROM letters") == letters
    assert (
        db_count(
            _node_db(cluster, AGENCY_B),
            "SELECT count(*) FROM inbox WHERE shams = ?",
            (f"{AGENCY_C}/O/2026/0777777",),
        )
        == 0
    )


@pytest.mark.parametrize("target", ["hub", "node"])
async def test_client_without_certificate_cannot_connect(cluster: Cluster, target: str) -> None:
    address = cluster.hub.address if target == "hub" else cluster.nodes[AGENCY_A].address
    creds = grpc.ssl_channel_credentials(root_certificates=cluster.pki.root_cert.read_bytes())
    async with grpc.aio.secure_channel(address, creds) as channel:
        call = (
            pb.HubServiceStub(channel).GetDirectory(pb.GetDirectoryRequest(), timeout=10)
            if target == "hub"
            else pb.NodeServiceStub(channel).ListAgencies(pb.ListAgenciesRequest(), timeout=10)
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_thousand_concurrent_submissions_get_unique_gapless_numbers_and_all_arrive(
    cluster: Cluster,
) -> None:
    async with ExchangeClient(cluster.nodes[AGENCY_A].address, cluster.credentials(AGENCY_A)) as a:
        receipts = await asyncio.gather(
            *(a.send(to=[AGENCY_B], subject=f"n{i}", body=f"letter {i}") for i in range(1000))
        )
    sequences = sorted(int(r.shams.rsplit("/", 1)[1]) for r in receipts)
    assert sequences == list(range(sequences[0], sequences[0] + 1000))
    wanted = {r.shams for r in receipts}
    inbox = _node_db(cluster, AGENCY_B)
    marks = ",".join("?" * len(wanted))
    deadline = asyncio.get_running_loop().time() + 60
    while (
        n := db_count(inbox, f"SELECT count(*) FROM inbox WHERE shams IN ({marks})", tuple(wanted))
    ) < 1000:
        assert asyncio.get_running_loop().time() < deadline, f"only {n} of 1000 delivered"
        await asyncio.sleep(0.2)
    assert n == 1000


def test_second_server_on_a_port_in_use_refuses_to_start(cluster: Cluster, tmp_path: Path) -> None:
    """No SO_REUSEPORT: another process must not be able to share (and steal from) our port."""
    config = tmp_path / "hub.toml"
    config.write_text(cluster.hub.config.read_text())  # pinned to the running hub's port
    result = subprocess.run(
        [sys.executable, "-m", "node", "hub", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "cannot bind" in result.stderr


async def _three_sent_and_received(a: ExchangeClient, b: ExchangeClient, subject: str):  # type: ignore[no-untyped-def]
    """Sends three letters A -> B in one batch; returns their numbers and B's letters."""
    receipts = await a.send_many(
        [Draft(to=[AGENCY_B], subject=f"{subject} {i}", body=f"letter {i}") for i in range(3)]
    )
    numbers = [r.shams for r in receipts if isinstance(r, Receipt)]
    assert len(numbers) == 3, receipts
    return numbers, [await _next_letter(b, n) for n in numbers]


async def test_acknowledgements_travel_in_batches_each_with_its_own_outcome(
    cluster: Cluster,
) -> None:
    async with (
        ExchangeClient(cluster.nodes[AGENCY_A].address, cluster.credentials(AGENCY_A)) as a,
        ExchangeClient(cluster.nodes[AGENCY_B].address, cluster.credentials(AGENCY_B)) as b,
    ):
        numbers, letters = await _three_sent_and_received(a, b, "batch ack")
        unknown = f"{AGENCY_A}/O/{dt.datetime.now(dt.UTC).year}/9999999"

        # Concurrent Letter.ack() calls are gathered; every caller gets its own evidence.
        first = await asyncio.gather(letters[0].ack(), letters[1].ack())
        outcomes = await b.ack_many([numbers[0], numbers[2], unknown, numbers[2]])

        assert isinstance(outcomes[2], NotFound)
        assert outcomes[2].reason == "LETTER_NOT_FOUND"
        assert outcomes[0] == first[0]  # acknowledging again returns the same evidence
        assert outcomes[1] == outcomes[3]  # twice in one batch: one HANDOVER
        trust = cluster.credentials(AGENCY_B).trust_store()
        trust.add_certificates(load_certs(cluster.pki.agency_dir(AGENCY_B) / "signing.crt"))
        handovers = [first[0], first[1], outcomes[1]]
        for number, evidence in zip(numbers, handovers, strict=True):
            assert isinstance(evidence, pb.Evidence)
            content = trust.verify_evidence(evidence)
            assert content.event == pb.EvidenceEvent.EVIDENCE_EVENT_HANDOVER
            assert f"{content.shams.sequence:07d}" in number
        assert (
            db_count(
                _node_db(cluster, AGENCY_B),
                "SELECT count(*) FROM evidence WHERE event = ? AND shams IN (?, ?, ?)",
                (pb.EvidenceEvent.EVIDENCE_EVENT_HANDOVER, *numbers),
            )
            == 3
        )


async def test_the_acknowledgement_stream_answers_frames_in_order_and_ends_on_a_bad_one(
    cluster: Cluster,
) -> None:
    async with (
        ExchangeClient(cluster.nodes[AGENCY_A].address, cluster.credentials(AGENCY_A)) as a,
        ExchangeClient(cluster.nodes[AGENCY_B].address, cluster.credentials(AGENCY_B)) as b,
    ):
        numbers, letters = await _three_sent_and_received(a, b, "ack stream")
        unknown = f"{AGENCY_A}/O/{dt.datetime.now(dt.UTC).year}/9999998"
        shams = [parse_shams(n) for n in (*numbers, unknown)]
        call = b._stub.StreamAckEnvelopes()
        await call.write(pb.StreamAckEnvelopesRequest(shams=[shams[0], shams[3]]))
        await call.write(pb.StreamAckEnvelopesRequest(shams=[shams[1], shams[0]]))
        first, second = await call.read(), await call.read()
        assert [r.WhichOneof("outcome") for r in first.results] == ["evidence", "error"]
        assert first.results[1].error.reason == "LETTER_NOT_FOUND"
        assert [r.WhichOneof("outcome") for r in second.results] == ["evidence", "evidence"]
        assert second.results[1].evidence == first.results[0].evidence  # the same HANDOVER
        contents = [
            pb.EvidenceContent.FromString(r.evidence.content)
            for r in (first.results[0], second.results[0])
        ]
        assert [c.shams for c in contents] == shams[:2]
        assert {c.event for c in contents} == {pb.EvidenceEvent.EVIDENCE_EVENT_HANDOVER}

        await call.write(pb.StreamAckEnvelopesRequest(shams=[shams[2]] * 1001))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
        error = from_rpc_error(caught.value)
        assert (error.code, error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "BATCH_TOO_LARGE")
        assert error.metadata == {"limit": "1000"}
        # Only that stream ended: Letter.ack() goes on the SDK's own.
        evidence = await letters[2].ack()
        assert pb.EvidenceContent.FromString(evidence.content).shams == shams[2]


async def test_a_submitted_batch_is_signed_once_and_each_letter_verifies_alone(
    cluster: Cluster,
) -> None:
    async with (
        ExchangeClient(cluster.nodes[AGENCY_A].address, cluster.credentials(AGENCY_A)) as a,
        ExchangeClient(cluster.nodes[AGENCY_B].address, cluster.credentials(AGENCY_B)) as b,
    ):
        numbers, letters = await _three_sent_and_received(a, b, "signed batch")  # SDK-verified
        assert [letter.subject for letter in letters] == [f"signed batch {i}" for i in range(3)]
        for letter in letters:
            await letter.ack()
        envelopes = [(await wait_for_chain(a, n)).envelope for n in numbers]
        assert len({e.signature.value for e in envelopes}) == 1
        assert sorted(e.batch_proof.leaf_index for e in envelopes) == [0, 1, 2]
        assert {e.batch_proof.tree_size for e in envelopes} == {3}
        for number in numbers:  # offline, each alone, with a fresh trust store
            tracking = await a.track(number)
            tracking.verify(cluster.credentials(AGENCY_A).trust_store())


async def test_concurrent_submissions_are_signed_together_and_each_caller_gets_its_own(
    cluster: Cluster,
) -> None:
    """Calls that arrive while an earlier one is being stored are stored as one signed
    batch; each caller still gets the receipt of its own letter."""
    async with ExchangeClient(cluster.nodes[AGENCY_A].address, cluster.credentials(AGENCY_A)) as a:
        subjects = [f"together {i}" for i in range(20)]
        receipts = await asyncio.gather(
            *(a.send(to=[AGENCY_B], subject=s, body=s) for s in subjects)
        )
        trackings = [await a.track(r.shams) for r in receipts]
    assert [t.header.subject for t in trackings] == subjects
    signatures = {t.envelope.signature.value for t in trackings}
    assert len(signatures) < len(subjects)  # some were signed together
    for tracking in trackings:
        tracking.verify(cluster.credentials(AGENCY_A).trust_store())


async def test_send_many_splits_calls_by_size_so_large_letters_all_go(cluster: Cluster) -> None:
    """Six letters of 3 MiB: 18 MiB, more than a node takes in one call (16 MiB)."""
    drafts = [
        Draft(to=[AGENCY_C], subject=f"large {i}", body=bytes([i]) * (3 * 1024 * 1024))
        for i in range(6)
    ]
    async with ExchangeClient(cluster.nodes[AGENCY_A].address, cluster.credentials(AGENCY_A)) as a:
        results = await a.send_many(drafts, timeout=60)
    assert all(isinstance(r, Receipt) for r in results), results
    assert len({r.shams for r in results if isinstance(r, Receipt)}) == 6


async def test_a_letter_over_the_nodes_message_limit_is_refused_alone(cluster: Cluster) -> None:
    """17 MiB of body, over the node's 16 MiB message limit, among small letters: on a
    SharedStream and in send_many it goes by a call of its own, refused there; the small
    letters around it are accepted (they were refused with it, not retryable)."""
    big = Draft(to=[AGENCY_C], subject="too big", body=b"x" * (17 * 1024 * 1024))
    small = [Draft(to=[AGENCY_C], subject=f"small {i}", body="ok") for i in range(8)]
    async with ExchangeClient(cluster.nodes[AGENCY_A].address, cluster.credentials(AGENCY_A)) as a:
        async with a.shared_stream() as shared:
            outcomes = await asyncio.gather(
                *(shared.send(d) for d in [*small[:4], big, *small[4:]]), return_exceptions=True
            )
        assert all(isinstance(o, Receipt) for o in outcomes[:4] + outcomes[5:]), outcomes
        assert isinstance(outcomes[4], ResourceExhausted), outcomes[4]
        again = [Draft(to=[AGENCY_C], subject=f"again {i}", body="ok") for i in range(3)]
        results = await a.send_many([again[0], big, *again[1:]], timeout=60)
    assert [type(r) for r in results] == [Receipt, ResourceExhausted, Receipt, Receipt], results
