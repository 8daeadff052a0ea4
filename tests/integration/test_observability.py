"""What operators see, against real processes: metrics, Prometheus, dashboards and alert rules,
health, reflection, JSON logs, configuration errors and ``chapar status``.

One cluster for the module (A and B with nodes, C without, so letters to C stay queued at
the hub), with gauges refreshed every 0.5 s. The health test stops and restarts the hub, so
it runs last.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from client_sdk import ExchangeClient, pb
from client_sdk.errors import NotFound
from node.cluster import Cluster
from tests.conftest import AGENCY_A, AGENCY_B, AGENCY_C

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
RULES = sorted((ROOT / "ops" / "prometheus").glob("*.yml"))
DASHBOARDS = sorted((ROOT / "ops" / "grafana").glob("*.json"))
CHAPAR = [sys.executable, "-m", "node"]
SECRET_BODY = f"BODY-SECRET-{uuid.uuid4()}"


@dataclass
class Traffic:
    """What the module's letters were: for the log and status tests to look for."""

    delivered: list[tuple[str, str]]  # (shams, request_id) A -> B, acknowledged by B
    queued: str  # A -> C, no node: waits at the hub


@pytest.fixture(scope="module")
def obs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("obs")
    started = asyncio.run(
        Cluster.start(
            root,
            [AGENCY_A, AGENCY_B, AGENCY_C],
            without_node=[AGENCY_C],
            node_settings="metrics_interval_s = 0.5\nreconnect_max_s = 1.0",
            hub_settings="metrics_interval_s = 0.5",
        )
    )
    try:
        yield started
    finally:
        codes = started.stop()
        assert all(code == 0 for code in codes.values()), codes


async def _send_traffic(cluster: Cluster, letters: int = 3) -> Traffic:
    """Letters A -> B (handed over), one A -> C (queued), and a refusal at node and hub."""
    delivered = []
    async with (
        ExchangeClient(cluster.nodes[AGENCY_A].address, cluster.credentials(AGENCY_A)) as a,
        ExchangeClient(cluster.nodes[AGENCY_B].address, cluster.credentials(AGENCY_B)) as b,
    ):
        for i in range(letters):
            rid = f"obs-{uuid.uuid4()}"
            receipt = await a.send(
                to=[AGENCY_B], subject=f"metrics {i}", body=SECRET_BODY, request_id=rid
            )
            delivered.append((receipt.shams, rid))
        inbox = b.inbox()
        for _ in range(letters):
            letter = await asyncio.wait_for(anext(inbox), 30)
            await letter.ack()
        await inbox.aclose()
        queued = await a.send(to=[AGENCY_C], subject="waits", body=SECRET_BODY)
        with pytest.raises(NotFound):  # a refusal at the node: UNKNOWN_RECIPIENT
            await a.send(to=["NO.SUCH"], subject="x", body="y")
    # A refusal at the hub: a back-end client is not an agency node.
    creds = cluster.credentials(AGENCY_A).channel_credentials()
    async with grpc.aio.secure_channel(cluster.hub.address, creds) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await pb.HubServiceStub(channel).GetDirectory(pb.GetDirectoryRequest(), timeout=10)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    return Traffic(delivered, queued.shams)


@pytest.fixture(scope="module")
def traffic(obs: Cluster) -> Traffic:
    return asyncio.run(_send_traffic(obs))


def _scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        return str(response.read().decode())


def _servers(cluster: Cluster) -> list[tuple[str, str]]:
    return [("hub", cluster.hub.metrics)] + [(c, p.metrics) for c, p in cluster.nodes.items()]


# -- promtool and a real Prometheus -------------------------------------------------------


def _prometheus_tools() -> tuple[str, str]:
    """promtool and prometheus from Debian's package, installed here if missing."""
    if shutil.which("promtool") is None or shutil.which("prometheus") is None:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            pytest.skip("prometheus is not installed and apt-get cannot install it (not root)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"]
        result = subprocess.run(install, capture_output=True, text=True, env=env, check=False)
        if result.returncode != 0:
            subprocess.run(["apt-get", "update"], capture_output=True, env=env, check=False)
            result = subprocess.run(install, capture_output=True, text=True, env=env, check=False)
        if result.returncode != 0:
            pytest.skip(f"apt-get install prometheus failed: {result.stderr[-500:]}")
    promtool, prometheus = shutil.which("promtool"), shutil.which("prometheus")
    assert promtool
    assert prometheus
    return promtool, prometheus


