"""``HubService.Track`` at the hub, driven with a real store and stand-ins for the rest:
who is refused before any walk, and receipts too large to keep; and the one-time linking
of letters accepted before the tree, which runs once the hub serves."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

import node.hub as hub_module
from certs.pki import generate_key, issue_certificate
from client_sdk import pb
from client_sdk.identity import Identity
from client_sdk.signing import ENVELOPE_PAYLOAD_TYPE, Signer, sha256
from client_sdk.trust import TrustStore
from node.core.directory import DirectoryView
from node.hub import MAX_RECEIPT_BYTES, Hub, _Session
from node.storage.db import Database
from node.storage.hub_store import MIGRATIONS, HubStore
from tests.unit.test_hub_tree import A, B, C, _accept, _letter, _number, _receipt, _relay


class _Context:
    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    async def abort(
        self,
        code: grpc.StatusCode,
        details: str,
        trailing_metadata: tuple[tuple[str, bytes], ...] = (),
    ) -> None:
        reason = ""
        for key, value in trailing_metadata:
            if key == "grpc-status-details-bin":
                for detail in status_pb2.Status.FromString(value).details:
                    info = error_details_pb2.ErrorInfo()
                    if detail.Unpack(info):
                        reason = info.reason
        self.aborted = (code, reason)
        raise grpc.aio.AbortError()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[HubStore]:
    opened = await HubStore.open(tmp_path / "hub.db", durability="normal")
    try:
        yield opened
    finally:
        await opened.close()


async def _track_as(
    monkeypatch: pytest.MonkeyPatch, hub: Any, agency: str, shams: pb.Shams
) -> tuple[grpc.StatusCode, str] | None:
    monkeypatch.setattr(
        hub_module, "peer_certificate", lambda context, trust: (None, Identity.for_agency(agency))
    )
    context = _Context()
    with contextlib.suppress(grpc.aio.AbortError):
        await Hub.Track(hub, pb.TrackRequest(shams=shams), context)  # type: ignore[arg-type]
    return context.aborted


async def test_an_agency_no_party_of_the_letter_is_refused_before_any_walk(
    store: HubStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = _letter(A, 1, [B])
    await _accept(store, x, *(_letter(B, i, [A], reply_to=x.shams_pb) for i in range(1, 50)))
    walks: list[str | None] = []
    real_tree = store.tree

    async def tree(shams: str, viewer: str | None = None, **kwargs: Any) -> Any:
        walks.append(viewer)
        return await real_tree(shams, viewer, **kwargs)

    hub = SimpleNamespace(
        store=SimpleNamespace(parties=store.parties, tree=tree),
        trust=None,
        _tracker=lambda identity: identity.agency,
    )
    assert x.shams_pb is not None
    assert await _track_as(monkeypatch, hub, C, x.shams_pb) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "NOT_A_PARTY",
    )
    assert walks == []
    hub._tracked = lambda tree: pb.TrackResponse(letters=[pb.TrackedLetter()] * len(tree.letters))
    assert await _track_as(monkeypatch, hub, B, x.shams_pb) is None
    assert walks == [B]


async def test_track_reads_the_letter_asked_for_and_its_recipients_once(
    store: HubStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Track asks who the letter's parties are before any walk, then walks the tree, which
    # read the same letter row and its recipients again.
    x = _letter(A, 1, [B, C])
    await _accept(store, x, _letter(B, 1, [A], reply_to=x.shams_pb))
    reads: list[tuple[str, list[object]]] = []
    db = store.db
    for name in ("fetchone", "fetchall"):  # fetchall_in reads through fetchall
        real = getattr(db, name)

        def recording(sql: str, *args: Any, _real: Any = real) -> Any:
            reads.append(
                (sql, [v for a in args for v in (a if isinstance(a, list | tuple) else [a])])
            )
            return _real(sql, *args)

        monkeypatch.setattr(db, name, recording)
    hub = SimpleNamespace(store=store, trust=None, _tracker=lambda identity: identity.agency)
    hub._tracked = lambda tree: pb.TrackResponse(letters=[pb.TrackedLetter()] * len(tree.letters))
    assert x.shams_pb is not None
    assert await _track_as(monkeypatch, hub, B, x.shams_pb) is None

    def of_x(table: str, column: str) -> int:
        return sum(
            1
            for sql, params in reads
            if f"FROM {table} " in sql
            and column in sql.split("FROM")[0]
            and params[-1:] == [x.shams]
        )

    assert (of_x("letters", "sender"), of_x("recipient_state", "recipient")) == (1, 1)


async def test_a_receipt_too_large_to_keep_is_refused_and_its_letter_left_unanswered(
    store: HubStore,
) -> None:
    x = _letter(A, 1, [B])
    await _accept(store, x)
    large, content, _ = _receipt(x, B, detail="d" * MAX_RECEIPT_BYTES)
    small, small_content, _ = _receipt(x, B, pb.EvidenceEvent.EVIDENCE_EVENT_DELIVERY)
    hub = SimpleNamespace(
        trust=SimpleNamespace(verify_evidence_many=lambda items: [content, small_content]),
        store=store,
        _unanswered={},
        _wake=lambda agency, notices: None,
        _count=lambda agency, delta: None,
    )
    hub._unverified_receipt = lambda session, item: Hub._unverified_receipt(hub, session, item)  # type: ignore[arg-type]
    hub._leave_window = lambda session, shams: Hub._leave_window(hub, session, shams)  # type: ignore[arg-type]
    session = _Session(B, None)  # type: ignore[arg-type]
    session.inflight.add(x.shams)
    await Hub._receipts(hub, session, [large, small])  # type: ignore[arg-type]
    tree = await store.tree(x.shams)
    assert tree is not None
    events = [pb.EvidenceContent.FromString(e.content).event for e in tree.letters[0].evidence]
    assert events == [
        pb.EvidenceEvent.EVIDENCE_EVENT_RELAY_ACCEPTANCE,
        pb.EvidenceEvent.EVIDENCE_EVENT_DELIVERY,
    ]


async def test_letters_accepted_before_the_tree_are_linked_in_the_background_once_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "hub.db"
    x = _letter(A, 1, [B])
    y = _letter(B, 1, [A], reply_to=x.shams_pb)
    old = await Database.open(path, MIGRATIONS[:7])  # the schema before the tree
    try:

        def insert(conn: Any) -> None:
            for letter in (x, y):
                conn.execute(
                    "INSERT INTO letters (shams, sender, envelope_sha256, relay_evidence,"
                    " accepted_at) VALUES (?, ?, ?, x'', ?)",
                    (letter.shams, letter.sender, letter.envelope_sha256, time.time()),
                )
                conn.execute(
                    "INSERT INTO recipient_state (shams, recipient, state) VALUES (?, ?, 1)",
                    (letter.shams, letter.recipients[0]),
                )
                conn.execute(
                    "INSERT INTO envelopes (shams, envelope) VALUES (?, ?)",
                    (letter.shams, letter.envelope),
                )

        await old.write(insert)
    finally:
        await old.close()
    store = await HubStore.open(path, durability="normal")
    try:
        hub = SimpleNamespace(store=store, _tasks=[])
        hub._link_held_letters = lambda: Hub._link_held_letters(hub)  # type: ignore[arg-type]
        task = Hub.link_held_letters_later(hub)  # type: ignore[arg-type]
        # Not linked yet: the tree meanwhile says so.
        before = await store.tree(y.shams)
        assert before is not None
        assert [(t.shams, t.kind) for t in before.letters] == [(y.shams, None)]
        await task
        assert hub._tasks == [task]
        after = await store.tree(y.shams)
        assert after is not None
        assert [t.shams for t in after.letters] == [y.shams, x.shams]
        # A failure is logged, not raised into the hub.
        broken = SimpleNamespace(store=SimpleNamespace(link_held_letters=_fails), _tasks=[])
        broken._link_held_letters = lambda: Hub._link_held_letters(broken)  # type: ignore[arg-type]
        await Hub.link_held_letters_later(broken)  # type: ignore[arg-type]
        assert "resumes at the next start" in caplog.text
    finally:
        await store.close()


async def _fails() -> int:
    await asyncio.sleep(0)
    raise OSError("disk I/O error")


async def test_a_receipt_padded_outside_its_signed_content_is_kept_without_the_padding(
    store: HubStore,
) -> None:
    # The signature covers the content alone: a field the proto does not define, added to
    # the outer Evidence, verified, passed a cap on the content, and was stored, routed to
    # the sender and shown in every Track, however large.
    x = _letter(A, 1, [B])
    await _accept(store, x)
    delivery, content, _ = _receipt(x, B, pb.EvidenceEvent.EVIDENCE_EVENT_DELIVERY)
    honest = delivery.SerializeToString()
    padded = pb.Evidence.FromString(honest + b"\x7a" + _varint(4 << 20) + b"p" * (4 << 20))
    assert padded.ByteSize() > 4 << 20  # kept by the parse
    hub = SimpleNamespace(
        trust=SimpleNamespace(verify_evidence_many=lambda items: [content]),
        store=store,
        _unanswered={},
        _wake=lambda agency, notices: None,
        _count=lambda agency, delta: None,
    )
    session = _Session(B, None)  # type: ignore[arg-type]
    session.inflight.add(x.shams)
    await Hub._receipts(hub, session, [padded])  # type: ignore[arg-type]
    tree = await store.tree(x.shams)
    assert tree is not None
    stored = [e.SerializeToString() for e in tree.letters[0].evidence]
    assert stored[-1] == honest
    assert max(len(b) for b in stored) < 1024


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


async def test_a_letter_padded_outside_its_signed_header_is_kept_without_the_padding(
    tmp_path: Path,
) -> None:
    # As for receipts: the signature covers the header bytes alone, so a field the proto
    # does not define, added to the Envelope, verified and was stored, relayed and shown
    # in every Track (the body cleared there, the padding not), as large as a frame.
    ca_key, key = generate_key("ed25519"), generate_key("ed25519")
    ca = issue_certificate(issuer_cert=None, issuer_key=ca_key, subject_key=ca_key,
                           identity_uri=None, kind="root")  # fmt: skip
    cert = issue_certificate(issuer_cert=ca, issuer_key=ca_key, subject_key=key,
                             identity_uri=Identity.for_agency(A).uri, kind="signing")  # fmt: skip
    trust = TrustStore([ca])
    trust.add_certificates([cert])
    header = pb.EnvelopeHeader(shams=_number(A, 1), sender=pb.Address(agency=A),
                               recipients=[pb.Address(agency=B)], subject="s", body_size=2,
                               body_sha256=sha256(b"ok"))  # fmt: skip
    header.create_time.FromSeconds(int(time.time()))
    data = header.SerializeToString()
    honest = pb.Envelope(
        header=data, body=b"ok", signature=Signer(key, cert).sign(ENVELOPE_PAYLOAD_TYPE, data)
    )
    padded = pb.Envelope.FromString(
        honest.SerializeToString() + b"\x7a" + _varint(4 << 20) + b"p" * (4 << 20)
    )
    (verified,) = trust.verify_envelopes([padded])
    assert isinstance(verified, pb.EnvelopeHeader)  # the padding verifies
    hub = Hub.__new__(Hub)
    hub.trust = trust
    hub.config = SimpleNamespace(clock_skew_s=300.0, max_letter_age_s=7 * 86400.0)  # type: ignore[assignment]
    hub.directory = DirectoryView(pb.Directory(version=1, agencies=[
        pb.Agency(code=c, display_name=c, state=pb.AGENCY_STATE_ACTIVE) for c in (A, B)]))  # fmt: skip
    letter = Hub._check_letter(hub, A, padded, verified)
    assert letter.envelope == honest.SerializeToString()
    store = await HubStore.open(tmp_path / "hub.db", durability="normal")
    try:
        assert await store.accept([letter], _relay)
        tree = await store.tree(letter.shams)
        assert tree is not None
        assert tree.letters[0].envelope.ByteSize() < 1024
    finally:
        await store.close()
