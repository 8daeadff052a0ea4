"""Store-and-forward under faults: every accepted letter lands exactly once, with evidence.

Each test starts its own hub and nodes as real processes and injects a real fault
(SIGKILL, SIGTERM, an offline recipient, expiry, a full queue) through node.faults.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from client_sdk import (
    ChaparError,
    Draft,
    ExchangeClient,
    Receipt,
    ResourceExhausted,
    pb,
)
from client_sdk.trust import TrustStore
from node import faults
from node.cluster import Cluster

pytestmark = pytest.mark.integration

A = "SENDER.A"
B = "RECIPIENT.B"
E = pb.EvidenceEvent
# The SDK's channel should retry a restarted node quickly (gRPC's default backoff grows to 2 min).
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]
NODE_SETTINGS = "reconnect_max_s = 1.0\nshutdown_grace_s = 2.0"


@contextlib.asynccontextmanager
async def started(
    tmp_path: Path, *, hub_settings: str = "", node_settings: str = ""
) -> AsyncIterator[Cluster]:
    cluster = await Cluster.start(
        tmp_path,
        [A, B],
        hub_settings=hub_settings,
        node_settings=f"{NODE_SETTINGS}\n{node_settings}",
    )
    try:
        yield cluster
    finally:
        codes = cluster.stop()
        assert set(codes.values()) == {0}, codes


def client(cluster: Cluster, code: str) -> ExchangeClient:
    return ExchangeClient(
        cluster.nodes[code].address, cluster.credentials(code), options=FAST_RECONNECT
    )


def query(
    cluster: Cluster, where: str, sql: str, params: tuple[object, ...] = ()
) -> list[tuple[object, ...]]:
    db = cluster.root / where / ("hub.db" if where == "hub" else "node.db")
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def count(cluster: Cluster, where: str, sql: str, params: tuple[object, ...] = ()) -> int:
    return int(query(cluster, where, sql, params)[0][0])  # type: ignore[call-overload]


async def eventually(check, timeout: float = 60.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


async def send_all(
    cluster: Cluster, drafts: list[Draft], batch: int = 100, pause_s: float = 0.0
) -> dict[str, Receipt]:
    """Submits every draft, retrying a batch with the same request ids while the node is down."""
    receipts: dict[str, Receipt] = {}
    async with client(cluster, A) as a:
        for start in range(0, len(drafts), batch):
            chunk = drafts[start : start + batch]
            while True:
                try:
                    results = await a.send_many(chunk, timeout=10)
                    break
                except ChaparError as exc:
                    if not exc.retryable:  # UNAVAILABLE, CANCELLED by a stopping node, ...
                        raise
                    await asyncio.sleep(0.2)
            for draft, result in zip(chunk, results, strict=True):
                assert isinstance(result, Receipt), result
                receipts[draft.request_id or ""] = result
            await asyncio.sleep(pause_s)
    return receipts


async def acknowledge_forever(cluster: Cluster, code: str, seen: list[str]) -> None:
    """A back-end that reads its inbox and acknowledges everything, reconnecting as needed."""
    while True:
        try:
            async with client(cluster, code) as c:
                async for letter in c.inbox():
                    seen.append(letter.shams)
                    await letter.ack()
        except ChaparError:
            await asyncio.sleep(0.2)


def drafts(n: int, **kwargs: object) -> list[Draft]:
    return [Draft(to=[B], subject=f"letter {i}", body=f"body {i}", **kwargs) for i in range(n)]  # type: ignore[arg-type]


def sequences(shams: list[str]) -> list[int]:
    return sorted(int(s.rsplit("/", 1)[1]) for s in shams)


def verify_all_evidence(cluster: Cluster, where: str) -> int:
    """Verifies every evidence signature stored at a node, offline, with the root CA alone
    plus the certificates the node keeps; returns how many were checked."""
    trust = TrustStore.from_pem_files(cluster.pki.root_cert, cluster.pki.intermediate_cert)
    trust.add_certificates(
        [bytes(r[0]) for r in query(cluster, where, "SELECT der FROM certificates")]
    )  # type: ignore[arg-type]
    blobs = query(cluster, where, "SELECT evidence FROM evidence")
    for (blob,) in blobs:
        trust.verify_evidence(pb.Evidence.FromString(blob))  # type: ignore[arg-type]
    return len(blobs)


# -- 1. a recipient offline ---------------------------------------------------------------


async def test_offline_recipient_gets_every_letter_in_submission_order_after_reconnect(
    tmp_path: Path,
) -> None:
    async with started(tmp_path) as cluster:
        await asyncio.to_thread(cluster.nodes[B].terminate)
        receipts = await send_all(cluster, drafts(300))
        await eventually(
            lambda: count(cluster, "hub", "SELECT count(*) FROM queue") == 300, what="queued"
        )
        await asyncio.sleep(3)  # offline for a while: the letters wait on the hub's disk
        assert count(cluster, "hub", "SELECT count(*) FROM queue WHERE recipient = ?", (B,)) == 300
        cluster.nodes[B].start()
        await cluster.nodes[B].wait_ready()
        await eventually(
            lambda: count(cluster, f"node-{B}", "SELECT count(*) FROM inbox") == 300,
            what="delivery",
        )
        arrived = [
            str(r[0]) for r in query(cluster, f"node-{B}", "SELECT shams FROM inbox ORDER BY rowid")
        ]
        assert arrived == sorted(arrived, key=lambda s: int(s.rsplit("/", 1)[1]))
        assert set(arrived) == {r.shams for r in receipts.values()}
        await eventually(
            lambda: count(cluster, "hub", "SELECT count(*) FROM queue") == 0, what="dequeue"
        )


async def test_a_backlog_larger_than_the_delivery_window_drains_as_receipts_free_room(
    tmp_path: Path,
) -> None:
    """With 5 letters in flight at most, the hub reads the rest of the queue only when the
    recipient's receipts free room: the read the window cut short must be taken up again."""
    async with started(tmp_path, hub_settings="delivery_window = 5") as cluster:
        await asyncio.to_thread(cluster.nodes[B].terminate)
        receipts = await send_all(cluster, drafts(60))
        await eventually(
            lambda: count(cluster, "hub", "SELECT count(*) FROM queue") == 60, what="queued"
        )
        cluster.nodes[B].start()
        await cluster.nodes[B].wait_ready()
        await eventually(
            lambda: count(cluster, f"node-{B}", "SELECT count(*) FROM inbox") == 60,
            timeout=30,
            what="delivery through a window of 5",
        )
        arrived = {str(r[0]) for r in query(cluster, f"node-{B}", "SELECT shams FROM inbox")}
        assert arrived == {r.shams for r in receipts.values()}
        await eventually(
            lambda: count(cluster, "hub", "SELECT count(*) FROM queue") == 0, what="dequeue"
        )


