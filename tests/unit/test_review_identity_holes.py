"""Security review (certificate holders): holes proved against the real checking code.

Each test states what should hold, and failed on the code before its mend (a limited
client replying into another mailbox's thread, F3; a letter naming a digest giving a
mailbox the node's copy held for another, F4). The review's F1 (a revoked trust anchor)
and F2 (any hub identity taken for the hub) are proved in tests/unit/test_pki.py,
test_bundle_hub.py and tests/integration/test_hub_identity.py."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from client_sdk import pb
from client_sdk.identity import Identity
from client_sdk.shams import format_shams
from node.agency import Access, Agency, _OpenStream
from node.core.errors import ChaparError, Code
from tests.unit.conftest import RECIPIENT, SENDER

# -- F3: a mailbox-limited client replies into another mailbox's letter -----------------------


def _draft(mailbox: str, *, in_reply_to: pb.Shams | None = None) -> pb.SubmitEnvelopeRequest:
    draft = pb.LetterDraft(
        sender_mailbox=mailbox,
        recipients=[pb.Address(agency=RECIPIENT)],
        subject="s",
        body=b"b",
    )
    if in_reply_to is not None:
        draft.in_reply_to.CopyFrom(in_reply_to)
    return pb.SubmitEnvelopeRequest(draft=draft)


async def test_a_limited_client_cannot_reply_into_a_letter_of_another_mailbox(
    agency: Agency,
) -> None:
    """Review F3, mended: Agency._submit read the parent of a reply with
    store.held_letter without access.require, unlike a status update
    (_fit_status_update): a client limited to mailbox 'm1' replied to a letter of mailbox
    'm2' and the node signed into its header that letter's thread_root, which the client
    then read; TrackCorrespondence on its reply walked the other mailbox's thread."""
    everyone = Access(Identity.for_agency(SENDER), None)
    # Mailbox m2's correspondence: a first letter, then a reply to it.
    (first,) = await agency._submit([_draft("m2")], everyone)
    assert isinstance(first, pb.Receipt), first
    (second,) = await agency._submit([_draft("m2", in_reply_to=first.shams)], everyone)
    assert isinstance(second, pb.Receipt), second
    limited = Access(Identity.for_client(SENDER, "clerk"), frozenset({"m1"}))
    (reply,) = await agency._submit([_draft("m1", in_reply_to=second.shams)], limited)
    if isinstance(reply, pb.Receipt):
        stored = await agency.store.letter(reply.shams_text)
        assert stored is not None
        header = pb.EnvelopeHeader.FromString(stored.envelope.header)
        # What leaked: the thread root of m2's letter, which m1 may not read.
        leaked = format_shams(header.thread_root)
        pytest.fail(f"accepted; its signed header names m2's thread root {leaked}")
    assert (reply.code, reply.reason) == (Code.PERMISSION_DENIED, "MAILBOX_NOT_ALLOWED")
    # A reply into its own mailbox's correspondence still joins that thread.
    (own,) = await agency._submit([_draft("m1")], everyone)
    assert isinstance(own, pb.Receipt), own
    (answer,) = await agency._submit([_draft("m1", in_reply_to=own.shams)], limited)
    assert isinstance(answer, pb.Receipt), answer
    stored = await agency.store.letter(answer.shams_text)
    assert stored is not None
    assert pb.EnvelopeHeader.FromString(stored.envelope.header).thread_root == own.shams


# -- F4: a sender naming a digest the recipient's node holds for another mailbox -------------


class _Context:
    """Enough of a grpc servicer context for DownloadDocument."""

    def __init__(self) -> None:
        self.written: list[pb.DownloadDocumentResponse] = []
        self.aborted: grpc.StatusCode | None = None

    async def write(self, message: pb.DownloadDocumentResponse) -> None:
        self.written.append(message)

    async def abort(
        self, code: grpc.StatusCode, details: str, trailing_metadata: object = ()
    ) -> None:
        self.aborted = code
        raise grpc.aio.AbortError()


