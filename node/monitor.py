"""What the operator sees that is not counted on the hot path: gauges and stage latencies.

One periodic task per server (every ``metrics_interval_s``) reads the store with cheap,
indexed queries and sets the gauges of ``node.metrics``: queue and outbox depths, the age
of the oldest waiting letter, bytes on disk, seconds until each local certificate expires,
connected nodes. At a node the monitor also observes how long each of its own letters took
from one signed event to the next: the node store hands it every evidence it stores, already
parsed, once the write has committed (``NodeStore.on_evidence_stored``). The times are the
signed ``event_time`` of the evidence, so the figure is the one the evidence proves; the
store pays a dictionary look-up per evidence, and an earlier event not in memory is read
from the store by the periodic task, once per batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from prometheus_client import Histogram

from client_sdk import pb
from client_sdk.trust import seconds_of
from node import metrics as m
from node.tasks import wait_period

if TYPE_CHECKING:
    from node.agency import Agency
    from node.hub import Hub

__all__ = ["HubMonitor", "NodeMonitor", "certificate_expiry", "store_bytes"]

log = logging.getLogger("chapar.monitor")
E = pb.EvidenceEvent
_EVIDENCE_BATCH = 2000
_MAX_REMEMBERED = 100_000  # event times kept in memory (about 15 MB at most)
# (event observed, the event it follows, histogram stage label)
_STAGES = {
    E.EVIDENCE_EVENT_RELAY_ACCEPTANCE: (E.EVIDENCE_EVENT_SUBMISSION_ACCEPTANCE, "submit_to_relay"),
    E.EVIDENCE_EVENT_DELIVERY: (E.EVIDENCE_EVENT_RELAY_ACCEPTANCE, "relay_to_delivery"),
    E.EVIDENCE_EVENT_HANDOVER: (E.EVIDENCE_EVENT_DELIVERY, "delivery_to_handover"),
}
_ANCHORS = frozenset(before for before, _ in _STAGES.values())
_SUBMISSION = E.EVIDENCE_EVENT_SUBMISSION_ACCEPTANCE
_STAGE_CHILDREN = {stage: m.STAGE_SECONDS.labels(stage=stage) for _, stage in _STAGES.values()}
# This node's own evidence, counted as letters at the commit that stored it: a submission
# retried under its request id, a letter delivered again or an acknowledgement repeated
# finds its evidence stored and counts nothing, and a call cancelled after its commit
# still counts.
_COUNTED = {
    E.EVIDENCE_EVENT_SUBMISSION_ACCEPTANCE: m.SUBMITTED,
    E.EVIDENCE_EVENT_DELIVERY: m.DELIVERED,
    E.EVIDENCE_EVENT_DELIVERY_FAILURE: m.DELIVERY_FAILED,
    E.EVIDENCE_EVENT_HANDOVER: m.HANDED_OVER,
}


def store_bytes(database: Path) -> int:
    """Size on disk of an SQLite database with its WAL and shared-memory files."""
    total = 0
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            total += Path(f"{database}{suffix}").stat().st_size
    return total


def certificate_expiry(path: Path, now: float) -> float:
    """Seconds from ``now`` until the leaf certificate in ``path`` expires."""
    cert = x509.load_pem_x509_certificates(path.read_bytes())[0]
    return cert.not_valid_after_utc.timestamp() - now


@dataclass
class _Common:
    database: Path
    certificates: dict[str, Path]
    # Read at each turn, and again when ``changed``'s event is set: a reload changes it
    # (node.tasks.wait_period).
    interval_s: Callable[[], float]
    changed: Callable[[], asyncio.Event] | None = None
    _task: asyncio.Task[None] | None = field(default=None, init=False)

    def _files(self, now: float) -> None:
        m.BYTES_STORED.set(store_bytes(self.database))
        usage = shutil.disk_usage(self.database.parent)
        m.STORE_FS_FREE.set(usage.free)
        m.STORE_FS_SIZE.set(usage.total)
        for name, path in self.certificates.items():
            try:
                m.CERT_EXPIRY.labels(certificate=name).set(certificate_expiry(path, now))
            except (OSError, ValueError) as exc:
                log.warning("cannot read certificate %s (%s): %s", name, path, exc)

    async def refresh(self) -> None:
        raise NotImplementedError

    async def refresh_all(self) -> None:
        """The files' gauges (disk, certificates) first, which need no database, then the
        role's; the time of the last refresh that completed says the gauges are fresh."""
        try:
            self._files(time.time())
        except OSError as exc:
            log.warning("cannot read the store's files: %s", exc)
        await self.refresh()
        m.METRICS_REFRESHED.set(time.time())

    async def _loop(self) -> None:
        while True:
            try:
                await self.refresh_all()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("metrics refresh failed")
            await wait_period(self.interval_s, self.changed)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="metrics")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class NodeMonitor(_Common):
    def __init__(self, agency: Agency) -> None:
        config = agency.config
        super().__init__(
            config.database,
            {"tls": config.tls.cert, "signing": config.signing.cert},
            lambda: agency.config.metrics_interval_s,  # as a reload sets it
            lambda: agency.reloaded,
        )
        self.agency = agency
        self._prefix = config.agency + "/"
        self._issuer = agency.identity.uri
        # (shams, event, recipient) -> signed event time, of this node's recent letters.
        # Insertion-ordered for eviction: a plain dict popped from the front with
        # next(iter(...)) scans the deleted slots before it, 39 us an event at 100,000.
        self._times: OrderedDict[tuple[str, int, str], float] = OrderedDict()
        # Stage events whose earlier event was not in memory: the next refresh reads it.
        self._waiting: list[tuple[str, pb.EvidenceContent]] = []
        # Histograms cover this process's lifetime, from the evidence it stores; history
        # serves only as the earlier event.
        agency.store.on_evidence_stored = self.evidence_stored

    async def refresh(self) -> None:
        now = time.time()
        db = self.agency.store.db
        m.HUB_CONNECTED.set(1 if self.agency.hub_connected else 0)
        m.IN_DIRECTORY.set(1 if self.agency.in_directory else 0)
        row = await db.fetchone(
            "SELECT count(*), min(created_at) FROM outbox WHERE relay_state = 0"
        )
        depth = int(row[0]) if row else 0
        m.NODE_OUTBOX_DEPTH.set(depth)
        m.NODE_OUTBOX_OLDEST_AGE.set(max(0.0, now - float(row[1])) if row and depth else 0.0)
        row = await db.fetchone("SELECT count(*) FROM inbox WHERE pending = 1")
        m.NODE_INBOX_UNACKED.set(int(row[0]) if row else 0)
        await self._observe_waiting()

    def evidence_stored(self, items: Sequence[tuple[str, pb.EvidenceContent]]) -> None:
        """Observes each stage whose earlier event is in memory; the others wait for the
        next refresh. Called by the store with the evidence one write stored, in order.

        A few evidence a letter, flat out thousands a second: each field is read once
        (each read of a protobuf field is a call), and the stages are observed after the
        whole write's earlier events are remembered (a frame may hold both)."""
        issuer, prefix, times = self._issuer, self._prefix, self._times
        stages: list[tuple[str, pb.EvidenceContent, tuple[str, int, str], float, Histogram]] = []
        counts: dict[pb.EvidenceEvent.ValueType, int] = {}
        for shams, content in items:
            event = content.event
            if event in _COUNTED and content.issuer == issuer:
                counts[event] = counts.get(event, 0) + 1
            # Only our own letters (numbered by this agency): each letter is observed at
            # exactly one node, the sender's, which stores all four kinds of evidence.
            if not shams.startswith(prefix):
                continue
            stage = _STAGES.get(event)
            if stage is None and event not in _ANCHORS:
                continue
            recipient = content.recipient
            at = seconds_of(content.event_time)
            if event in _ANCHORS:  # as _remember does
                times[(shams, event, recipient)] = at
                while len(times) > _MAX_REMEMBERED:  # bounded: the oldest go first
                    times.popitem(last=False)
            if stage is not None:
                # Submission acceptance is about the whole letter; the others per
                # recipient (as _anchor reads it).
                before, label = stage
                earlier = (shams, before, "" if before == _SUBMISSION else recipient)
                stages.append((shams, content, earlier, at, _STAGE_CHILDREN[label]))
        for event, n in counts.items():
            _COUNTED[event].inc(n)
        for shams, content, anchor, at, histogram in stages:
            start = times.get(anchor)
            if start is None:
                self._waiting.append((shams, content))
            else:  # as _observe does
                histogram.observe(max(0.0, at - start))

    async def _observe_waiting(self) -> None:
        """Observes the waiting stages whose earlier event the store holds: one query per
        batch of ``_EVIDENCE_BATCH``. A stage with no earlier event stored is dropped."""
        waiting, self._waiting = self._waiting, []
        for i in range(0, len(waiting), _EVIDENCE_BATCH):
            batch = waiting[i : i + _EVIDENCE_BATCH]
            missing = {s for s, c in batch if self._anchor(s, c) is None}
            if missing:
                await self._load_anchors(sorted(missing))
            for shams, content in batch:
                before = self._anchor(shams, content)
                if before is not None:
                    _observe(content, before)

    def _remember(self, shams: str, content: pb.EvidenceContent) -> None:
        key = (shams, content.event, content.recipient)
        self._times[key] = seconds_of(content.event_time)
        while len(self._times) > _MAX_REMEMBERED:  # bounded: the oldest go first
            self._times.popitem(last=False)

    def _anchor(self, shams: str, content: pb.EvidenceContent) -> float | None:
        event = _STAGES[content.event][0]
        # Submission acceptance is about the whole letter; the others per recipient.
        recipient = "" if event == _SUBMISSION else content.recipient
        return self._times.get((shams, event, recipient))

    async def _load_anchors(self, shams: Sequence[str]) -> None:
        rows = await self.agency.store.db.fetchall_in(
            "SELECT shams, evidence FROM evidence WHERE event IN (?, ?, ?) AND shams IN ({marks})",
            shams,
            sorted(_ANCHORS),
        )
        for s, blob in rows:
            self._remember(str(s), _content(blob))


