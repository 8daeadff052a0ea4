"""The node monitor's stage latencies, from the evidence a real node store stores."""

from __future__ import annotations

import datetime as dt
import sqlite3
import time
import types
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from client_sdk import pb
from client_sdk.identity import Identity
from node import metrics as m
from node.core.evidence import evidence_content
from node.monitor import NodeMonitor, certificate_expiry, store_bytes
from node.storage.node_store import NodeStore

E = pb.EvidenceEvent
ME = "AA.BB"
T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[NodeStore]:
    opened = await NodeStore.open(tmp_path / "node.db")
    yield opened
    await opened.close()


def _content(origin: str, seq: int, event: int, recipient: str, at_s: float) -> pb.EvidenceContent:
    shams = pb.Shams(
        origin=origin, domain=pb.ShamsDomain.SHAMS_DOMAIN_OUTGOING, year=2026, sequence=seq
    )
    return pb.EvidenceContent.FromString(
        evidence_content(
            event,  # type: ignore[arg-type]
            issuer="urn:chapar:hub:national",
            shams=shams,
            envelope_sha256=b"\0" * 32,
            recipient=recipient,
            now=T0 + dt.timedelta(seconds=at_s),
            evidence_id=f"{origin}/{seq}/{event}/{recipient}",  # the same evidence, the same id
        )
    )


def _insert(path: Path, origin: str, seq: int, event: int, recipient: str, at_s: float) -> None:
    """Evidence stored before the monitor (an earlier run): written behind the store's back."""
    content = _content(origin, seq, event, recipient, at_s)
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(
            "INSERT INTO evidence (evidence_id, shams, event, evidence, recorded_at) "
            "VALUES (?, ?, ?, ?, 0)",
            (
                content.evidence_id,
                f"{origin}/O/2026/{seq}",
                event,
                pb.Evidence(content=content.SerializeToString()).SerializeToString(),
            ),
        )
    conn.close()


async def _store(store: NodeStore, evidence: list[tuple[str, int, int, str, float]]) -> None:
    """Evidence (origin, sequence, event, recipient, time) stored now, in one write, about
    letters in the outbox (added here, to the recipients the tests name): the store takes
    routed evidence only about a letter it sent, to one of its recipients, under its
    digest."""

    def sent(conn: sqlite3.Connection) -> None:
        for origin, seq, _, _, _ in evidence:
            shams = f"{origin}/O/2026/{seq}"
            conn.execute(
                "INSERT OR IGNORE INTO outbox (shams, envelope, envelope_sha256, receipt,"
                " created_at) VALUES (?, x'', ?, x'', 0)",
                (shams, b"\0" * 32),
            )
            conn.executemany(
                "INSERT OR IGNORE INTO recipient_state VALUES (?, ?, 1)",
                [(shams, r) for r in ("X.Y", "Z.Z", ME)],
            )

    await store.db.write(sent)
    items = []
    for origin, seq, event, recipient, at_s in evidence:
        content = _content(origin, seq, event, recipient, at_s)
        items.append(
            (pb.Evidence(content=content.SerializeToString()), content, f"{origin}/O/2026/{seq}")
        )
    await store.record_sender_evidence(items)


def _monitor(store: NodeStore, db: Path) -> NodeMonitor:
    config = types.SimpleNamespace(
        agency=ME,
        database=db,
        tls=types.SimpleNamespace(cert=db.parent / "none.crt"),
        signing=types.SimpleNamespace(cert=db.parent / "none.crt"),
        metrics_interval_s=1.0,
    )
    agency = types.SimpleNamespace(
        config=config,
        store=store,
        hub_connected=True,
        in_directory=True,
        identity=Identity.for_agency(ME),
    )
    return NodeMonitor(agency)  # type: ignore[arg-type]


def _counts() -> dict[str, tuple[float, float]]:
    out: dict[str, list[float]] = {}
    for metric in m.STAGE_SECONDS.collect():
        for sample in metric.samples:
            stage = sample.labels["stage"]
            if sample.name.endswith("_count"):
                out.setdefault(stage, [0.0, 0.0])[0] = sample.value
            elif sample.name.endswith("_sum"):
                out.setdefault(stage, [0.0, 0.0])[1] = sample.value
    return {k: (v[0], v[1]) for k, v in out.items()}


