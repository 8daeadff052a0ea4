"""Review of the day's server-side changes (aa44039..07ec00e): proofs of defects, each of
which failed on the code before its mend."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, cast

import grpc

from client_sdk import pb
from client_sdk.identity import Identity
from client_sdk.shams import format_shams
from node.agency import Access, Agency, _OpenStream
from tests.unit.conftest import RECIPIENT, SENDER


class _Context:
    """Enough of a grpc servicer context for DownloadDocument."""

    def __init__(self) -> None:
        self.written: list[pb.DownloadDocumentResponse] = []
        self.aborted: grpc.StatusCode | None = None
        self.details = ""

    async def write(self, message: pb.DownloadDocumentResponse) -> None:
        self.written.append(message)

    async def abort(
        self, code: grpc.StatusCode, details: str, trailing_metadata: object = ()
    ) -> None:
        self.aborted = code
        self.details = details
        raise grpc.aio.AbortError()


async def test_a_document_fetched_before_the_upgrade_stays_available_to_its_mailbox(
    agency: Agency, tmp_path: Path
) -> None:
    """A node of aa44039 received a letter from RECIPIENT into mailbox m1 attaching
    RECIPIENT's own document, and fetched that document from RECIPIENT through the hub
    (DownloadDocument by m1's client). Its database then holds: the inbox letter, its
    letter_documents row, the document in the store, and no document_uploads row (the
    version wrote none for a fetch). After the upgrade, m1's limited client asks for it
    again while the hub (or the owner) cannot be reached: before, the node's copy was
    served; now it is asked of the owner (UNAVAILABLE here; DOCUMENT_NOT_FOUND if the owner
    purged it under documents.retention_s), a stat says it is not held, and attaching it to
    a forward is refused MAILBOX_NOT_ALLOWED. Nothing in the upgrade (no migration, no
    index at start) kept the right the letter gave; the node's start now marks such a
    document as fetched from its owner when letters of that owner alone name it
    (NodeStore.mark_documents_fetched_before, which serve_node runs)."""
    from node.core.documents import document_uri
    from node.document_store import DocumentStore
    from node.documents import Documents

    store = DocumentStore(tmp_path / "docs", agency.config.documents)
    agency.document_store = store
    content = b"RECIPIENT's annex, fetched from RECIPIENT through the hub before the upgrade"
    writer = store.writer(expected_size=len(content))
    writer.write(content)
    digest, _, _ = await writer.commit()
    uri = document_uri(RECIPIENT, digest)
    shams = pb.Shams(origin=RECIPIENT, domain=pb.SHAMS_DOMAIN_OUTGOING, year=2026, sequence=3)
    header = pb.EnvelopeHeader(
        shams=shams,
        sender=pb.Address(agency=RECIPIENT, mailbox="x"),
        recipients=[pb.Address(agency=SENDER, mailbox="m1")],
    )
    header.attachments.add(
        uri=uri, sha256=digest, size=len(content), media_type="application/pdf", file_name="a.pdf"
    )
    envelope = pb.Envelope(header=header.SerializeToString(), body=b"b")
    delivery = pb.Evidence(content=pb.EvidenceContent(evidence_id="d-3").SerializeToString())
    await agency.store.store_incoming(
        [(format_shams(shams), RECIPIENT, ["m1"], envelope)],
        lambda _i: delivery,
        documents=[[digest]],
    )
    assert await agency.store.mark_documents_fetched_before() == 1  # the upgraded start
    m1 = Access(Identity.for_client(SENDER, "clerk"), frozenset({"m1"}))

    def authorize(_context: object, *, read_only: bool = False) -> Access:
        return m1

    agency._authorize = authorize  # type: ignore[method-assign,assignment]

    def open_stream(_context: object, *, read_only: bool = False) -> _OpenStream:
        # Documents' transfers are open streams (a revocation ends them); no certificate here.
        return _OpenStream(m1, cast(Any, None))

    agency._open_stream = open_stream  # type: ignore[method-assign,assignment]
    documents = Documents(agency, store)  # no hub link: the hub is down
    context = _Context()
    with contextlib.suppress(grpc.aio.AbortError):
        await documents.DownloadDocument(pb.DownloadDocumentRequest(uri=uri), cast(Any, context))
    served = b"".join(m.chunk for m in context.written)
    assert (served, context.aborted) == (content, None), (context.aborted, context.details)


async def test_revocations_kept_for_a_mistyped_path_survive_a_restart_of_the_hub(
    tmp_path: Path,
) -> None:
    import json

    from node.cluster import Cluster
    from node.config import load_hub_config
    from node.hub import Hub, build_directory
    from node.server import _read_tls, _signer, _trust
    from node.storage.hub_store import HubStore

    cluster = Cluster.prepare(tmp_path, [SENDER, RECIPIENT])
    config_path = cluster.hub.config

    def configure(path: Path) -> None:
        lines = [
            line
            for line in config_path.read_text().splitlines()
            if not line.startswith("revocation_file")
        ]
        lines.insert(lines.index("[hub]") + 1, f"revocation_file = {json.dumps(str(path))}")
        config_path.write_text("\n".join(lines) + "\n")

    async def start(store: HubStore) -> Hub:  # as node.server.serve_hub builds and starts it
        config = load_hub_config(config_path)
        signer = _signer(config.signing, config.identity)
        trust = _trust(_read_tls(config.tls, config.identity), config.signing)
        directory = build_directory(config, signer, trust.intermediates)
        hub = Hub(config, store, signer, trust, directory, config_path)
        await hub.start()
        started.append(hub)
        return hub

    started: list[Hub] = []

    revoked = tmp_path / "revoked.txt"
    revoked.write_text("0a1b2c\n")
    configure(revoked)
    store = await HubStore.open(tmp_path / "hub.db", durability="normal")
    try:
        hub = await start(store)
        assert list(hub.directory.message.revoked_serials) == ["0a1b2c"]
        configure(tmp_path / "revokd.txt")  # the operator's slip, in the running hub
        hub._sources = ()
        await hub.reload_if_changed()
        assert list(hub.directory.message.revoked_serials) == ["0a1b2c"]  # kept, logged
        await hub.stop()
        restarted = await start(store)  # a deploy, a crash, a reboot: the file still missing
        assert list(restarted.directory.message.revoked_serials) == ["0a1b2c"]
        assert restarted.trust.revoked_serials == {0x0A1B2C}
        await restarted.reload_if_changed()  # and a reload while it is still missing
        assert list(restarted.directory.message.revoked_serials) == ["0a1b2c"]
        configure(revoked)  # the slip mended: read from the file again
        revoked.write_text("0a1b2c\n0d0e0f\n")
        await restarted.reload_if_changed()
        assert list(restarted.directory.message.revoked_serials) == ["0a1b2c", "0d0e0f"]
    finally:
        for each in started:
            await each.stop()
        await store.close()