async def test_a_backlog_of_the_largest_letters_reaches_the_back_end_in_frames_it_accepts(
    tmp_path: Path,
) -> None:
    """24 letters at the body limit (4 MiB) wait for an offline recipient: 96 MiB, more than
    a node or the SDK accepts in one message (64 MiB), so the hub's deliveries and the
    node's inbox stream must cut their frames by size, not only by count."""
    big = [
        Draft(to=[B], subject=f"big {i}", body=bytes([i]) * (4 * 1024 * 1024 - 4096))
        for i in range(24)
    ]
    async with started(tmp_path) as cluster:
        await asyncio.to_thread(cluster.nodes[B].terminate)
        receipts = await send_all(cluster, big, batch=3)  # under 16 MiB a call
        await eventually(
            lambda: count(cluster, "hub", "SELECT count(*) FROM queue") == 24, what="queued"
        )
        cluster.nodes[B].start()
        await cluster.nodes[B].wait_ready()
        bodies: dict[str, bytes] = {}
        async with client(cluster, B) as b:

            async def read_all() -> None:
                async for letter in b.inbox():
                    bodies[letter.shams] = letter.body
                    await letter.ack()
                    if len(bodies) == len(big):
                        return

            await asyncio.wait_for(read_all(), 120)
        assert set(bodies) == {r.shams for r in receipts.values()}
        by_subject = {r.shams: d for d, r in zip(big, receipts.values(), strict=True)}
        assert all(bodies[s] == by_subject[s].body for s in bodies)
        await eventually(
            lambda: count(cluster, "hub", "SELECT count(*) FROM queue") == 0, what="dequeue"
        )


# -- 2. the hub down ------------------------------------------------------------------------


