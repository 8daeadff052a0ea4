"""Running a hub or a node: TLS, gRPC server, health, reflection, signals, ready file.

``serve_hub`` and ``serve_node`` run until SIGTERM or SIGINT, then stop taking calls, let
calls in flight finish within the configured grace period, and close the database after
its writer has committed what was queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from client_sdk import pb
from client_sdk.identity import Identity, identity_of_certificate
from client_sdk.signing import Signer, key_matches_certificate, leaf_position, load_private_key
from client_sdk.trust import TrustStore, chain_break
from node import metrics as m
from node.config import (
    MAX_MESSAGE,
    ConfigError,
    HubConfig,
    NodeConfig,
    SigningConfig,
    TlsConfig,
    read_certificate_file,
    read_certificates,
)
from node.rpc.side import SideServiceAdmission, revocation
from node.rpc.wire import add_servicer

__all__ = ["LOG_FIELDS", "check_key_file", "configure_logging", "serve_hub", "serve_node"]

if TYPE_CHECKING:
    from node.agency import Agency
    from node.rpc.hub_link import HubLink
    from node.storage.db import Database

log = logging.getLogger("chapar.server")
_HEALTH_POLL_S = 0.25
# gRPC's own hard cap; the roles' configured limits (checked with a reason) are lower.
_MAX_MESSAGE = MAX_MESSAGE
_SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", _MAX_MESSAGE),
    ("grpc.max_send_message_length", _MAX_MESSAGE),
    # Peers may ping every second (ours ping every ``keepalive_s``, 1 s at least, 20 s by
    # default); more often and gRPC ends their connection (GOAWAY, "too_many_pings").
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 1_000),
    # gRPC sets SO_REUSEPORT by default: another process could then bind our port and take
    # a share of our connections. A clash must fail the bind instead.
    ("grpc.so_reuseport", 0),
    # A fixed 1 MiB receive window per stream instead of BDP-probed growth: with probing,
    # a 1 GiB document stream let windows (and buffered bytes) grow until the hub's peak
    # RSS passed 150 MB under load; fixed, it stays within a few MB of idle at the same
    # transfer rate on loopback (docs/BENCHMARKS.md).
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", 1024 * 1024),
]


def _server_options(keepalive_s: float) -> list[tuple[str, int]]:
    """The server's options; it pings each peer's connection every ``keepalive_s``.

    A peer that does not answer within half that (a node or back-end that hangs, or whose
    host vanished, with no FIN or RST) has its connection closed: its calls end, a hub's
    session with it ends (its letters go to its next session), a node's inbox stream ends
    (its unacknowledged letters go again), rather than waiting on TCP for many minutes.
    """
    return [
        *_SERVER_OPTIONS,
        ("grpc.keepalive_time_ms", round(keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", round(keepalive_s * 500)),
        # grpc 1.85 waits for a keepalive ping's answer this long (1 min by default).
        ("grpc.http2.ping_timeout_ms", round(keepalive_s * 500)),
        # gRPC stops pinging after two pings with no data sent; an idle stream needs more.
        ("grpc.http2.max_pings_without_data", 0),
    ]


# Context fields a log call may pass with ``extra={...}``; each becomes a JSON key. Only
# identifiers: never keys, certificates' private parts or letter bodies. Lines about a
# batch of letters carry ``shams`` (and ``request_ids``, aligned) as JSON arrays.
LOG_FIELDS = ("shams", "request_ids", "peer", "agency", "reason", "count", "incident", "method")


# What json.dumps leaves raw with ensure_ascii=False (it escapes U+0000-U+001F only) and
# readers still take for the end of a line: Python's splitlines() and JavaScript split at
# NEL, LINE SEPARATOR and PARAGRAPH SEPARATOR. A peer's string (a back-end's request_id
# may hold U+2028) would start a line of its own making. Escaped, the value is the same.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in LOG_FIELDS:
            value = record.__dict__.get(name)
            if value is not None and value != "":
                entry[name] = value
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False).translate(_LINE_BREAKS)


def configure_logging(level: str = "INFO") -> None:
    """One JSON object per line on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def check_key_file(path: Path, key: str) -> bytes:
    """Reads a private key, refusing one that group or others can read."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{key}: {path} is readable by others (mode {stat.S_IMODE(mode):o}); chmod 600 it"
        )
    return path.read_bytes()


@dataclass(frozen=True, slots=True)
class _TlsFiles:
    """A server's TLS files, each read once at start (``_read_tls``) and checked: the key,
    the certificate chain (leaf first) and the CA bundle, as PEM and, parsed, as certificates."""

    key_pem: bytes
    cert_pem: bytes
    chain: list[x509.Certificate]
    ca_pem: bytes
    roots: list[x509.Certificate]


def _read_tls(tls: TlsConfig, expected: Identity) -> _TlsFiles:
    """Reads tls.key, tls.cert and tls.ca, refusing (ConfigError) a key others can read or
    that is not the certificate's, a chain in the wrong order, speaking for another than
    ``expected`` or that cannot lead to a CA of tls.ca. The last is named with the issuer
    missing: gRPC would start, and every handshake with the server, and the node's with the
    hub, would fail, seen on the other side only as UNAVAILABLE."""
    key_pem = check_key_file(tls.key, "tls.key")
    key = _private_key(key_pem, tls.key, "tls.key")
    cert_pem, chain = read_certificate_file(tls.cert, "tls.cert")
    _check_order(key, chain, tls.cert, "tls.key", "tls.cert")
    _check_identity(chain, tls.cert, "tls.cert", expected)
    _check_key_matches(key, chain, tls.cert, "tls.key")
    ca_pem, roots = read_certificate_file(tls.ca, "tls.ca")
    gap = chain_break(chain, roots)
    if gap is not None:
        raise ConfigError(f"tls.cert: {tls.cert} does not chain to tls.ca ({tls.ca}): {gap}")
    return _TlsFiles(key_pem, cert_pem, chain, ca_pem, roots)


def _trust(tls: _TlsFiles, signing: SigningConfig) -> TrustStore:
    trust = TrustStore(tls.roots)
    trust.add_certificates(tls.chain[1:])
    if signing.intermediates is not None:
        trust.add_certificates(read_certificates(signing.intermediates, "signing.intermediates"))
    return trust


def _check_identity(
    chain: list[x509.Certificate], path: Path, key: str, expected: Identity
) -> None:
    found = identity_of_certificate(chain[0])
    if found != expected:
        raise ConfigError(
            f"{key}: {path} speaks for {found.uri if found else 'nobody'}, not {expected.uri}"
        )


def _signer(signing: SigningConfig, expected: Identity) -> Signer:
    key = _private_key(check_key_file(signing.key, "signing.key"), signing.key, "signing.key")
    chain = read_certificates(signing.cert, "signing.cert")
    _check_order(key, chain, signing.cert, "signing.key", "signing.cert")
    _check_identity(chain, signing.cert, "signing.cert", expected)
    _check_key_matches(key, chain, signing.cert, "signing.key")
    signer = Signer.from_files(signing.key, signing.cert)
    if signing.algorithm is not None:
        wanted = {
            "ed25519": pb.SignatureAlgorithm.SIGNATURE_ALGORITHM_ED25519,
            "ecdsa-p256": pb.SignatureAlgorithm.SIGNATURE_ALGORITHM_ECDSA_P256_SHA256,
        }[signing.algorithm]
        if signer.algorithm != wanted:
            raise ConfigError(
                f"signing.algorithm: is {signing.algorithm} but {signing.key} is another key type"
            )
    return signer


def _private_key(key_pem: bytes, key_path: Path, key: str) -> PrivateKeyTypes:
    """The key of ``key_path``, or a ConfigError saying why it cannot be read (encrypted:
    the servers take no passphrase)."""
    try:
        return load_private_key(key_pem, str(key_path))
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def _check_order(
    private: PrivateKeyTypes,
    chain: list[x509.Certificate],
    cert_path: Path,
    key: str,
    cert_key: str,
) -> None:
    """A chain file concatenated the other way round (the intermediate first) is named as
    such; read for its first certificate, it would "speak for nobody"."""
    place = leaf_position(private, chain)
    if place is not None and place > 1:
        raise ConfigError(
            f"{cert_key}: {cert_path} is in the wrong order: the certificate of {key} is "
            f"number {place} of {len(chain)}; it must come first, then its issuers "
            "(leaf first)"
        )


def _check_key_matches(
    private: PrivateKeyTypes, chain: list[x509.Certificate], cert_path: Path, key: str
) -> None:
    """A key that is not the certificate's is named here (gRPC would say only 'cannot bind')."""
    if not key_matches_certificate(private, chain[0]):
        raise ConfigError(f"{key}: does not match the public key of {cert_path}")


