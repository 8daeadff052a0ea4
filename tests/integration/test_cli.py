"""The ``chapar`` command as a person at a terminal uses it: demo, send, inbox, track."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from certs.pki import init_pki, load_certs
from client_sdk import ExchangeClient, Letter, format_shams_checked, pb
from node.cluster import Cluster
from node.demo import AGENCY_A, AGENCY_B, EXPECTED_CHAIN

pytestmark = pytest.mark.integration
CHAPAR = [sys.executable, "-m", "node"]


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CHAPAR, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_demo_prints_every_chain_verified_and_exits_zero() -> None:
    result = _run("demo", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "All evidence chains verified." in out
    for event in EXPECTED_CHAIN:
        assert out.count(f"{event} ") >= 2, out  # in the letter's chain and the reply's
    assert out.count("signature verified") == 2 * len(EXPECTED_CHAIN)
    assert "arrived intact, SHA-256 verified" in out
    assert "verified again from the file with the root CA alone" in out
    assert re.search(r"Business status of \S+: 10861234567 ACCEPTED .* verified", out), out
    # The hub's tree: the letter, and B's status update and reply under it.
    assert re.search(r"Correspondence of \S+ at the hub \(\d+ evidence verified\)", out), out
    assert out.count("signed header verified") == 3, out
    assert re.search(r"\n    \S+  ACCEPTED +10861234567 -> 000.00.00.G22  signed header", out), out
    assert "hub exit 0" in out
    # Numbers as people quote them: with their check character, everywhere the demo names one.
    sent = re.search(rf"A \({re.escape(AGENCY_A)}\) sent (\S+) with", out)
    assert sent is not None, out
    assert sent[1] == format_shams_checked(sent[1].rpartition(":")[0]), out
    assert f"Business status of {sent[1]}: " in out, out
    assert f"  SHAMS {sent[1]}\n" in out, out


def test_demo_serve_keeps_servers_for_send_inbox_and_track(tmp_path: Path) -> None:
    demo_dir = tmp_path / "demo"
    proc = subprocess.Popen(
        [*CHAPAR, "demo", "--serve", str(demo_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        addresses = demo_dir / "addresses.json"
        deadline = time.monotonic() + 90
        while not addresses.exists():
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "demo --serve did not write addresses.json"
            time.sleep(0.2)
        info = json.loads(addresses.read_text())
        assert set(info["nodes"]) == {AGENCY_A, AGENCY_B}
        assert info["hub"].startswith("127.0.0.1:")

        sent = _run(
            "send",
            "--demo",
            str(demo_dir),
            "--agency",
            AGENCY_A,
            "--to",
            AGENCY_B,
            "--subject",
            "By hand",
            "--body",
            "typed at a terminal",
            "--json",
        )
        assert sent.returncode == 0, sent.stderr
        shams = json.loads(sent.stdout)["shams"]
        assert shams.startswith(f"{AGENCY_A}/O/")
        assert json.loads(sent.stdout)["shams_checked"] == format_shams_checked(shams)

        inbox = _run(
            "inbox",
            "--demo",
            str(demo_dir),
            "--agency",
            AGENCY_B,
            "--ack",
            "--limit",
            "1",
            "--timeout",
            "30",
        )
        assert inbox.returncode == 0, inbox.stderr
        assert inbox.stdout.startswith(f"{format_shams_checked(shams)}  from {AGENCY_A}  By hand")

        deadline = time.monotonic() + 30
        while True:
            track = _run("track", "--demo", str(demo_dir), "--agency", AGENCY_A, shams)
            if "HANDOVER" in track.stdout or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert track.returncode == 0, track.stdout + track.stderr
        for event in EXPECTED_CHAIN:
            assert event in track.stdout

        bad = _run(
            "send",
            "--demo",
            str(demo_dir),
            "--agency",
            AGENCY_A,
            "--to",
            "NO.SUCH",
            "--subject",
            "x",
            "--body",
            "y",
        )
        assert bad.returncode == 1
        assert "NOT_FOUND" in bad.stderr
        assert "UNKNOWN_RECIPIENT" in bad.stderr
        assert "Traceback" not in bad.stderr

        # Every server's metrics address is listed, for pointing a Prometheus at the demo.
        metrics = info["metrics"]
        assert set(metrics["nodes"]) == {AGENCY_A, AGENCY_B}
        for address in [metrics["hub"], *metrics["nodes"].values()]:
            assert address.startswith("127.0.0.1:")
            with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
                assert b"chapar_build_info{" in response.read()
        hub_status = _run("status", "--demo", str(demo_dir), "hub")
        assert hub_status.returncode == 0, hub_status.stderr
        assert "Chapar hub" in hub_status.stdout
        assert "READY (SERVING)" in hub_status.stdout
        node_status = _run("status", "--demo", str(demo_dir), AGENCY_B)
        assert node_status.returncode == 0, node_status.stderr
        assert "handover handed_over" in node_status.stdout
    finally:
        pids = [json.loads(p.read_text())["pid"] for p in demo_dir.glob("*/ready.json")]
        proc.send_signal(signal.SIGTERM)  # the demo alone: it must stop its servers itself
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "hub exit 0" in out
    assert len(pids) == 3
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


# -- start-up errors: one line, an exit code, and the process ends ---------------------------


def _prepared(root: Path) -> Cluster:
    """A hub's and a node's configurations and PKI under ``root``; nothing started."""
    cluster = Cluster.prepare(root, [AGENCY_A, AGENCY_B])
    cluster.hub.address = "127.0.0.1:9"  # nobody listens: the node must not get that far
    cluster.add_node(AGENCY_A)
    return cluster


def _server_configs(root: Path) -> dict[str, Path]:
    """Configurations of a hub and a node (PKI made, nothing started), by role."""
    cluster = _prepared(root)
    return {"hub": cluster.hub.config, "node": cluster.nodes[AGENCY_A].config}


def _serve_briefly(role: str, config: Path) -> subprocess.CompletedProcess[str]:
    """``chapar ROLE serve``, expected to fail at start-up: a hang is a failure too."""
    try:
        return _run(role, "serve", "--config", str(config), timeout=15)
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr
        pytest.fail(f"{role} serve did not exit after a start-up error:\n{err}")


def _assert_one_error_line(result: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert text in errors[0], result.stderr


@pytest.mark.parametrize("role", ["hub", "node"])
def test_serve_exits_when_the_metrics_address_cannot_be_bound(tmp_path: Path, role: str) -> None:
    """The store is open by then: its writer thread must not keep the process alive."""
    config = _server_configs(tmp_path)[role]
    text = config.read_text()
    config.write_text(
        text.replace('metrics_listen = "127.0.0.1:0"', 'metrics_listen = "192.0.2.1:9100"')
    )
    result = _serve_briefly(role, config)
    _assert_one_error_line(result, 2, "metrics_listen: cannot serve 192.0.2.1:9100")


def test_hub_serve_exits_when_its_ready_file_cannot_be_written(tmp_path: Path) -> None:
    """Listening by then: the server is stopped with the rest, and the process ends. (A
    node writes its ready file once it has a directory, from a hub this test has not.)"""
    role = "hub"
    config = _server_configs(tmp_path)[role]
    text = config.read_text()
    assert text.count("ready_file = ") == 1
    missing = json.dumps(str(tmp_path / "no-such-dir" / "ready.json"))
    config.write_text(re.sub(r"ready_file = .*", f"ready_file = {missing}", text))
    result = _serve_briefly(role, config)
    _assert_one_error_line(result, 2, "ready_file: cannot write")


@pytest.mark.parametrize("role", ["hub", "node"])
def test_a_failed_start_leaves_no_ready_file_of_an_earlier_run(tmp_path: Path, role: str) -> None:
    """A ready file says that the process running now is ready: one an earlier run left
    (killed, crashed) must not go on saying so, with a dead pid, when this start fails."""
    config = _server_configs(tmp_path)[role]
    ready = config.parent / "ready.json"
    assert 'ready_file = "ready.json"' in config.read_text()
    earlier = {"address": "127.0.0.1:9", "pid": 1, "role": role, "metrics": ""}
    ready.write_text(json.dumps(earlier))
    text = config.read_text()
    config.write_text(
        text.replace('metrics_listen = "127.0.0.1:0"', 'metrics_listen = "192.0.2.1:9100"')
    )
    result = _serve_briefly(role, config)
    _assert_one_error_line(result, 2, "metrics_listen: cannot serve 192.0.2.1:9100")
    assert not ready.exists(), ready.read_text()


def test_a_stopped_server_removes_its_ready_file(tmp_path: Path) -> None:
    cluster = asyncio.run(Cluster.start(tmp_path, [AGENCY_A]))
    ready = [cluster.hub.ready_file, cluster.nodes[AGENCY_A].ready_file]
    try:
        assert all(path.exists() for path in ready)
    finally:
        codes = cluster.stop()
    assert all(code == 0 for code in codes.values()), codes
    assert [path for path in ready if path.exists()] == []


def test_node_serve_exits_when_the_documents_directory_cannot_be_made(tmp_path: Path) -> None:
    config = _server_configs(tmp_path)["node"]
    config.write_text(config.read_text() + '[documents]\ndirectory = "/etc/passwd/docs"\n')
    result = _serve_briefly("node", config)
    _assert_one_error_line(result, 2, "documents.directory: cannot use /etc/passwd/docs")


@pytest.mark.parametrize(
    ("role", "key"),
    [
        ("node", "tls.cert"),
        ("hub", "tls.cert"),
        ("node", "tls.ca"),
        ("node", "signing.cert"),
        ("hub", "signing.cert"),
        ("hub", "signing.intermediates"),
        ("hub", "agencies[0].signing_certificates[0]"),
    ],
)
def test_serve_names_a_file_that_is_not_a_certificate(tmp_path: Path, role: str, key: str) -> None:
    """A key file (the usual mix-up) or any other file where a certificate belongs."""
    cluster = _prepared(tmp_path)
    pki = cluster.pki
    own = pki.hub_dir("national") if role == "hub" else pki.agency_dir(AGENCY_A)
    not_a_cert = tmp_path / "notes.txt"
    not_a_cert.write_text("not a certificate\n")
    original, replacement = {
        "tls.cert": (own / "tls.crt", own / "tls.key"),
        "tls.ca": (pki.root_cert, not_a_cert),
        "signing.cert": (own / "signing.crt", own / "signing.key"),
        "signing.intermediates": (pki.intermediate_cert, not_a_cert),
        "agencies[0].signing_certificates[0]": (
            pki.agency_dir(AGENCY_A) / "signing.crt",
            not_a_cert,
        ),
    }[key]
    config = cluster.hub.config if role == "hub" else cluster.nodes[AGENCY_A].config
    text = config.read_text()
    assert text.count(json.dumps(str(original))) == 1
    config.write_text(text.replace(json.dumps(str(original)), json.dumps(str(replacement))))
    result = _serve_briefly(role, config)
    _assert_one_error_line(result, 2, f"{key}: not a valid PEM certificate")


# -- bad command-line input: one error line, never a traceback --------------------------------


def _assert_fails_in_one_line(result: subprocess.CompletedProcess[str], text: str = "") -> None:
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    assert text in lines[0], result.stderr


@pytest.fixture
def answering() -> Iterator[dict[str, bytes]]:
    """A local HTTP server; the test sets what /metrics answers in the yielded dict,
    whose "address" entry is the server's HOST:PORT."""
    pages: dict[str, bytes] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = pages.get(self.path, b"")
            self.send_response(200 if self.path in pages else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    pages["address"] = f"127.0.0.1:{server.server_address[1]}".encode()
    try:
        yield pages
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("body", "text"),
    [
        (b"<html><body>Welcome</body></html>", "with a Chapar server's metrics"),
        (b"up 1\n", "with a Chapar server's metrics"),  # Prometheus text, not ours
        (b"\xff\xfe\n", "with a Chapar server's metrics"),
    ],
    ids=["html", "other-metrics", "not-utf8"],
)
def test_status_of_something_that_is_not_a_chapar_server(
    answering: dict[str, bytes], body: bytes, text: str
) -> None:
    answering["/metrics"] = body
    result = _run("status", answering["address"].decode(), timeout=30)
    _assert_fails_in_one_line(result, text)