async def test_hub_down_nodes_keep_accepting_and_flush_when_it_returns(tmp_path: Path) -> None:
    async with started(tmp_path) as cluster:
        await asyncio.to_thread(cluster.hub.terminate)
        receipts = await send_all(cluster, drafts(200))
        assert all(
            r.content().event == E.EVIDENCE_EVENT_SUBMISSION_ACCEPTANCE for r in receipts.values()
        )
        await asyncio.sleep(2)
        assert (
            count(cluster, f"node-{A}", "SELECT count(*) FROM outbox WHERE relay_state = 0") == 200
        )
        cluster.hub.start()
        await cluster.hub.wait_ready()
        await eventually(
            lambda: count(cluster, f"node-{B}", "SELECT count(*) FROM inbox") == 200, what="flush"
        )
        reconnects = (cluster.root / f"node-{A}" / "node.log").read_text().count("hub stream ended")
        assert reconnects >= 2  # it kept trying, with backoff, while the hub was away


# -- 3. kill -9 in the middle of a run ----------------------------------------------------------


@pytest.mark.parametrize("victim", ["hub", "sender", "recipient"])
async def test_kill_9_mid_run_loses_nothing_and_duplicates_nothing(
    tmp_path: Path, victim: str
) -> None:
    total = 3000
    async with started(tmp_path) as cluster:
        seen: list[str] = []
        backend = asyncio.create_task(acknowledge_forever(cluster, B, seen))
        letters = drafts(total)

        async def killer() -> int:
            await eventually(
                lambda: count(cluster, f"node-{A}", "SELECT count(*) FROM outbox") >= total // 3,
                what="a third submitted",
            )
            at_kill = count(cluster, f"node-{A}", "SELECT count(*) FROM outbox")
            await faults.inject(
                cluster, faults.parse_fault(f"kill-{victim}@0s"), sender=A, recipient=B
            )
            return at_kill

        kill = asyncio.create_task(killer())
        receipts = await send_all(cluster, letters, pause_s=0.03)
        at_kill = await kill
        assert at_kill < total - 500, f"the kill came too late to be mid-run ({at_kill} submitted)"
        shams = [r.shams for r in receipts.values()]
        assert len(set(shams)) == total
        assert sequences(shams) == list(range(1, total + 1))  # unique and gapless

        def done() -> bool:
            return (
                count(
                    cluster,
                    f"node-{A}",
                    "SELECT count(*) FROM evidence WHERE event = ?",
                    (E.EVIDENCE_EVENT_HANDOVER,),
                )
                == total
            )

        await eventually(done, timeout=120, what="every HANDOVER back at the sender")
        backend.cancel()

        # Exactly once in the recipient's inbox; nothing else there.
        inbox = [str(r[0]) for r in query(cluster, f"node-{B}", "SELECT shams FROM inbox")]
        assert sorted(inbox) == sorted(shams)
        assert count(cluster, f"node-{A}", "SELECT count(*) FROM outbox") == total
        # Every chain complete at the sender: one of each event per letter.
        for event in (
            E.EVIDENCE_EVENT_SUBMISSION_ACCEPTANCE,
            E.EVIDENCE_EVENT_RELAY_ACCEPTANCE,
            E.EVIDENCE_EVENT_DELIVERY,
            E.EVIDENCE_EVENT_HANDOVER,
        ):
            assert (
                count(
                    cluster,
                    f"node-{A}",
                    "SELECT count(DISTINCT shams) FROM evidence WHERE event = ?",
                    (event,),
                )
                == total
            ), pb.EvidenceEvent.Name(event)
        assert (
            count(
                cluster,
                f"node-{A}",
                "SELECT count(*) FROM recipient_state WHERE state != ?",
                (pb.DeliveryState.DELIVERY_STATE_HANDED_OVER,),
            )
            == 0
        )
        assert verify_all_evidence(cluster, f"node-{A}") == 4 * total
        assert count(cluster, "hub", "SELECT count(*) FROM queue") == 0


# -- 4. expiry -----------------------------------------------------------------------------------


