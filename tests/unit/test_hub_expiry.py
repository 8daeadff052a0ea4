"""The hub's expiry reads past letters being delivered: a recipient whose delivery window
is full of expired letters (each waits for its receipt, which decides it) used to hold the
first page of expired letters for good, and no other queue's letters expired. Driven with
a real HubStore and stand-ins for the rest of the hub."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest

from certs.pki import generate_key, issue_certificate
from client_sdk import pb
from client_sdk.shams import format_shams
from client_sdk.signing import Signer
from client_sdk.trust import TrustStore
from node.core.evidence import evidence_content
from node.hub import _EXPIRY_PAGE, UNANSWERED_GRACE_S, Hub, _Session
from node.storage.hub_store import HubStore, IncomingLetter

SENDER, BUSY, QUIET = "000.00.00.G22", "10101010101", "MOF.IR"
E = pb.EvidenceEvent


def _letter(sequence: int, recipient: str, expire_at: float) -> IncomingLetter:
    shams = pb.Shams(origin=SENDER, domain=pb.SHAMS_DOMAIN_OUTGOING, year=2026, sequence=sequence)
    header = pb.EnvelopeHeader(shams=shams).SerializeToString()
    return IncomingLetter(
        shams=format_shams(shams),
        sender=SENDER,
        recipients=[recipient],
        envelope=pb.Envelope(header=header).SerializeToString(),
        envelope_sha256=hashlib.sha256(header).digest(),
        expire_at=expire_at,
        shams_pb=shams,
    )


def _relay(letter: IncomingLetter, recipient: str) -> pb.Evidence:
    return pb.Evidence(
        content=evidence_content(
            E.EVIDENCE_EVENT_RELAY_ACCEPTANCE,
            issuer="urn:chapar:hub:test",
            shams=letter.shams_pb,
            envelope_sha256=letter.envelope_sha256,
            recipient=recipient,
            now=dt.datetime.now(dt.UTC),
        )
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[HubStore]:
    hub_store = await HubStore.open(tmp_path / "hub.db", durability="normal")
    try:
        yield hub_store
    finally:
        await hub_store.close()


def _hub(store: HubStore, inflight: dict[str, set[str]]) -> SimpleNamespace:
    hub = SimpleNamespace(
        store=store,
        identity=SimpleNamespace(uri="urn:chapar:hub:test"),
        signer=SimpleNamespace(
            sign_evidence=lambda contents: [pb.Evidence(content=c) for c in contents]
        ),
        _sessions={agency: SimpleNamespace(inflight=s) for agency, s in inflight.items()},
        _unanswered={},
        counted=[],
    )
    hub._expiries = lambda rows, now: Hub._expiries(hub, rows, now)  # type: ignore[arg-type]
    hub._expire = lambda items: Hub._expire(hub, items)  # type: ignore[arg-type]
    hub._count = lambda recipient, n: hub.counted.append((recipient, n))
    hub._wake = lambda *_, **__: None
    return hub


async def test_expired_letters_being_delivered_do_not_hold_up_other_queues(
    store: HubStore,
) -> None:
    past = time.time() - 3600
    busy = [_letter(i, BUSY, past + i) for i in range(1, _EXPIRY_PAGE + 2)]  # over a page
    quiet = _letter(10_000, QUIET, past + 1800)  # expired later than all of them
    await store.accept([*busy, quiet], _relay)
    hub = _hub(store, {BUSY: {letter.shams for letter in busy}})  # all in its window
    assert await Hub.expire_due(hub) == 1  # type: ignore[arg-type]
    assert hub.counted == [(QUIET, -1)]
    left: Sequence[tuple[str, str, bytes, str, object]] = await store.expired(time.time(), 10_000)
    assert {row[0] for row in left} == {BUSY}
    assert len(left) == len(busy)


# -- expiry against a push: never both an EXPIRY and a delivery ---------------------------------


class _Pushing:
    """The stand-in hub's parts ``Hub._push`` and ``Hub._end_session`` use."""

    @staticmethod
    def add_to(hub: SimpleNamespace) -> None:
        hub.config = SimpleNamespace(delivery_window=1024)
        hub.directory = SimpleNamespace(version=0)
        hub._status_version = -1
        hub._unanswered_rows = lambda session, limit, max_bytes: Hub._unanswered_rows(  # type: ignore[arg-type]
            hub, session, limit, max_bytes
        )
        hub._leave_unanswered = lambda session: Hub._leave_unanswered(hub, session)  # type: ignore[arg-type]


def _session(recipient: str) -> _Session:
    return _Session(recipient, None)  # type: ignore[arg-type]  # no certificate needed here