def test_metrics_of_hub_and_node_pass_promtool_check_metrics(
    obs: Cluster, traffic: Traffic
) -> None:
    promtool, _ = _prometheus_tools()
    for name, address in _servers(obs):
        text = _scrape(address)
        assert "chapar_build_info{" in text, name
        checked = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
        )
        assert checked.returncode == 0, f"{name}: {checked.stdout}{checked.stderr}"
        assert checked.stdout.strip() == "", name  # no lint findings either
        assert checked.stderr.strip() == "", name


def test_alert_rules_pass_promtool_check_rules() -> None:
    promtool, _ = _prometheus_tools()
    assert RULES, "no rule files in ops/prometheus"
    checked = subprocess.run(
        [promtool, "check", "rules", *map(str, RULES)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def dashboard_expressions() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target, with Grafana's variables given test values."""
    out = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        assert board["schemaVersion"] >= 36
        for panel in board["panels"]:
            for target in panel["targets"]:
                expr = target["expr"]
                expr = expr.replace("$__rate_interval", "1m").replace("$instance", ".+")
                assert "$" not in expr, f"{path.name}: unknown variable in {expr}"
                out.append((f"{path.name}: {panel['title']}", expr))
    return out


def rule_count() -> int:
    return sum(len(re.findall(r"^\s*- (?:alert|record):", p.read_text(), re.M)) for p in RULES)


def rule_expressions(base: str) -> list[tuple[str, str]]:
    """(alert, PromQL) of every rule as Prometheus loaded it from ops/prometheus, with
    comparisons made ``bool`` so that a healthy system answers too.

    ``x > 3600`` finds nothing while all is well; ``x > bool 3600`` answers 0 for every
    series it compares, which proves the series the alert watches exist.
    """
    with urllib.request.urlopen(f"{base}/api/v1/rules", timeout=10) as r:
        groups = json.loads(r.read())["data"]["groups"]
    out = []
    for group in groups:
        for rule in group["rules"]:
            assert rule["health"] in ("ok", "unknown"), rule
            expr = re.sub(r"\s(==|!=|>=|<=|>|<)\s+(?!bool)", r" \1 bool ", rule["query"])
            out.append((f"{group['file']}: {rule['name']}", expr))
    assert len(out) == rule_count()
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _query(base: str, expr: str) -> list[object]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as response:
        answer = json.loads(response.read())
    assert answer["status"] == "success", answer
    result = answer["data"]["result"]
    return result if isinstance(result, list) else [result]


@contextlib.contextmanager
def _prometheus(binary: str, cluster: Cluster, tmp_path: Path) -> Iterator[str]:
    config = {
        "global": {"scrape_interval": "500ms", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in RULES],
        "scrape_configs": [
            {"job_name": "chapar-hub", "static_configs": [{"targets": [cluster.hub.metrics]}]},
            {
                "job_name": "chapar-node",
                "static_configs": [{"targets": [p.metrics for p in cluster.nodes.values()]}],
            },
        ],
    }
    (tmp_path / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    port = _free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{base}/-/ready", timeout=2) as r,
            ):
                if r.status == 200:
                    break
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_prometheus_finds_data_for_every_dashboard_and_alert_expression(
    obs: Cluster, traffic: Traffic, tmp_path: Path
) -> None:
    _, prometheus = _prometheus_tools()
    with _prometheus(prometheus, obs, tmp_path) as base:
        expressions = dashboard_expressions() + rule_expressions(base)
        assert len(expressions) > 30
        deadline = time.monotonic() + 30
        while len([s for s in _query(base, "up == 1")]) < 3:
            assert time.monotonic() < deadline, _query(base, "up")
            time.sleep(0.3)
        asyncio.run(_send_traffic(obs, letters=2))  # counters move while Prometheus watches
        time.sleep(2.0)  # a few scrapes after the traffic, for rate() and the histograms
        missing = expressions
        deadline = time.monotonic() + 30
        while missing and time.monotonic() < deadline:
            missing = [(w, e) for w, e in missing if not _query(base, e)]
            if missing:
                time.sleep(1.0)
        assert not missing, "expressions with no data:\n" + "\n".join(
            f"{w}: {e}" for w, e in missing
        )
        rule_expressions(base)  # after evaluating for a while, still no rule in error
        # And the values agree with what happened: 3 + 2 handed over at B, letters queued for C.
        handed = _query(base, 'sum(chapar_letters_total{stage="handover"})')
        assert [float(s["value"][1]) for s in handed] == [5.0]  # type: ignore[index]
        top = _query(base, 'chapar_hub_queue_top_depth{rank="1"}')
        assert [s["metric"]["agency"] for s in top] == [AGENCY_C]  # type: ignore[index]