@pytest.mark.parametrize("target", ["a:b", "http://[::1", "ftp://127.0.0.1:1/metrics"])
def test_status_of_a_malformed_address(target: str) -> None:
    result = _run("status", target, timeout=30)
    _assert_fails_in_one_line(result, f"cannot read metrics at {target}")


@pytest.mark.parametrize("missing", ["--ca", "--cert", "--key"])
def test_status_with_a_tls_file_missing_names_it(tmp_path: Path, missing: str) -> None:
    # It said "cannot read metrics at ...: [Errno 2] No such file or directory", naming
    # neither the option nor the file, and blaming the server.
    files = {}
    for option in ("--ca", "--cert", "--key"):
        path = tmp_path / option.strip("-")
        if option != missing:
            path.write_text("not PEM")
        files[option] = path
    args = [x for option, path in files.items() for x in (option, str(path))]
    result = _run("status", "127.0.0.1:1", *args, timeout=30)
    _assert_fails_in_one_line(result, f"{missing} {files[missing]}: no such file")
    assert result.returncode == 2


def test_status_with_tls_files_that_do_not_load_says_so_not_the_server(tmp_path: Path) -> None:
    files = []
    for option in ("--ca", "--cert", "--key"):
        path = tmp_path / option.strip("-")
        path.write_text("not PEM")
        files += [option, str(path)]
    result = _run("status", "127.0.0.1:1", *files, timeout=30)
    _assert_fails_in_one_line(result, f"cannot load --ca {tmp_path / 'ca'}")
    assert result.returncode == 2