async def test_letter_not_delivered_before_expire_time_yields_expiry_evidence(
    tmp_path: Path,
) -> None:
    async with started(tmp_path, hub_settings="expiry_interval_s = 0.2") as cluster:
        await asyncio.to_thread(cluster.nodes[B].terminate)
        expire = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2)
        # Three, expiring in one page: their EXPIRY evidence is signed as one batch (a
        # Merkle tree), which the sender's node takes and the SDK verifies, each alone.
        receipts = list((await send_all(cluster, drafts(3, expire_time=expire))).values())
        async with client(cluster, A) as a:
            for receipt in receipts:
                deadline = time.monotonic() + 30
                while True:
                    tracking = await a.track(receipt.shams)
                    if tracking.statuses.get(B) == "EXPIRED":
                        break
                    assert time.monotonic() < deadline, tracking.statuses
                    await asyncio.sleep(0.2)
                verified = tracking.verify(cluster.credentials(A).trust_store())
                expiry = [v for v in verified if v.event == "EXPIRY"]
                assert len(expiry) == 1
                assert expiry[0].issuer == "urn:chapar:hub:national"
                assert expiry[0].reason == "LETTER_EXPIRED"
        signed = query(
            cluster, "hub", "SELECT evidence FROM evidence WHERE event = ?",
            (pb.EvidenceEvent.EVIDENCE_EVENT_EXPIRY,),
        )  # fmt: skip
        proofs = [pb.Evidence.FromString(row[0]).HasField("batch_proof") for row in signed]  # type: ignore[arg-type]
        assert proofs == [True] * 3
        assert count(cluster, "hub", "SELECT count(*) FROM queue") == 0
        cluster.nodes[B].start()
        await cluster.nodes[B].wait_ready()
        await asyncio.sleep(1.5)
        assert count(cluster, f"node-{B}", "SELECT count(*) FROM inbox") == 0


async def test_a_letter_pushed_to_a_node_that_vanished_gets_the_nodes_answer_not_an_expiry(
    tmp_path: Path,
) -> None:
    # The hub pushed the letter to B's node, which froze before it answered, then died:
    # it may have delivered the letter (its receipt lost with the stream). The hub used to
    # expire it once the stream was gone, an EXPIRY that a DELIVERY from B's node could
    # contradict. Now it waits for B's node and pushes the letter again though it has
    # expired; B's node, back within a minute of the expire_time, takes it (one that
    # never had it later than that refuses it: tests/unit/test_hub_link_writes.py).
    async with started(tmp_path, hub_settings="expiry_interval_s = 0.2") as cluster:
        cluster.nodes[B].pause()  # connected, reading nothing
        expire = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2)
        (receipt,) = (await send_all(cluster, drafts(1, expire_time=expire))).values()
        await asyncio.sleep(3.0)  # expired, and several expiry rounds
        expiries = "SELECT count(*) FROM evidence WHERE event = ?"
        expiry_event = (E.EVIDENCE_EVENT_EXPIRY,)
        assert count(cluster, "hub", expiries, expiry_event) == 0  # in flight: waits
        cluster.nodes[B].kill()  # the stream is gone, the answer unknown
        await asyncio.sleep(1.5)
        assert count(cluster, "hub", expiries, expiry_event) == 0
        cluster.nodes[B].start()
        await cluster.nodes[B].wait_ready()
        async with client(cluster, A) as a:
            deadline = time.monotonic() + 30
            while (tracking := await a.track(receipt.shams)).statuses.get(B) != "DELIVERED":
                assert time.monotonic() < deadline, tracking.statuses
                await asyncio.sleep(0.2)
            verified = tracking.verify(cluster.credentials(A).trust_store())
        assert [
            v.event for v in verified if v.event in ("EXPIRY", "DELIVERY", "DELIVERY_FAILURE")
        ] == ["DELIVERY"]
        assert count(cluster, "hub", expiries, expiry_event) == 0
        assert count(cluster, "hub", "SELECT count(*) FROM queue") == 0
        assert count(cluster, f"node-{B}", "SELECT count(*) FROM inbox") == 1


# -- 5. a full queue ----------------------------------------------------------------------------


