"""What operators see, against real processes: metrics, Prometheus, dashboards and alert rules,
health, reflection, JSON logs, configuration errors and ``chapar status``.

One cluster for the module (A and B with nodes, C without, so letters to C stay queued at
the hub), with gauges refreshed every 0.5 s. The health test stops and restarts the hub, so
it runs last.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import re
import shutil
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from client_sdk import ExchangeClient, pb
from client_sdk.errors import NotFound
from loadtest.harness import proc_stats
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


def _samples(address: str) -> dict[str, float]:
    """``name{labels}`` -> value of a server's scrape."""
    out = {}
    for line in _scrape(address).splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def test_counters_and_stage_latencies_match_the_letters_sent(
    obs: Cluster, traffic: Traffic
) -> None:
    """Three letters A -> B handed over, one A -> C queued, one refused at A."""
    a, b = obs.nodes[AGENCY_A].metrics, obs.nodes[AGENCY_B].metrics
    deadline = time.monotonic() + 15
    while True:  # the stage histograms follow within metrics_interval_s
        sa = _samples(a)
        # Both: the A -> C letter is sent last, so its relay can come after the handovers.
        if (
            sa.get('chapar_letter_stage_seconds_count{stage="delivery_to_handover"}') == 3
            and sa.get('chapar_letter_stage_seconds_count{stage="submit_to_relay"}') == 4
        ):
            break
        assert time.monotonic() < deadline, sa
        time.sleep(0.2)
    assert sa['chapar_letter_stage_seconds_count{stage="submit_to_relay"}'] == 4
    assert sa['chapar_letter_stage_seconds_count{stage="relay_to_delivery"}'] == 3
    for stage in ("submit_to_relay", "relay_to_delivery", "delivery_to_handover"):
        assert 0 < sa[f'chapar_letter_stage_seconds_sum{{stage="{stage}"}}'] < 60
    assert sa['chapar_letters_total{outcome="accepted",stage="submit"}'] == 4
    assert sa['chapar_letters_total{outcome="rejected",stage="submit"}'] == 1
    assert sa['chapar_rejections_total{code="NOT_FOUND",reason="UNKNOWN_RECIPIENT"}'] == 1
    sb = _samples(b)
    assert sb['chapar_letters_total{outcome="delivered",stage="delivery"}'] == 3
    assert sb['chapar_letters_total{outcome="handed_over",stage="handover"}'] == 3
    assert sb['chapar_letter_stage_seconds_count{stage="delivery_to_handover"}'] == 0  # A's letters
    deadline = time.monotonic() + 15
    top_c = f'chapar_hub_queue_top_depth{{agency="{AGENCY_C}",rank="1"}}'
    # Gauges follow within metrics_interval_s, so wait for C's letter itself: a refresh
    # taken while B's last letter was still queued also shows a total of 1 (seen once: its
    # only series was B's, queued 5 ms before, and C's letter not yet sent).
    while (hub := _samples(obs.hub.metrics))["chapar_hub_queue_depth"] != 1 or hub.get(top_c) != 1:
        assert time.monotonic() < deadline, {k: v for k, v in hub.items() if "queue" in k}
        time.sleep(0.2)
    assert hub['chapar_letters_total{outcome="accepted",stage="relay"}'] == 4
    assert hub["chapar_hub_connected_nodes"] == 2
    assert hub[top_c] == 1
    assert not any(k.startswith("chapar_node_") for k in hub)  # each role its own metrics
    assert not any(k.startswith("chapar_hub_queue") for k in sa)
    # The threads that do the work, from their own CPU clocks: both worked, and no thread
    # used more CPU than the process has.
    for samples, server in ((hub, obs.hub), (sa, obs.nodes[AGENCY_A])):
        loop = samples['chapar_thread_cpu_seconds_total{thread="event_loop"}']
        writer = samples['chapar_thread_cpu_seconds_total{thread="db_writer"}']
        assert 0 < writer < loop <= proc_stats(server)["cpu_s"] + 0.05, (loop, writer)


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


# -- JSON logs ------------------------------------------------------------------------------


