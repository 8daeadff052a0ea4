"""Fuzzing node.core.letters.validate_draft with structured drafts (pure, no I/O).

The property: a draft is either returned normalised (text NFC without control
characters, defined kind and priority, valid and distinct active recipients, limits kept)
or refused with node.core.errors.ChaparError carrying a canonical code the API documents
for submissions. Any other exception would reach gRPC as UNKNOWN.
"""

from __future__ import annotations

import datetime as dt
import unicodedata
from typing import Any

import pytest
from google.protobuf import timestamp_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from client_sdk import pb
from client_sdk.identity import is_agency_code
from client_sdk.shams import format_shams
from node.core.directory import DirectoryView
from node.core.errors import ChaparError, Code
from node.core.letters import LetterLimits, validate_draft

SENDER = "000.00.00.G22"
ACTIVE = ("10861234567", "MOFA.IR", SENDER)
SUSPENDED = "SUSPENDED-01"
RETIRED = "RETIRED-01"
NOW = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
LIMITS = LetterLimits(
    max_body_bytes=64, max_recipients=4, max_subject_chars=40, max_mailbox_chars=12
)
ALLOWED = frozenset(
    {
        Code.INVALID_ARGUMENT,
        Code.NOT_FOUND,
        Code.FAILED_PRECONDITION,
        Code.RESOURCE_EXHAUSTED,
        Code.UNIMPLEMENTED,
    }
)
DIRECTORY = DirectoryView(
    pb.Directory(
        version=1,
        hub="urn:chapar:hub:national",
        agencies=[
            *(pb.Agency(code=c, display_name=c, state=pb.AGENCY_STATE_ACTIVE) for c in ACTIVE),
            pb.Agency(code=SUSPENDED, display_name="s", state=pb.AGENCY_STATE_SUSPENDED),
            pb.Agency(code=RETIRED, display_name="r", state=pb.AGENCY_STATE_RETIRED),
        ],
    )
)

_INT32 = st.integers(-(2**31), 2**31 - 1)
_INT64 = st.integers(-(2**63), 2**63 - 1)
# Letters, decomposed Vietnamese marks, spaces of several kinds, control characters (C0,
# DEL, C1 such as NEL), format characters; plus anything hypothesis draws.
_TRICKY = "aeEoO \u0302\u0323\u0306\u0309\u031b\u0300\u0301\u0303\u3000\u2003\u00a0\t\n\r\x00\x1b\x7f\u0085\u009f\u200b\u200d\ufeff\u1ec7\u0110"
_TEXT = st.one_of(
    st.text(alphabet=st.sampled_from(_TRICKY), max_size=50),
    st.text(max_size=50),
    st.sampled_from(["", " ", "Budget", unicodedata.normalize("NFD", "Vi\u1ec7t Nam")]),
)
_CODES = st.one_of(
    st.sampled_from([*ACTIVE, SUSPENDED, RETIRED, "NOBODY.99", "a b", "..", "mofa.ir", "", "X"]),
    st.from_regex(r"[A-Z0-9.\-]{1,66}", fullmatch=True),
    st.text(max_size=10),
)
_SHAMS = st.builds(
    pb.Shams,
    origin=_CODES,
    domain=st.one_of(st.sampled_from([1, 2]), _INT32),
    year=st.one_of(st.just(2026), _INT32),
    sequence=st.one_of(st.just(7), _INT64),
)
_TIMESTAMPS = st.builds(
    timestamp_pb2.Timestamp,
    seconds=st.one_of(
        st.sampled_from([0, 1_772_366_400, 1_800_000_000, 253_402_300_799, 253_402_300_800]),
        _INT64,
    ),
    nanos=st.one_of(st.just(0), st.sampled_from([999_999_999, 1_000_000_000, -1])),
)


_VALID_TEXT = st.text(
    alphabet=st.sampled_from("abcXYZ 0123e\u0302\u0323\u0306\u1ec7\u0110"), min_size=1, max_size=20
).filter(str.strip)
_VALID_RECIPIENTS = st.lists(
    st.builds(pb.Address, agency=st.sampled_from(ACTIVE), mailbox=st.sampled_from(["", "x"])),
    min_size=1,
    max_size=LIMITS.max_recipients,
    unique_by=lambda a: (a.agency, a.mailbox),
)
_FUZZ_RECIPIENTS = st.lists(
    st.builds(pb.Address, agency=_CODES, mailbox=_TEXT), max_size=LIMITS.max_recipients + 2
)
_VALID_SHAMS = st.builds(
    pb.Shams,
    origin=st.sampled_from(ACTIVE),
    domain=st.just(pb.ShamsDomain.SHAMS_DOMAIN_OUTGOING),
    year=st.just(2026),
    sequence=st.integers(1, 2**63 - 1),
)
_FUTURE = st.builds(
    timestamp_pb2.Timestamp,
    seconds=st.integers(int(NOW.timestamp()) + 1, 253_402_300_799),
    nanos=st.integers(0, 999_999_999),
)
# Each field: (valid values, fuzzed values). A draft fuzzes up to three fields and keeps
# the others valid, so refusals come from every check, not only the first few.
_FIELDS: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    "recipients": (_VALID_RECIPIENTS, _FUZZ_RECIPIENTS),
    "subject": (_VALID_TEXT, _TEXT),
    "kind": (st.sampled_from([0, 1, 2, 3, 6]), st.one_of(st.sampled_from([4, 5]), _INT32)),
    "priority": (st.sampled_from(pb.Priority.values()), _INT32),
    "content_type": (st.sampled_from(["", "text/plain"]), _TEXT),
    "body_size": (
        st.integers(0, LIMITS.max_body_bytes),
        st.integers(0, 2 * LIMITS.max_body_bytes),
    ),
    "sender_mailbox": (st.sampled_from(["", "desk"]), _TEXT),
    "in_reply_to": (st.one_of(st.none(), _VALID_SHAMS), _SHAMS),
    "expire_time": (st.one_of(st.none(), _FUTURE), _TIMESTAMPS),
    "attachments": (st.just(0), st.integers(0, 2)),
    "metadata": (
        st.one_of(st.none(), st.tuples(_VALID_TEXT, _VALID_TEXT, _VALID_TEXT, st.none())),
        st.tuples(_TEXT, _TEXT, _TEXT, st.one_of(st.none(), _TIMESTAMPS)),
    ),
}


