"""A server whose database cannot write answers with a canonical code and a reason (DESIGN
section 9), never gRPC's UNKNOWN with a Python exception's text, stores nothing of the
request that failed, and serves again once it can write: real hub and node processes, the node's disk
taken away with RLIMIT_FSIZE (writes past the limit fail with EFBIG)."""

from __future__ import annotations

import asyncio
import contextlib
import resource
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from client_sdk import ExchangeClient, InternalError
from client_sdk.shams import parse_shams
from node.cluster import Cluster, ServerProcess
from tests.conftest import AGENCY_A, AGENCY_B, db_count

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def _no_writes(server: ServerProcess) -> Iterator[None]:
    """The server's process may extend no file past one byte: its database's next commit
    fails with "disk I/O error" (and its log stays as it was meanwhile)."""
    proc = server.proc
    assert proc is not None
    before = resource.prlimit(proc.pid, resource.RLIMIT_FSIZE)
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (1, before[1]))  # the soft one
    try:
        yield
    finally:
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, before)


async def test_a_submission_the_database_cannot_store_gets_a_reason_and_a_retry_stores_it(
    tmp_path: Path,
) -> None:
    cluster = await Cluster.start(tmp_path, [AGENCY_A, AGENCY_B])
    try:
        db = cluster.root / f"node-{AGENCY_A}" / "node.db"
        async with ExchangeClient(
            cluster.nodes[AGENCY_A].address, cluster.credentials(AGENCY_A)
        ) as a:
            first = await a.send(to=[AGENCY_B], subject="s", body="before")
            with _no_writes(cluster.nodes[AGENCY_A]), pytest.raises(InternalError) as info:
                await a.send(to=[AGENCY_B], subject="s", body="during", request_id="r-2")
            error = info.value
            assert (error.code, error.reason) == (grpc.StatusCode.INTERNAL, "STORAGE_FAILED")
            assert error.retry_after is not None
            assert error.retryable
            assert error.metadata["incident"]
            assert "Error" not in error.message  # no Python exception's name or text
            assert db_count(db, "SELECT count(*) FROM outbox WHERE request_id LIKE '%r-2%'") == 0
            # Nothing of it was stored: the retry with its id is a new letter, numbered
            # next (a number taken by the failed call would leave a gap).
            again = await a.send(to=[AGENCY_B], subject="s", body="during", request_id="r-2")
            assert again.request_id == "r-2"
            assert parse_shams(again.shams).sequence == parse_shams(first.shams).sequence + 1
    finally:
        cluster.stop()


async def test_a_hub_that_cannot_store_a_relay_ends_the_stream_with_a_reason_and_loses_nothing(
    tmp_path: Path,
) -> None:
    cluster = await Cluster.start(tmp_path, [AGENCY_A, AGENCY_B])
    try:
        async with (
            ExchangeClient(cluster.nodes[AGENCY_A].address, cluster.credentials(AGENCY_A)) as a,
            ExchangeClient(cluster.nodes[AGENCY_B].address, cluster.credentials(AGENCY_B)) as b,
        ):
            with _no_writes(cluster.hub):
                receipt = await a.send(to=[AGENCY_B], subject="s", body="kept")  # in A's outbox
                node_log = cluster.nodes[AGENCY_A].log_file
                for _ in range(100):  # the hub refuses the relay: A's stream ends, A retries
                    if "hub stream ended" in node_log.read_text():
                        break
                    await asyncio.sleep(0.1)
            ended = [line for line in node_log.read_text().splitlines() if "hub stream" in line]
            assert ended
            assert all("INTERNAL the server's database failed" in line for line in ended), ended
            assert all("UNKNOWN" not in line and "Traceback" not in line for line in ended)

            async def first_letter() -> str:
                async for letter in b.inbox():
                    await letter.ack()
                    return letter.shams
                raise AssertionError("inbox stream ended")

            assert await asyncio.wait_for(first_letter(), 30) == receipt.shams
    finally:
        cluster.stop()