def _log_entries(path: Path) -> list[dict[str, object]]:
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            entry = json.loads(line)  # every line one JSON object, or this fails
            assert isinstance(entry, dict), f"{path}:{number}"
            entries.append(entry)
    return entries


def _numbers(entry: dict[str, object]) -> list[object]:
    """The SHAMS numbers a log line names: a JSON array on lines about letters."""
    numbers = entry.get("shams")
    return numbers if isinstance(numbers, list) else []


def test_json_logs_name_shams_request_id_and_peer_never_bodies_or_keys(
    obs: Cluster, traffic: Traffic
) -> None:
    """One line per batch of letters per step, naming each letter of the batch by number."""
    shams, request_id = traffic.delivered[0]
    client_a = f"urn:chapar:client:{AGENCY_A}:backend"
    time.sleep(0.5)  # log lines of the last acknowledgements are flushed
    hub = _log_entries(obs.hub.log_file)
    node_a = _log_entries(obs.nodes[AGENCY_A].log_file)
    node_b = _log_entries(obs.nodes[AGENCY_B].log_file)

    def find(entries: list[dict[str, object]], message: str) -> dict[str, object]:
        found = [e for e in entries if e["message"] == message and shams in _numbers(e)]
        assert len(found) == 1, (message, [e for e in entries if shams in _numbers(e)])
        numbers = _numbers(found[0])
        assert found[0]["count"] == len(numbers) == len(set(numbers))
        return found[0]

    accepted = find(node_a, "letters accepted")
    request_ids = accepted["request_ids"]
    assert isinstance(request_ids, list)
    assert len(request_ids) == len(_numbers(accepted))
    assert request_ids[_numbers(accepted).index(shams)] == request_id
    assert accepted["peer"] == client_a
    assert find(hub, "letters relayed")["peer"] == AGENCY_A
    assert find(node_b, "letters delivered")["peer"] == AGENCY_A
    assert find(node_b, "letters handed over")["peer"] == f"urn:chapar:client:{AGENCY_B}:backend"
    for entries, message in (
        (node_a, "letters accepted"),
        (hub, "letters relayed"),
        (node_b, "letters delivered"),
        (node_b, "letters handed over"),
    ):  # batching loses no letter and names none twice
        logged = [n for e in entries if e["message"] == message for n in _numbers(e)]
        for number, _ in traffic.delivered:
            assert logged.count(number) == 1, (message, number, logged)
    for entries in (hub, node_a, node_b):
        assert {"time", "level", "logger", "message"} <= set(entries[0])
    for path in (obs.hub.log_file, *(p.log_file for p in obs.nodes.values())):
        text = path.read_text()
        assert SECRET_BODY not in text, path
        assert "PRIVATE KEY" not in text, path


# -- chapar status --------------------------------------------------------------------------