async def test_a_letter_naming_a_digest_gives_no_mailbox_the_nodes_copy_held_for_another(
    agency: Agency, tmp_path: Path
) -> None:
    """Review F4, mended: DownloadDocument (node/documents.py) served a document of another
    owner (chapar://C/...) from this node's own store whenever it held that digest, for any
    reason; senders_documents (node/core/documents.py) takes C's address with any digest as
    C's own. A sender node C that knows only a digest (an auditor's or the hub's view of
    headers shows them) named it in a letter to mailbox m1: m1's limited client then
    downloaded m2's document, which C never held, and could attach it onward. Now the
    letter lets m1 have it only as fetched from C through the hub (here: no hub, so
    UNAVAILABLE; a real C without it answers DOCUMENT_NOT_FOUND)."""
    from node.core.documents import document_uri, senders_documents
    from node.document_store import DocumentStore
    from node.documents import Documents

    store = DocumentStore(tmp_path / "docs", agency.config.documents)
    agency.document_store = store
    secret = b"m2's document, uploaded here and attached to m2's letters only"
    writer = store.writer(expected_size=len(secret))
    writer.write(secret)
    digest, _, _ = await writer.commit()
    # A letter from RECIPIENT's node (here: agency C) to this agency's mailbox m1, naming
    # that digest under C's own address: C knows the digest, not the content.
    uri = document_uri(RECIPIENT, digest)
    shams = pb.Shams(origin=RECIPIENT, domain=pb.SHAMS_DOMAIN_OUTGOING, year=2026, sequence=7)
    header = pb.EnvelopeHeader(
        shams=shams,
        sender=pb.Address(agency=RECIPIENT, mailbox="x"),
        recipients=[pb.Address(agency=SENDER, mailbox="m1")],
    )
    header.attachments.add(
        uri=uri, sha256=digest, size=len(secret), media_type="application/pdf", file_name="a.pdf"
    )
    assert senders_documents(header, RECIPIENT) == [digest]  # what the hub link indexes
    envelope = pb.Envelope(header=header.SerializeToString(), body=b"b")
    delivery = pb.Evidence(content=pb.EvidenceContent(evidence_id="d-7").SerializeToString())
    await agency.store.store_incoming(
        [(format_shams(shams), RECIPIENT, ["m1"], envelope)],
        lambda _i: delivery,
        documents=[[digest]],
    )
    m1 = Access(Identity.for_client(SENDER, "clerk"), frozenset({"m1"}))

    def authorize(_context: object, *, read_only: bool = False) -> Access:
        return m1

    agency._authorize = authorize  # type: ignore[method-assign,assignment]

    def open_stream(_context: object, *, read_only: bool = False) -> _OpenStream:
        # Documents' transfers are open streams (a revocation ends them); no certificate here.
        return _OpenStream(m1, cast(Any, None))

    agency._open_stream = open_stream  # type: ignore[method-assign,assignment]
    documents = Documents(agency, store)

    async def download(address: str) -> tuple[bytes, grpc.StatusCode | None]:
        context = _Context()
        with contextlib.suppress(grpc.aio.AbortError):
            await documents.DownloadDocument(
                pb.DownloadDocumentRequest(uri=address), cast(Any, context)
            )
        return b"".join(m.chunk for m in context.written), context.aborted

    served, aborted = await download(uri)
    assert secret not in served, "m1's client was served m2's document"
    assert aborted == grpc.StatusCode.UNAVAILABLE  # asked of C through the hub, not here
    # Nor under this agency's own address, nor does a stat tell it is held here.
    own = document_uri(SENDER, digest)
    served, aborted = await download(own)
    assert (served, aborted) == (b"", grpc.StatusCode.PERMISSION_DENIED)
    stat = await documents.StatDocument(pb.StatDocumentRequest(uri=uri), cast(Any, _Context()))
    assert not stat.stored
    # Nor may m1 attach it onward (to C itself, say), as this agency's document.
    attach = _draft("m1")
    attach.draft.attachments.add(
        uri=own, sha256=digest, size=len(secret), media_type="application/pdf", file_name="a.pdf"
    )
    (refused,) = await agency._submit([attach], m1)
    assert isinstance(refused, ChaparError), refused
    assert (refused.code, refused.reason) == (Code.PERMISSION_DENIED, "MAILBOX_NOT_ALLOWED")
    # Once this node has it from C (a verified fetch through the hub records it so), the
    # letter gives m1 the node's copy: C had the document.
    await agency.store.record_fetch(digest, RECIPIENT)
    assert await download(uri) == (secret, None)
    assert (await documents.StatDocument(pb.StatDocumentRequest(uri=uri), cast(Any, None))).stored
    (attached,) = await agency._submit([attach], m1)
    assert isinstance(attached, pb.Receipt), attached
