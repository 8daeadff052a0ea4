"""What a reload of the hub's (and a node's) configuration applies, and what it says it
does not.

``Hub.reload_if_changed`` took the whole new configuration as ``self.config``, but the
repeating tasks (expiry, retention, the reload itself) and the gauges' refresh had read
their periods, and the monitor its top-N, once at start: a reload accepted a new value,
showed it in ``hub.config``, and went on with the old one without a word. What the
server read at start (addresses, database, TLS and signing files, keepalive, the frame
limit) cannot change without a restart; a reload took those silently too. (``hub.name``
is not one of them: a reload publishes it in the directory, the first step of a rename,
OPERATIONS.md; the hub attests as its start's name until a restart.)
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import pytest
from cryptography import x509

from client_sdk import pb
from client_sdk.identity import Identity
from client_sdk.shams import parse_shams
from node import metrics as m
from node.agency import _RESTART_ONLY as NODE_RESTART_ONLY
from node.agency import Agency, _OpenStream
from node.cluster import Cluster
from node.config import load_hub_config, load_node_config
from node.core.directory import DirectoryView
from node.core.errors import ChaparError
from node.document_store import DocumentStore
from node.hub import _RESTART_ONLY as HUB_RESTART_ONLY
from node.hub import Hub, build_directory
from node.monitor import HubMonitor, NodeMonitor
from node.server import _read_tls, _signer, _trust
from node.storage.db import Page
from node.storage.hub_store import HubStore
from node.storage.node_store import NodeStore

A, B = "000.00.00.G22", "10861234567"
# The longest periods at start: a task still waiting on one has not taken the reload.
SLOW = {"expiry_interval_s": "3600", "purge_interval_s": "3600", "metrics_interval_s": "60"}


def _set(path: Path, key: str, value: str, table: str = "hub") -> None:
    """``key = value`` in ``[table]`` of the TOML file at ``path``, as an operator's edit."""
    lines = path.read_text().splitlines()
    at = lines.index(f"[{table}]") + 1
    end = next((i for i in range(at, len(lines)) if lines[i].startswith("[")), len(lines))
    lines = [ln for i, ln in enumerate(lines) if not (at <= i < end and ln.startswith(f"{key} "))]
    lines.insert(at, f"{key} = {value}")
    path.write_text("\n".join(lines) + "\n")


def _reload_seen(hub: Hub) -> None:
    hub._sources = ()  # as if the reload loop saw a new modification time


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[Hub]:
    cluster = Cluster.prepare(tmp_path, [A, B])
    config_path = cluster.hub.config
    for key, value in SLOW.items():
        _set(config_path, key, value)
    config = load_hub_config(config_path)
    signer = _signer(config.signing, config.identity)
    trust = _trust(_read_tls(config.tls, config.identity), config.signing)
    directory = build_directory(config, signer, trust.intermediates)
    store = await HubStore.open(tmp_path / "hub.db", durability="normal")
    hub = Hub(config, store, signer, trust, directory, config_path)
    try:
        yield hub
    finally:
        await hub.stop()
        await store.close()


def _counting(calls: list[float]) -> object:
    async def action() -> int:
        calls.append(asyncio.get_running_loop().time())
        return 0

    return action