@pytest.mark.parametrize(
    ("content", "text"),
    [
        (None, "cannot read"),
        ("not json", "not JSON"),
        ("[]", "no metrics addresses"),
        ('{"hub": "127.0.0.1:1"}', "no metrics addresses"),
        ('{"metrics": {"hub": ""}}', "no metrics address for hub"),
        ('{"metrics": {"hub": 7}}', "no metrics address for hub"),
        ('{"metrics": {"nodes": []}}', f"no node {AGENCY_A}"),
    ],
    ids=["missing", "not-json", "list", "no-metrics", "empty", "number", "nodes-list"],
)
def test_status_with_a_bad_demo_directory(tmp_path: Path, content: str | None, text: str) -> None:
    if content is not None:
        (tmp_path / "addresses.json").write_text(content)
    target = AGENCY_A if "nodes" in (content or "") else "hub"
    result = _run("status", "--demo", str(tmp_path), target, timeout=30)
    _assert_fails_in_one_line(result, text)


@pytest.mark.parametrize(
    ("content", "text"),
    [
        ("[]", "not a JSON object"),
        ('{"nodes": ["x"], "pki": "/x"}', f"has no entry nodes.{AGENCY_A}"),
        (json.dumps({"nodes": {AGENCY_A: 5}, "pki": "/x"}), f"has no entry nodes.{AGENCY_A}"),
        ('{"nodes": {}, "pki": ["/x"]}', "has no entry pki"),
    ],
    ids=["list", "nodes-list", "node-number", "pki-list"],
)
def test_client_commands_with_a_bad_demo_directory(tmp_path: Path, content: str, text: str) -> None:
    (tmp_path / "addresses.json").write_text(content)
    result = _run("agencies", "--demo", str(tmp_path), "--agency", AGENCY_A, timeout=30)
    _assert_fails_in_one_line(result, text)
    assert "DEMO_INCOMPLETE" in result.stderr


# -- an inbox that never reached its node is not an empty inbox --------------------------------