async def test_full_recipient_queue_refuses_new_letters_with_retry_info_and_drops_nothing(
    tmp_path: Path,
) -> None:
    quota = 20
    async with started(
        tmp_path,
        hub_settings=f"queue_quota = {quota}\nquota_retry_after_s = 7\nreload_interval_s = 0.2",
    ) as cluster:
        await asyncio.to_thread(cluster.nodes[B].terminate)
        accepted: list[Receipt] = []
        refused: ResourceExhausted | None = None
        async with client(cluster, A) as a:
            for i in range(200):
                try:
                    accepted.append(await a.send(to=[B], subject=f"q{i}", body="x"))
                except ResourceExhausted as exc:
                    refused = exc
                    break
                await asyncio.sleep(0.02)
            assert refused is not None, "the quota was never enforced"
            assert refused.reason == "RECIPIENT_QUEUE_FULL"
            assert refused.retry_after == pytest.approx(7.0)
            assert refused.metadata["agency"] == B
            # The same refusal for a letter of a batch or of a stream carries its delay too,
            # so that it reads as retryable there as well (it read as final before).
            (in_batch,) = await a.send_many([Draft(to=[B], subject="batch", body="x")])
            streamed = [r async for r in a.send_stream([Draft(to=[B], subject="stream", body="x")])]
            for result in (in_batch, *streamed):
                assert isinstance(result, ResourceExhausted), result
                assert result.reason == "RECIPIENT_QUEUE_FULL"
                assert (result.retry_after, result.retryable) == (pytest.approx(7.0), True)
            assert len(accepted) >= quota
            outbox = count(cluster, f"node-{A}", "SELECT count(*) FROM outbox")
            assert outbox == len(accepted)  # the refused letter left no row

            # A quota raised in the hub's configuration frees the queue at the next reload,
            # with the recipient still away (the queue's depth does not change for it).
            config = cluster.root / "hub" / "hub.toml"
            text = config.read_text()
            assert f"queue_quota = {quota}\n" in text
            config.write_text(text.replace(f"queue_quota = {quota}\n", "queue_quota = 1000\n"))
            deadline = time.monotonic() + 20
            while True:
                try:
                    accepted.append(await a.send(to=[B], subject="quota raised", body="x"))
                    break
                except ResourceExhausted:
                    assert time.monotonic() < deadline, "the raised quota was never applied"
                    await asyncio.sleep(0.2)

            cluster.nodes[B].start()
            await cluster.nodes[B].wait_ready()
            await eventually(
                lambda: count(cluster, f"node-{B}", "SELECT count(*) FROM inbox") == len(accepted),
                what="every accepted letter delivered",
            )
            deadline = time.monotonic() + 30
            while True:  # the queue drained: the node learns it and accepts again
                try:
                    await a.send(to=[B], subject="after", body="x")
                    break
                except ResourceExhausted:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.2)


# -- 6. SIGTERM ------------------------------------------------------------------------------------


@pytest.mark.parametrize("victim", ["hub", "sender"])
async def test_sigterm_stops_within_grace_and_loses_nothing(tmp_path: Path, victim: str) -> None:
    async with started(tmp_path, hub_settings="shutdown_grace_s = 2.0") as cluster:
        seen: list[str] = []
        backend = asyncio.create_task(acknowledge_forever(cluster, B, seen))
        proc = cluster.hub if victim == "hub" else cluster.nodes[A]

        async def terminator() -> float:
            await eventually(
                lambda: count(cluster, f"node-{A}", "SELECT count(*) FROM outbox") >= 300,
                what="run under way",
            )
            t0 = time.monotonic()
            code = await asyncio.to_thread(proc.terminate)
            took = time.monotonic() - t0
            assert code == 0, proc.log_tail()
            proc.start()
            await proc.wait_ready()
            return took

        stopping = asyncio.create_task(terminator())
        receipts = await send_all(cluster, drafts(1000))
        took = await stopping
        assert took < 2.0 + 3.0, f"took {took:.1f}s to stop with a 2 s grace"
        await eventually(
            lambda: count(cluster, f"node-{B}", "SELECT count(*) FROM inbox") == 1000,
            what="delivery",
        )
        assert sequences([r.shams for r in receipts.values()]) == list(range(1, 1001))
        await eventually(lambda: len(set(seen)) == 1000, what="handed over")
        backend.cancel()


# -- 7. a back-end that never acknowledges ---------------------------------------------------