async def test_a_reloaded_expiry_and_retention_interval_is_the_one_their_tasks_wait(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    expired: list[float] = []
    purged: list[float] = []
    monkeypatch.setattr(hub, "expire_due", _counting(expired))
    monkeypatch.setattr(hub, "purge", _counting(purged))
    await hub.start()
    assert hub.config_path is not None
    _set(hub.config_path, "expiry_interval_s", "0.1")
    _set(hub.config_path, "purge_interval_s", "0.1")
    _reload_seen(hub)
    await hub.reload_if_changed()
    await asyncio.sleep(2.0)
    # The wait of an hour under way when the reload came is cut short too (within a
    # second), then every 0.1 s: several turns, not none until the hour is out.
    assert len(expired) >= 5, f"expiry ran {len(expired)} times in 2 s after a reload to 0.1 s"
    assert len(purged) >= 5, f"retention ran {len(purged)} times in 2 s after a reload to 0.1 s"


async def test_a_reloaded_reload_interval_is_the_one_the_reload_task_waits(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert hub.config_path is not None
    _set(hub.config_path, "reload_interval_s", "3600")
    _reload_seen(hub)
    await hub.reload_if_changed()
    assert hub.config.reload_interval_s == 3600
    reloads: list[float] = []
    real = hub.reload_if_changed

    async def counted() -> int:
        reloads.append(asyncio.get_running_loop().time())
        return await real()

    monkeypatch.setattr(hub, "reload_if_changed", counted)
    await hub.start()
    _set(hub.config_path, "reload_interval_s", "0.1")
    await real()  # the operator's edit, read by some reload
    await asyncio.sleep(2.0)
    assert len(reloads) >= 5, f"reload ran {len(reloads)} times in 2 s after a reload to 0.1 s"


def _top_series() -> set[tuple[str, str]]:
    return {
        (s.labels["rank"], s.labels["agency"])
        for s in m.HUB_QUEUE_TOP_DEPTH.collect()[0].samples
        if s.name == "chapar_hub_queue_top_depth"
    }


async def test_a_reloaded_metrics_interval_and_top_n_are_the_ones_the_monitor_uses(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monitor = HubMonitor(hub)
    hub._depth = {A: 3, B: 2}
    await monitor.refresh()
    assert _top_series() == {("1", A), ("2", B)}

    assert hub.config_path is not None
    _set(hub.config_path, "metrics_top_n", "1")
    _reload_seen(hub)
    await hub.reload_if_changed()
    await monitor.refresh()
    assert _top_series() == {("1", A)}, "metrics_top_n reloaded to 1"

    refreshed: list[float] = []
    monkeypatch.setattr(monitor, "refresh", _counting(refreshed))
    monitor.start()  # refreshes at once, then waits a minute ...
    try:
        await asyncio.sleep(0.2)
        _set(hub.config_path, "metrics_interval_s", "0.1")  # ... which a reload cuts short
        _reload_seen(hub)
        await hub.reload_if_changed()
        await asyncio.sleep(1.0)
    finally:
        await monitor.stop()
    assert len(refreshed) >= 6, f"gauges refreshed {len(refreshed)} times in 1.2 s at 0.1 s"


async def test_a_reload_warns_of_each_changed_key_that_takes_effect_at_a_restart(
    hub: Hub, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    started = hub.config
    assert hub.config_path is not None
    other_cert = tmp_path / "tls-renewed.crt"
    shutil.copy(started.tls.cert, other_cert)
    _set(hub.config_path, "keepalive_s", "40")
    _set(hub.config_path, "listen", '"127.0.0.1:7443"')
    _set(hub.config_path, "name", '"renamed"')  # announced in the directory: not named
    _set(hub.config_path, "metrics_listen", '"127.0.0.1:9999"')
    _set(hub.config_path, "max_frame_bytes", "65536")
    _set(hub.config_path, "cert", f'"{other_cert}"', table="tls")
    _set(hub.config_path, "queue_quota", "7")  # applied by a reload: not named
    _reload_seen(hub)
    caplog.set_level(logging.WARNING, "chapar.hub")
    await hub.reload_if_changed()

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    named = set(re.findall(r"\b(?:hub|tls|signing)\.[a-z_]+", warnings[0]))
    assert named == {
        "hub.keepalive_s",
        "hub.listen",
        "hub.metrics_listen",
        "hub.max_frame_bytes",
        "tls.cert",
    }, warnings[0]
    assert "restart" in warnings[0]
    # What is in force is what runs: the start's values.
    assert hub.config.keepalive_s == started.keepalive_s
    assert hub.config.listen == started.listen
    assert hub.config.tls == started.tls
    assert hub.config.max_frame_bytes == started.max_frame_bytes
    assert hub.config.queue_quota == 7
    assert hub.directory.message.hub == "urn:chapar:hub:renamed"
    assert hub.identity == started.identity

    caplog.clear()
    _reload_seen(hub)  # another edit, of a key a reload applies: still said, once a reload
    _set(hub.config_path, "queue_quota", "8")
    await hub.reload_if_changed()
    assert hub.config.queue_quota == 8
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "hub.keepalive_s" in warnings[0]


async def test_a_reload_of_keys_it_applies_warns_of_nothing(
    hub: Hub, caplog: pytest.LogCaptureFixture
) -> None:
    assert hub.config_path is not None
    for key, value in {
        "queue_quota": "7",
        "delivery_window": "8",
        "clock_skew_s": "60",
        "expiry_interval_s": "2",
        "metrics_top_n": "3",
        "shutdown_grace_s": "1",
    }.items():
        _set(hub.config_path, key, value)
    _reload_seen(hub)
    caplog.set_level(logging.WARNING, "chapar.hub")
    await hub.reload_if_changed()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert (hub.config.queue_quota, hub.config.delivery_window, hub.config.grace_s) == (7, 8, 1.0)


def test_operations_md_marks_exactly_the_keys_a_reload_does_not_apply(hub: Hub) -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "OPERATIONS.md").read_text()
    table = text[text.index("### Hub (`hub.toml`)") : text.index("### Node (`node.toml`)")]
    marked = {
        row.split("`")[1]
        for row in table.splitlines()
        if row.startswith("| `") and "takes effect at a restart, not a reload" in row
    }
    assert marked == set(HUB_RESTART_ONLY.named(hub.config))


# -- the node ------------------------------------------------------------------------------
#
# A node read its configuration once, at start: an operator who changed a back-end's
# mailboxes, a retention period or a document limit had to restart it, and nothing said
# which edits a restart was needed for. It now reloads as the hub does.

CLIENTS = """reload_interval_s = 3600
purge_interval_s = 3600
metrics_interval_s = 60
[[clients]]
name = "backend"
mailboxes = ["a"]
[[clients]]
name = "archive"
mailboxes = ["x"]"""


def _node_reload_seen(node: Agency) -> None:
    node._sources = ()  # as if the reload loop saw a new modification time


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Agency]:
    cluster = Cluster.prepare(tmp_path, [A, B])
    cluster.hub.address = "127.0.0.1:1"  # never dialled: no hub link here
    config_path = cluster.add_node(A, CLIENTS).config
    config = load_node_config(config_path)
    store = await NodeStore.open(tmp_path / "node.db", durability="normal")
    agency = Agency(
        config,
        store,
        _signer(config.signing, config.identity),
        _trust(_read_tls(config.tls, config.identity), config.signing),
        config_path=config_path,
    )
    agency.document_store = DocumentStore(config.documents_dir, config.documents)
    try:
        yield agency
    finally:
        await agency.stop()
        await store.close()


def _mailboxes_of(node: Agency, client: str) -> frozenset[str] | None:
    return node._access(Identity.for_client(A, client)).mailboxes


def _stream_of(node: Agency, client: str) -> _OpenStream:
    """An open back-end stream of ``client``, as the node registers one (_registered)."""
    identity = Identity.for_client(A, client)
    stream = _OpenStream(node._access(identity), node.signer.certificate)
    node._streams[stream] = stream.certificate
    return stream


async def test_a_node_reload_applies_a_changed_mailbox_list_and_ends_the_streams_it_changes(
    node: Agency, caplog: pytest.LogCaptureFixture
) -> None:
    assert node.config_path is not None
    backend, archive = _stream_of(node, "backend"), _stream_of(node, "archive")
    text = node.config_path.read_text()
    node.config_path.write_text(
        text.replace('mailboxes = ["a"]', 'mailboxes = ["a", "b"]')
        + '[[clients]]\nname = "registry"\nmailboxes = ["r"]\n'
    )
    assert _mailboxes_of(node, "registry") is None  # not listed: every mailbox
    _node_reload_seen(node)
    caplog.set_level(logging.WARNING, "chapar")
    assert await node.reload_if_changed() == 1
    assert _mailboxes_of(node, "backend") == {"a", "b"}
    assert _mailboxes_of(node, "registry") == {"r"}
    assert _mailboxes_of(node, "archive") == {"x"}
    # The stream opened with the old list ends (its back-end reads again, STREAM_ENDED,
    # and is admitted with the new one); another client's goes on.
    assert backend.ended.is_set()
    assert backend.refused is None
    assert not archive.ended.is_set()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_an_inbox_page_read_as_a_reload_removes_its_mailbox_is_not_shown(
    node: Agency, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reload ends the stream of a client whose mailboxes changed, but a page of its
    inbox read from the database as the reload landed was still written to the stream,
    once, with the old mailboxes: a letter of a mailbox just taken from the client shown
    to it after the reload (as a page read as its certificate is revoked is not)."""
    assert node.config_path is not None
    backend = _stream_of(node, "backend")
    text = node.config_path.read_text()

    async def read_as_the_reload_lands(
        after: int, limit: int, max_bytes: int
    ) -> Page[tuple[int, str, str, bytes, bytes, float]]:
        page = Page([(1, f"{B}/O/2026/0000001", "a", b"envelope", b"delivery", 0.0)], False)
        node.config_path.write_text(text.replace('mailboxes = ["a"]', 'mailboxes = ["b"]'))
        _node_reload_seen(node)
        assert await node.reload_if_changed() == 1
        return page

    monkeypatch.setattr(node.store, "unacked_inbox", read_as_the_reload_lands)

    class Context:
        def __init__(self) -> None:
            self.written: list[object] = []

        async def write(self, message: object) -> None:
            self.written.append(message)

    context = Context()
    await asyncio.wait_for(node._send_inbox("", context, backend), 5)  # type: ignore[arg-type]
    assert backend.ended.is_set()
    assert context.written == []


class _Written:
    """A back-end stream's context: what the node wrote to it (an abort has no stand-in:
    a stream that ends with an error fails the test)."""

    def __init__(self) -> None:
        self.written: list[object] = []

    async def write(self, message: object) -> None:
        self.written.append(message)


def _removing_mailbox_a(node: Agency) -> None:
    """Edits the file as an operator who moves the back-end from mailbox "a" to "b"."""
    assert node.config_path is not None
    text = node.config_path.read_text()
    node.config_path.write_text(text.replace('mailboxes = ["a"]', 'mailboxes = ["b"]'))
    _node_reload_seen(node)


async def test_a_submission_frame_read_just_before_a_reload_removes_its_mailbox_is_not_stored(
    node: Agency, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reload ends the stream of a client whose mailboxes changed once the frames it
    read are answered, but a frame read before the reload and handled after it was
    handled with the old mailboxes: a letter from a mailbox just taken from the client
    accepted after the reload. It is not applied: the stream ends (OK, the SDK's
    STREAM_ENDED) with it unanswered, as at a stop, and the back-end sends it again on a
    new stream, admitted with its new mailboxes."""
    node.directory = DirectoryView(
        pb.Directory(
            version=1,
            agencies=[
                pb.Agency(code=code, display_name=code, state=pb.AGENCY_STATE_ACTIVE)
                for code in (A, B)
            ],
        )
    )
    backend = _stream_of(node, "backend")
    monkeypatch.setattr(node, "_open_stream", lambda context: backend)
    stored: list[object] = []
    submit = node.store.submit

    async def submit_seen(request_ids: Sequence[str], **kwargs: Any) -> Any:
        stored.append(request_ids)
        return await submit(request_ids, **kwargs)

    monkeypatch.setattr(node.store, "submit", submit_seen)

    async def frames() -> AsyncIterator[pb.StreamSubmitEnvelopesRequest]:
        draft = pb.LetterDraft(
            recipients=[pb.Address(agency=B)], subject="from a", body=b"x", sender_mailbox="a"
        )
        yield pb.StreamSubmitEnvelopesRequest(
            requests=[pb.SubmitEnvelopeRequest(request_id="r-1", draft=draft)]
        )
        # Read, not yet handled: the reload lands now.
        _removing_mailbox_a(node)
        assert await node.reload_if_changed() == 1

    context = _Written()
    await asyncio.wait_for(node.StreamSubmitEnvelopes(frames(), context), 5)  # type: ignore[arg-type]
    assert backend.ended.is_set()
    assert (stored, context.written) == ([], [])


async def test_an_acknowledgement_frame_handled_as_a_reload_removes_its_mailbox_is_not_applied(
    node: Agency, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a submission frame: an acknowledgement of a letter of mailbox "a" whose entry
    was being read from the database as a reload took "a" from the client was recorded,
    for "a", after the reload. It is not applied, and the stream ends with it unanswered."""
    backend = _stream_of(node, "backend")
    monkeypatch.setattr(node, "_open_stream", lambda context: backend)
    text = f"{B}/O/2026/0000001"
    header = pb.EnvelopeHeader(shams=parse_shams(text)).SerializeToString()

    async def read_as_the_reload_lands(
        numbers: Sequence[str],
    ) -> dict[str, tuple[list[str], bytes, pb.Evidence | None, list[str]]]:
        _removing_mailbox_a(node)
        assert await node.reload_if_changed() == 1
        return {text: (["a"], header, None, ["a"])}

    recorded: list[object] = []

    async def record_handovers(items: Sequence[tuple[str, pb.Evidence]], **kwargs: Any) -> Any:
        recorded.append(kwargs.get("mailboxes"))
        return [evidence for _, evidence in items]

    monkeypatch.setattr(node.store, "inbox_entries", read_as_the_reload_lands)
    monkeypatch.setattr(node.store, "record_handovers", record_handovers)

    async def frames() -> AsyncIterator[pb.StreamAckEnvelopesRequest]:
        yield pb.StreamAckEnvelopesRequest(shams=[parse_shams(text)])

    context = _Written()
    await asyncio.wait_for(node.StreamAckEnvelopes(frames(), context), 5)  # type: ignore[arg-type]
    assert backend.ended.is_set()
    assert (recorded, context.written) == ([], [])


async def test_an_acknowledgement_frame_handled_as_its_certificate_is_revoked_is_refused(
    node: Agency, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same window for a revocation: a frame was checked against the stream's
    refusal only as its handling began, so an acknowledgement whose letter's entry was
    being read as the directory revoked the stream's certificate was recorded after the
    revocation. It is refused with the stream's refusal (CERTIFICATE_REVOKED), as a frame
    read before the revocation and not yet handled is."""
    assert node.config.tls.cert.is_file()
    certificate = x509.load_pem_x509_certificate(node.config.tls.cert.read_bytes())
    identity = Identity.for_client(A, "backend")
    backend = _OpenStream(node._access(identity), certificate)
    monkeypatch.setattr(node, "_open_stream", lambda context: backend)
    text = f"{B}/O/2026/0000001"
    header = pb.EnvelopeHeader(shams=parse_shams(text)).SerializeToString()

    async def read_as_the_revocation_lands(
        numbers: Sequence[str],
    ) -> dict[str, tuple[list[str], bytes, pb.Evidence | None, list[str]]]:
        await node.set_directory(
            pb.Directory(version=2, revoked_serials=[f"{certificate.serial_number:x}"]),
            persist=False,
        )
        assert backend.refused is not None
        return {text: (["a"], header, None, ["a"])}

    recorded: list[object] = []

    async def record_handovers(items: Sequence[tuple[str, pb.Evidence]], **kwargs: Any) -> Any:
        recorded.append(kwargs.get("mailboxes"))
        return [evidence for _, evidence in items]

    monkeypatch.setattr(node.store, "inbox_entries", read_as_the_revocation_lands)
    monkeypatch.setattr(node.store, "record_handovers", record_handovers)

    async def frames() -> AsyncIterator[pb.StreamAckEnvelopesRequest]:
        yield pb.StreamAckEnvelopesRequest(shams=[parse_shams(text)])

    async def abort(context: object, error: ChaparError) -> NoReturn:
        raise error  # as grpc's abort ends the call, with its status

    monkeypatch.setattr("node.agency.abort", abort)
    context = _Written()
    with pytest.raises(ChaparError) as ended:
        await asyncio.wait_for(node.StreamAckEnvelopes(frames(), context), 5)  # type: ignore[arg-type]
    assert ended.value.reason == "CERTIFICATE_REVOKED"
    assert (recorded, context.written) == ([], [])


async def test_a_node_reload_of_keys_it_applies_warns_of_nothing(
    node: Agency, caplog: pytest.LogCaptureFixture
) -> None:
    assert node.config_path is not None
    assert node.document_store is not None
    for key, value in {
        "shutdown_grace_s": "1",
        "relay_batch": "8",
        "relay_frame_bytes": "65536",
        "reconnect_max_s": "2",
        "retention_s": "60",
    }.items():
        _set(node.config_path, key, value, table="node")
    with node.config_path.open("a") as f:
        f.write(
            "[limits]\nmax_body_bytes = 1000\nmax_recipients = 3\nmax_subject_chars = 20\n"
            '[documents]\nmax_file_bytes = 4096\nmedia_types = ["text/plain"]\nretention_s = 60\n'
        )
    _node_reload_seen(node)
    caplog.set_level(logging.WARNING, "chapar")
    await node.reload_if_changed()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    config = node.config
    assert (config.grace_s, config.relay_batch, config.relay_frame_bytes) == (1.0, 8, 65536)
    assert (config.reconnect_max_s, config.retention_s, config.documents_retention_s) == (
        2.0,
        60.0,
        60.0,
    )
    assert (config.limits.max_body_bytes, config.limits.max_recipients) == (1000, 3)
    # The document store checks uploads against its own copy of the limits: it has the new.
    assert node.document_store.limits == config.documents
    assert config.documents.max_file_bytes == 4096


async def test_a_reloaded_node_retention_and_reload_interval_are_the_ones_their_tasks_wait(
    node: Agency, monkeypatch: pytest.MonkeyPatch
) -> None:
    purged: list[float] = []
    monkeypatch.setattr(node, "purge", _counting(purged))
    reloads: list[float] = []
    real = node.reload_if_changed

    async def counted() -> int:
        reloads.append(asyncio.get_running_loop().time())
        return await real()

    monkeypatch.setattr(node, "reload_if_changed", counted)
    node.start()  # both wait an hour ...
    assert node.config_path is not None
    _set(node.config_path, "purge_interval_s", "0.1", table="node")
    _set(node.config_path, "reload_interval_s", "0.1", table="node")
    _node_reload_seen(node)
    await real()  # ... which the operator's edit, read by some reload, cuts short
    await asyncio.sleep(2.0)
    assert len(purged) >= 5, f"retention ran {len(purged)} times in 2 s after a reload to 0.1 s"
    assert len(reloads) >= 5, f"reload ran {len(reloads)} times in 2 s after a reload to 0.1 s"


async def test_a_reloaded_node_metrics_interval_is_the_one_the_monitor_uses(
    node: Agency, monkeypatch: pytest.MonkeyPatch
) -> None:
    monitor = NodeMonitor(node)
    refreshed: list[float] = []
    monkeypatch.setattr(monitor, "refresh", _counting(refreshed))
    monitor.start()  # refreshes at once, then waits a minute ...
    try:
        await asyncio.sleep(0.2)
        assert node.config_path is not None
        _set(node.config_path, "metrics_interval_s", "0.1", table="node")  # ... cut short
        _node_reload_seen(node)
        await node.reload_if_changed()
        await asyncio.sleep(1.0)
    finally:
        await monitor.stop()
    assert len(refreshed) >= 6, f"gauges refreshed {len(refreshed)} times in 1.2 s at 0.1 s"


async def test_a_reload_that_finds_one_restart_only_key_changed_says_so_in_the_singular(
    hub: Hub, caplog: pytest.LogCaptureFixture
) -> None:
    # "hub.keepalive_s changed and take effect only at a restart": an operator's first
    # edit of a restart-only key is most often one key.
    assert hub.config_path is not None
    _set(hub.config_path, "keepalive_s", "40")
    _reload_seen(hub)
    caplog.set_level(logging.WARNING, "chapar.hub")
    await hub.reload_if_changed()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "configuration reloaded, but hub.keepalive_s changed and takes effect only at a"
        " restart; the running value stays until then"
    ]


async def test_a_node_reload_warns_of_each_changed_key_that_takes_effect_at_a_restart(
    node: Agency, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    started = node.config
    assert node.config_path is not None
    other_cert = tmp_path / "tls-renewed.crt"
    shutil.copy(started.tls.cert, other_cert)
    _set(node.config_path, "keepalive_s", "40", table="node")
    _set(node.config_path, "listen", '"127.0.0.1:7443"', table="node")
    _set(node.config_path, "hub", '"127.0.0.1:7444"', table="node")
    _set(node.config_path, "database", '"elsewhere.db"', table="node")
    _set(node.config_path, "cert", f'"{other_cert}"', table="tls")
    _set(node.config_path, "retention_s", "60", table="node")  # applied: not named
    with node.config_path.open("a") as f:
        f.write('[limits]\nmax_message_bytes = 65536\n[documents]\ndirectory = "docs-2"\n')
    _node_reload_seen(node)
    caplog.set_level(logging.WARNING, "chapar")
    await node.reload_if_changed()

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    named = set(re.findall(r"\b(?:node|tls|signing|limits|documents)\.[a-z_]+", warnings[0]))
    assert named == {
        "node.keepalive_s",
        "node.listen",
        "node.hub",
        "node.database",
        "tls.cert",
        "limits.max_message_bytes",
        "documents.directory",
    }, warnings[0]
    assert "restart" in warnings[0]
    # What is in force is what runs: the start's values.
    config = node.config
    assert (config.keepalive_s, config.listen, config.hub) == (
        started.keepalive_s,
        started.listen,
        started.hub,
    )
    assert (config.database, config.tls, config.documents_dir) == (
        started.database,
        started.tls,
        started.documents_dir,
    )
    assert config.max_message_bytes == started.max_message_bytes
    assert config.retention_s == 60


async def test_a_broken_node_configuration_is_refused_whole_and_the_running_one_kept(
    node: Agency, caplog: pytest.LogCaptureFixture
) -> None:
    started = node.config
    assert node.config_path is not None
    text = node.config_path.read_text()
    # A live key changed, beside a key that does not load: neither is taken.
    _set(node.config_path, "retention_s", "60", table="node")
    _set(node.config_path, "relay_batch", "0", table="node")
    _node_reload_seen(node)
    caplog.set_level(logging.INFO, "chapar")
    assert await node.reload_if_changed() == 0
    assert node.config == started
    assert _mailboxes_of(node, "backend") == {"a"}
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1, errors
    assert "not reloaded" in errors[0], errors[0]
    assert "node.relay_batch" in errors[0], errors[0]

    caplog.clear()  # not TOML at all: the same
    node.config_path.write_text(text + "[[clients]\n")
    _node_reload_seen(node)
    assert await node.reload_if_changed() == 0
    assert node.config == started
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1

    node.config_path.write_text(text.replace('mailboxes = ["a"]', 'mailboxes = ["b"]'))
    _node_reload_seen(node)  # mended: taken at the next change
    assert await node.reload_if_changed() == 1
    assert _mailboxes_of(node, "backend") == {"b"}


def test_operations_md_marks_exactly_the_node_keys_a_reload_does_not_apply(node: Agency) -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "OPERATIONS.md").read_text()
    table = text[text.index("### Node (`node.toml`)") : text.index("## Changing the directory")]
    marked = {
        row.split("`")[1]
        for row in table.splitlines()
        if row.startswith("| `") and "takes effect at a restart, not a reload" in row
    }
    assert marked == set(NODE_RESTART_ONLY.named(node.config))