def test_status_shows_queues_peers_certificates_and_last_errors(
    obs: Cluster, traffic: Traffic
) -> None:
    deadline = time.monotonic() + 15
    while _samples(obs.hub.metrics)["chapar_hub_queue_depth"] < 1:  # gauges refreshed
        assert time.monotonic() < deadline
        time.sleep(0.2)
    hub = subprocess.run(
        [*CHAPAR, "status", obs.hub.metrics], capture_output=True, text=True, check=False
    )
    assert hub.returncode == 0, hub.stderr
    out = hub.stdout
    assert f"Chapar hub at {obs.hub.metrics}" in out
    assert "READY (SERVING)" in out
    assert re.search(r"Connected nodes\s+2\n", out), out
    # The queue for C (no node takes it) is listed with its depth; its rank among the
    # deepest depends on what else the cluster's traffic left queued at that moment.
    assert re.search(rf"\s[1-9]\d*\s+{re.escape(AGENCY_C)}\s+[1-9]", out), out
    assert "Certificate tls" in out
    assert "Certificate signing" in out
    assert "PERMISSION_DENIED / NOT_AN_AGENCY_NODE" in out

    node = subprocess.run(
        [*CHAPAR, "status", obs.nodes[AGENCY_A].metrics],
        capture_output=True,
        text=True,
        check=False,
    )
    assert node.returncode == 0, node.stderr
    out = node.stdout
    assert "Chapar node" in out
    assert re.search(r"Hub stream\s+up", out), out
    assert re.search(r"submit accepted [1-9]", out), out
    assert "NOT_FOUND / UNKNOWN_RECIPIENT" in out
    assert re.search(r"Certificate tls\s+expires in 3\d\d days", out), out

    down = subprocess.run(
        [*CHAPAR, "status", f"127.0.0.1:{_free_port()}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert down.returncode == 1
    assert "cannot read metrics" in down.stderr
    assert "Traceback" not in down.stderr


def test_metrics_tls_serves_only_clients_with_a_certificate_of_the_national_ca(
    tmp_path: Path,
) -> None:
    from certs.pki import generate_key, issue_certificate
    from node.status import client_context, fetch

    cluster = asyncio.run(
        Cluster.start(
            tmp_path,
            [AGENCY_A],
            hub_settings="metrics_tls = true",
            node_settings="metrics_tls = true",
        )
    )
    try:
        pki, a = cluster.pki, cluster.pki.agency_dir(AGENCY_A)
        good = client_context(pki.root_cert, a / "tls.crt", a / "tls.key")
        anonymous = ssl.create_default_context(cafile=str(pki.root_cert))
        ca_key, key = generate_key("ecdsa-p256"), generate_key("ecdsa-p256")
        ca = issue_certificate(
            issuer_cert=None, issuer_key=ca_key, subject_key=ca_key, identity_uri=None, kind="root"
        )
        cert = issue_certificate(
            issuer_cert=ca, issuer_key=ca_key, subject_key=key,
            identity_uri=f"urn:chapar:agency:{AGENCY_A}", kind="tls",
        )  # fmt: skip
        stranger = _context_with(pki.root_cert, cert, key, tmp_path)  # another CA's certificate
        for server in (cluster.hub, cluster.nodes[AGENCY_A]):
            url = server.metrics
            assert url.startswith("https://127.0.0.1:"), url
            assert url.endswith("/metrics"), url
            assert fetch(url, tls=good).value("chapar_ready") is not None
            # No client certificate, one from another CA, plain HTTP: nothing is served.
            _assert_tls_refuses(url, anonymous)
            _assert_tls_refuses(url, stranger)
            with pytest.raises((ConnectionError, http.client.HTTPException)):
                fetch(url.replace("https://", "http://"))
        status = subprocess.run(
            [*CHAPAR, "status", cluster.hub.metrics, "--ca", str(pki.root_cert),
             "--cert", str(a / "tls.crt"), "--key", str(a / "tls.key")],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert status.returncode == 0, status.stderr
        assert "READY (SERVING)" in status.stdout
        # With a certificate to present, a bare HOST:PORT is read over https (it was read
        # over plain HTTP, ignoring the files, and failed with "Connection reset by peer").
        host_port = cluster.hub.metrics.removeprefix("https://").removesuffix("/metrics")
        status = subprocess.run(
            [*CHAPAR, "status", host_port, "--ca", str(pki.root_cert),
             "--cert", str(a / "tls.crt"), "--key", str(a / "tls.key")],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert status.returncode == 0, status.stderr
        assert "READY (SERVING)" in status.stdout
        # Without a certificate, over https or plain HTTP: one line naming the cause and
        # what to give (it was a bare "certificate verify failed" or "Connection reset by
        # peer").
        for target, cause in (
            (cluster.hub.metrics, "certificate verify failed ("),
            (host_port, "the server closed the connection without an HTTP answer"),
        ):
            refused = subprocess.run(
                [*CHAPAR, "status", target], capture_output=True, text=True, check=False
            )
            assert refused.returncode == 1
            assert refused.stderr.startswith(f"error: cannot read metrics at {target}: ")
            assert refused.stderr.count("\n") == 1, refused.stderr
            assert cause in refused.stderr
            assert "metrics_tls" in refused.stderr
            assert "--ca" in refused.stderr
            assert "--cert and --key" in refused.stderr
        # With the right files, but dialled by a name its certificate does not give ("127.1"
        # reaches 127.0.0.1, but is no IP address to the name check): the line says that,
        # not that the certificate does not chain to --ca (which sent the operator to the
        # wrong file).
        misnamed = host_port.replace("127.0.0.1", "127.1")
        refused = subprocess.run(
            [*CHAPAR, "status", misnamed, "--ca", str(pki.root_cert),
             "--cert", str(a / "tls.crt"), "--key", str(a / "tls.key")],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert refused.returncode == 1
        assert refused.stderr.count("\n") == 1, refused.stderr
        assert "does not chain" not in refused.stderr
        assert "the server's certificate does not name 127.1" in refused.stderr
        # With a client certificate of another CA than the one the server trusts: the
        # server refuses it in the handshake, and the line says so, naming --cert (it was
        # most often "EOF occurred in violation of protocol", the alert lost to a race
        # under TLS 1.3, otherwise OpenSSL's alert alone: "[SSL: TLSV1_ALERT_UNKNOWN_CA]
        # tlsv1 alert unknown ca"). Both servers: one run saw each of those.
        for target in (host_port, cluster.nodes[AGENCY_A].metrics):
            refused = subprocess.run(
                [*CHAPAR, "status", target, "--ca", str(pki.root_cert),
                 "--cert", str(tmp_path / "c.crt"), "--key", str(tmp_path / "c.key")],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            assert refused.returncode == 1
            assert refused.stderr.startswith(f"error: cannot read metrics at {target}: ")
            assert refused.stderr.count("\n") == 1, refused.stderr
            assert (
                f"the server refused our client certificate --cert {tmp_path / 'c.crt'} (TLS"
                " alert: unknown CA): is it issued by the CA the server trusts?" in refused.stderr
            ), refused.stderr
    finally:
        codes = cluster.stop()
    assert all(code == 0 for code in codes.values()), codes


def _assert_tls_refuses(url: str, context: ssl.SSLContext) -> None:
    """The handshake, or under TLS 1.3 the first read after it, fails with an SSL error
    (urllib wraps it in URLError when it comes during the handshake)."""
    from node.status import fetch

    with pytest.raises((ssl.SSLError, urllib.error.URLError)) as info:
        fetch(url, tls=context)
    error = info.value
    assert isinstance(error, ssl.SSLError) or isinstance(error.reason, ssl.SSLError), error


def _context_with(ca: Path, cert: Any, key: Any, where: Path) -> ssl.SSLContext:
    from cryptography.hazmat.primitives import serialization

    (where / "c.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (where / "c.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    from node.status import client_context

    return client_context(ca, where / "c.crt", where / "c.key")


# -- configuration errors stop start-up -----------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            ('metrics_listen = "127.0.0.1:0"', 'metrics_listn = "127.0.0.1:0"'),
            "node.metrics_listn: unknown key",
        ),
        (
            ("reconnect_max_s = 1.0", 'reconnect_max_s = "soon"'),
            "node.reconnect_max_s: must be a number from 0.2 to 3600",
        ),
        (
            ("metrics_interval_s = 0.5", "metrics_interval_s = 0"),
            "node.metrics_interval_s: must be a number from 0.1 to 60",
        ),
        (
            ('metrics_listen = "127.0.0.1:0"', 'metrics_listen = "localhost"'),
            "node.metrics_listen: must be HOST:PORT, not 'localhost'",
        ),
        (("[tls]", '[tls]\ncrl = "x"'), "tls.crl: unknown key"),
    ],
    ids=["unknown-key", "wrong-type", "out-of-range", "bad-address", "unknown-in-table"],
)
def test_bad_node_configuration_stops_start_up_naming_the_key(
    obs: Cluster, tmp_path: Path, edit: tuple[str, str], message: str
) -> None:
    text = obs.nodes[AGENCY_A].config.read_text()
    assert edit[0] in text
    bad = text.replace(edit[0], edit[1], 1)
    bad = bad.replace('database = "node.db"', f"database = {json.dumps(str(tmp_path / 'n.db'))}")
    config = tmp_path / "node.toml"
    config.write_text(bad)
    result = subprocess.run(
        [*CHAPAR, "node", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "n.db").exists()  # stopped before opening anything


# -- reflection and health (last: stops and restarts the hub) --------------------------------


def test_reflection_lets_standard_tools_explore_node_and_hub(obs: Cluster) -> None:
    creds = obs.credentials(AGENCY_A).channel_credentials()
    for address, service in (
        (obs.nodes[AGENCY_A].address, pb.NODE_SERVICE_NAME),
        (obs.hub.address, pb.HUB_SERVICE_NAME),
    ):
        with grpc.secure_channel(address, creds) as channel:
            db = ProtoReflectionDescriptorDatabase(channel)
            services = set(db.get_services())
            assert {service, "grpc.health.v1.Health"} <= services, services
            methods = db.FindFileContainingSymbol(service)
            assert methods.name.startswith("chapar/exchange/v1/")


async def _health(address: str, creds: grpc.ChannelCredentials, service: str = "") -> str:
    async with grpc.aio.secure_channel(address, creds) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        answer = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))


async def _wait_health(address: str, creds: grpc.ChannelCredentials, want: str) -> float:
    start = time.monotonic()
    while True:
        states = {await _health(address, creds, s) for s in ("", pb.NODE_SERVICE_NAME)}
        if states == {want}:
            return time.monotonic() - start
        assert time.monotonic() - start < 30, f"health {states}, want {want}"
        await asyncio.sleep(0.1)


def _gauge(address: str, name: str) -> float:
    for line in _scrape(address).splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in the metrics of {address}")


def test_node_health_is_not_serving_while_its_hub_stream_is_down(obs: Cluster) -> None:
    creds = obs.credentials(AGENCY_A).channel_credentials()
    node = obs.nodes[AGENCY_A]

    async def run() -> None:
        assert await _health(obs.hub.address, creds) == "SERVING"
        assert await _health(obs.hub.address, creds, pb.HUB_SERVICE_NAME) == "SERVING"
        await _wait_health(node.address, creds, "SERVING")
        obs.hub.terminate()
        await _wait_health(node.address, creds, "NOT_SERVING")
        await asyncio.sleep(1.2)  # the gauges follow within metrics_interval_s
        assert _gauge(node.metrics, "chapar_ready") == 0
        assert _gauge(node.metrics, "chapar_node_hub_connected") == 0
        await obs.hub.restart()
        await _wait_health(node.address, creds, "SERVING")
        await asyncio.sleep(1.2)
        assert _gauge(node.metrics, "chapar_ready") == 1
        assert _gauge(node.metrics, "chapar_node_hub_connected") == 1
        assert _gauge(node.metrics, "chapar_hub_link_reconnects_total") >= 1

    asyncio.run(run())


async def test_hub_health_is_not_serving_while_its_store_cannot_write(tmp_path: Path) -> None:
    # Another process holds the database's write lock (a backup tool, an operator's
    # sqlite3 shell): the hub's commits wait out busy_timeout (10 s) and fail. Health and
    # chapar_ready must say so, and come back with the next commit; nothing is lost.
    cluster = await Cluster.start(
        tmp_path, [AGENCY_A, AGENCY_B], node_settings="reconnect_max_s = 1.0"
    )
    creds = cluster.credentials(AGENCY_A).channel_credentials()
    hub = cluster.hub

    async def health_becomes(want: str) -> None:
        start = time.monotonic()
        while await _health(hub.address, creds, pb.HUB_SERVICE_NAME) != want:
            assert time.monotonic() - start < 40, f"hub health never became {want}"
            await asyncio.sleep(0.1)
        assert await _health(hub.address, creds) == want

    try:
        await health_becomes("SERVING")
        lock = sqlite3.connect(cluster.root / "hub" / "hub.db", timeout=1)
        lock.execute("BEGIN IMMEDIATE")
        try:
            async with ExchangeClient(
                cluster.nodes[AGENCY_A].address, cluster.credentials(AGENCY_A)
            ) as a:
                receipt = await a.send(to=[AGENCY_B], subject="while locked", body="x")
            await health_becomes("NOT_SERVING")
            assert _gauge(hub.metrics, "chapar_ready") == 0
        finally:
            lock.rollback()
            lock.close()
        await health_becomes("SERVING")
        assert _gauge(hub.metrics, "chapar_ready") == 1
        async with (
            ExchangeClient(cluster.nodes[AGENCY_B].address, cluster.credentials(AGENCY_B)) as b,
            contextlib.aclosing(b.inbox()) as inbox,
        ):
            letter = await asyncio.wait_for(anext(inbox), 60)
        assert letter.shams == receipt.shams
    finally:
        codes = cluster.stop()
        assert set(codes.values()) == {0}, codes


async def test_letters_are_counted_once_however_often_their_calls_are_retried(
    tmp_path: Path,
) -> None:
    # A submission retried under its request id and an acknowledgement made twice find
    # their evidence stored: the letter counts once, at the commit that stored it.
    cluster = await Cluster.start(tmp_path, [AGENCY_A, AGENCY_B])
    try:
        async with (
            ExchangeClient(cluster.nodes[AGENCY_A].address, cluster.credentials(AGENCY_A)) as a,
            ExchangeClient(cluster.nodes[AGENCY_B].address, cluster.credentials(AGENCY_B)) as b,
        ):
            first = await a.send(to=[AGENCY_B], subject="once", body="x", request_id="once")
            again = await a.send(to=[AGENCY_B], subject="once", body="x", request_id="once")
            assert again.shams == first.shams
            async with contextlib.aclosing(b.inbox()) as inbox:
                letter = await asyncio.wait_for(anext(inbox), 30)
            assert await letter.ack() == await b.ack(letter.shams)
        sa = _samples(cluster.nodes[AGENCY_A].metrics)
        sb = _samples(cluster.nodes[AGENCY_B].metrics)
        assert sa['chapar_letters_total{outcome="accepted",stage="submit"}'] == 1
        assert sb['chapar_letters_total{outcome="delivered",stage="delivery"}'] == 1
        assert sb['chapar_letters_total{outcome="handed_over",stage="handover"}'] == 1
    finally:
        codes = cluster.stop()
        assert set(codes.values()) == {0}, codes


def test_the_error_rate_alert_fires_for_one_stage_that_fails_among_busy_ones(
    tmp_path: Path,
) -> None:
    # A node refusing 10 % of its submissions while it also receives letters: the refused
    # share of all its letters is under 5 %, of its submissions it is not.
    promtool, _ = _prometheus_tools()
    node = '{job="chapar-node", instance="n1", stage="%s", outcome="%s"}'
    series = {
        node % ("submit", "accepted"): "0+540x30",
        node % ("submit", "rejected"): "0+60x30",
        node % ("delivery", "delivered"): "0+600x30",
        node % ("handover", "handed_over"): "0+600x30",
    }
    test = {
        "rule_files": [str(p) for p in RULES],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": f"chapar_letters_total{labels}", "values": values}
                    for labels, values in series.items()
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "20m",
                        "alertname": "ChaparHighErrorRate",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "warning",
                                    "job": "chapar-node",
                                    "instance": "n1",
                                    "stage": "submit",
                                },
                                "exp_annotations": {
                                    "summary": "More than 5% of the letters at the submit stage"
                                    " of n1 are rejected or fail",
                                    "description": "chapar_rejections_total by reason says why."
                                    " At the hub, accepted letters count once per recipient.",
                                },
                            }
                        ],
                    }
                ],
            }
        ],
    }
    path = tmp_path / "error_rate_test.yml"
    path.write_text(json.dumps(test))  # JSON is YAML
    result = subprocess.run(
        [promtool, "test", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _promtool_test(promtool: str, tmp_path: Path, name: str, test: dict[str, Any]) -> None:
    path = tmp_path / f"{name}.yml"
    path.write_text(json.dumps({"rule_files": [str(p) for p in RULES], **test}))  # JSON is YAML
    result = subprocess.run(
        [promtool, "test", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_node_not_ready_or_left_out_of_the_directory_raises_an_alert(tmp_path: Path) -> None:
    # n1's store cannot write: its hub stream stays up (no ChaparNodeDisconnected), but it
    # is NOT_SERVING. n2's agency was removed from the hub's directory: it refuses every
    # letter (and has no stream: ChaparNodeDisconnected's, not paged twice as not ready).
    # n3 is well. Neither n1 nor n2 raised an alert that said what is wrong.
    promtool, _ = _prometheus_tools()
    gauges = {
        "n1": {"chapar_ready": 0, "chapar_node_hub_connected": 1, "chapar_node_in_directory": 1},
        "n2": {"chapar_ready": 0, "chapar_node_hub_connected": 0, "chapar_node_in_directory": 0},
        "n3": {"chapar_ready": 1, "chapar_node_hub_connected": 1, "chapar_node_in_directory": 1},
    }
    series = [
        {"series": f'{metric}{{job="chapar-node", instance="{node}"}}', "values": f"{value}x30"}
        for node, values in gauges.items()
        for metric, value in values.items()
    ]

    def fired(alert: str, node: str, summary: str, description: str) -> dict[str, object]:
        return {
            "eval_time": "15m",
            "alertname": alert,
            "exp_alerts": [
                {
                    "exp_labels": {"severity": "warning", "job": "chapar-node", "instance": node},
                    "exp_annotations": {"summary": summary, "description": description},
                }
            ],
        }

    test = {
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    fired(
                        "ChaparNodeNotReady",
                        "n1",
                        "Agency node n1 has reported NOT_SERVING for 5 minutes with its hub"
                        " stream up",
                        'Its log says why ("health: NOT_SERVING (...)"): most often its database'
                        " cannot be written (disk full, permissions), and submissions are"
                        " refused.",
                    ),
                    fired(
                        "ChaparNodeNotInDirectory",
                        "n2",
                        "The hub refuses agency node n2: its agency is not in the hub's directory",
                        "It refuses every letter (AGENCY_NOT_IN_DIRECTORY) until the hub lists"
                        " its agency again: the hub's [[agencies]] lost it, or the node is"
                        " configured with the wrong agency code.",
                    ),
                ],
            }
        ],
    }
    _promtool_test(promtool, tmp_path, "node_ready_test", test)


def test_a_node_whose_clock_is_far_from_the_hubs_raises_an_alert(tmp_path: Path) -> None:
    # n1's hub is 10 minutes ahead of it, n2's 3 minutes behind: both are alerted on after
    # 10 minutes. n3 is 30 s off, and n4 was 10 minutes off for 5 minutes only (its clock
    # stepped by NTP): neither. Nothing told an operator of either before.
    promtool, _ = _prometheus_tools()
    metric = 'chapar_node_hub_clock_offset_seconds{job="chapar-node", instance="%s"}'
    series = [
        {"series": metric % "n1", "values": "600x40"},
        {"series": metric % "n2", "values": "-180x40"},
        {"series": metric % "n3", "values": "30x40"},
        {"series": metric % "n4", "values": "600x5 0x35"},
    ]

    def fired(node: str) -> dict[str, object]:
        return {
            "exp_labels": {"severity": "warning", "job": "chapar-node", "instance": node},
            "exp_annotations": {
                "summary": f"The clocks of agency node {node} and of the hub are more than 2"
                " minutes apart",
                "description": "chapar_node_hub_clock_offset_seconds says by how much (positive:"
                " the hub's is ahead). At 5 minutes (hub.clock_skew_s) the hub refuses the"
                " letters of a node ahead of it (CREATE_TIME_OUT_OF_WINDOW), and a restore may"
                " leave out letters or notices. Set both machines' clocks by NTP.",
            },
        }

    test = {
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    {"eval_time": "8m", "alertname": "ChaparNodeClockOffTheHubs", "exp_alerts": []},
                    {
                        "eval_time": "15m",
                        "alertname": "ChaparNodeClockOffTheHubs",
                        "exp_alerts": [fired("n1"), fired("n2")],
                    },
                ],
            }
        ],
    }
    _promtool_test(promtool, tmp_path, "node_clock_test", test)