def _server_credentials(tls: _TlsFiles) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(tls.key_pem, tls.cert_pem)], root_certificates=tls.ca_pem, require_client_auth=True
    )


def channel_credentials(tls: _TlsFiles) -> grpc.ChannelCredentials:
    """The node's credentials towards the hub (the same TLS certificate and key)."""
    return grpc.ssl_channel_credentials(
        root_certificates=tls.ca_pem, private_key=tls.key_pem, certificate_chain=tls.cert_pem
    )


def _write_ready(path: Path | None, address: str, role: str, metrics: str) -> None:
    if path is None:
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    info = {"address": address, "pid": os.getpid(), "role": role, "metrics": metrics}
    try:
        tmp.write_text(json.dumps(info))
        tmp.replace(path)
    except OSError as exc:
        raise ConfigError(f"ready_file: cannot write {path}: {exc.strerror}") from exc


def _withdraw_ready(path: Path | None) -> None:
    """At start: removes the ready file an earlier run left (killed, crashed), which would
    say that a dead process is ready, also should this start fail."""
    if path is None:
        return
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise ConfigError(f"ready_file: cannot remove {path}: {exc.strerror}") from exc


def _remove_own_ready(path: Path | None) -> None:
    """At the end: removes the ready file if it is still this process's."""
    if path is None:
        return
    with contextlib.suppress(OSError, ValueError):  # gone, or not JSON: not ours
        info = json.loads(path.read_text())
        if isinstance(info, dict) and info.get("pid") == os.getpid():
            path.unlink()


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _set_health(servicer: health.aio.HealthServicer, *services: str, serving: bool) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for service in ("", *services):
        await servicer.set(service, status)
    m.READY.set(1 if serving else 0)