@pytest.mark.parametrize("timeout", ["3", "nan", "-1"])
def test_inbox_with_a_timeout_fails_when_it_never_reached_the_node(
    tmp_path: Path, timeout: str
) -> None:
    """``chapar inbox --timeout N`` against a node that accepts connections and never
    answers (hung, or a TLS-intercepting middlebox): nothing was ever read, yet the command
    exits 0 with no output, as for an empty inbox; a script polling the inbox cannot tell
    a dead node from no mail. ``nan`` and negative timeouts are taken as well (exit 0 at
    once), where ``--limit 0`` is refused."""
    import socket

    pki = Cluster.prepare(tmp_path, [AGENCY_A, AGENCY_B]).pki.root
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        result = _run(
            "inbox",
            "--pki",
            str(pki),
            "--agency",
            AGENCY_B,
            "--node",
            f"127.0.0.1:{port}",
            "--timeout",
            timeout,
            timeout=60,
        )
    finally:
        listener.close()
        for conn in held:
            conn.close()
    assert result.returncode != 0, (result.returncode, result.stdout, result.stderr)
    _assert_fails_in_one_line(result)


# -- Ctrl-C -----------------------------------------------------------------------------------


def test_status_interrupted_while_a_server_does_not_answer_ends_without_a_traceback() -> None:
    """An operator presses Ctrl-C while ``chapar status`` waits (up to 10 s) on a metrics
    address that accepts and never answers: the client commands exit 130 without a word,
    ``status`` prints a KeyboardInterrupt traceback."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(30)
    port = listener.getsockname()[1]
    proc = subprocess.Popen(
        [*CHAPAR, "status", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        conn, _ = listener.accept()  # the command is waiting for the answer now
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        conn.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        listener.close()
    assert proc.returncode == 130, (proc.returncode, err)
    assert "Traceback" not in err, err


def test_inbox_with_a_timeout_against_a_node_that_is_down_fails_at_once(tmp_path: Path) -> None:
    """A node that is down (connection refused) is UNAVAILABLE at once, not after the whole
    --timeout (the first version of the check above waited through every reconnect; a
    review's proof)."""
    pki = Cluster.prepare(tmp_path, [AGENCY_A, AGENCY_B]).pki.root
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]  # closed when the block ends: nothing listens
    started = time.monotonic()
    result = _run(
        "inbox", "--pki", str(pki), "--agency", AGENCY_B,
        "--node", f"127.0.0.1:{port}", "--timeout", "20",
        timeout=60,
    )  # fmt: skip
    took = time.monotonic() - started
    assert result.returncode != 0, result.stderr
    assert took < 10, f"took {took:.1f} s of the 20 s timeout: {result.stderr.strip()}"


# -- a closed output hands nothing over ------------------------------------------------------


async def _send_to_box(cluster: Cluster, mailbox: str, subject: str) -> str:
    async with ExchangeClient(cluster.nodes[AGENCY_A].address, cluster.credentials(AGENCY_A)) as a:
        receipt = await a.send(to=[(AGENCY_B, mailbox)], subject=subject, body="Dear colleagues")
    return receipt.shams


async def _events_at_b(cluster: Cluster, shams: str) -> list[str]:
    async with ExchangeClient(cluster.nodes[AGENCY_B].address, cluster.credentials(AGENCY_B)) as b:
        tracking = await b.track(shams)
    return [
        pb.EvidenceEvent.Name(pb.EvidenceContent.FromString(e.content).event)
        for e in tracking.evidence
    ]


async def _still_in_inbox(cluster: Cluster, mailbox: str) -> list[str]:
    """The numbers B's inbox streams for ``mailbox`` again (its unacknowledged letters),
    each acknowledged here so that no other test of the session meets it."""
    seen: list[Letter] = []
    async with ExchangeClient(cluster.nodes[AGENCY_B].address, cluster.credentials(AGENCY_B)) as b:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(3), contextlib.aclosing(b.inbox(mailbox)) as letters:
                async for letter in letters:
                    seen.append(letter)
        for letter in seen:
            await letter.ack()
    return [letter.shams for letter in seen]


