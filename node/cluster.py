"""A hub and agency nodes as real processes on loopback, with a fresh development PKI.

Used by ``chapar demo``, the integration tests and (later) the load-test harness and
fault injection: ``kill``, ``terminate`` and ``restart`` act on real processes. After its
first start a server keeps its port (its configuration is rewritten with it), so peers and
clients reconnect to the same address after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from certs.pki import KeyAlgorithm, PkiLayout, init_pki
from client_sdk.credentials import Credentials

__all__ = ["Cluster", "ReapedPopen", "ServerProcess"]

Role = Literal["hub", "node"]
_READY_TIMEOUT_S = 30.0
_BIND_REFUSED = "(address in use?)"  # node.server's words when its listen address is taken


class ReapedPopen(subprocess.Popen[bytes]):
    """A child process reaped with ``os.wait4``: once it has ended (``poll`` or ``wait``
    saw it), ``rusage`` holds what it used over its whole life, a clean stop after SIGTERM
    included, which /proc no longer shows. ``poll`` and ``wait`` may be called from any
    thread; the child is reaped once."""

    rusage: resource.struct_rusage | None = None  # None until reaped here

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reaping = threading.Lock()

    def poll(self) -> int | None:
        with self._reaping:
            if self.returncode is None:
                try:
                    pid, status, usage = os.wait4(self.pid, os.WNOHANG)
                except ChildProcessError:  # reaped by someone else: its figures are lost
                    self.returncode = 0  # as Popen itself says then
                else:
                    if pid:
                        self.rusage = usage
                        self.returncode = os.waitstatus_to_exitcode(status)
            return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if timeout is None:
            # Until it has ended, without reaping it (``poll`` does, keeping its rusage).
            with contextlib.suppress(ChildProcessError):
                os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)
        deadline = time.monotonic() + (timeout or 0.0)
        delay = 0.0005
        while (code := self.poll()) is None:
            left = deadline - time.monotonic()
            if timeout is not None and left <= 0:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(min(delay, max(left, 0.0)) if timeout is not None else delay)
            delay = min(delay * 2, 0.05)
        return code


@dataclass
class ServerProcess:
    """One ``chapar hub serve`` or ``chapar node serve`` process."""

    name: str
    role: Role
    config: Path
    ready_file: Path
    log_file: Path
    address: str = ""
    metrics: str = ""
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.ready_file.unlink()
        log = self.log_file.open("ab")
        try:
            self.proc = ReapedPopen(
                [sys.executable, "-m", "node", self.role, "serve", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            log.close()

    async def wait_ready(self, timeout: float = _READY_TIMEOUT_S) -> str:
        """Waits for the process to write its ready file; returns its address."""
        assert self.proc is not None
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            if self.proc.poll() is not None:
                if self.address and _BIND_REFUSED in self.log_tail(3):
                    # A restart on its pinned port lost a race: the port came from the
                    # ephemeral range, and a connection made while the server was down
                    # (a peer reconnecting can even connect to itself) holds it for a
                    # moment. Start again until the deadline.
                    await asyncio.sleep(0.2)
                    self.start()
                    continue
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                info = json.loads(self.ready_file.read_text())
                if info.get("pid") == self.proc.pid:
                    first = not self.address
                    self.address = str(info["address"])
                    self.metrics = str(info.get("metrics", ""))
                    if first:
                        self._pin_port()
                    return self.address
            await asyncio.sleep(0.05)
        raise TimeoutError(f"{self.name} not ready after {timeout}s:\n{self.log_tail()}")

    def _pin_port(self) -> None:
        # Only the gRPC port, anchored to its line: metrics_listen also ends in "listen = ".
        text = re.sub(
            r'^listen = "127\.0\.0\.1:0"$',
            f'listen = "{self.address}"',
            self.config.read_text(),
            flags=re.M,
        )
        self.config.write_text(text)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        """SIGKILL: the crash case."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait for a clean exit; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def pause(self) -> None:
        """SIGSTOP: the process hangs without closing its connections."""
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGCONT)

    async def restart(self) -> str:
        self.terminate()
        self.start()
        return await self.wait_ready()


def _toml_path(path: Path) -> str:
    return json.dumps(str(path))


