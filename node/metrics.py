"""Prometheus metrics of the node and hub roles (prometheus-client): every definition.

Label values are bounded: reasons are this program's own UPPER_SNAKE codes (or a
``VerificationError`` reason, also ours), stages and outcomes are fixed words below, and
never an agency code or anything a peer chooses freely. A node passes on the reason the
hub refused a call with (a Track, a document fetched through the hub), so ``reason`` is
bounded where the label is made too (``_Reasons``): a reason not of the UPPER_SNAKE form
(64 characters at most), or a new one once ``MAX_REASONS`` label sets are held, is counted
as ``OTHER``. The one exception is the hub's
top-N queue gauge, whose ``agency`` label takes at most ``metrics_top_n`` values at a time
(the N largest queues; ranks are fixed ``1``..``N``), and whose old series are removed at
every refresh, so a scrape never carries more than N of them.

Hot-path counters are resolved to their label children once, here, and incremented by batch
size. Gauges that describe state (queue depth, oldest letter, bytes stored, certificate
expiry, connected nodes) are set by a periodic task in ``node.monitor``, off the hot path.
"""

from __future__ import annotations

import logging
import platform
import re
import resource
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import (
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from node.config import TlsConfig

__all__ = [
    "BUILD",
    "BYTES_STORED",
    "CERT_EXPIRY",
    "DUPLICATES",
    "HUB_CLOCK_OFFSET",
    "HUB_CONNECTED",
    "HUB_CONNECTED_NODES",
    "HUB_LETTERS",
    "HUB_QUEUE_DEPTH",
    "HUB_QUEUE_OLDEST_AGE",
    "HUB_QUEUE_TOP_AGE",
    "HUB_QUEUE_TOP_DEPTH",
    "IN_DIRECTORY",
    "LAST_REJECTION",
    "MAX_REASONS",
    "METRICS_REFRESHED",
    "NODE_INBOX_UNACKED",
    "NODE_LETTERS",
    "NODE_OUTBOX_DEPTH",
    "NODE_OUTBOX_OLDEST_AGE",
    "PEAK_RSS",
    "READY",
    "RECONNECTS",
    "REJECTIONS",
    "STAGE_SECONDS",
    "STORE_FS_FREE",
    "STORE_FS_SIZE",
    "VERIFICATION_FAILURES",
    "count_rejection",
    "count_verification_failure",
    "register_role",
    "serve_metrics",
    "track_thread_cpu",
]

VERSION = "0.1.0"
log = logging.getLogger("chapar.metrics")
# The most (code, reason) label sets a counter by reason holds: this program has some
# hundred reasons, and a refusal kind seldom comes with more than one code.
MAX_REASONS = 256
_REASON_FORM = re.compile(r"[A-Z][A-Z0-9_]{0,63}")

# -- counters (hot path) ------------------------------------------------------------------

REJECTIONS = Counter(
    "chapar_rejections",
    "Calls, letters, evidence and frames refused, by canonical code and reason.",
    ["code", "reason"],
)
LAST_REJECTION = Gauge(
    "chapar_last_rejection_timestamp_seconds",
    "Unix time of the latest refusal, by canonical code and reason.",
    ["code", "reason"],
)
# Metrics of one role are created unregistered (registry=None) and registered by
# ``register_role``, so a node does not export the hub's series and the other way round.
# The two ``chapar_letters`` objects are one metric name; each process registers one.
_LETTERS_HELP = (
    "Letters through each stage. stage: submit (node), relay (hub, per recipient), delivery "
    "(recipient node), handover (recipient node), expiry (hub, per recipient); outcome: "
    "accepted, rejected, delivered, failed, handed_over, expired."
)
NODE_LETTERS = Counter("chapar_letters", _LETTERS_HELP, ["stage", "outcome"], registry=None)
HUB_LETTERS = Counter("chapar_letters", _LETTERS_HELP, ["stage", "outcome"], registry=None)
SUBMITTED = NODE_LETTERS.labels(stage="submit", outcome="accepted")
SUBMIT_REJECTED = NODE_LETTERS.labels(stage="submit", outcome="rejected")
DELIVERED = NODE_LETTERS.labels(stage="delivery", outcome="delivered")
DELIVERY_FAILED = NODE_LETTERS.labels(stage="delivery", outcome="failed")
HANDED_OVER = NODE_LETTERS.labels(stage="handover", outcome="handed_over")
RELAYED = HUB_LETTERS.labels(stage="relay", outcome="accepted")
RELAY_REJECTED = HUB_LETTERS.labels(stage="relay", outcome="rejected")
EXPIRED = HUB_LETTERS.labels(stage="expiry", outcome="expired")

DUPLICATES = Counter(
    "chapar_duplicates_suppressed",
    "Letters received again and answered from what was stored, not stored twice.",
    ["stage"],
    registry=None,
)
RELAY_DUPLICATES = DUPLICATES.labels(stage="relay")
RECONNECTS = Counter(
    "chapar_hub_link_reconnects",
    "Times a node's stream to the hub ended and was dialled again (retries).",
    registry=None,
)
DOCUMENTS_SET_ASIDE = Counter(
    "chapar_documents_set_aside",
    "Stored documents found corrupt (content not matching their SHA-256) and taken out of"
    " the document store. kind: own (this agency's: moved to corrupt/, a back-end must"
    " upload the file again), fetched (another agency's copy: dropped, fetched again).",
    ["kind"],
    registry=None,
)
VERIFICATION_FAILURES = Counter(
    "chapar_verification_failures",
    "Signatures and certificates that did not verify, by what was checked and the reason.",
    ["kind", "reason"],
)

# -- histograms ---------------------------------------------------------------------------

STAGE_SECONDS = Histogram(
    "chapar_letter_stage_seconds",
    "Seconds a letter took per stage, from signed evidence times observed at the sending node: "
    "submit_to_relay (SUBMISSION_ACCEPTANCE to RELAY_ACCEPTANCE), relay_to_delivery "
    "(RELAY_ACCEPTANCE to DELIVERY), delivery_to_handover (DELIVERY to HANDOVER).",
    ["stage"],
    registry=None,
    buckets=(
        0.01,
        0.025,
        0.05,
        0.1,
        0.25,
        0.5,
        1,
        2.5,
        5,
        10,
        30,
        60,
        300,
        900,
        3600,
        14400,
        86400,
    ),
)

# -- gauges (set by node.monitor) ---------------------------------------------------------

READY = Gauge(
    "chapar_ready",
    "1 when the server reports SERVING on gRPC health (store open, directory loaded and, for "
    "a node, its hub stream up), else 0.",
)
HUB_CONNECTED = Gauge(
    "chapar_node_hub_connected", "1 while the node's stream to the hub is up.", registry=None
)
HUB_CLOCK_OFFSET = Gauge(
    "chapar_node_hub_clock_offset_seconds",
    "How far the hub's clock is ahead of this node's (negative: behind), from the signed"
    " attest_time of the hub's welcome on the latest stream (0 before one).",
    registry=None,
)
IN_DIRECTORY = Gauge(
    "chapar_node_in_directory",
    "1 unless the hub refused this node's agency as unknown (removed from its directory): "
    "then 0, and the node refuses letters (AGENCY_NOT_IN_DIRECTORY) until the hub lists it.",
    registry=None,
)
IN_DIRECTORY.set(1)  # until the hub says otherwise
NODE_OUTBOX_DEPTH = Gauge(
    "chapar_node_outbox_depth",
    "Letters accepted by the node and not yet relayed by the hub.",
    registry=None,
)
NODE_OUTBOX_OLDEST_AGE = Gauge(
    "chapar_node_outbox_oldest_age_seconds",
    "Age of the oldest letter waiting in the node's outbox (0 when empty).",
    registry=None,
)
NODE_INBOX_UNACKED = Gauge(
    "chapar_node_inbox_unacked",
    "Letters delivered to the node that a mailbox of theirs has not yet acknowledged.",
    registry=None,
)
HUB_CONNECTED_NODES = Gauge(
    "chapar_hub_connected_nodes", "Agency nodes with a Connect stream up.", registry=None
)
HUB_QUEUE_DEPTH = Gauge(
    "chapar_hub_queue_depth", "Letters queued at the hub, all recipients.", registry=None
)
HUB_QUEUE_OLDEST_AGE = Gauge(
    "chapar_hub_queue_oldest_age_seconds",
    "Age of the oldest letter queued at the hub, all recipients (0 when empty).",
    registry=None,
)
HUB_QUEUE_TOP_DEPTH = Gauge(
    "chapar_hub_queue_top_depth",
    "Depth of the N deepest recipient queues (rank 1 is the deepest; N = metrics_top_n).",
    ["rank", "agency"],
    registry=None,
)
HUB_QUEUE_TOP_AGE = Gauge(
    "chapar_hub_queue_top_oldest_age_seconds",
    "Age of the oldest letter in each of the N deepest recipient queues.",
    ["rank", "agency"],
    registry=None,
)
BYTES_STORED = Gauge(
    "chapar_store_bytes", "Bytes on disk of the server's database (main file, WAL and shm)."
)
STORE_FS_FREE = Gauge(
    "chapar_store_filesystem_free_bytes",
    "Bytes available to the server on the filesystem holding its database.",
)
STORE_FS_SIZE = Gauge(
    "chapar_store_filesystem_size_bytes", "Size of the filesystem holding the database."
)
CERT_EXPIRY = Gauge(
    "chapar_certificate_expiry_seconds",
    "Seconds until each configured local certificate expires (negative: expired).",
    ["certificate"],
)
METRICS_REFRESHED = Gauge(
    "chapar_metrics_refresh_timestamp_seconds",
    "When the gauges set from the database (queues, outbox, inbox) were last refreshed "
    "in full; an old value means they are stale (the refresh fails, see the log).",
)
PEAK_RSS = Gauge(
    "chapar_process_peak_resident_memory_bytes",
    "Largest resident memory the process has had since it started (getrusage ru_maxrss).",
)
PEAK_RSS.set_function(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
BUILD = Info("chapar_build", "Version of the running program and of its main libraries.")


_ROLE_METRICS = {
    "node": (
        NODE_LETTERS,
        RECONNECTS,
        STAGE_SECONDS,
        HUB_CONNECTED,
        HUB_CLOCK_OFFSET,
        IN_DIRECTORY,
        NODE_OUTBOX_DEPTH,
        NODE_OUTBOX_OLDEST_AGE,
        NODE_INBOX_UNACKED,
        DOCUMENTS_SET_ASIDE,
    ),
    "hub": (
        HUB_LETTERS,
        DUPLICATES,
        HUB_CONNECTED_NODES,
        HUB_QUEUE_DEPTH,
        HUB_QUEUE_OLDEST_AGE,
        HUB_QUEUE_TOP_DEPTH,
        HUB_QUEUE_TOP_AGE,
    ),
}
_registered: set[str] = set()


class _ThreadCpu(Collector):
    """CPU seconds of the threads that do a server's work, read at scrape time from each
    thread's CPU clock: the event loop (gRPC, verification, signing outside the store)
    and the database writer (every write and commit). A rate near 1 means that thread is
    saturated: more letters then wait, whatever the other core does."""

    def __init__(self) -> None:
        self.threads: dict[str, Callable[[], int | None]] = {}

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "chapar_thread_cpu_seconds",
            "CPU seconds used by the event loop and the database writer thread.",
            labels=["thread"],
        )
        for name, ident in sorted(self.threads.items()):
            thread = ident()
            if thread is None or not hasattr(time, "pthread_getcpuclockid"):
                continue
            try:
                family.add_metric([name], time.clock_gettime(time.pthread_getcpuclockid(thread)))
            except OSError:  # the thread has ended
                continue
        yield family


THREAD_CPU = _ThreadCpu()


def track_thread_cpu(name: str, ident: Callable[[], int | None]) -> None:
    """Exports the CPU time of the thread whose id ``ident()`` gives (None: not yet)."""
    THREAD_CPU.threads[name] = ident


def register_role(role: str) -> None:
    """Exports the metrics of ``role`` (hub or node) and the build info; once per process."""
    if role in _registered:
        return
    _registered.add(role)
    # ``*_created`` samples double the series count and no dashboard of ours reads them.
    disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in the library
    for metric in _ROLE_METRICS[role]:
        REGISTRY.register(metric)
    REGISTRY.register(THREAD_CPU)
    BUILD.info(
        {
            "version": VERSION,
            "role": role,
            "python": platform.python_version(),
            "grpc": grpc.__version__,
        }
    )


class _Reasons:
    """The label sets a counter by reason has been given, at most ``MAX_REASONS``."""

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.seen: set[tuple[str, str]] = set()
        self.full_logged = False

    def label(self, first: str, reason: str) -> str:
        """``reason`` as the label to count it under: itself when of our form and held (or
        room for it), else OTHER."""
        reason = reason or "UNSPECIFIED"
        if (first, reason) in self.seen:
            return reason
        if not _REASON_FORM.fullmatch(reason):
            reason = "OTHER"
        elif len(self.seen) >= MAX_REASONS:
            if not self.full_logged:
                self.full_logged = True
                log.warning(
                    "%s holds %d label sets: new reasons are counted as OTHER",
                    self.metric,
                    MAX_REASONS,
                )
            reason = "OTHER"
        self.seen.add((first, reason))
        return reason


_REJECTION_REASONS = _Reasons("chapar_rejections_total")
_VERIFICATION_REASONS = _Reasons("chapar_verification_failures_total")


def _forget_reasons() -> None:
    """For tests that removed the series they made."""
    for reasons in (_REJECTION_REASONS, _VERIFICATION_REASONS):
        reasons.seen.clear()
        reasons.full_logged = False


def count_rejection(code: str, reason: str, n: int = 1) -> None:
    reason = _REJECTION_REASONS.label(code, reason)
    REJECTIONS.labels(code=code, reason=reason).inc(n)
    LAST_REJECTION.labels(code=code, reason=reason).set_to_current_time()


def count_verification_failure(kind: str, reason: str) -> None:
    """``kind``: envelope, evidence or certificate."""
    VERIFICATION_FAILURES.labels(kind=kind, reason=_VERIFICATION_REASONS.label(kind, reason)).inc()


def serve_metrics(
    listen: str, tls: TlsConfig | None = None, refusal: Callable[[bytes], str] | None = None
) -> tuple[WSGIServer, threading.Thread, str]:
    """Serves /metrics on ``HOST:PORT`` (port 0 picks one); returns where to scrape it:
    ``HOST:PORT`` over plain HTTP, or with ``tls`` an ``https://`` URL served with the
    server's certificate that requires a client certificate chaining to ``tls.ca``.

    ``refusal`` (with ``tls``): given the client certificate (DER), why it is refused
    ("" when it is not); a refused client gets 403 with the reason as the body. The TLS
    layer admits any certificate of the CA; this is where the directory's revocations
    apply."""
    host, _, port = listen.rpartition(":")
    if tls is None:
        server, thread = start_http_server(int(port), addr=host)
        return server, thread, f"{host}:{server.server_port}"
    server, thread = start_http_server(
        int(port),
        addr=host,
        certfile=str(tls.cert),
        keyfile=str(tls.key),
        client_cafile=str(tls.ca),
        client_auth_required=True,
        tls_min_version=ssl.TLSVersion.TLSv1_2,
    )
    if refusal is not None:
        _refuse_with(server, refusal)
    return server, thread, f"https://{host}:{server.server_port}/metrics"


_PEER = "chapar.peer_certificate"  # the client certificate's DER, in the WSGI environ


def _refuse_with(server: WSGIServer, refusal: Callable[[bytes], str]) -> None:
    """Puts each request's client certificate in its environ, and answers 403 to those
    ``refusal`` refuses before the metrics app sees them."""
    handler = server.RequestHandlerClass

    class Handler(handler):  # type: ignore[valid-type,misc]
        def get_environ(self) -> dict[str, Any]:
            environ: dict[str, Any] = super().get_environ()
            environ[_PEER] = self.connection.getpeercert(binary_form=True) or b""
            return environ

    server.RequestHandlerClass = Handler
    app = server.get_app()
    assert app is not None

    def checked(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        reason = refusal(environ.get(_PEER, b"")) if environ.get(_PEER) else "NO_CLIENT_CERTIFICATE"
        if reason:
            body = f"{reason}: client certificate refused\n".encode()
            start_response(
                "403 Forbidden",
                [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
            )
            return [body]
        return app(environ, start_response)

    server.set_app(checked)