def test_an_own_document_set_aside_as_corrupt_raises_an_alert(tmp_path: Path) -> None:
    # n1 found one of its own documents corrupt (no agency can download it until a back-end
    # uploads the file again); n2 dropped a corrupt copy it had fetched, which it fetches
    # again by itself: no alert for n2. Neither was alerted on before.
    promtool, _ = _prometheus_tools()
    metric = 'chapar_documents_set_aside_total{job="chapar-node", instance="%s", kind="%s"}'
    series = [
        {"series": metric % ("n1", "own"), "values": "0x20 1x40"},
        {"series": metric % ("n1", "fetched"), "values": "0x60"},
        {"series": metric % ("n2", "own"), "values": "0x60"},
        {"series": metric % ("n2", "fetched"), "values": "0x20 3x40"},
    ]
    fired = {
        "exp_labels": {
            "severity": "warning",
            "job": "chapar-node",
            "instance": "n1",
            "kind": "own",
        },
        "exp_annotations": {
            "summary": "Agency node n1 found a document of its own corrupt on disk and set it aside",
            "description": 'Its log names it ("our document ... is corrupt; moved aside"); the'
            " copy is kept in corrupt/ under the documents directory. Other agencies cannot"
            " download it until a back-end uploads the file again. Check the disk.",
        },
    }
    test = {
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    {"eval_time": "10m", "alertname": "ChaparOwnDocumentCorrupt", "exp_alerts": []},
                    {
                        "eval_time": "30m",
                        "alertname": "ChaparOwnDocumentCorrupt",
                        "exp_alerts": [fired],
                    },
                    {
                        "eval_time": "59m",
                        "alertname": "ChaparOwnDocumentCorrupt",
                        "exp_alerts": [fired],
                    },
                ],
            }
        ],
    }
    _promtool_test(promtool, tmp_path, "own_document_corrupt_test", test)