class Cluster:
    """A hub and its agency nodes under one directory."""

    def __init__(
        self, root: Path, pki: PkiLayout, hub: ServerProcess, nodes: dict[str, ServerProcess]
    ):
        self.root = root
        self.pki = pki
        self.hub = hub
        self.nodes = nodes

    @classmethod
    async def start(
        cls,
        root: Path,
        agencies: Sequence[str],
        *,
        hub_name: str = "national",
        signing_algorithm: KeyAlgorithm = "ed25519",
        node_settings: str = "",
        hub_settings: str = "",
        agency_states: dict[str, str] | None = None,
        without_node: Sequence[str] = (),
    ) -> Cluster:
        """Makes a PKI and configurations under ``root``, starts the hub then the nodes.

        Agencies in ``without_node`` get certificates and a directory entry but no node.
        """
        cluster = cls.prepare(
            root,
            agencies,
            hub_name=hub_name,
            signing_algorithm=signing_algorithm,
            hub_settings=hub_settings,
            agency_states=agency_states,
        )
        cluster.hub.start()
        await cluster.hub.wait_ready()
        nodes = [
            cluster.add_node(code, node_settings) for code in agencies if code not in without_node
        ]
        for proc in nodes:
            proc.start()
        for proc in nodes:
            await proc.wait_ready()
        return cluster

    @classmethod
    def prepare(
        cls,
        root: Path,
        agencies: Sequence[str],
        *,
        hub_name: str = "national",
        signing_algorithm: KeyAlgorithm = "ed25519",
        hub_settings: str = "",
        agency_states: dict[str, str] | None = None,
    ) -> Cluster:
        """The PKI and the hub's configuration under ``root``; nothing is started.

        Lets a caller work on the hub's database before the hub runs (``loadtest.backlog``
        pre-fills it); nodes are added with ``add_node`` once the hub has its address.
        """
        root.mkdir(parents=True, exist_ok=True)
        pki = init_pki(
            root / "pki",
            hub=hub_name,
            agencies=agencies,
            signing_algorithm=signing_algorithm,
            auditors=["auditor"],
        )
        hub = cls._hub_process(root, pki, hub_name, agencies, hub_settings, agency_states or {})
        return cls(root, pki, hub, {})

    def add_node(self, code: str, settings: str = "") -> ServerProcess:
        """Configures (does not start) the node of ``code``; the hub must have been started."""
        if not self.hub.address:
            raise RuntimeError("the hub has no address yet: start it first")
        proc = self._node_process(self.root, self.pki, code, self.hub.address, settings)
        self.nodes[code] = proc
        return proc

    @staticmethod
    def _hub_process(
        root: Path,
        pki: PkiLayout,
        name: str,
        agencies: Sequence[str],
        extra: str,
        states: dict[str, str],
    ) -> ServerProcess:
        d = root / "hub"
        d.mkdir(exist_ok=True)
        hub_dir = pki.hub_dir(name)
        lines = [
            "[hub]",
            f"name = {json.dumps(name)}",
            'listen = "127.0.0.1:0"',
            'database = "hub.db"',
            'ready_file = "ready.json"',
            'metrics_listen = "127.0.0.1:0"',
            extra,
            "[tls]",
            f"ca = {_toml_path(pki.root_cert)}",
            f"cert = {_toml_path(hub_dir / 'tls.crt')}",
            f"key = {_toml_path(hub_dir / 'tls.key')}",
            "[signing]",
            f"cert = {_toml_path(hub_dir / 'signing.crt')}",
            f"key = {_toml_path(hub_dir / 'signing.key')}",
            f"intermediates = {_toml_path(pki.intermediate_cert)}",
        ]
        for code in agencies:
            lines += [
                "[[agencies]]",
                f"code = {json.dumps(code)}",
                f"name = {json.dumps('Agency ' + code)}",
                f"state = {json.dumps(states.get(code, 'active'))}",
                f"signing_certificates = [{_toml_path(pki.agency_dir(code) / 'signing.crt')}]",
            ]
        config = d / "hub.toml"
        config.write_text("\n".join(lines) + "\n")
        return ServerProcess("hub", "hub", config, d / "ready.json", d / "hub.log")

    @staticmethod
    def _node_process(
        root: Path, pki: PkiLayout, code: str, hub_address: str, extra: str
    ) -> ServerProcess:
        d = root / f"node-{code}"
        d.mkdir(exist_ok=True)
        a = pki.agency_dir(code)
        config = d / "node.toml"
        config.write_text(
            "\n".join(
                [
                    "[node]",
                    f"agency = {json.dumps(code)}",
                    'listen = "127.0.0.1:0"',
                    f"hub = {json.dumps(hub_address)}",
                    'database = "node.db"',
                    'ready_file = "ready.json"',
                    'metrics_listen = "127.0.0.1:0"',
                    extra,
                    "[tls]",
                    f"ca = {_toml_path(pki.root_cert)}",
                    f"cert = {_toml_path(a / 'tls.crt')}",
                    f"key = {_toml_path(a / 'tls.key')}",
                    "[signing]",
                    f"cert = {_toml_path(a / 'signing.crt')}",
                    f"key = {_toml_path(a / 'signing.key')}",
                    f"intermediates = {_toml_path(pki.intermediate_cert)}",
                ]
            )
            + "\n"
        )
        return ServerProcess(f"node-{code}", "node", config, d / "ready.json", d / "node.log")

    def credentials(self, agency: str) -> Credentials:
        """The back-end client credentials of ``agency``."""
        return Credentials.from_pki(self.pki.root, agency)

    def addresses(self) -> dict[str, object]:
        return {
            "hub": self.hub.address,
            "nodes": {code: p.address for code, p in self.nodes.items()},
            "pki": str(self.pki.root),
            # Prometheus /metrics of every server, HOST:PORT ("" if a server serves none).
            "metrics": {
                "hub": self.hub.metrics,
                "nodes": {code: p.metrics for code, p in self.nodes.items()},
            },
        }

    def write_addresses(self, path: Path) -> None:
        path.write_text(json.dumps(self.addresses(), indent=2) + "\n")

    def stop(self) -> dict[str, int]:
        """SIGTERM every process (nodes first); returns their exit codes."""
        codes = {name: p.terminate() for name, p in self.nodes.items()}
        codes["hub"] = self.hub.terminate()
        return codes