@st.composite
def _drafts(draw: st.DrawFn) -> pb.LetterDraft:
    fuzzed = draw(st.sets(st.sampled_from(sorted(_FIELDS)), max_size=3))
    v = {name: draw(pair[name in fuzzed]) for name, pair in _FIELDS.items()}
    draft = pb.LetterDraft(
        recipients=v["recipients"],
        subject=v["subject"],
        kind=v["kind"],
        priority=v["priority"],
        content_type=v["content_type"],
        body=b"b" * v["body_size"],
        sender_mailbox=v["sender_mailbox"],
    )
    if v["in_reply_to"] is not None:
        draft.in_reply_to.CopyFrom(v["in_reply_to"])
    if v["expire_time"] is not None:
        draft.expire_time.CopyFrom(v["expire_time"])
    for i in range(v["attachments"]):
        draft.attachments.add(uri=f"doc://{i}")
    if v["metadata"] is not None:
        (
            draft.metadata.document_code,
            draft.metadata.signer_title,
            draft.metadata.signer_name,
            due_time,
        ) = v["metadata"]
        if due_time is not None:
            draft.metadata.due_time.CopyFrom(due_time)
    return draft


def _clean(text: str) -> bool:
    return text == unicodedata.normalize("NFC", text) and not any(
        unicodedata.category(ch) in ("Cc", "Cs") for ch in text
    )


@settings(max_examples=1000, deadline=None)
@given(draft=_drafts())
def test_validate_draft_normalises_or_refuses_with_a_canonical_code(draft: pb.LetterDraft) -> None:
    original = draft.SerializeToString()
    refusal: ChaparError | None = None
    try:
        out = validate_draft(draft, sender=SENDER, directory=DIRECTORY, limits=LIMITS, now=NOW)
    except ChaparError as exc:  # anything else escapes and fails the test
        refusal = exc
    assert draft.SerializeToString() == original, "validate_draft changed its input"
    if refusal is not None:
        assert refusal.code in ALLOWED, refusal
        assert refusal.reason, refusal
        assert refusal.reason == refusal.reason.upper(), refusal
        return
    assert out.subject == unicodedata.normalize("NFC", draft.subject)
    assert out.subject.strip()
    assert len(out.subject) <= LIMITS.max_subject_chars
    for text in (
        out.subject,
        out.sender_mailbox,
        out.content_type,
        *(r.mailbox for r in out.recipients),
        out.metadata.document_code,
        out.metadata.signer_title,
        out.metadata.signer_name,
    ):
        assert _clean(text), repr(text)
    assert out.kind in pb.LetterKind.values()
    assert out.kind != pb.LetterKind.LETTER_KIND_UNSPECIFIED
    assert out.priority in pb.Priority.values()
    assert out.priority != pb.Priority.PRIORITY_UNSPECIFIED
    assert 1 <= len(out.recipients) <= LIMITS.max_recipients
    assert [r.agency for r in out.recipients] == [r.agency for r in draft.recipients]
    assert all(r.agency in ACTIVE and is_agency_code(r.agency) for r in out.recipients)
    keys = [(r.agency, r.mailbox) for r in out.recipients]
    assert len(set(keys)) == len(keys)
    assert out.body == draft.body
    assert len(out.body) <= LIMITS.max_body_bytes
    assert not out.attachments
    if out.HasField("in_reply_to"):
        format_shams(out.in_reply_to)  # a number the rest of the node can print and look up
    if out.HasField("expire_time"):
        assert out.expire_time.ToDatetime(tzinfo=dt.UTC) > NOW
    if out.metadata.HasField("due_time"):
        out.metadata.due_time.ToDatetime(tzinfo=dt.UTC)  # a time the node can convert


@pytest.mark.parametrize(
    "timestamp",
    [
        timestamp_pb2.Timestamp(seconds=2**40),
        timestamp_pb2.Timestamp(seconds=-(2**40)),
        timestamp_pb2.Timestamp(seconds=1_800_000_000, nanos=-1),
        timestamp_pb2.Timestamp(seconds=1_800_000_000, nanos=1_000_000_000),
    ],
    ids=["seconds-far-future", "seconds-far-past", "nanos-negative", "nanos-one-second"],
)
@pytest.mark.parametrize("field", ["expire_time", "metadata.due_time"])
def test_out_of_range_timestamp_is_invalid_time(
    timestamp: timestamp_pb2.Timestamp, field: str
) -> None:
    draft = pb.LetterDraft(recipients=[pb.Address(agency=ACTIVE[0])], subject="s", body=b"b")
    if field == "expire_time":
        draft.expire_time.CopyFrom(timestamp)
    else:
        draft.metadata.due_time.CopyFrom(timestamp)
    with pytest.raises(ChaparError) as err:
        validate_draft(draft, sender=SENDER, directory=DIRECTORY, limits=LIMITS, now=NOW)
    assert (err.value.code, err.value.reason) == (Code.INVALID_ARGUMENT, "INVALID_TIME")