def test_gauges_refreshed_at_the_longest_metrics_interval_are_never_stale(tmp_path: Path) -> None:
    # ChaparMetricsStale fires once the gauges are 120 s old; metrics_interval_s was allowed
    # up to 3600, so a node refreshing every 10 minutes raised it for ever. At the longest
    # interval the configuration takes, a refresh on time never does; one that stops does.
    from node.config import MAX_METRICS_INTERVAL_S

    promtool, _ = _prometheus_tools()
    scrape_s, minutes = 15, 30
    on_time = [
        int(t // MAX_METRICS_INTERVAL_S * MAX_METRICS_INTERVAL_S)
        for t in range(0, minutes * 60, scrape_s)
    ]
    stopped = [min(t, 600) for t in on_time]  # its last refresh at 10 minutes

    def values(samples: list[int]) -> str:
        return " ".join(map(str, samples))

    metric = 'chapar_metrics_refresh_timestamp_seconds{job="chapar-node", instance="%s"}'
    test = {
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": f"{scrape_s}s",
                "input_series": [
                    {"series": metric % "on-time", "values": values(on_time)},
                    {"series": metric % "stopped", "values": values(stopped)},
                ],
                "alert_rule_test": [
                    {
                        "eval_time": f"{m}m",
                        "alertname": "ChaparMetricsStale",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "warning",
                                    "job": "chapar-node",
                                    "instance": "stopped",
                                },
                                "exp_annotations": {
                                    "summary": "The queue and outbox gauges of stopped have"
                                    " not been refreshed for 5 minutes",
                                    "description": "Their refresh fails (the server's log says"
                                    " why): alerts on queues and outboxes judge old values.",
                                },
                            }
                        ]
                        if m >= 16
                        else [],
                    }
                    for m in range(1, minutes)
                ],
            }
        ],
    }
    _promtool_test(promtool, tmp_path, "metrics_stale_test", test)