async def _pushed(hub: SimpleNamespace, session: _Session, wait_s: float = 0.5) -> list[str]:
    """The numbers ``Hub._push`` sends on ``session`` within ``wait_s``."""
    return [shams for frame in await _frames(hub, session, wait_s) for shams in frame]


async def _frames(hub: SimpleNamespace, session: _Session, wait_s: float = 0.5) -> list[list[str]]:
    """The numbers ``Hub._push`` sends on ``session`` within ``wait_s``, frame by frame."""
    pusher = asyncio.create_task(Hub._push(hub, session))  # type: ignore[arg-type]
    try:
        await asyncio.sleep(wait_s)
    finally:
        pusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pusher
    frames = []
    while not session.out.empty():
        frame = session.out.get_nowait()
        assert isinstance(frame, bytes)  # a spliced deliveries frame
        response = pb.ConnectResponse.FromString(frame)
        frames.append(
            [
                format_shams(pb.EnvelopeHeader.FromString(envelope.header).shams)
                for envelope in response.deliveries.envelopes
            ]
        )
    return frames


async def _expiries_stored(store: HubStore) -> int:
    row = await store.db.fetchone(
        "SELECT count(*) FROM evidence WHERE event = ?", (E.EVIDENCE_EVENT_EXPIRY,)
    )
    assert row is not None
    return int(row[0])


async def test_a_letter_the_expiry_passes_over_while_its_push_is_read_is_not_pushed(
    store: HubStore,
) -> None:
    # The pusher reads a page (the letter not yet expired); before it puts the letter in
    # the window, the expiry loop reads it as expired and not in flight, and expires it.
    # The pusher used to send it anyway: the sender got an EXPIRY and the recipient the
    # letter, which the sender was told it would not get.
    letter = _letter(1, BUSY, time.time() + 0.3)
    await store.accept([letter], _relay)
    session = _session(BUSY)
    hub = _hub(store, {})
    _Pushing.add_to(hub)
    hub._sessions[BUSY] = session
    expired: list[int] = []

    class SlowRead:
        def __getattr__(self, name: str) -> object:
            return getattr(store, name)

        async def queued(self, *args: object) -> object:
            page = await store.queued(*args)  # type: ignore[arg-type]
            await asyncio.sleep(max(0.0, letter.expire_at - time.time()) + 0.05)  # type: ignore[operator]
            expired.append(await Hub.expire_due(hub))  # type: ignore[arg-type]
            return page

    hub.store = SlowRead()
    pushed = await _pushed(hub, session)
    assert expired[:1] == [1]
    assert await _expiries_stored(store) == 1
    assert pushed == []


async def _left_unanswered(store: HubStore, letter: IncomingLetter) -> SimpleNamespace:
    """A stand-in hub that pushed ``letter`` to BUSY on a stream that then ended."""
    await store.accept([letter], _relay)
    hub = _hub(store, {})
    _Pushing.add_to(hub)
    first = hub._sessions[BUSY] = _session(BUSY)
    assert await _pushed(hub, first) == [letter.shams]
    Hub._end_session(hub, first)  # type: ignore[arg-type]
    assert BUSY not in hub._sessions
    return hub


async def test_a_letter_left_unanswered_by_a_lost_stream_does_not_expire_and_is_pushed_again(
    store: HubStore,
) -> None:
    # Pushed, then the stream was lost before the recipient's receipt came: its node may
    # have delivered it. It used to expire once out of the window, an EXPIRY the node's
    # DELIVERY could contradict; now it is pushed again, expired or not, and the node's
    # answer decides.
    letter = _letter(1, BUSY, time.time() + 0.3)
    hub = await _left_unanswered(store, letter)
    await asyncio.sleep(max(0.0, letter.expire_at - time.time()) + 0.05)  # type: ignore[operator]
    assert await Hub.expire_due(hub) == 0  # type: ignore[arg-type]
    assert await _expiries_stored(store) == 0
    second = hub._sessions[BUSY] = _session(BUSY)
    assert await _pushed(hub, second) == [letter.shams]  # expired, but pushed again
    assert letter.shams in hub._unanswered[BUSY]  # until its answer comes
    # Once a stream, even out of its window again (an answer that did not verify) ...
    second.inflight.discard(letter.shams)
    second.queue_dirty = True
    assert await _pushed(hub, second, 0.1) == []
    # ... unless the directory changed since (the answer may verify now).
    Hub._push_unanswered_again(second)
    assert await _pushed(hub, second) == [letter.shams]


async def test_a_letter_left_unanswered_and_not_expired_is_pushed_again_once(
    store: HubStore,
) -> None:
    # Pushed again from the unanswered set, and found again by the queue's read from its
    # start: it went twice in one frame.
    letter = _letter(1, BUSY, time.time() + 3600)
    hub = await _left_unanswered(store, letter)
    second = hub._sessions[BUSY] = _session(BUSY)
    assert await _pushed(hub, second) == [letter.shams]