def _observe(content: pb.EvidenceContent, before: float) -> None:
    elapsed = seconds_of(content.event_time) - before
    _STAGE_CHILDREN[_STAGES[content.event][1]].observe(max(0.0, elapsed))


def _content(blob: object) -> pb.EvidenceContent:
    assert isinstance(blob, bytes)
    return pb.EvidenceContent.FromString(pb.Evidence.FromString(blob).content)


class HubMonitor(_Common):
    def __init__(self, hub: Hub) -> None:
        config = hub.config
        super().__init__(
            config.database,
            {"tls": config.tls.cert, "signing": config.signing.cert},
            lambda: hub.config.metrics_interval_s,  # as a reload sets it
            lambda: hub.reloaded,
        )
        self.hub = hub
        self._top: set[tuple[str, str]] = set()

    async def refresh(self) -> None:
        now = time.time()
        db = self.hub.store.db
        depths = self.hub.queue_depths()  # counted in memory; a GROUP BY costs 0.1 s at 1M
        nonempty = [(agency, depth) for agency, depth in depths.items() if depth > 0]
        top = sorted(nonempty, key=lambda kv: (-kv[1], kv[0]))[: self.hub.config.metrics_top_n]
        # Read first, then set every gauge at once: a scrape between two awaits would see
        # the new total beside the old top-N.
        row = await db.fetchone("SELECT enqueued_at FROM queue ORDER BY id LIMIT 1")
        oldest = max(0.0, now - float(row[0])) if row else 0.0
        ages: list[float] = []
        for agency, _ in top:
            row = await db.fetchone(
                "SELECT enqueued_at FROM queue WHERE recipient = ? ORDER BY id LIMIT 1", (agency,)
            )
            ages.append(max(0.0, now - float(row[0])) if row else 0.0)
        m.HUB_CONNECTED_NODES.set(self.hub.connected)
        m.HUB_QUEUE_DEPTH.set(sum(depths.values()))
        m.HUB_QUEUE_OLDEST_AGE.set(oldest)
        current: set[tuple[str, str]] = set()
        for rank, ((agency, depth), age) in enumerate(zip(top, ages, strict=True), start=1):
            labels = (str(rank), agency)
            current.add(labels)
            m.HUB_QUEUE_TOP_DEPTH.labels(*labels).set(depth)
            m.HUB_QUEUE_TOP_AGE.labels(*labels).set(age)
        for labels in self._top - current:  # bounded: only the current N series remain
            m.HUB_QUEUE_TOP_DEPTH.remove(*labels)
            m.HUB_QUEUE_TOP_AGE.remove(*labels)
        self._top = current