@pytest.mark.parametrize("json_lines", [True, False], ids=["json", "text"])
def test_inbox_ack_hands_over_no_letter_it_could_not_print(
    cluster: Cluster, json_lines: bool
) -> None:
    """``chapar inbox --ack | head -1``: the reader goes after the first letter. The letter
    printed is handed over; the next, whose line could not be written (closed pipe), is
    not: it stays in the inbox, and the command ends in one error line, exit 1. The JSON
    mode acknowledged a letter before printing it, so the next letter was handed over and
    never seen (a lost letter)."""
    mailbox = f"cli-pipe-{uuid.uuid4().hex[:8]}"
    first = asyncio.run(_send_to_box(cluster, mailbox, "Printed"))
    proc = subprocess.Popen(
        [
            *CHAPAR, "inbox", "--pki", str(cluster.pki.root), "--agency", AGENCY_B,
            "--node", cluster.nodes[AGENCY_B].address, "--mailbox", mailbox,
            "--ack", "--timeout", "60", *(["--json"] if json_lines else []),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        # Read up to the first letter's handover, then go, like head: nothing else is
        # in the pipe yet (the second letter is sent only after the reader has gone).
        while not any("HANDOVER" in line for line in lines):
            line = proc.stdout.readline()
            assert line, (lines, proc.communicate(timeout=60)[1])
            lines.append(line)
        proc.stdout.close()
        second = asyncio.run(_send_to_box(cluster, mailbox, "Not printed"))
        err = proc.communicate(timeout=60)[1]
        code = proc.returncode
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert first in lines[0]
    assert "HANDOVER" in " ".join(asyncio.run(_events_at_b(cluster, first)))
    assert "HANDOVER" not in " ".join(asyncio.run(_events_at_b(cluster, second))), err
    assert asyncio.run(_still_in_inbox(cluster, mailbox)) == [second]
    assert code == 1, err
    assert "Traceback" not in err, err
    (error,) = err.splitlines()
    assert error.startswith("error: "), err
    assert second in error, err


def test_inbox_listening_line_comes_once_the_stream_is_open(cluster: Cluster) -> None:
    """``inbox --listening-line`` says on stderr when the node has opened the stream, empty
    inbox or not: the node sent the stream's headers only with its first letter, so a
    script (or a test) had no sign that the command listened, but waiting for it to go
    quiet. Standard output stays the letters' alone."""
    mailbox = f"cli-listen-{uuid.uuid4().hex[:8]}"
    done = _run(
        "inbox", "--pki", str(cluster.pki.root), "--agency", AGENCY_B,
        "--node", cluster.nodes[AGENCY_B].address, "--mailbox", mailbox,
        "--timeout", "3", "--listening-line",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert done.stderr == f"listening: the inbox stream of mailbox {mailbox!r} is open\n"


def test_inbox_listening_line_never_comes_for_a_stream_refused(cluster: Cluster) -> None:
    """A stream the node refuses (a mailbox too long) was never open: one error line, no
    ``listening:`` before it."""
    done = _run(
        "inbox", "--pki", str(cluster.pki.root), "--agency", AGENCY_B,
        "--node", cluster.nodes[AGENCY_B].address, "--mailbox", "m" * 200,
        "--timeout", "10", "--listening-line",
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    (error,) = done.stderr.splitlines()
    assert error.startswith("error: INVALID_ARGUMENT TEXT_TOO_LONG: "), error


# -- a timeout that comes while an acknowledgement is in flight -------------------------------


class _HeldRelay:
    """A TCP relay on 127.0.0.1 to a node, whose client-to-node direction the test can hold:
    what the client sends meanwhile (an acknowledgement) waits in the relay until ``release``.
    The TLS passes through untouched, so the command talks to the node as it would."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self._target = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._open = threading.Event()
        self._open.set()
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            node = socket.create_connection(self._target)
            self._sockets += [client, node]
            threading.Thread(target=self._pipe, args=(client, node, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(node, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, held: bool) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if held:
                self._open.wait()
            try:
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
            except OSError:
                return

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def close(self) -> None:
        self.release()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()


def _inbox_ack_through(
    cluster: Cluster, relay: _HeldRelay, mailbox: str, timeout: float, release_after: float | None
) -> tuple[str, str, str, int]:
    """``chapar inbox --ack --timeout`` through ``relay``: once the command listens (its
    ``--listening-line``: the node opened its stream; a wait for the client to go quiet
    instead held a command on a loaded machine in its TLS handshake), the relay holds what
    it sends and a letter is sent to ``mailbox``; its acknowledgement is
    held past the timeout, and let through ``release_after`` seconds after the timeout
    (None: never, until the command ends), within the ``timeout`` the acknowledgement
    itself has from when it went. Returns the letter's number, the command's
    stdout, stderr and exit code."""
    proc = subprocess.Popen(
        [
            *CHAPAR, "inbox", "--pki", str(cluster.pki.root), "--agency", AGENCY_B,
            "--node", relay.address, "--mailbox", mailbox,
            "--ack", "--timeout", str(timeout), "--listening-line",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        listening = proc.stderr.readline()
        assert listening.startswith("listening: "), (listening, proc.communicate(timeout=60))
        listening_since = time.monotonic()
        relay.hold()
        if release_after is not None:  # the letter comes late enough to release its ack
            time.sleep(release_after + 0.6)
        shams = asyncio.run(_send_to_box(cluster, mailbox, "Acknowledged late"))
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the letter, printed; its acknowledgement held
        assert shams in line, (line, proc.communicate(timeout=60))
        printed = time.monotonic()
        assert printed < listening_since + timeout - 1, "the letter came too near the timeout"
        if release_after is not None:
            assert listening_since + release_after < printed - 0.5, "no time to release it in"
            time.sleep(max(0.0, listening_since + timeout + release_after - time.monotonic()))
            relay.release()
        rest, err = proc.communicate(timeout=60)
    finally:
        relay.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return shams, line + rest, err, proc.returncode


def test_inbox_ack_waits_past_the_timeout_for_an_acknowledgement_in_flight(
    cluster: Cluster,
) -> None:
    """The timeout came while a printed letter's acknowledgement was on its way: the
    command ended at once, exit 0, with no HANDOVER line, though the node may have taken
    the acknowledgement (the letter handed over, its evidence never shown). The timeout
    ends listening, not an acknowledgement under way: the command waits for its answer
    (up to the timeout again) and prints the HANDOVER."""
    mailbox = f"cli-ack-late-{uuid.uuid4().hex[:8]}"
    relay = _HeldRelay(cluster.nodes[AGENCY_B].address)
    shams, out, err, code = _inbox_ack_through(cluster, relay, mailbox, 6.0, release_after=0.5)
    assert code == 0, (out, err)
    assert "HANDOVER" in out, (out, err)
    assert "HANDOVER" in " ".join(asyncio.run(_events_at_b(cluster, shams)))
    assert asyncio.run(_still_in_inbox(cluster, mailbox)) == []


def test_inbox_ack_names_the_letter_whose_acknowledgement_went_unanswered(
    cluster: Cluster,
) -> None:
    """An acknowledgement never answered, past the timeout and as long again: the command
    does not claim all was done (exit 0); it ends in one error line naming the letter, whose
    handing over is unknown, exit 1."""
    mailbox = f"cli-ack-lost-{uuid.uuid4().hex[:8]}"
    relay = _HeldRelay(cluster.nodes[AGENCY_B].address)
    shams, out, err, code = _inbox_ack_through(cluster, relay, mailbox, 4.0, release_after=None)
    asyncio.run(_still_in_inbox(cluster, mailbox))  # acknowledged: no other test meets it
    assert code == 1, (code, out, err)
    assert "HANDOVER" not in out, out
    assert "Traceback" not in err, err
    (error,) = err.splitlines()
    assert error.startswith("error: DEADLINE_EXCEEDED ACK_UNANSWERED: "), err
    assert shams in error, err


# -- numbers as people type them: with their check character -----------------------------


def test_track_and_in_reply_to_take_a_number_with_its_check_character(
    cluster: Cluster, sent_by_a: dict[str, str]
) -> None:
    """The checked form (``...0000042:3``) is a number as a person quotes it: `track` and
    `send --in-reply-to` take it as the canonical one (the SDK and the node see only that)."""
    shams = sent_by_a["shams"]
    for shown in ([], ["--tree"]):
        tracked = _run("track", *_conn_a(cluster), format_shams_checked(shams), *shown, "--json")
        assert tracked.returncode == 0, tracked.stderr
        assert json.loads(tracked.stdout)["shams"] == shams
    mailbox = f"cli-checked-{uuid.uuid4().hex[:8]}"
    letter = asyncio.run(_send_to_box(cluster, mailbox, "Quoted with its check character"))
    asyncio.run(_still_in_inbox(cluster, mailbox))  # at B's node, and acknowledged
    b = ["--pki", str(cluster.pki.root), "--agency", AGENCY_B]
    b += ["--node", cluster.nodes[AGENCY_B].address]
    status = _run("send", *b, "--status", "accepted", "--in-reply-to", format_shams_checked(letter))
    assert status.returncode == 0, status.stderr
    # Its default subject names the letter canonical, as it always did.
    assert asyncio.run(_status_subject_at_a(cluster, letter)) == f"ACCEPTED: {letter}"


async def _status_subject_at_a(cluster: Cluster, shams: str) -> str:
    """The subject of the status update A's node linked to its letter ``shams``, once it has."""
    async with ExchangeClient(cluster.nodes[AGENCY_A].address, cluster.credentials(AGENCY_A)) as a:
        for _ in range(300):
            tracking = await a.track(shams)
            if tracking.status_updates:
                (update,) = tracking.status_updates
                return update.header.subject
            await asyncio.sleep(0.1)
    raise AssertionError(f"no status update linked to {shams} within 30 s")


# -- standard output closed, or unable to show the text: one line, exit 1, every command ------


def _run_into(
    args: list[str], *, closed: bool = True, buffered: bool, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``chapar ARGS`` with standard output a pipe whose reader went before the command
    began (``| head -0``: the first write fails with EPIPE), or with ``closed=False`` a
    pipe read to its end; stderr captured. ``buffered``: standard output as a terminal's
    user has it, flushed at exit, or unbuffered (PYTHONUNBUFFERED, as under the tests),
    each print written at once."""
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    environ.update(env or {})
    if not buffered:
        environ["PYTHONUNBUFFERED"] = "1"
    if not closed:
        return subprocess.run(
            [*CHAPAR, *args], capture_output=True, text=True, timeout=60, env=environ, check=False
        )
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(
            [*CHAPAR, *args],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            env=environ,
            check=False,
        )
    finally:
        os.close(write)


def _assert_output_failed(result: subprocess.CompletedProcess[str], reason: str) -> str:
    """One ``error: OUTPUT_FAILED <reason>`` line on stderr and nothing else (no traceback,
    no "Exception ignored" at exit), exit 1; returns the line."""
    assert result.returncode == 1, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: OUTPUT_FAILED {reason}: "), result.stderr
    return lines[0]


async def _upload_at_a(cluster: Cluster, content: bytes, path: Path) -> str:
    await asyncio.to_thread(path.write_bytes, content)
    async with ExchangeClient(cluster.nodes[AGENCY_A].address, cluster.credentials(AGENCY_A)) as a:
        ref = await a.upload(path)
    return ref.uri


@pytest.fixture(scope="module")
def sent_by_a(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A letter A sent (its number), a saved evidence bundle of it, and a document of A's."""
    folder = tmp_path_factory.mktemp("sent-by-a")
    mailbox = f"cli-out-{uuid.uuid4().hex[:8]}"
    shams = asyncio.run(_send_to_box(cluster, mailbox, "\u0628\u0648\u062f\u062c\u0647 1405"))
    asyncio.run(_still_in_inbox(cluster, mailbox))  # acknowledged: no other test meets it
    bundle = folder / "letter.bundle"
    saved = _run("track", *_conn_a(cluster), shams, "--save", str(bundle))
    assert saved.returncode == 0, saved.stderr
    uri = asyncio.run(_upload_at_a(cluster, b"a report of A's", folder / "report.txt"))
    return {"shams": shams, "bundle": str(bundle), "uri": uri, "dir": str(folder)}


def _conn_a(cluster: Cluster) -> list[str]:
    return [
        "--pki", str(cluster.pki.root), "--agency", AGENCY_A,
        "--node", cluster.nodes[AGENCY_A].address,
    ]  # fmt: skip


def _command(name: str, cluster: Cluster, sent: dict[str, str]) -> list[str]:
    """The command line of each client command that prints something, by name."""
    a = _conn_a(cluster)
    to = f"{AGENCY_B}:cli-out-{uuid.uuid4().hex[:8]}"
    out = str(Path(sent["dir"]) / uuid.uuid4().hex)
    commands = {
        "agencies": ["agencies", *a],
        "agencies-json": ["agencies", *a, "--json"],
        "track": ["track", *a, sent["shams"]],
        "track-json": ["track", *a, sent["shams"], "--json"],
        "track-tree": ["track", *a, sent["shams"], "--tree"],
        "send": ["send", *a, "--to", to, "--subject", "Unread receipt", "--body", "x"],
        "fetch": ["fetch", *a, sent["uri"], "--out", out],
        "verify": ["verify", sent["bundle"], "--pki", str(cluster.pki.root)],
    }
    return commands[name]


_COMMANDS = ["agencies", "agencies-json", "track", "track-json", "track-tree", "send", "fetch",
             "verify"]  # fmt: skip


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
@pytest.mark.parametrize("command", _COMMANDS)
def test_a_command_whose_output_is_closed_ends_in_one_output_failed_line(
    cluster: Cluster, sent_by_a: dict[str, str], command: str, buffered: bool
) -> None:
    """``chapar track X | head -0``: the reader went before the first line. Unbuffered,
    the failed write was taken for a file the command could not read (``INVALID_ARGUMENT
    FILE_UNREADABLE: Broken pipe``); buffered, the command said nothing and Python
    reported the failed flush at exit ("Exception ignored ... BrokenPipeError", exit
    120)."""
    result = _run_into(_command(command, cluster, sent_by_a), buffered=buffered)
    _assert_output_failed(result, "STDOUT_CLOSED")


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
def test_status_whose_output_is_closed_ends_in_one_output_failed_line(
    answering: dict[str, bytes], buffered: bool
) -> None:
    """Unbuffered, ``chapar status`` ended in a BrokenPipeError traceback."""
    answering["/metrics"] = b'chapar_build_info{role="hub",version="9"} 1\nchapar_ready 1\n'
    result = _run_into(["status", answering["address"].decode()], buffered=buffered)
    _assert_output_failed(result, "STDOUT_CLOSED")


def test_a_letter_the_output_encoding_cannot_show_is_an_output_failure(
    cluster: Cluster, sent_by_a: dict[str, str]
) -> None:
    """A Persian subject on a standard output whose encoding is ASCII: the
    UnicodeEncodeError was reported as ``INVALID_ARGUMENT BAD_VALUE``, as if the command
    line held a bad value. It is an output failure, and says how to set the encoding."""
    result = _run_into(
        ["track", *_conn_a(cluster), sent_by_a["shams"]],
        closed=False,
        buffered=True,
        env={"PYTHONIOENCODING": "ascii"},
    )
    line = _assert_output_failed(result, "STDOUT_ENCODING")
    assert "PYTHONIOENCODING=utf-8" in line, line
    assert result.stdout == ""  # nothing half-shown


def test_inbox_hands_over_no_letter_the_output_encoding_cannot_show(cluster: Cluster) -> None:
    mailbox = f"cli-ascii-{uuid.uuid4().hex[:8]}"
    shams = asyncio.run(_send_to_box(cluster, mailbox, "\u0646\u0627\u0645\u0647"))
    result = _run_into(
        [
            "inbox", "--pki", str(cluster.pki.root), "--agency", AGENCY_B,
            "--node", cluster.nodes[AGENCY_B].address, "--mailbox", mailbox,
            "--ack", "--limit", "1", "--timeout", "30",
        ],
        closed=False,
        buffered=True,
        env={"PYTHONIOENCODING": "ascii"},
    )  # fmt: skip
    line = _assert_output_failed(result, "STDOUT_ENCODING")
    assert shams in line, line
    assert "HANDOVER" not in " ".join(asyncio.run(_events_at_b(cluster, shams)))
    assert asyncio.run(_still_in_inbox(cluster, mailbox)) == [shams]


def test_the_help_into_a_closed_output_ends_in_one_output_failed_line() -> None:
    # argparse prints it and exits: Python reported the failed flush at exit (exit 120).
    # (Unbuffered, argparse ignores the failed write itself and exits 0, saying nothing.)
    _assert_output_failed(_run_into(["send", "--help"], buffered=True), "STDOUT_CLOSED")


def test_files_the_command_cannot_read_or_write_are_not_output_failures(
    cluster: Cluster, sent_by_a: dict[str, str], tmp_path: Path
) -> None:
    """A bundle or a document that cannot be saved named its temporary file beside the
    path given, as a file that could not be read (FILE_UNREADABLE)."""
    missing = tmp_path / "no-such-dir"
    cases = [
        (["send", *_conn_a(cluster), "--to", AGENCY_B, "--subject", "s",
          "--body-file", str(missing / "body.txt")], "FILE_UNREADABLE", "body.txt"),
        (["verify", str(missing / "letter.bundle"), "--pki", str(cluster.pki.root)],
         "FILE_UNREADABLE", "letter.bundle"),
        (["track", *_conn_a(cluster), sent_by_a["shams"], "--save", str(missing / "x.bundle")],
         "FILE_UNWRITABLE", f"cannot save {missing / 'x.bundle'}: No such file or directory"),
        (["fetch", *_conn_a(cluster), sent_by_a["uri"], "--out", str(missing / "report.txt")],
         "FILE_UNWRITABLE", f"cannot save {missing / 'report.txt'}: No such file or directory"),
    ]  # fmt: skip
    for args, reason, text in cases:
        result = _run_into(args, closed=False, buffered=True)
        _assert_fails_in_one_line(result, text)
        assert result.stderr.startswith(f"error: INVALID_ARGUMENT {reason}: "), result.stderr
        assert result.returncode == 1, result.stderr


# -- pki and demo: their output closed, the same one line as the client commands' -------------


def _pki_command(command: str, tmp_path: Path) -> tuple[list[str], Callable[[], bool]]:
    """The command line of each ``pki`` command, on a PKI made in ``tmp_path`` (none for
    ``init``), and a test that it did its work although its output could not be shown."""
    root = tmp_path / "pki"
    if command == "init":
        argv = ["pki", "init", "--dir", str(root), "--hub", "national", "--agency", AGENCY_A]
        return argv, (root / "ca" / "root.crt").is_file
    layout = init_pki(root, hub="national", agencies=[AGENCY_A])
    if command == "issue":
        argv = ["pki", "issue", "--dir", str(root), "--agency", AGENCY_B]
        return argv, (layout.agency_dir(AGENCY_B) / "signing.crt").is_file
    tls = layout.agency_dir(AGENCY_A) / "tls.crt"
    if command == "renew":
        argv = ["pki", "renew", "--dir", str(root), str(tls)]
        return argv, lambda: len(list(tls.parent.glob("tls.*.crt"))) == 1  # the old one, kept
    revoked = tmp_path / "revoked.txt"
    revoked.write_text("")  # a new one is said on stderr; this test is about stdout
    serial = f"{load_certs(tls)[0].serial_number:x}"
    argv = ["pki", "revoke", "--file", str(revoked), str(tls)]
    return argv, lambda: revoked.is_file() and serial in revoked.read_text()


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
@pytest.mark.parametrize("command", ["init", "issue", "renew", "revoke"])
def test_a_pki_command_whose_output_is_closed_ends_in_one_output_failed_line(
    tmp_path: Path, command: str, buffered: bool
) -> None:
    """``chapar pki init ... | head -0``. Unbuffered, ``init`` ended in a BrokenPipeError
    traceback, and the others took the failed write for a file of the PKI they could not
    write (``chapar pki issue: error: [Errno 32] Broken pipe``). The work is done: the line
    says so."""
    argv, done = _pki_command(command, tmp_path)
    line = _assert_output_failed(_run_into(argv, buffered=buffered), "STDOUT_CLOSED")
    assert done(), line
    assert "could not be printed" in line, line


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
def test_a_demo_whose_output_is_closed_ends_in_one_output_failed_line(buffered: bool) -> None:
    """``chapar demo | head -0``: unbuffered, its first line ended it in a BrokenPipeError
    traceback."""
    line = _assert_output_failed(_run_into(["demo"], buffered=buffered), "STDOUT_CLOSED")
    assert "it started no server" in line, line


def _servers_under(root: Path) -> list[str]:
    """The command lines of the running processes that name ``root`` (the demo's servers
    name their configuration files in it)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if str(root) in text and " serve " in text:
                found.append(text)
    return found


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
def test_a_demo_whose_reader_goes_stops_its_servers_and_ends_in_one_line(buffered: bool) -> None:
    """``chapar demo | head -2``: the reader goes once the servers are up. Unbuffered, the
    next line ended the demo in two BrokenPipeError tracebacks (the second from the line
    that says the servers stopped); buffered, nothing came out until the demo had ended,
    whose output went into the pipe unread, exit 0. Now each line goes out as it comes, and
    the first that cannot ends the demo: its servers stopped, one line, exit 1."""
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if not buffered:
        environ["PYTHONUNBUFFERED"] = "1"
    with subprocess.Popen(
        [*CHAPAR, "demo"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ
    ) as proc:
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()
            match = re.search(r" in (\S+) \.\.\.$", first.rstrip("\n"))
            assert match, first
            root = Path(match.group(1))
            assert proc.stdout.readline().startswith("hub "), "the servers did not start"
            assert len(_servers_under(root)) == 3  # a hub and two nodes, running
            proc.stdout.close()  # the reader goes
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    result = subprocess.CompletedProcess(proc.args, proc.returncode, "", err)
    line = _assert_output_failed(result, "STDOUT_CLOSED")
    assert "stopped its servers" in line, line
    assert _servers_under(root) == []
    assert not root.exists()