def _delta(before: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    after = _counts()
    return {
        k: (
            after[k][0] - before.get(k, (0, 0))[0],
            round(after[k][1] - before.get(k, (0, 0))[1], 3),
        )
        for k in after
        if after[k][0] != before.get(k, (0, 0))[0]
    }


async def test_stage_latencies_come_from_evidence_times_of_own_letters_only(
    store: NodeStore, tmp_path: Path
) -> None:
    db = tmp_path / "node.db"
    monitor = _monitor(store, db)
    # History before the monitor starts is not observed, but serves as the earlier event.
    _insert(db, ME, 1, E.EVIDENCE_EVENT_SUBMISSION_ACCEPTANCE, "", 0)
    _insert(db, ME, 1, E.EVIDENCE_EVENT_RELAY_ACCEPTANCE, "X.Y", 0.5)
    before = _counts()
    await monitor._observe_waiting()
    assert _delta(before) == {}

    await _store(
        store,
        [
            (ME, 1, E.EVIDENCE_EVENT_DELIVERY, "X.Y", 2.5),  # anchor read from the store
            (ME, 1, E.EVIDENCE_EVENT_HANDOVER, "X.Y", 10.0),
            (ME, 2, E.EVIDENCE_EVENT_SUBMISSION_ACCEPTANCE, "", 20.0),
            (ME, 2, E.EVIDENCE_EVENT_RELAY_ACCEPTANCE, "X.Y", 20.25),
        ],
    )
    await _store(
        store,
        [
            (ME, 2, E.EVIDENCE_EVENT_RELAY_ACCEPTANCE, "Z.Z", 20.75),
            (ME, 2, E.EVIDENCE_EVENT_DELIVERY, "Z.Z", 21.0),
            # A letter of another agency that we received: its sender observes it, not us.
            ("OTHER", 7, E.EVIDENCE_EVENT_DELIVERY, ME, 30.0),
            ("OTHER", 7, E.EVIDENCE_EVENT_HANDOVER, ME, 31.0),
            # A delivery whose relay acceptance we never stored: nothing to measure from.
            (ME, 3, E.EVIDENCE_EVENT_DELIVERY, "X.Y", 40.0),
        ],
    )
    # Observed as stored, from the earlier events in memory; the others wait for a refresh.
    assert _delta(before) == {
        "relay_to_delivery": (1, 0.25),
        "delivery_to_handover": (1, 7.5),
        "submit_to_relay": (2, 0.25 + 0.75),
    }
    before = _counts()
    await monitor._observe_waiting()  # one read of the earlier events not in memory
    assert _delta(before) == {"relay_to_delivery": (1, 2.0)}
    before = _counts()
    await _store(store, [(ME, 2, E.EVIDENCE_EVENT_DELIVERY, "Z.Z", 21.0)])  # again: not stored
    await monitor._observe_waiting()
    assert _delta(before) == {}


async def test_stage_whose_earlier_event_is_stored_later_is_observed_at_refresh(
    store: NodeStore, tmp_path: Path
) -> None:
    """Frames from the hub are stored concurrently: a delivery may commit before the relay
    acceptance it follows. The stage waits and is observed once the earlier one is known."""
    monitor = _monitor(store, tmp_path / "node.db")
    before = _counts()
    await _store(store, [(ME, 5, E.EVIDENCE_EVENT_DELIVERY, "X.Y", 3.0)])
    await _store(store, [(ME, 5, E.EVIDENCE_EVENT_RELAY_ACCEPTANCE, "X.Y", 1.0)])
    assert _delta(before) == {}
    await monitor._observe_waiting()
    assert _delta(before) == {"relay_to_delivery": (1, 2.0)}


async def test_remembered_event_times_are_bounded_and_the_oldest_go_first(
    store: NodeStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("node.monitor._MAX_REMEMBERED", 3)
    monitor = _monitor(store, tmp_path / "node.db")
    await _store(
        store, [(ME, i, E.EVIDENCE_EVENT_SUBMISSION_ACCEPTANCE, "", float(i)) for i in range(1, 6)]
    )
    assert [shams for shams, _, _ in monitor._times] == [f"{ME}/O/2026/{i}" for i in (3, 4, 5)]
    before = _counts()
    await _store(
        store,
        [
            (ME, 5, E.EVIDENCE_EVENT_RELAY_ACCEPTANCE, "X.Y", 5.5),  # its anchor is remembered
            (ME, 1, E.EVIDENCE_EVENT_RELAY_ACCEPTANCE, "X.Y", 1.5),  # forgotten: read at refresh
        ],
    )
    assert _delta(before) == {"submit_to_relay": (1, 0.5)}
    await monitor._observe_waiting()
    assert _delta(before) == {"submit_to_relay": (2, 1.0)}


def test_store_bytes_counts_database_wal_and_shm(tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    assert store_bytes(db) == 0
    db.write_bytes(b"a" * 100)
    Path(f"{db}-wal").write_bytes(b"b" * 20)
    assert store_bytes(db) == 120


def test_certificate_expiry_reads_the_leaf(tmp_path: Path) -> None:
    from certs.pki import init_pki

    pki = init_pki(tmp_path / "pki", hub="national", agencies=["AA.BB"])
    seconds = certificate_expiry(pki.agency_dir("AA.BB") / "tls.crt", T0.timestamp())
    assert seconds > 0


async def test_a_failing_refresh_leaves_its_timestamp_and_still_sets_the_disk_gauges(
    store: NodeStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Alerts judge the queue and outbox gauges: when their refresh fails they must be seen
    # as stale (the timestamp stays), and the disk gauges, which need no database, move on.
    monitor = _monitor(store, tmp_path / "node.db")
    m.METRICS_REFRESHED.set(0)
    m.STORE_FS_FREE.set(-1)

    async def broken() -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(monitor, "refresh", broken)
    with pytest.raises(sqlite3.OperationalError):
        await monitor.refresh_all()
    assert m.METRICS_REFRESHED._value.get() == 0
    assert m.STORE_FS_FREE._value.get() > 0
    monkeypatch.undo()
    await monitor.refresh_all()
    assert abs(m.METRICS_REFRESHED._value.get() - time.time()) < 5