async def test_unacknowledged_letters_come_again_on_a_new_stream_and_double_ack_is_harmless(
    tmp_path: Path,
) -> None:
    async with started(tmp_path) as cluster:
        receipts = await send_all(cluster, drafts(3))
        wanted = sorted(r.shams for r in receipts.values())

        async def read(n: int, *, ack: bool) -> list[str]:
            got: list[str] = []
            async with client(cluster, B) as b:
                async for letter in b.inbox():
                    got.append(letter.shams)
                    if ack:
                        first = await letter.ack()
                        second = await letter.ack()
                        assert first.SerializeToString() == second.SerializeToString()
                    if len(got) == n:
                        break
            return sorted(got)

        assert await asyncio.wait_for(read(3, ack=False), 30) == wanted
        assert await asyncio.wait_for(read(3, ack=False), 30) == wanted  # redelivered
        assert await asyncio.wait_for(read(3, ack=True), 30) == wanted
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(read(1, ack=False), 1.5)  # nothing left to hand over
        assert (
            count(
                cluster,
                f"node-{B}",
                "SELECT count(*) FROM evidence WHERE event = ?",
                (E.EVIDENCE_EVENT_HANDOVER,),
            )
            == 3
        )


# -- memory while a backlog builds ----------------------------------------------------------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def test_hub_memory_stays_flat_while_a_recipient_backlog_grows(tmp_path: Path) -> None:
    async with started(tmp_path) as cluster:
        await asyncio.to_thread(cluster.nodes[B].terminate)
        assert cluster.hub.proc is not None
        pid = cluster.hub.proc.pid
        await send_all(cluster, drafts(2000))
        await eventually(
            lambda: count(cluster, "hub", "SELECT count(*) FROM queue") == 2000, what="queued"
        )
        early = rss_mb(pid)
        await send_all(cluster, drafts(8000))
        await eventually(
            lambda: count(cluster, "hub", "SELECT count(*) FROM queue") == 10000, what="queued"
        )
        late = rss_mb(pid)
        # Five times the backlog; the queue is on disk, so memory barely moves.
        assert late - early < 15, f"hub RSS grew from {early:.0f} MB to {late:.0f} MB"


# -- 9. retention -------------------------------------------------------------------------------------


async def test_retention_drops_bodies_of_finished_letters_and_keeps_verifiable_evidence(
    tmp_path: Path,
) -> None:
    fast = "retention_s = 0\npurge_interval_s = 0.3"
    async with started(tmp_path, hub_settings=fast, node_settings=fast) as cluster:
        seen: list[str] = []
        backend = asyncio.create_task(acknowledge_forever(cluster, B, seen))
        (receipt,) = (await send_all(cluster, drafts(1))).values()
        async with client(cluster, A) as a:
            deadline = time.monotonic() + 30
            while True:
                tracking = await a.track(receipt.shams)
                if tracking.body_purged and tracking.statuses.get(B) == "HANDED_OVER":
                    break
                assert time.monotonic() < deadline, (tracking.body_purged, tracking.statuses)
                await asyncio.sleep(0.2)
        backend.cancel()
        assert tracking.envelope.body == b""
        events = [v.event for v in tracking.verify(cluster.credentials(A).trust_store())]
        assert events == ["SUBMISSION_ACCEPTANCE", "RELAY_ACCEPTANCE", "DELIVERY", "HANDOVER"]
        await eventually(
            lambda: count(cluster, "hub", "SELECT count(*) FROM letters WHERE purged = 1") == 1,
            what="hub purge",
        )
        await eventually(
            lambda: count(cluster, f"node-{B}", "SELECT count(*) FROM inbox WHERE purged = 1") == 1,
            what="recipient purge",
        )
        assert (
            count(cluster, "hub", "SELECT count(*) FROM evidence") == 3
        )  # relay, delivery, handover


def test_fault_specs_parse_and_bad_ones_are_refused() -> None:
    assert faults.parse_fault("kill-hub@10s") == faults.Fault("kill", "hub", 10.0)
    assert faults.parse_fault("stop-recipient@5s:30s") == faults.Fault(
        "stop", "recipient", 5.0, 30.0
    )
    assert str(faults.parse_fault("pause-hub@1.5s:2s")) == "pause-hub@1.5s:2s"
    for bad in ("kill-hub", "explode-hub@1s", "stop-hub@1s", "kill-hub@-1s"):
        with pytest.raises(ValueError, match="bad fault"):
            faults.parse_fault(bad)
