"""The hub's expiry reads past letters being delivered: a recipient whose delivery window
is full of expired letters (each waits for its receipt, which decides it) used to hold the
first page of expired letters for good, and no other queue's letters expired. Driven with
a real HubStore and stand-ins for the rest of the hub."""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest

from client_sdk import pb
from client_sdk.shams import format_shams
from node.core.evidence import evidence_content
from node.hub import _EXPIRY_PAGE, Hub
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
        counted=[],
    )
    hub._sign = lambda content: Hub._sign(hub, content)  # type: ignore[arg-type]
    hub._expiries = lambda rows, now: Hub._expiries(hub, rows, now)  # type: ignore[arg-type]
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