def _store_trouble(db: Database) -> str:
    """Why a server's store keeps it from SERVING, or ""."""
    if not db.is_open:
        return "database closed"
    if db.write_failing:  # until a commit succeeds, and RECOVERY_S after the last failure
        return "database not writable"
    return ""


def _node_trouble(agency: Agency) -> str:
    """Why the node is not SERVING, or "": it serves while its store is open and writing,
    a directory is held, its signing certificate is valid and the hub stream is up.

    Without the hub a node still accepts letters into its outbox, but it cannot deliver,
    relay or learn revocations: a load balancer or operator should see it as not ready.
    """
    m.HUB_CONNECTED.set(1 if agency.hub_connected else 0)  # in step with health
    m.IN_DIRECTORY.set(1 if agency.in_directory else 0)
    if agency.directory is None:
        return "no directory"
    if not agency.in_directory:
        return "agency not in the hub's directory"
    if (state := agency.own_state()) not in (None, pb.AGENCY_STATE_ACTIVE):
        name = pb.AgencyState.Name(state).removeprefix("AGENCY_STATE_").lower()
        return f"agency {name} in the hub's directory"
    if fault := agency.signing_certificate_fault():
        return f"{fault}: letters refused"
    if not agency.hub_connected:
        if agency.numbers_unconfirmed is not None:  # letters refused, not only held
            return "hub stream down, and restored from a backup: letters refused until the hub confirms the numbers"
        return "hub stream down"
    return _store_trouble(agency.store.db)


async def _watch_health(
    servicer: health.aio.HealthServicer,
    services: Sequence[str],
    trouble: Callable[[], str],
    why: str,
    db: Database,
) -> None:
    """Polls ``trouble()`` and sets health (and ``chapar_ready``) when it changes; ``why``
    is what it said when health was last set ("": SERVING). While the store fails, a probe
    write a second tells when it can write again, should no other write come (a load
    balancer sends nothing to a server that is NOT_SERVING)."""
    probe: asyncio.Task[None] | None = None
    probed = 0.0
    try:
        while True:
            await asyncio.sleep(_HEALTH_POLL_S)
            now = time.monotonic()
            if db.write_failing and (probe is None or probe.done()) and now - probed >= 1.0:
                probed = now
                probe = asyncio.create_task(_probe(db))
            why = await _health_changed(servicer, services, trouble(), why)
    finally:
        if probe is not None:
            probe.cancel()


async def _probe(db: Database) -> None:
    with contextlib.suppress(Exception):  # a failure is what write_failing records
        await db.probe_write()


