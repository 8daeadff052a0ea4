"""Validating drafts, building headers and evidence content (node.core.letters, .evidence).

Pure core: no I/O, no event loop. Each refusal is checked for its exact canonical code and
ErrorInfo reason, since that pair is the wire contract (DESIGN.md §9).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import unicodedata
import uuid
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client_sdk import pb
from client_sdk.signing import (
    ENVELOPE_PAYLOAD_TYPE,
    EVIDENCE_PAYLOAD_TYPE,
    SignatureError,
    Signer,
    verify_signature,
)
from node.core.directory import DirectoryView
from node.core.errors import ChaparError, Code
from node.core.evidence import event_name, evidence_content
from node.core.letters import (
    DEFAULT_CONTENT_TYPE,
    LetterLimits,
    build_header,
    normalise_text,
    validate_draft,
)

SENDER = "000.00.00.G22"
ACTIVE = "10101010101"
ACTIVE_2 = "MOF.IR"
SUSPENDED = "SUSPENDED-01"
RETIRED = "RETIRED-01"
UNKNOWN = "NOBODY.99"
NOW = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
LIMITS = LetterLimits()
VIET_DECOMPOSED = "Vie\u0302\u0323t Nam"  # e + circumflex + dot below, not composed
VIET_COMPOSED = "Vi\u1ec7t Nam"  # U+1EC7 LATIN SMALL LETTER E WITH CIRCUMFLEX AND DOT BELOW


def _directory() -> DirectoryView:
    return DirectoryView(
        pb.Directory(
            version=7,
            hub="urn:chapar:hub:national-hub",
            agencies=[
                pb.Agency(code=SENDER, display_name="Sender", state=pb.AGENCY_STATE_ACTIVE),
                pb.Agency(code=ACTIVE, display_name="Active", state=pb.AGENCY_STATE_ACTIVE),
                pb.Agency(code=ACTIVE_2, display_name="Active 2", state=pb.AGENCY_STATE_ACTIVE),
                pb.Agency(code=SUSPENDED, display_name="Susp", state=pb.AGENCY_STATE_SUSPENDED),
                pb.Agency(code=RETIRED, display_name="Ret", state=pb.AGENCY_STATE_RETIRED),
            ],
        )
    )


DIRECTORY = _directory()


def _draft(**fields: object) -> pb.LetterDraft:
    base: dict[str, object] = {
        "recipients": [pb.Address(agency=ACTIVE)],
        "subject": "Budget request",
        "body": b"Dear colleagues,\n...",
    }
    base.update(fields)
    return pb.LetterDraft(**base)  # type: ignore[arg-type]


def _validate(
    draft: pb.LetterDraft, *, sender: str = SENDER, limits: LetterLimits = LIMITS
) -> pb.LetterDraft:
    return validate_draft(draft, sender=sender, directory=DIRECTORY, limits=limits, now=NOW)


def _refusal(draft: pb.LetterDraft, **kwargs: object) -> ChaparError:
    with pytest.raises(ChaparError) as info:
        _validate(draft, **kwargs)  # type: ignore[arg-type]
    return info.value


def _ts(when: dt.datetime) -> pb.LetterDraft:
    draft = _draft()
    draft.expire_time.FromDatetime(when)
    return draft


# -- the directory view -----------------------------------------------------------------


def test_directory_view_looks_agencies_up_by_code() -> None:
    assert DIRECTORY.version == 7
    found = DIRECTORY.agency(SUSPENDED)
    assert found is not None
    assert found.state == pb.AGENCY_STATE_SUSPENDED
    assert DIRECTORY.agency(UNKNOWN) is None
    assert [a.code for a in DIRECTORY] == [SENDER, ACTIVE, ACTIVE_2, SUSPENDED, RETIRED]


def test_unknown_sender_is_permission_denied() -> None:
    err = _refusal(_draft(), sender=UNKNOWN)
    assert (err.code, err.reason) == (Code.PERMISSION_DENIED, "UNKNOWN_SENDER")


# -- valid drafts are normalised ----------------------------------------------------------


def test_valid_draft_gets_default_kind_priority_and_content_type() -> None:
    out = _validate(_draft())
    assert out.kind == pb.LetterKind.LETTER_KIND_LETTER
    assert out.priority == pb.Priority.PRIORITY_NORMAL
    assert out.content_type == DEFAULT_CONTENT_TYPE == "text/plain; charset=utf-8"
    assert out.subject == "Budget request"
    assert out.body == b"Dear colleagues,\n..."
    assert [(r.agency, r.mailbox) for r in out.recipients] == [(ACTIVE, "")]


def test_explicit_kind_priority_and_content_type_are_kept() -> None:
    out = _validate(
        _draft(
            kind=pb.LetterKind.LETTER_KIND_CIRCULAR,
            priority=pb.Priority.PRIORITY_EXPRESS,
            content_type="application/pdf",
        )
    )
    assert out.kind == pb.LetterKind.LETTER_KIND_CIRCULAR
    assert out.priority == pb.Priority.PRIORITY_EXPRESS
    assert out.content_type == "application/pdf"


def test_subject_mailboxes_and_metadata_are_nfc_normalised() -> None:
    draft = _draft(
        subject=VIET_DECOMPOSED,
        recipients=[pb.Address(agency=ACTIVE, mailbox=VIET_DECOMPOSED)],
        sender_mailbox=VIET_DECOMPOSED,
        metadata=pb.DocumentMetadata(signer_name=VIET_DECOMPOSED, document_code="12/QD"),
    )
    out = _validate(draft)
    assert VIET_DECOMPOSED != VIET_COMPOSED
    assert out.subject == VIET_COMPOSED
    assert out.recipients[0].mailbox == VIET_COMPOSED
    assert out.sender_mailbox == VIET_COMPOSED
    assert out.metadata.signer_name == VIET_COMPOSED
    assert out.metadata.document_code == "12/QD"


def test_validate_returns_a_copy_and_leaves_the_input_untouched() -> None:
    draft = _draft(subject=VIET_DECOMPOSED)
    before = draft.SerializeToString()
    out = _validate(draft)
    assert draft.SerializeToString() == before
    assert draft.subject == VIET_DECOMPOSED
    assert out is not draft


def test_subject_length_limit_counts_characters_after_normalisation() -> None:
    # 1000 composed characters, 3000 code points before NFC: within the 1000 limit.
    subject = "e\u0302\u0323" * LIMITS.max_subject_chars
    assert len(subject) == 3 * LIMITS.max_subject_chars
    out = _validate(_draft(subject=subject))
    assert out.subject == "\u1ec7" * LIMITS.max_subject_chars


def test_same_agency_with_different_mailboxes_is_two_recipients() -> None:
    out = _validate(
        _draft(recipients=[pb.Address(agency=ACTIVE, mailbox="legal"), pb.Address(agency=ACTIVE)])
    )
    assert [(r.agency, r.mailbox) for r in out.recipients] == [(ACTIVE, "legal"), (ACTIVE, "")]


def test_reply_with_in_reply_to_is_accepted() -> None:
    parent = pb.Shams(
        origin=ACTIVE, domain=pb.ShamsDomain.SHAMS_DOMAIN_OUTGOING, year=2026, sequence=5
    )
    out = _validate(_draft(kind=pb.LetterKind.LETTER_KIND_REPLY, in_reply_to=parent))
    assert out.in_reply_to == parent
    assert out.kind == pb.LetterKind.LETTER_KIND_REPLY


def test_body_at_exactly_the_limit_is_accepted() -> None:
    out = _validate(_draft(body=b"x" * 16), limits=LetterLimits(max_body_bytes=16))
    assert len(out.body) == 16


def test_future_expire_time_is_accepted() -> None:
    out = _validate(_ts(NOW + dt.timedelta(seconds=1)))
    assert out.expire_time.ToDatetime(tzinfo=dt.UTC) == NOW + dt.timedelta(seconds=1)


# -- each refusal with its code, reason and field -----------------------------------------

OUTGOING = pb.ShamsDomain.SHAMS_DOMAIN_OUTGOING
BAD_SHAMS = {
    "bad-origin": pb.Shams(origin="abc", domain=OUTGOING, year=2026, sequence=1),
    "no-domain": pb.Shams(
        origin=ACTIVE, domain=pb.ShamsDomain.SHAMS_DOMAIN_UNSPECIFIED, year=2026, sequence=1
    ),
    "short-year": pb.Shams(origin=ACTIVE, domain=OUTGOING, year=999, sequence=1),
    "zero-sequence": pb.Shams(origin=ACTIVE, domain=OUTGOING, year=2026, sequence=0),
}


Case = Callable[[], tuple[pb.LetterDraft, dict[str, object]]]
INVALID = Code.INVALID_ARGUMENT
REPLY = pb.LetterKind.LETTER_KIND_REPLY


def _to(*agencies: str) -> list[pb.Address]:
    return [pb.Address(agency=a) for a in agencies]


def _body_too_large() -> tuple[pb.LetterDraft, dict[str, object]]:
    return _draft(body=b"x" * 17), {"limits": LetterLimits(max_body_bytes=16)}


def _too_many() -> tuple[pb.LetterDraft, dict[str, object]]:
    recipients = [pb.Address(agency=ACTIVE, mailbox=f"box{i}") for i in range(3)]
    return _draft(recipients=recipients), {"limits": LetterLimits(max_recipients=2)}


def _plain(draft: pb.LetterDraft, **kwargs: object) -> Case:
    return lambda: (draft, dict(kwargs))


def _case(
    name: str, make: Case | pb.LetterDraft, code: Code, reason: str, field: str | None
) -> object:
    if isinstance(make, pb.LetterDraft):
        make = _plain(make)
    return pytest.param(make, code, reason, field, id=name)


R0 = "draft.recipients[0]"
R1 = "draft.recipients[1]"
ATTACHMENT = pb.AttachmentRef(
    uri=f"chapar://{SENDER}/documents/sha256/" + "0" * 64,
    sha256=b"\0" * 32,
    size=1,
    media_type="application/pdf",
    file_name="report.pdf",
)


def _ref(**changes: object) -> pb.AttachmentRef:
    ref = pb.AttachmentRef()
    ref.CopyFrom(ATTACHMENT)
    for name, value in changes.items():
        setattr(ref, name, value)
    return ref


A0 = "draft.attachments[0]"
NFC_TWINS = [
    pb.Address(agency=ACTIVE, mailbox=VIET_COMPOSED),
    pb.Address(agency=ACTIVE, mailbox=VIET_DECOMPOSED),
]

REFUSALS = [
    _case("no-recipients", _draft(recipients=[]), INVALID, "NO_RECIPIENTS", "draft.recipients"),
    _case("too-many-recipients", _too_many, INVALID, "TOO_MANY_RECIPIENTS", "draft.recipients"),
    _case("lowercase-agency", _draft(recipients=_to("mof")), INVALID, "INVALID_AGENCY_CODE",
          f"{R0}.agency"),
    _case("one-char-agency", _draft(recipients=_to(ACTIVE, "A")), INVALID, "INVALID_AGENCY_CODE",
          f"{R1}.agency"),
    _case("dots-only-agency", _draft(recipients=_to("..")), INVALID, "INVALID_AGENCY_CODE",
          f"{R0}.agency"),
    _case("duplicate", _draft(recipients=_to(ACTIVE, ACTIVE)), INVALID, "DUPLICATE_RECIPIENT", R1),
    _case("duplicate-after-nfc", _draft(recipients=NFC_TWINS), INVALID, "DUPLICATE_RECIPIENT", R1),
    _case("unknown-recipient", _draft(recipients=_to(ACTIVE, UNKNOWN)), Code.NOT_FOUND,
          "UNKNOWN_RECIPIENT", f"{R1}.agency"),
    _case("suspended-recipient", _draft(recipients=_to(SUSPENDED)), Code.FAILED_PRECONDITION,
          "RECIPIENT_INACTIVE", None),
    _case("retired-recipient", _draft(recipients=_to(RETIRED)), Code.FAILED_PRECONDITION,
          "RECIPIENT_INACTIVE", None),
    _case("suspended-sender", _plain(_draft(), sender=SUSPENDED), Code.FAILED_PRECONDITION,
          "SENDER_INACTIVE", None),
    _case("retired-sender", _plain(_draft(), sender=RETIRED), Code.FAILED_PRECONDITION,
          "SENDER_INACTIVE", None),
    _case("empty-subject", _draft(subject=""), INVALID, "EMPTY_FIELD", "draft.subject"),
    _case("blank-subject", _draft(subject=" \u3000 \u00a0 "), INVALID, "EMPTY_FIELD",
          "draft.subject"),
    _case("nul-in-subject", _draft(subject="a\x00b"), INVALID, "INVALID_TEXT", "draft.subject"),
    _case("escape-in-subject", _draft(subject="\x1b[31mred"), INVALID, "INVALID_TEXT",
          "draft.subject"),
    _case("newline-in-subject", _draft(subject="two\nlines"), INVALID, "INVALID_TEXT",
          "draft.subject"),
    _case("c1-control-in-subject", _draft(subject="next\x85line"), INVALID, "INVALID_TEXT",
          "draft.subject"),
    _case("control-in-mailbox", _draft(recipients=[pb.Address(agency=ACTIVE, mailbox="a\x07")]),
          INVALID, "INVALID_TEXT", f"{R0}.mailbox"),
    _case("control-in-sender-mailbox", _draft(sender_mailbox="\x7f"), INVALID, "INVALID_TEXT",
          "draft.sender_mailbox"),
    _case("control-in-metadata", _draft(metadata=pb.DocumentMetadata(signer_title="x\x00")),
          INVALID, "INVALID_TEXT", "draft.metadata.signer_title"),
    _case("subject-too-long", _draft(subject="s" * 1001), INVALID, "TEXT_TOO_LONG",
          "draft.subject"),
    _case("mailbox-too-long", _draft(recipients=[pb.Address(agency=ACTIVE, mailbox="m" * 129)]),
          INVALID, "TEXT_TOO_LONG", f"{R0}.mailbox"),
    _case("body-too-large", _body_too_large, Code.RESOURCE_EXHAUSTED, "BODY_TOO_LARGE", None),
    _case("unknown-kind", _draft(kind=99), INVALID, "INVALID_KIND", "draft.kind"),
    _case("unknown-priority", _draft(priority=42), INVALID, "INVALID_PRIORITY", "draft.priority"),
    _case("reply-without-parent", _draft(kind=REPLY), INVALID, "MISSING_IN_REPLY_TO",
          "draft.in_reply_to"),
    _case("status-update-without-parent", _draft(kind=pb.LetterKind.LETTER_KIND_STATUS_UPDATE),
          INVALID, "MISSING_IN_REPLY_TO", "draft.in_reply_to"),
    *[
        _case(f"in-reply-to-{name}", _draft(kind=REPLY, in_reply_to=shams), INVALID,
              "INVALID_SHAMS", "draft.in_reply_to")
        for name, shams in BAD_SHAMS.items()
    ],
    _case("expire-time-past", _ts(NOW - dt.timedelta(days=1)), INVALID, "EXPIRE_TIME_PAST",
          "draft.expire_time"),
    _case("expire-time-now", _ts(NOW), INVALID, "EXPIRE_TIME_PAST", "draft.expire_time"),
    _case("attachment-uri-not-chapar", _draft(attachments=[_ref(uri="doc://1")]), INVALID,
          "INVALID_DOCUMENT_URI", f"{A0}.uri"),
    _case("attachment-uri-uppercase-hex",
          _draft(attachments=[_ref(uri=ATTACHMENT.uri[:-64] + "A" * 64)]), INVALID,
          "INVALID_DOCUMENT_URI", f"{A0}.uri"),
    _case("attachment-of-another-agency",
          _draft(attachments=[_ref(uri=ATTACHMENT.uri.replace(SENDER, ACTIVE))]), INVALID,
          "DOCUMENT_NOT_OWNED", f"{A0}.uri"),
    _case("attachment-digest-not-its-uri", _draft(attachments=[_ref(sha256=b"\1" * 32)]),
          INVALID, "DOCUMENT_DIGEST_MISMATCH", f"{A0}.sha256"),
    _case("attachment-negative-size", _draft(attachments=[_ref(size=-1)]), INVALID,
          "INVALID_SIZE", f"{A0}.size"),
    _case("attachment-over-the-size-limit", _draft(attachments=[_ref(size=2**40)]),
          Code.RESOURCE_EXHAUSTED, "DOCUMENT_TOO_LARGE", None),
    _case("attachment-media-type-not-allowed",
          _draft(attachments=[_ref(media_type="application/x-msdownload")]), INVALID,
          "MEDIA_TYPE_NOT_ALLOWED", f"{A0}.media_type"),
    _case("attachment-file-name-with-control-characters",
          _draft(attachments=[_ref(file_name="a\x00.pdf")]), INVALID, "INVALID_TEXT",
          f"{A0}.file_name"),
]  # fmt: skip


@pytest.mark.parametrize(("make", "code", "reason", "field"), REFUSALS)
def test_invalid_draft_is_refused_with_code_reason_and_field(
    make: Case,
    code: Code,
    reason: str,
    field: str | None,
) -> None:
    draft, kwargs = make()
    err = _refusal(draft, **kwargs)
    assert (err.code, err.reason) == (code, reason)
    assert err.message
    if field is None:
        assert err.field_violations == []
    else:
        assert [f for f, _ in err.field_violations] == [field]


def test_unknown_recipient_names_the_agency_and_the_field() -> None:
    err = _refusal(_draft(recipients=[pb.Address(agency=UNKNOWN)]))
    assert err.code == Code.NOT_FOUND
    assert err.metadata == {"agency": UNKNOWN}
    assert err.field_violations == [("draft.recipients[0].agency", "unknown agency")]


@pytest.mark.parametrize(("agency", "state"), [(SUSPENDED, "suspended"), (RETIRED, "retired")])
def test_inactive_recipient_reports_its_state(agency: str, state: str) -> None:
    err = _refusal(_draft(recipients=[pb.Address(agency=agency)]))
    assert (err.code, err.reason) == (Code.FAILED_PRECONDITION, "RECIPIENT_INACTIVE")
    assert err.metadata == {"agency": agency, "state": state}


def test_too_many_recipients_reports_the_limit() -> None:
    draft, kwargs = _too_many()
    err = _refusal(draft, **kwargs)
    assert err.metadata == {"limit": "2"}


def test_body_too_large_reports_limit_and_size() -> None:
    draft, kwargs = _body_too_large()
    err = _refusal(draft, **kwargs)
    assert err.metadata == {"limit": "16", "size": "17"}


# -- build_header -------------------------------------------------------------------------

SHAMS = pb.Shams(origin=SENDER, domain=pb.ShamsDomain.SHAMS_DOMAIN_OUTGOING, year=2026, sequence=42)
PARENT = pb.Shams(origin=ACTIVE, domain=pb.ShamsDomain.SHAMS_DOMAIN_OUTGOING, year=2025, sequence=7)
ROOT = pb.Shams(origin=ACTIVE_2, domain=pb.ShamsDomain.SHAMS_DOMAIN_INTERNAL, year=2024, sequence=1)


def _header(draft: pb.LetterDraft, thread_root: pb.Shams | None = None) -> pb.EnvelopeHeader:
    data = build_header(draft, sender=SENDER, shams=SHAMS, now=NOW, thread_root=thread_root)
    return pb.EnvelopeHeader.FromString(data)


def test_attachment_references_are_signed_into_the_header_normalised() -> None:
    ref = _ref(file_name=VIET_DECOMPOSED + ".pdf", media_type="application/pdf")
    header = _header(_validate(_draft(attachments=[ref])))
    (got,) = header.attachments
    assert (got.uri, got.sha256, got.size) == (ATTACHMENT.uri, ATTACHMENT.sha256, 1)
    assert got.media_type == "application/pdf"
    assert got.file_name == VIET_COMPOSED + ".pdf"


def test_header_carries_sender_shams_recipients_and_body_digest() -> None:
    body = "Nội dung công văn".encode()
    draft = _validate(
        _draft(
            body=body,
            sender_mailbox="registry",
            recipients=[pb.Address(agency=ACTIVE), pb.Address(agency=ACTIVE_2, mailbox="legal")],
            priority=pb.Priority.PRIORITY_URGENT,
            metadata=pb.DocumentMetadata(document_code="15/CV-BTC"),
        )
    )
    header = _header(draft)
    assert header.shams == SHAMS
    assert (header.sender.agency, header.sender.mailbox) == (SENDER, "registry")
    assert [(r.agency, r.mailbox) for r in header.recipients] == [(ACTIVE, ""), (ACTIVE_2, "legal")]
    assert header.body_sha256 == hashlib.sha256(body).digest()
    assert header.body_size == len(body)
    assert header.subject == "Budget request"
    assert header.kind == pb.LetterKind.LETTER_KIND_LETTER
    assert header.priority == pb.Priority.PRIORITY_URGENT
    assert header.content_type == DEFAULT_CONTENT_TYPE
    assert header.metadata.document_code == "15/CV-BTC"
    assert header.create_time.ToDatetime(tzinfo=dt.UTC) == NOW
    assert not header.HasField("expire_time")
    assert not header.HasField("in_reply_to")
    assert not header.HasField("thread_root")


def test_header_thread_root_defaults_to_in_reply_to() -> None:
    draft = _validate(_draft(kind=pb.LetterKind.LETTER_KIND_REPLY, in_reply_to=PARENT))
    header = _header(draft)
    assert header.in_reply_to == PARENT
    assert header.thread_root == PARENT


def test_header_uses_a_given_thread_root() -> None:
    draft = _validate(_draft(kind=pb.LetterKind.LETTER_KIND_REPLY, in_reply_to=PARENT))
    header = _header(draft, thread_root=ROOT)
    assert header.in_reply_to == PARENT
    assert header.thread_root == ROOT


def test_header_copies_expire_time() -> None:
    draft = _validate(_ts(NOW + dt.timedelta(days=3)))
    assert _header(draft).expire_time.ToDatetime(tzinfo=dt.UTC) == NOW + dt.timedelta(days=3)


def test_header_bytes_are_deterministic() -> None:
    def make() -> bytes:
        draft = _validate(
            _draft(
                subject=VIET_DECOMPOSED,
                kind=pb.LetterKind.LETTER_KIND_REPLY,
                in_reply_to=PARENT,
                metadata=pb.DocumentMetadata(signer_name="Nguyễn Văn A"),
            )
        )
        return build_header(draft, sender=SENDER, shams=SHAMS, now=NOW)

    first = make()
    assert make() == first
    other = build_header(
        _validate(_draft()),
        sender=SENDER,
        shams=pb.Shams(origin=SENDER, domain=OUTGOING, year=2026, sequence=43),
        now=NOW,
    )
    assert other != first


# -- arbitrary text -----------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(subject=st.text(), mailbox=st.text(), sender_mailbox=st.text(max_size=200))
def test_arbitrary_text_is_normalised_or_refused_as_invalid_argument(
    subject: str, mailbox: str, sender_mailbox: str
) -> None:
    draft = _draft(
        subject=subject,
        recipients=[pb.Address(agency=ACTIVE, mailbox=mailbox)],
        sender_mailbox=sender_mailbox,
    )
    try:
        out = _validate(draft)
    except ChaparError as err:
        refusal: ChaparError | None = err
    else:
        refusal = None
    if refusal is not None:
        assert refusal.code == Code.INVALID_ARGUMENT
        assert refusal.reason in {"INVALID_TEXT", "EMPTY_FIELD", "TEXT_TOO_LONG"}
        return
    for text in (out.subject, out.recipients[0].mailbox, out.sender_mailbox):
        assert unicodedata.is_normalized("NFC", text)
        assert not any(unicodedata.category(ch) == "Cc" for ch in text)
    assert out.subject.strip()
    assert out.subject == unicodedata.normalize("NFC", subject)
    assert len(out.subject) <= LIMITS.max_subject_chars
    assert len(out.recipients[0].mailbox) <= LIMITS.max_mailbox_chars


# -- evidence content and its signature -----------------------------------------------------


def _self_signed() -> tuple[ed25519.Ed25519PrivateKey, x509.Certificate]:
    key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hub signing")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=365))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("urn:chapar:hub:national-hub")]
            ),
            critical=False,
        )
        .sign(key, None)
    )
    return key, cert


@pytest.fixture(scope="module")
def signer() -> Signer:
    key, cert = _self_signed()
    return Signer(key, cert)


def test_evidence_content_round_trips_every_field() -> None:
    digest = hashlib.sha256(b"header").digest()
    data = evidence_content(
        pb.EvidenceEvent.EVIDENCE_EVENT_RELAY_REJECTION,
        issuer="urn:chapar:hub:national-hub",
        shams=SHAMS,
        envelope_sha256=digest,
        recipient=ACTIVE,
        now=NOW,
        reason="RECIPIENT_INACTIVE",
        detail="agency is suspended",
        evidence_id="ev-1",
    )
    content = pb.EvidenceContent.FromString(data)
    assert content.evidence_id == "ev-1"
    assert content.event == pb.EvidenceEvent.EVIDENCE_EVENT_RELAY_REJECTION
    assert content.issuer == "urn:chapar:hub:national-hub"
    assert content.shams == SHAMS
    assert content.envelope_sha256 == digest
    assert content.recipient == ACTIVE
    assert content.reason == "RECIPIENT_INACTIVE"
    assert content.detail == "agency is suspended"
    assert content.event_time.ToDatetime(tzinfo=dt.UTC) == NOW


def test_evidence_content_without_shams_or_id_gets_a_fresh_uuid() -> None:
    def make() -> pb.EvidenceContent:
        return pb.EvidenceContent.FromString(
            evidence_content(
                pb.EvidenceEvent.EVIDENCE_EVENT_SUBMISSION_REJECTION,
                issuer=f"urn:chapar:agency:{SENDER}",
                shams=None,
                envelope_sha256=b"",
                recipient="",
                now=NOW,
            )
        )

    first, second = make(), make()
    assert not first.HasField("shams")
    assert uuid.UUID(first.evidence_id).version == 7
    assert first.evidence_id != second.evidence_id


def test_evidence_content_is_deterministic_for_a_given_id() -> None:
    def make() -> bytes:
        return evidence_content(
            pb.EvidenceEvent.EVIDENCE_EVENT_DELIVERY,
            issuer=f"urn:chapar:agency:{ACTIVE}",
            shams=SHAMS,
            envelope_sha256=b"\x01" * 32,
            recipient=ACTIVE,
            now=NOW,
            evidence_id="fixed",
        )

    assert make() == make()


def test_signed_evidence_verifies_and_tampering_is_detected(signer: Signer) -> None:
    data = evidence_content(
        pb.EvidenceEvent.EVIDENCE_EVENT_DELIVERY,
        issuer=f"urn:chapar:agency:{ACTIVE}",
        shams=SHAMS,
        envelope_sha256=hashlib.sha256(b"header").digest(),
        recipient=ACTIVE,
        now=NOW,
    )
    evidence = pb.Evidence(content=data, signature=signer.sign(EVIDENCE_PAYLOAD_TYPE, data))
    assert evidence.signature.algorithm == pb.SignatureAlgorithm.SIGNATURE_ALGORITHM_ED25519
    assert (
        evidence.signature.key_id
        == hashlib.sha256(signer.certificate.public_bytes(Encoding.DER)).digest()
    )
    received = pb.Evidence.FromString(evidence.SerializeToString())
    verify_signature(
        signer.certificate, EVIDENCE_PAYLOAD_TYPE, received.content, received.signature
    )

    tampered = pb.EvidenceContent.FromString(received.content)
    tampered.event = pb.EvidenceEvent.EVIDENCE_EVENT_DELIVERY_FAILURE
    with pytest.raises(SignatureError) as info:
        verify_signature(
            signer.certificate,
            EVIDENCE_PAYLOAD_TYPE,
            tampered.SerializeToString(deterministic=True),
            received.signature,
        )
    assert info.value.reason == "SIGNATURE_INVALID"


def test_evidence_signature_cannot_be_replayed_as_an_envelope_signature(signer: Signer) -> None:
    data = evidence_content(
        pb.EvidenceEvent.EVIDENCE_EVENT_HANDOVER,
        issuer=f"urn:chapar:agency:{ACTIVE}",
        shams=SHAMS,
        envelope_sha256=b"\x02" * 32,
        recipient=ACTIVE,
        now=NOW,
    )
    signature = signer.sign(EVIDENCE_PAYLOAD_TYPE, data)
    with pytest.raises(SignatureError) as info:
        verify_signature(signer.certificate, ENVELOPE_PAYLOAD_TYPE, data, signature)
    assert info.value.reason == "SIGNATURE_INVALID"


def test_evidence_signature_from_another_key_is_a_key_mismatch(signer: Signer) -> None:
    _, other_cert = _self_signed()
    data = evidence_content(
        pb.EvidenceEvent.EVIDENCE_EVENT_EXPIRY,
        issuer="urn:chapar:hub:national-hub",
        shams=SHAMS,
        envelope_sha256=b"\x03" * 32,
        recipient=ACTIVE,
        now=NOW,
    )
    with pytest.raises(SignatureError) as info:
        verify_signature(
            other_cert, EVIDENCE_PAYLOAD_TYPE, data, signer.sign(EVIDENCE_PAYLOAD_TYPE, data)
        )
    assert info.value.reason == "SIGNATURE_KEY_MISMATCH"


@pytest.mark.parametrize(
    ("event", "name"),
    [
        (pb.EvidenceEvent.EVIDENCE_EVENT_SUBMISSION_ACCEPTANCE, "SUBMISSION_ACCEPTANCE"),
        (pb.EvidenceEvent.EVIDENCE_EVENT_RELAY_FAILURE, "RELAY_FAILURE"),
        (pb.EvidenceEvent.EVIDENCE_EVENT_DELIVERY, "DELIVERY"),
        (pb.EvidenceEvent.EVIDENCE_EVENT_HANDOVER, "HANDOVER"),
        (pb.EvidenceEvent.EVIDENCE_EVENT_EXPIRY, "EXPIRY"),
    ],
)
def test_event_name_drops_the_enum_prefix(event: int, name: str) -> None:
    assert event_name(event) == name


@given(st.text(alphabet=st.characters(codec=None), max_size=30))
def test_text_is_refused_exactly_when_it_holds_a_control_or_surrogate_character(
    value: str,
) -> None:
    """The printable shortcut must not change what is refused: Cf (e.g. the zero-width
    non-joiner of Persian text) and non-ASCII spaces pass, Cc and Cs never do."""
    nfc = unicodedata.normalize("NFC", value)
    expected_bad = any(unicodedata.category(ch) in ("Cc", "Cs") for ch in nfc)
    if expected_bad:
        with pytest.raises(ChaparError) as info:
            normalise_text(value, "f", max_chars=1000, required=False)
        assert info.value.reason == "INVALID_TEXT"
    else:
        assert normalise_text(value, "f", max_chars=1000, required=False) == nfc


@pytest.mark.parametrize(
    "text", ["\u0646\u0627\u0645\u0647\u200c\u0647\u0627", "a\u00a0b", "a\u2028b", "x\u00adx"]
)
def test_text_that_is_not_printable_but_has_no_control_character_passes(text: str) -> None:
    assert not text.isprintable()
    assert normalise_text(text, "f", max_chars=100, required=True) == text
