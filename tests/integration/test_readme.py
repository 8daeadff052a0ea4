"""README.md's SDK example, run as a new integrator runs it: copied into a file and started
with Python against a real hub and two nodes, only its addresses and PKI directory filled in."""

from __future__ import annotations

import asyncio
import os
import re
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from client_sdk import ExchangeClient, Tracking
from node.cluster import Cluster
from tests.conftest import AGENCY_A, AGENCY_B

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
# What the example names and a reader replaces with their own: asserted present, so that a
# README that renames them fails here rather than running against nothing.
NODE_A, NODE_B = '"127.0.0.1:7443"', '"127.0.0.1:7444"'
ATTACHMENT = b"%PDF-1.4\n% the README's report.pdf\n"


def sdk_example() -> str:
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.M | re.S)
    assert len(blocks) == 1, "README.md should hold one Python example (the SDK's)"
    return str(blocks[0])


@pytest.fixture
async def exchange(tmp_path: Path) -> AsyncIterator[Cluster]:
    """A hub and nodes of the README's two agencies, none of whose letters other tests
    left behind: the example acknowledges and answers every letter of B's inbox."""
    cluster = await Cluster.start(tmp_path / "cluster", [AGENCY_A, AGENCY_B])
    try:
        yield cluster
    finally:
        codes = cluster.stop()
        assert all(code == 0 for code in codes.values()), codes


async def _line(stream: asyncio.StreamReader, err: asyncio.StreamReader, timeout: float) -> str:
    try:
        line = await asyncio.wait_for(stream.readline(), timeout)
    except TimeoutError:
        raise AssertionError("the example printed nothing more") from None
    if not line:
        raise AssertionError(f"the example ended: {(await err.read()).decode()}")
    return line.decode().rstrip("\n")


async def test_readme_sdk_example_runs_against_a_real_exchange(
    exchange: Cluster, tmp_path: Path
) -> None:
    code = sdk_example()
    assert NODE_A in code
    assert NODE_B in code
    code = code.replace(NODE_A, repr(exchange.nodes[AGENCY_A].address))
    code = code.replace(NODE_B, repr(exchange.nodes[AGENCY_B].address))
    work = tmp_path / "backend"
    work.mkdir()
    (work / "pki").symlink_to(exchange.pki.root)  # the example's Path("pki")
    (work / "report.pdf").write_bytes(ATTACHMENT)
    (work / "example.py").write_text(code)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "example.py",
        cwd=work,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    try:
        shams = await _line(proc.stdout, proc.stderr, 30)
        assert shams.startswith(f"{AGENCY_A}/O/")
        # A's part ends with the tree, the letter first; B's inbox loop then prints it.
        seen = [await _line(proc.stdout, proc.stderr, 30)]
        while not seen[-1].startswith(f"{shams} Budget 2026"):
            seen.append(await _line(proc.stdout, proc.stderr, 30))
        assert "SUBMISSION_ACCEPTANCE urn:chapar:agency:000.00.00.G22" in seen
        assert f"{shams} LETTER RELAY_ACCEPTANCE" in seen or f"{shams} LETTER DELIVERY" in seen
        assert seen[-1] == f"{shams} Budget 2026 Please confirm."
        # B's back-end saves the attachment, acknowledges and reports ACCEPTED, then waits
        # for more letters for ever: stopped once A sees the status.
        async with ExchangeClient(
            exchange.nodes[AGENCY_A].address, exchange.credentials(AGENCY_A)
        ) as a:
            trust = await a.trust_from_directory(exchange.credentials(AGENCY_A).trust_store())
            async with asyncio.timeout(30):
                while (tracking := await a.track(shams)).business_statuses != {
                    AGENCY_B: "ACCEPTED"
                }:
                    assert proc.returncode is None, (await proc.stderr.read()).decode()
                    await asyncio.sleep(0.1)
            events = {e.event for e in tracking.verify(trust)}
            assert "HANDOVER" in events
    finally:
        if proc.returncode is None:
            proc.terminate()
        _, err = await proc.communicate()
    assert "Traceback" not in err.decode(), err.decode()

    saved = work / "inbox" / "report.pdf"
    assert saved.read_bytes() == ATTACHMENT
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    # The bundle holds the letter's body: the owner's alone, as `chapar track --save` writes it.
    bundle = work / "letter.bundle"
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o600
    offline = Tracking.from_bundle(bundle.read_bytes())
    assert offline.shams == shams
    assert "SUBMISSION_ACCEPTANCE" in {e.event for e in offline.verify(trust)}