async def _health_changed(
    servicer: health.aio.HealthServicer, services: Sequence[str], why: str, was: str
) -> str:
    """Sets health when ``why`` (empty: serving) and ``was`` differ on serving, and logs
    every change of ``why``: a server already NOT_SERVING that finds another reason says
    so (a node whose hub closed its stream, "hub stream down", then learns that its agency
    is suspended: the directory, not the network, is the operator's lead). Returns ``why``."""
    if why == was:
        return why
    if bool(why) != bool(was):
        await _set_health(servicer, *services, serving=not why)
    if why:
        log.warning("health: NOT_SERVING (%s)", why)
    else:
        log.info("health: SERVING")
    return why


def _metrics(listen: str, role: str, tls: TlsConfig | None, db: Database, trust: TrustStore) -> str:
    m.register_role(role)
    main = threading.get_ident()  # this runs in the event loop's thread
    m.track_thread_cpu("event_loop", lambda: main)
    m.track_thread_cpu("db_writer", lambda: db.writer_thread)
    if not listen:
        return ""
    from node.metrics import serve_metrics

    try:
        _, _, address = serve_metrics(listen, tls, _metrics_refusal(trust))
    except OSError as exc:  # ssl.SSLError (a certificate or key that will not load) too
        raise ConfigError(f"metrics_listen: cannot serve {listen}: {exc}") from exc
    return address


def _metrics_refusal(trust: TrustStore) -> Callable[[bytes], str]:
    """Why /metrics refuses a client certificate (DER), asked from the metrics server's
    threads. They never touch ``trust`` (the event loop's, which changes it) nor wait for
    the loop (stuck, or closed while the process shuts down, a scrape got a 500 and a
    traceback): they read a copy of its CAs and revoked serials, replaced whole, by one
    assignment, whenever its revocations change (every directory change sets them)."""

    current = trust.snapshot()

    def renew() -> None:
        nonlocal current
        current = trust.snapshot()

    trust.revocation_listeners.append(renew)

    def refusal(der: bytes) -> str:
        try:
            return revocation(x509.load_der_x509_certificate(der), current)
        except ValueError:
            return "CERTIFICATE_MALFORMED"

    return refusal


def revocations_coming_due(trust: TrustStore) -> Callable[[], None]:
    """Runs the trust store's revocation listeners again when the earliest revocation
    scheduled for a time still ahead (``revoked_since``) comes due, so that what each holds
    open for a certificate retired from that time (a back-end's stream, a node's session,
    a document transfer, a health Watch) ends then, as at a revocation published without
    a time, not at the next directory change. One timer on the running loop, armed again
    whenever the revocations change (it is one of the listeners) and at each time come due
    (a timer that fires early, by the wall clock, arms again for the same time). Returns
    what cancels it, for the server's close."""
    loop = asyncio.get_running_loop()
    timer: asyncio.TimerHandle | None = None

    def arm() -> None:
        nonlocal timer
        if timer is not None:
            timer.cancel()
            timer = None
        now = dt.datetime.now(dt.UTC)
        due = min((t for t in trust.revoked_since.values() if t > now), default=None)
        if due is not None:
            timer = loop.call_later((due - now).total_seconds(), came_due)

    def came_due() -> None:
        try:
            for listener in list(trust.revocation_listeners):
                if listener is not arm:
                    listener()
        finally:
            arm()  # the next time ahead, if any

    def cancel() -> None:
        with contextlib.suppress(ValueError):
            trust.revocation_listeners.remove(arm)
        if timer is not None:
            timer.cancel()

    trust.revocation_listeners.append(arm)
    arm()
    return cancel