async def test_letters_pushed_again_keep_to_the_frame_size(
    store: HubStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Read whatever their size, a window of large letters pushed again made one frame
    # larger than a node takes, refused at every reconnect.
    letters = [_letter(i, BUSY, time.time() + 3600) for i in range(1, 4)]
    await store.accept(letters, _relay)
    size = len(letters[0].envelope)
    monkeypatch.setattr("node.hub._PUSH_FRAME_BYTES", size + size // 2)
    hub = _hub(store, {})
    _Pushing.add_to(hub)
    hub._unanswered[BUSY] = {letter.shams for letter in letters}
    session = hub._sessions[BUSY] = _session(BUSY)
    frames = await _frames(hub, session)
    assert [len(frame) for frame in frames] == [1, 1, 1]
    assert sorted(s for frame in frames for s in frame) == [lt.shams for lt in letters]


async def test_a_letter_in_a_replaced_streams_window_does_not_expire_before_its_end(
    store: HubStore,
) -> None:
    # A node reconnects: the new stream is registered at once, the old one ends a few
    # turns later. Its window's letters were in neither in between, and could expire.
    letter = _letter(1, BUSY, time.time() + 0.3)
    await store.accept([letter], _relay)
    hub = _hub(store, {})
    _Pushing.add_to(hub)
    old = hub._sessions[BUSY] = _session(BUSY)
    assert await _pushed(hub, old) == [letter.shams]
    old.closed.set()  # as Hub.Connect does for the stream a new one replaces
    Hub._leave_unanswered(hub, old)  # type: ignore[arg-type]
    hub._sessions[BUSY] = _session(BUSY)  # registered; the old one not ended yet
    await asyncio.sleep(max(0.0, letter.expire_at - time.time()) + 0.05)  # type: ignore[operator]
    assert await Hub.expire_due(hub) == 0  # type: ignore[arg-type]


async def test_after_a_restart_the_letters_pushed_and_not_answered_wait_for_their_node(
    store: HubStore,
) -> None:
    # Letters in a delivery window when the hub stopped may have been delivered; the hub
    # used to remember no window after a restart, and expired them. Letters with an
    # expire_time are marked when pushed; the others (never pushed) expire.
    letters = [_letter(i, BUSY, time.time() + 0.3) for i in range(1, 4)]
    await store.accept(letters, _relay)
    before = _hub(store, {})
    _Pushing.add_to(before)
    before.config = SimpleNamespace(delivery_window=2)
    session = before._sessions[BUSY] = _session(BUSY)
    assert await _pushed(before, session) == [letters[0].shams, letters[1].shams]
    after = _hub(store, {})  # the hub restarted: nothing in memory
    await Hub._load_unanswered(after)  # type: ignore[arg-type]
    assert after._unanswered == {BUSY: {letters[0].shams, letters[1].shams}}
    await asyncio.sleep(max(0.0, letters[0].expire_at - time.time()) + 0.05)  # type: ignore[operator]
    assert await Hub.expire_due(after) == 1  # type: ignore[arg-type]
    left = await store.expired(time.time(), 10)
    assert sorted(row[1] for row in left) == [letters[0].shams, letters[1].shams]


async def test_a_letter_past_its_grace_is_left_to_the_expiry_not_pushed_again(
    store: HubStore,
) -> None:
    # Pushed again while the expiry loop was expiring it, its node's answer reached the
    # sender after the EXPIRY.
    letter = _letter(1, BUSY, time.time() - UNANSWERED_GRACE_S - 10)
    await store.accept([letter], _relay)
    hub = _hub(store, {})
    _Pushing.add_to(hub)
    hub._unanswered[BUSY] = {letter.shams}
    session = hub._sessions[BUSY] = _session(BUSY)
    assert await _pushed(hub, session) == []
    assert await Hub.expire_due(hub) == 1  # type: ignore[arg-type]


async def test_a_letter_whose_node_never_answers_expires_a_grace_after_its_expire_time(
    store: HubStore,
) -> None:
    letter = _letter(1, BUSY, time.time() - UNANSWERED_GRACE_S - 10)
    await store.accept([letter], _relay)
    hub = _hub(store, {})
    hub._unanswered[BUSY] = {letter.shams}
    assert await Hub.expire_due(hub) == 1  # type: ignore[arg-type]
    row = await store.db.fetchone(
        "SELECT evidence FROM evidence WHERE event = ?", (E.EVIDENCE_EVENT_EXPIRY,)
    )
    assert row is not None
    content = pb.EvidenceContent.FromString(pb.Evidence.FromString(row[0]).content)
    assert content.reason == "DELIVERY_UNCONFIRMED"
    assert hub._unanswered[BUSY] == set()


# -- expiry's pace: a run expires every letter due, a page at a time ---------------------------


async def test_one_run_expires_every_letter_due_not_one_page(store: HubStore) -> None:
    # 100,000 letters for an offline recipient expiring together took 200 runs (one page
    # a run): their senders waited that long for the EXPIRY, and the queue stayed counted
    # full, refusing new letters to it, all the while.
    past = time.time() - 3600
    letters = [_letter(i, QUIET, past + i / 1000) for i in range(1, 2 * _EXPIRY_PAGE + 2)]
    await store.accept(letters, _relay)
    hub = _hub(store, {})
    assert await Hub.expire_due(hub) == len(letters)  # type: ignore[arg-type]
    assert await store.expired(time.time(), 10) == []
    assert await _expiries_stored(store) == len(letters)
    assert sum(n for _, n in hub.counted) == -len(letters)


async def test_a_run_gives_the_event_loop_a_turn_between_pages(store: HubStore) -> None:
    # The evidence of a page is made and signed on the event loop: the next page waits
    # for another task's turn (a stream's frame), so a large expiry holds no stream up.
    past = time.time() - 3600
    letters = [_letter(i, QUIET, past + i / 1000) for i in range(1, 2 * _EXPIRY_PAGE + 2)]
    await store.accept(letters, _relay)
    hub = _hub(store, {})
    turns: list[int] = []  # letters whose EXPIRY was signed when another task had a turn
    signed: list[int] = []

    def sign(contents: Sequence[bytes]) -> list[pb.Evidence]:
        signed.extend(1 for _ in contents)
        return [pb.Evidence(content=c) for c in contents]

    async def other_task() -> None:
        while True:
            turns.append(len(signed))
            await asyncio.sleep(0)

    hub.signer.sign_evidence = sign
    ticker = asyncio.create_task(other_task())
    try:
        assert await Hub.expire_due(hub) == len(letters)  # type: ignore[arg-type]
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
    # Some turn came between the first page's signing and the last's.
    assert any(0 < n < len(letters) for n in turns)


async def test_letters_past_their_expire_time_the_expiry_has_not_reached_are_not_pushed(
    store: HubStore,
) -> None:
    # Expiry lagging behind (a large backlog expiring at once) must cost no more than
    # late EXPIRY evidence: a letter past its expire_time is never pushed to its
    # recipient, expired or not yet (the node refuses one it never had, too).
    past = time.time() - 60
    letters = [_letter(i, BUSY, past + i / 1000) for i in range(1, 4)]
    fresh = _letter(100, BUSY, time.time() + 3600)
    await store.accept([*letters, fresh], _relay)
    hub = _hub(store, {})
    _Pushing.add_to(hub)
    session = hub._sessions[BUSY] = _session(BUSY)
    assert await _pushed(hub, session) == [fresh.shams]
    assert await Hub.expire_due(hub) == len(letters)  # type: ignore[arg-type]


async def test_a_pages_expiry_evidence_is_signed_as_one_batch_each_verifying_alone(
    store: HubStore,
) -> None:
    # One signature a letter held the event loop about 30 ms a page of 500 (Ed25519),
    # 200 times over for 100,000 letters: the page is signed as relay evidence is, in
    # Merkle batches of one signature each.
    ca_key, key = generate_key("ed25519"), generate_key("ed25519")
    ca = issue_certificate(issuer_cert=None, issuer_key=ca_key, subject_key=ca_key,
                           identity_uri=None, kind="root")  # fmt: skip
    certificate = issue_certificate(issuer_cert=ca, issuer_key=ca_key, subject_key=key,
                                    identity_uri="urn:chapar:hub:test", kind="signing")  # fmt: skip
    signer = Signer(key, certificate)
    calls: list[int] = []

    def sign_evidence(contents: Sequence[bytes]) -> list[pb.Evidence]:
        calls.append(len(contents))
        return signer.sign_evidence(contents)

    past = time.time() - 3600
    letters = [_letter(i, QUIET, past + i) for i in range(1, 6)]
    await store.accept(letters, _relay)
    hub = _hub(store, {})
    hub.signer = SimpleNamespace(sign_evidence=sign_evidence)
    assert await Hub.expire_due(hub) == len(letters)  # type: ignore[arg-type]
    assert calls == [len(letters)]
    rows = await store.db.fetchall(
        "SELECT evidence FROM evidence WHERE event = ?", (E.EVIDENCE_EVENT_EXPIRY,)
    )
    trust = TrustStore([ca])
    trust.add_certificates([certificate])
    for (blob,) in rows:  # each alone, as a sender's node and an auditor check it
        content = trust.verify_evidence(pb.Evidence.FromString(blob))
        assert content.event == E.EVIDENCE_EVENT_EXPIRY
    assert len(rows) == len(letters)