async def _start(
    server: grpc.aio.Server,
    listen: str,
    creds: grpc.ServerCredentials,
    service: str,
    health_servicer: health.aio.HealthServicer,
    *more_services: str,
) -> str:
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    # grpcio-health-checking starts "" as SERVING; nothing is ready before we say so.
    await _set_health(health_servicer, service, *more_services, serving=False)
    reflection.enable_server_reflection(
        [
            service,
            *more_services,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    try:
        port = server.add_secure_port(listen, creds)
    except RuntimeError as exc:  # grpc raises this when the bind fails
        raise ConfigError(f"listen: cannot bind {listen} (address in use?)") from exc
    if port == 0:
        raise ConfigError(f"listen: cannot bind {listen}")
    await server.start()
    host = listen.rpartition(":")[0]
    return f"{host}:{port}"


async def serve_hub(config: HubConfig, config_path: Path | None = None) -> None:
    from node.hub import Hub, build_directory
    from node.monitor import HubMonitor
    from node.storage.hub_store import HubStore

    _withdraw_ready(config.ready_file)
    tls = _read_tls(config.tls, config.identity)
    creds = _server_credentials(tls)
    signer = _signer(config.signing, config.identity)
    trust = _trust(tls, config.signing)
    directory = build_directory(config, signer, trust.intermediates)
    async with contextlib.AsyncExitStack() as cleanup:
        cleanup.callback(_remove_own_ready, config.ready_file)  # last, once all is closed
        cleanup.callback(revocations_coming_due(trust))
        # From here on whatever was opened is closed again, however start-up or serving
        # ends: left open, the store's writer (not a daemon thread) keeps the process alive.
        store = await HubStore.open(config.database, config.durability)
        cleanup.callback(log.info, "hub stopped")
        cleanup.push_async_callback(store.close)
        hub = Hub(config, store, signer, trust, directory, config_path)
        cleanup.push_async_callback(hub.stop)
        await hub.start()
        server = grpc.aio.server(
            options=_server_options(config.keepalive_s),
            interceptors=[SideServiceAdmission(trust)],  # health, reflection: revocations too
        )
        add_servicer(server, hub, pb.HUB_SERVICE, limit=config.max_frame_bytes)
        metrics = _metrics(
            config.metrics_listen,
            "hub",
            config.tls if config.metrics_tls else None,
            store.db,
            trust,
        )
        health_servicer = health.aio.HealthServicer()
        monitor = HubMonitor(hub)
        cleanup.push_async_callback(monitor.stop)
        monitor.start()
        # Stopped first (the stack unwinds last in, first out) if start-up fails from here
        # on, so no handler runs against what the callbacks above close; after serving, a
        # second stop is a no-op.
        cleanup.push_async_callback(server.stop, 0)
        address = await _start(server, config.listen, creds, pb.HUB_SERVICE_NAME, health_servicer)
        # The store is open and the directory built (both above): the hub is ready.
        await _set_health(health_servicer, pb.HUB_SERVICE_NAME, serving=True)
        _write_ready(config.ready_file, address, "hub", metrics)
        log.info("hub %s listening on %s", config.name, address)
        hub.link_held_letters_later()  # serving first: it reads every envelope held
        watcher = asyncio.create_task(
            _watch_health(
                health_servicer,
                (pb.HUB_SERVICE_NAME,),
                lambda: _store_trouble(store.db),
                "",
                store.db,
            )
        )
        cleanup.callback(watcher.cancel)
        await _until_signalled()
        grace_s = hub.config.grace_s  # as a reload may have set it
        log.info("hub stopping (grace %.1fs)", grace_s)
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        m.READY.set(0)
        await health_servicer.enter_graceful_shutdown()
        hub.close_sessions()
        await server.stop(grace_s)


async def serve_node(config: NodeConfig, config_path: Path | None = None) -> None:
    from node.agency import Agency
    from node.backup import place_staged
    from node.document_store import DocumentStore
    from node.documents import Documents
    from node.monitor import NodeMonitor
    from node.rpc.hub_link import HubLink
    from node.storage.node_store import NodeStore

    _withdraw_ready(config.ready_file)
    tls = _read_tls(config.tls, config.identity)
    creds = _server_credentials(tls)
    signer = _signer(config.signing, config.identity)
    trust = _trust(tls, config.signing)
    link_creds = channel_credentials(tls)
    async with contextlib.AsyncExitStack() as cleanup:
        cleanup.callback(_remove_own_ready, config.ready_file)  # last, once all is closed
        cleanup.callback(revocations_coming_due(trust))
        # From here on whatever was opened is closed again, however start-up or serving
        # ends: left open, the store's writer (not a daemon thread) keeps the process alive.
        # Stopped in the reverse order: monitor, agency, hub link, store.
        store = await NodeStore.open(config.database, config.durability)
        cleanup.callback(log.info, "node stopped")
        cleanup.push_async_callback(store.close)
        if indexed := await store.index_documents():
            log.info("indexed the attachments of %d letters stored before this version", indexed)
        if marked := await store.mark_documents_fetched_before():
            log.info("%d documents fetched before this version marked as their owners'", marked)
        agency = Agency(config, store, signer, trust, config_path)
        agency.numbers_unconfirmed = await store.unconfirmed_restore()
        if agency.numbers_unconfirmed is not None:
            log.warning(
                "restored from a backup: submissions wait until the hub confirms the numbers"
            )
        try:
            # Before the store is opened: what a restore cut short left unplaced.
            if placed := place_staged(config.documents_dir):
                log.warning("%s", placed)
        except OSError as exc:
            raise ConfigError(
                f"documents.directory: cannot place what a restore cut short left in"
                f" {config.documents_dir}: {exc}"
            ) from exc
        try:
            document_store = DocumentStore(config.documents_dir, config.documents)
        except OSError as exc:
            raise ConfigError(
                f"documents.directory: cannot use {config.documents_dir}: {exc}"
            ) from exc
        agency.document_store = document_store
        documents = Documents(agency, document_store)
        # Trust stores only add: a signing certificate a directory listed once still
        # verifies after a restart, as it does without one, so that letters and evidence its
        # key signed before it left the directory (rotated while they waited) are not refused.
        trust.add_certificates(await store.known_certificates())
        cached = await store.load_directory()
        if cached is not None:
            await agency.set_directory(cached, persist=False)
            agency.hold_hub_of(cached)  # saved by this node: its hub is the one accepted
        # The hub's frame limit as it last said it, so that the submission check holds
        # from the first call even while the hub is down (its next welcome updates it).
        hub_frame_bytes = await store.load_hub_frame_bytes()
        if hub_frame_bytes is not None:
            await agency.set_hub_frame_bytes(hub_frame_bytes, persist=False)
        server = grpc.aio.server(
            options=_server_options(config.keepalive_s),
            interceptors=[SideServiceAdmission(trust)],  # health, reflection: revocations too
        )
        add_servicer(server, agency, pb.NODE_SERVICE, limit=config.max_message_bytes)
        add_servicer(server, documents, pb.DOCUMENT_SERVICE, limit=config.max_message_bytes)
        metrics = _metrics(
            config.metrics_listen,
            "node",
            config.tls if config.metrics_tls else None,
            store.db,
            trust,
        )
        health_servicer = health.aio.HealthServicer()
        link = HubLink(agency, link_creds)
        link.document_store = document_store
        documents.link = link
        agency.hub_link = link
        link_task = asyncio.create_task(link.run(), name="hub-link")
        cleanup.push_async_callback(_stop_link, link, link_task)
        agency.start()
        cleanup.push_async_callback(agency.stop)
        monitor = NodeMonitor(agency)
        monitor.start()
        cleanup.push_async_callback(monitor.stop)
        cleanup.push_async_callback(server.stop, 0)  # first, as at the hub
        address = await _start(
            server,
            config.listen,
            creds,
            pb.NODE_SERVICE_NAME,
            health_servicer,
            pb.DOCUMENT_SERVICE_NAME,
        )
        log.info("node %s listening on %s", config.agency, address)
        stop = asyncio.create_task(_until_signalled())
        # Ready means able to take submissions: listening and holding a directory (cached
        # from an earlier run, or fetched from the hub). Until then submit says UNAVAILABLE.
        ready = asyncio.create_task(agency.directory_ready.wait())
        await asyncio.wait({stop, ready}, return_when=asyncio.FIRST_COMPLETED)
        watcher: asyncio.Task[None] | None = None
        if ready.done():
            services = (pb.NODE_SERVICE_NAME, pb.DOCUMENT_SERVICE_NAME)
            why = _node_trouble(agency)
            await _set_health(health_servicer, *services, serving=not why)
            _write_ready(config.ready_file, address, "node", metrics)
            log.info("node %s ready", config.agency)
            watcher = asyncio.create_task(
                _watch_health(
                    health_servicer, services, lambda: _node_trouble(agency), why, store.db
                )
            )
        ready.cancel()
        await stop
        grace_s = agency.config.grace_s  # as a reload may have set it
        log.info("node stopping (grace %.1fs)", grace_s)
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        m.READY.set(0)
        await health_servicer.enter_graceful_shutdown()
        agency.end_streams()  # back-end streams end now, not at the end of the grace
        await server.stop(grace_s)


async def _stop_link(link: HubLink, task: asyncio.Task[None]) -> None:
    link.stop()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
