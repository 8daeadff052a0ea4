"""Bad input against real processes: the node's NodeService and the hub's Connect frames.

Every refusal is checked for its exact gRPC code and ErrorInfo reason (domain
``chapar.exchange``), for leaving nothing stored (node outbox and SHAMS counter, hub
``letters``), for one more ``chapar_rejections_total{code,reason}`` on the server that
refused, and each group ends with a valid letter that is delivered: the server kept serving.

Requests are sent as raw bytes (identity serializers) where the point is bytes the SDK
would never produce: malformed protobuf, invalid UTF-8, unknown enum values.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import hashlib
import json
import os
import sqlite3
import unicodedata
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from client_sdk import ExchangeClient, pb
from client_sdk.errors import ChaparError as SdkError
from client_sdk.errors import InvalidArgument, ResourceExhausted
from client_sdk.shams import format_shams
from client_sdk.signing import ENVELOPE_PAYLOAD_TYPE, EVIDENCE_PAYLOAD_TYPE, Signer, sha256
from node.cluster import Cluster, ServerProcess
from tests.conftest import (
    AGENCY_A,
    AGENCY_B,
    AGENCY_C,
    HUB_PEER_OPTIONS,
    client_credentials,
    db_count,
)
from tests.conftest import node_tls as _node_tls

pytestmark = pytest.mark.integration

DOMAIN = "chapar.exchange"
SUBMIT = f"/{pb.NODE_SERVICE.full_name}/SubmitEnvelope"
BATCH = f"/{pb.NODE_SERVICE.full_name}/BatchSubmitEnvelopes"
STREAM = f"/{pb.NODE_SERVICE.full_name}/StreamSubmitEnvelopes"
CONNECT = f"/{pb.HUB_SERVICE.full_name}/Connect"
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
# How the hub may end a Connect stream over a bad frame; anything else (UNKNOWN, INTERNAL:
# an exception escaped the servicer) is a bug.
HUB_STREAM_CODES = frozenset({INVALID, grpc.StatusCode.PERMISSION_DENIED, EXHAUSTED})
SMALL = 65_536  # the limits of the dedicated small cluster
VIET = "C\u00f4ng v\u0103n v\u1ec1 vi\u1ec7c tri\u1ec3n khai Ngh\u1ecb \u0111\u1ecbnh 30/2020/N\u0110-CP"
VIET_NFD = unicodedata.normalize("NFD", VIET)
READ_TIMEOUT = 15.0


# -- state, metrics and status helpers -----------------------------------------------------


def _node_state(cluster: Cluster, code: str) -> tuple[int, int]:
    """(outbox rows, highest SHAMS sequence issued) of a node."""
    db = cluster.root / f"node-{code}" / "node.db"
    return (
        db_count(db, "SELECT count(*) FROM outbox"),
        db_count(db, "SELECT coalesce(max(last), 0) FROM shams_counter"),
    )


def _hub_letters(cluster: Cluster) -> int:
    return db_count(cluster.root / "hub" / "hub.db", "SELECT count(*) FROM letters")


def _scrape(address: str) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    counts: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "chapar_rejections_total" and set(sample.labels) == {
                "code",
                "reason",
            }:
                counts[(sample.labels["code"], sample.labels["reason"])] = sample.value
    return counts


async def _rejections(server: ServerProcess) -> dict[tuple[str, str], float]:
    assert server.metrics, f"{server.name} serves no metrics"
    return await asyncio.to_thread(_scrape, server.metrics)


@dataclass(frozen=True)
class Refusal:
    code: grpc.StatusCode
    reason: str
    domain: str
    metadata: dict[str, str]
    details: str
    fields: tuple[str, ...] = ()  # of its google.rpc.BadRequest field violations


def _refusal(err: grpc.aio.AioRpcError) -> Refusal:
    """The status of a failed call, read from the trailing google.rpc.Status ourselves."""
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            assert status.code == err.code().value[0], (status.code, err.code())
            fields: tuple[str, ...] = ()
            for detail in status.details:
                if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad = error_details_pb2.BadRequest()
                    detail.Unpack(bad)
                    fields = tuple(v.field for v in bad.field_violations)
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return Refusal(
                        err.code(),
                        info.reason,
                        info.domain,
                        dict(info.metadata),
                        err.details(),
                        fields,
                    )
    return Refusal(err.code(), "", "", {}, err.details() or "")


async def _refused(send: Callable[[], Awaitable[object]]) -> Refusal:
    """Runs ``send``, which must fail; raw calls and SDK calls alike."""
    sdk_error: SdkError | None = None
    try:
        await send()
    except grpc.aio.AioRpcError as err:
        return _refusal(err)
    except SdkError as err:
        sdk_error = err
    if sdk_error is None:
        raise AssertionError("the call was accepted")
    cause = sdk_error.__cause__
    assert isinstance(cause, grpc.aio.AioRpcError), sdk_error
    refusal = _refusal(cause)
    assert (sdk_error.code, sdk_error.reason) == (refusal.code, refusal.reason)
    return refusal


async def _assert_refused_on_node(
    cluster: Cluster,
    code: str,
    send: Callable[[], Awaitable[object]],
    status: grpc.StatusCode,
    reason: str,
) -> Refusal:
    """Exact code and reason, nothing stored, one more rejection counted on the node."""
    node = cluster.nodes[code]
    stored = _node_state(cluster, code)
    before = await _rejections(node)
    refusal = await _refused(send)
    assert (refusal.code, refusal.reason, refusal.domain) == (status, reason, DOMAIN), refusal
    assert _node_state(cluster, code) == stored, "a refused letter left a trace"
    after = await _rejections(node)
    key = (status.name, reason)
    assert after.get(key, 0.0) - before.get(key, 0.0) == 1, (key, before.get(key), after.get(key))
    return refusal


# -- raw calls ------------------------------------------------------------------------------


def _client_channel(cluster: Cluster, code: str) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(
        cluster.nodes[code].address, cluster.credentials(code).channel_credentials()
    )


def _hub_channel_as_c(cluster: Cluster) -> grpc.aio.Channel:
    """A channel to the hub as C's node, which takes the hub's frames as a node does (up to
    64 MiB): pushes of letters queued for C by earlier tests may be over gRPC's 4 MiB."""
    return grpc.aio.secure_channel(
        cluster.hub.address,
        _node_tls(cluster, AGENCY_C),
        options=HUB_PEER_OPTIONS,
    )


async def _raw_unary(cluster: Cluster, code: str, method: str, raw: bytes) -> bytes:
    async with _client_channel(cluster, code) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        response: bytes = await call(raw, timeout=30)
        return response


def _request(request_id: str | None = None, **fields: object) -> pb.SubmitEnvelopeRequest:
    draft: dict[str, object] = {
        "recipients": [pb.Address(agency=AGENCY_B)],
        "subject": "Security input test",
        "body": b"x",
    }
    draft.update(fields)
    return pb.SubmitEnvelopeRequest(
        request_id=request_id if request_id is not None else str(uuid.uuid4()),
        draft=pb.LetterDraft(**draft),  # type: ignore[arg-type]
    )


def _unheld_ref(**fields: str) -> pb.AttachmentRef:
    """A well-formed reference to a document of A's that its node does not hold."""
    return pb.AttachmentRef(
        uri=f"chapar://{AGENCY_A}/documents/sha256/" + "ab" * 32,
        sha256=b"\xab" * 32,
        size=10,
        media_type="application/pdf",
        **fields,
    )


def _serialized(**fields: object) -> Callable[[], bytes]:
    return lambda: _request(**fields).SerializeToString()


def _malformed(raw: bytes) -> Callable[[], bytes]:
    def build() -> bytes:
        with pytest.raises(DecodeError):  # precondition: the bytes really are malformed
            pb.SubmitEnvelopeRequest.FromString(raw)
        return raw

    return build


def _patched(marker: str, bad: bytes, **fields: object) -> Callable[[], bytes]:
    """A valid request whose ``marker`` text is replaced by the same number of bad bytes."""

    def build() -> bytes:
        raw = _request(**fields).SerializeToString()
        assert raw.count(marker.encode()) == 1
        assert len(bad) == len(marker.encode())
        patched = raw.replace(marker.encode(), bad)
        with pytest.raises(DecodeError):
            pb.SubmitEnvelopeRequest.FromString(patched)
        return patched

    return build


def _ts(seconds: int, nanos: int = 0) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


async def _delivered(
    receiver: ExchangeClient, shams: str, timeout: float = 30.0, mailbox: str | None = None
) -> object:
    """The letter ``shams`` from the receiver's inbox (acknowledged, to keep the inbox short),
    read from the stream of ``mailbox`` when one is given."""

    async def find() -> object:
        async with contextlib.aclosing(receiver.inbox(mailbox)) as letters:
            async for letter in letters:
                if letter.shams == shams:
                    await letter.ack()
                    return letter
        raise AssertionError("inbox stream ended")

    return await asyncio.wait_for(find(), timeout)


async def _still_serving(cluster: Cluster, note: str) -> None:
    """A valid letter A -> B through the SDK is accepted, relayed and delivered."""
    async with (
        ExchangeClient(cluster.nodes[AGENCY_A].address, cluster.credentials(AGENCY_A)) as a,
        ExchangeClient(cluster.nodes[AGENCY_B].address, cluster.credentials(AGENCY_B)) as b,
    ):
        body = f"still serving after {note}: {uuid.uuid4()}"
        receipt = await a.send(to=[AGENCY_B], subject=f"Still serving ({note})", body=body)
        letter = await _delivered(b, receipt.shams)
        assert letter.body == body.encode()  # type: ignore[attr-defined]


# -- 1. NodeService: explicit cases over raw gRPC -------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    request: Callable[[], bytes]
    code: grpc.StatusCode
    reason: str


_CASES = [
    Case("garbage-bytes", _malformed(b"\xff\xff\xff\xff"), INVALID, "MALFORMED_MESSAGE"),
    Case("invalid-wire-type", _malformed(b"\x0f\x00"), INVALID, "MALFORMED_MESSAGE"),
    Case(
        "truncated",
        lambda: _malformed(_request().SerializeToString()[:-1])(),
        INVALID,
        "MALFORMED_MESSAGE",
    ),
    Case(
        "invalid-utf8-subject",
        _patched("MARK-SUBJECT", b"MARK-\xc3\x28\xffJECT", subject="MARK-SUBJECT"),
        INVALID,
        "MALFORMED_MESSAGE",
    ),
    Case(
        "utf8-surrogate-in-subject",
        _patched("MARK-SUBJECT", b"MARK-\xed\xa0\x80JECT", subject="MARK-SUBJECT"),
        INVALID,
        "MALFORMED_MESSAGE",
    ),
    Case(
        "overlong-utf8-in-recipient",
        _patched(
            "MARK.AGENCY", b"MARK.\xc0\xafENCY", recipients=[pb.Address(agency="MARK.AGENCY")]
        ),
        INVALID,
        "MALFORMED_MESSAGE",
    ),
    Case(
        "over-default-16MiB-limit",
        _serialized(body=b"\0" * (16 * 1024 * 1024 + 1)),
        EXHAUSTED,
        "MESSAGE_TOO_LARGE",
    ),
    Case("no-recipients", _serialized(recipients=[]), INVALID, "NO_RECIPIENTS"),
    Case(
        "101-recipients",
        _serialized(recipients=[pb.Address(agency=f"AGENCY.{i:03d}") for i in range(101)]),
        INVALID,
        "TOO_MANY_RECIPIENTS",
    ),
    Case(
        "duplicate-recipients",
        _serialized(recipients=[pb.Address(agency=AGENCY_B), pb.Address(agency=AGENCY_B)]),
        INVALID,
        "DUPLICATE_RECIPIENT",
    ),
    Case(
        "duplicate-after-nfc-of-mailbox",
        _serialized(
            recipients=[
                pb.Address(agency=AGENCY_B, mailbox=VIET_NFD[:20]),
                pb.Address(agency=AGENCY_B, mailbox=unicodedata.normalize("NFC", VIET_NFD[:20])),
            ]
        ),
        INVALID,
        "DUPLICATE_RECIPIENT",
    ),
    *(
        Case(
            f"agency-code-{name}",
            _serialized(recipients=[pb.Address(agency=bad)]),
            INVALID,
            "INVALID_AGENCY_CODE",
        )
        for name, bad in [
            ("space", "a b"),
            ("dots-only", ".."),
            ("lower-case", AGENCY_C.lower()),
            ("empty", ""),
            ("one-char", "X"),
            ("65-chars", "X" * 65),
            ("newline", AGENCY_B + "\n"),
            ("fullwidth", "\uff2d\uff2f\uff26\uff21"),
        ]
    ),
    Case("kind-99", _serialized(kind=99), INVALID, "INVALID_KIND"),
    Case("kind-negative", _serialized(kind=-1), INVALID, "INVALID_KIND"),
    Case("priority-42", _serialized(priority=42), INVALID, "INVALID_PRIORITY"),
    Case("empty-subject", _serialized(subject=""), INVALID, "EMPTY_FIELD"),
    Case("spaces-subject", _serialized(subject="   "), INVALID, "EMPTY_FIELD"),
    Case("unicode-spaces-subject", _serialized(subject="\u3000\u2003 "), INVALID, "EMPTY_FIELD"),
    *(
        Case(f"control-{name}", _serialized(subject=text), INVALID, "INVALID_TEXT")
        for name, text in [
            ("nul", "a\x00b"),
            ("escape", "\x1b[2Jcleared"),
            ("nel", "next\u0085line"),
            ("del", "x\x7f"),
            ("tab", "a\tb"),
            ("newline", "a\nb"),
        ]
    ),
    Case(
        "control-in-mailbox",
        _serialized(recipients=[pb.Address(agency=AGENCY_B, mailbox="reg\x00istry")]),
        INVALID,
        "INVALID_TEXT",
    ),
    Case("control-in-sender-mailbox", _serialized(sender_mailbox="\x1b"), INVALID, "INVALID_TEXT"),
    Case(
        "control-in-content-type",
        _serialized(content_type="text/plain\r\n"),
        INVALID,
        "INVALID_TEXT",
    ),
    Case("subject-1001-chars", _serialized(subject="s" * 1001), INVALID, "TEXT_TOO_LONG"),
    Case(
        "body-over-4MiB",
        _serialized(body=b"\0" * (4 * 1024 * 1024 + 1)),
        EXHAUSTED,
        "BODY_TOO_LARGE",
    ),
    Case(
        "request-id-129-chars",
        lambda: _request(request_id="r" * 129).SerializeToString(),
        INVALID,
        "INVALID_REQUEST_ID",
    ),
    Case(
        "request-id-control-character",
        lambda: _request(request_id="order\n1").SerializeToString(),
        INVALID,
        "INVALID_REQUEST_ID",
    ),
    *(
        Case(
            f"request-id-c1-control-{name}",
            lambda text=text: _request(request_id=f"order{text}1").SerializeToString(),
            INVALID,
            "INVALID_REQUEST_ID",
        )
        for name, text in [("nel", "\u0085"), ("csi", "\u009b"), ("pad", "\u0080")]
    ),
    Case(
        "in-reply-to-invalid",
        _serialized(
            kind=pb.LetterKind.LETTER_KIND_REPLY,
            in_reply_to=pb.Shams(origin="nope", domain=9, year=1, sequence=0),
        ),
        INVALID,
        "INVALID_SHAMS",
    ),
    Case(
        "reply-without-in-reply-to",
        _serialized(kind=pb.LetterKind.LETTER_KIND_REPLY),
        INVALID,
        "MISSING_IN_REPLY_TO",
    ),
    Case("expire-time-past", _serialized(expire_time=_ts(1_000_000)), INVALID, "EXPIRE_TIME_PAST"),
    Case(
        "unknown-recipient",
        _serialized(recipients=[pb.Address(agency="NO.SUCH.AGENCY")]),
        grpc.StatusCode.NOT_FOUND,
        "UNKNOWN_RECIPIENT",
    ),
    Case(
        "attachment-uri-not-a-document-address",
        _serialized(attachments=[pb.AttachmentRef(uri="doc://1")]),
        INVALID,
        "INVALID_DOCUMENT_URI",
    ),
    *(
        Case(
            f"attachment-file-name-{label}",
            _serialized(attachments=[_unheld_ref(file_name=name)]),
            INVALID,
            "INVALID_FILE_NAME",
        )
        for label, name in [
            ("up", "../../home/svc/.bashrc"),
            ("absolute", "/etc/cron.d/evil"),
            ("backslash", "..\\evil.exe"),
            ("dot-dot", ".."),
        ]
    ),
    Case(
        "attachment-not-held-by-the-node",
        _serialized(attachments=[_unheld_ref()]),
        grpc.StatusCode.NOT_FOUND,
        "DOCUMENT_NOT_FOUND",
    ),
]


@pytest.mark.parametrize("case", _CASES, ids=[c.id for c in _CASES])
async def test_bad_submission_is_refused_with_exact_status_and_nothing_stored(
    cluster: Cluster, case: Case
) -> None:
    raw = case.request()
    refusal = await _assert_refused_on_node(
        cluster,
        AGENCY_A,
        lambda: _raw_unary(cluster, AGENCY_A, SUBMIT, raw),
        case.code,
        case.reason,
    )
    if case.reason == "MESSAGE_TOO_LARGE":
        assert refusal.metadata == {"limit": str(16 * 1024 * 1024), "size": str(len(raw))}


@pytest.mark.parametrize(
    "timestamp",
    [
        _ts(2**40),
        _ts(-(2**40)),
        _ts(2**63 - 1),
        _ts(4_102_444_800, -1),
        _ts(4_102_444_800, 1_000_000_000),
    ],
    ids=[
        "seconds-far-future",
        "seconds-far-past",
        "seconds-max-int64",
        "nanos-negative",
        "nanos-one-second",
    ],
)
@pytest.mark.parametrize("field", ["expire_time", "metadata.due_time"])
async def test_out_of_range_timestamp_is_invalid_time_not_a_crash(
    cluster: Cluster, timestamp: timestamp_pb2.Timestamp, field: str
) -> None:
    """A Timestamp outside 0001..9999 or with nanos outside [0, 1e9) is not a time at all.

    It must be refused like every other bad field, not escape as an exception that gRPC
    turns into UNKNOWN.
    """
    request = _request()
    if field == "expire_time":
        request.draft.expire_time.CopyFrom(timestamp)
    else:
        request.draft.metadata.due_time.CopyFrom(timestamp)
    raw = request.SerializeToString()
    await _assert_refused_on_node(
        cluster,
        AGENCY_A,
        lambda: _raw_unary(cluster, AGENCY_A, SUBMIT, raw),
        INVALID,
        "INVALID_TIME",
    )


async def test_batch_of_bad_drafts_gets_one_error_each_and_stores_nothing(
    cluster: Cluster,
) -> None:
    node = cluster.nodes[AGENCY_A]
    stored = _node_state(cluster, AGENCY_A)
    before = await _rejections(node)
    batch = pb.BatchSubmitEnvelopesRequest(
        requests=[
            _request(kind=99),
            _request(subject="\x00"),
            _request(recipients=[pb.Address(agency="a b")]),
        ]
    )
    raw = await _raw_unary(cluster, AGENCY_A, BATCH, batch.SerializeToString())
    results = pb.BatchSubmitEnvelopesResponse.FromString(raw).results
    got = [(r.request_id, r.WhichOneof("outcome"), r.error.code, r.error.reason) for r in results]
    assert got == [
        (batch.requests[0].request_id, "error", INVALID.value[0], "INVALID_KIND"),
        (batch.requests[1].request_id, "error", INVALID.value[0], "INVALID_TEXT"),
        (batch.requests[2].request_id, "error", INVALID.value[0], "INVALID_AGENCY_CODE"),
    ]
    assert _node_state(cluster, AGENCY_A) == stored
    after = await _rejections(node)
    for reason in ("INVALID_KIND", "INVALID_TEXT", "INVALID_AGENCY_CODE"):
        key = ("INVALID_ARGUMENT", reason)
        assert after.get(key, 0.0) - before.get(key, 0.0) == 1, key


async def test_malformed_batch_and_stream_frame_are_malformed_message(cluster: Cluster) -> None:
    await _assert_refused_on_node(
        cluster,
        AGENCY_A,
        lambda: _raw_unary(cluster, AGENCY_A, BATCH, b"\x0a\xff\xff"),
        INVALID,
        "MALFORMED_MESSAGE",
    )

    async def stream_garbage() -> None:
        async with _client_channel(cluster, AGENCY_A) as channel:
            call = channel.stream_stream(
                STREAM, request_serializer=None, response_deserializer=None
            )()
            await call.write(b"\xff\xff\xff")
            await call.done_writing()
            async for _ in call:
                raise AssertionError("answered a malformed frame")

    await _assert_refused_on_node(cluster, AGENCY_A, stream_garbage, INVALID, "MALFORMED_MESSAGE")


async def test_batch_or_stream_frame_over_1024_letters_is_refused_whole(cluster: Cluster) -> None:
    """The limit the proto states: BATCH_TOO_LARGE, nothing of the batch stored."""
    requests = [_request(subject=f"letter {i}") for i in range(1025)]
    batch = pb.BatchSubmitEnvelopesRequest(requests=requests).SerializeToString()
    refusal = await _assert_refused_on_node(
        cluster,
        AGENCY_A,
        lambda: _raw_unary(cluster, AGENCY_A, BATCH, batch),
        EXHAUSTED,
        "BATCH_TOO_LARGE",
    )
    assert refusal.metadata == {"limit": "1024"}

    frame = pb.StreamSubmitEnvelopesRequest(requests=requests)
    await _assert_refused_on_node(
        cluster, AGENCY_A, lambda: _stream_one_frame(cluster, frame), EXHAUSTED, "BATCH_TOO_LARGE"
    )


async def test_an_acknowledgement_batch_over_1000_letters_is_refused_as_a_batch_too_large(
    cluster: Cluster,
) -> None:
    """As an oversized submission batch: RESOURCE_EXHAUSTED, BATCH_TOO_LARGE, "limit" (it
    was INVALID_ARGUMENT, with a field violation, unlike every other size limit)."""
    numbers = [f"{AGENCY_B}/O/2026/{n:07d}" for n in range(1, 1002)]
    async with ExchangeClient(
        cluster.nodes[AGENCY_A].address, cluster.credentials(AGENCY_A)
    ) as client:
        refusal = await _assert_refused_on_node(
            cluster, AGENCY_A, lambda: client.ack_many(numbers), EXHAUSTED, "BATCH_TOO_LARGE"
        )
    assert refusal.metadata == {"limit": "1000"}


async def _stream_one_frame(cluster: Cluster, frame: pb.StreamSubmitEnvelopesRequest) -> None:
    """One frame on a raw StreamSubmitEnvelopes call, half-closed; an answer is a failure
    (the node must refuse it)."""
    async with _client_channel(cluster, AGENCY_A) as channel:
        call = channel.stream_stream(STREAM, request_serializer=None, response_deserializer=None)()
        await call.write(frame.SerializeToString())
        await call.done_writing()
        async for _ in call:
            raise AssertionError("answered a frame it must refuse")


_SDK_CASES = [
    ("duplicate", {"to": [AGENCY_B, AGENCY_B]}, "DUPLICATE_RECIPIENT"),
    ("lower-case-code", {"to": [AGENCY_C.lower()]}, "INVALID_AGENCY_CODE"),
    ("code-with-space", {"to": ["a b"]}, "INVALID_AGENCY_CODE"),
    ("no-recipients", {"to": []}, "NO_RECIPIENTS"),
    (
        "101-recipients",
        {"to": [f"AGENCY.{i:03d}" for i in range(101)]},
        "TOO_MANY_RECIPIENTS",
    ),
    ("empty-subject", {"subject": ""}, "EMPTY_FIELD"),
    ("whitespace-subject", {"subject": " \u3000 "}, "EMPTY_FIELD"),
    ("escape-in-subject", {"subject": "\x1b[31mred"}, "INVALID_TEXT"),
    ("nel-in-subject", {"subject": "a\u0085b"}, "INVALID_TEXT"),
    ("nul-in-subject", {"subject": "\x00"}, "INVALID_TEXT"),
]


@pytest.mark.parametrize(
    ("fields", "reason"), [c[1:] for c in _SDK_CASES], ids=[c[0] for c in _SDK_CASES]
)
async def test_sdk_submission_is_refused_as_invalid_argument(
    cluster: Cluster, fields: dict[str, object], reason: str
) -> None:
    args: dict[str, object] = {"to": [AGENCY_B], "subject": "SDK case", "body": "x"}
    args.update(fields)

    async def send() -> None:
        async with ExchangeClient(
            cluster.nodes[AGENCY_A].address, cluster.credentials(AGENCY_A)
        ) as a:
            with pytest.raises(InvalidArgument) as err:
                await a.send(**args)  # type: ignore[arg-type]
            raise err.value

    await _assert_refused_on_node(cluster, AGENCY_A, send, INVALID, reason)


async def test_decomposed_vietnamese_is_accepted_and_arrives_nfc(cluster: Cluster) -> None:
    assert VIET_NFD != VIET
    assert unicodedata.normalize("NFC", VIET_NFD) == VIET
    mailbox = unicodedata.normalize("NFD", "v\u0103n th\u01b0")
    async with (
        ExchangeClient(cluster.nodes[AGENCY_A].address, cluster.credentials(AGENCY_A)) as a,
        ExchangeClient(cluster.nodes[AGENCY_B].address, cluster.credentials(AGENCY_B)) as b,
    ):
        receipt = await a.send(to=[(AGENCY_B, mailbox)], subject=VIET_NFD, body="NFC test")
        letter = await _delivered(b, receipt.shams)
    assert letter.subject == unicodedata.normalize("NFC", VIET_NFD)  # type: ignore[attr-defined]
    (recipient,) = letter.header.recipients  # type: ignore[attr-defined]
    assert recipient.mailbox == unicodedata.normalize("NFC", mailbox)


# A mailbox the back-end spells decomposed (NFD), as some input methods and platforms do.
MAILBOX_VIET = "Ph\u00f2ng v\u0103n th\u01b0"
MAILBOX_VIET_NFD = unicodedata.normalize("NFD", MAILBOX_VIET)


async def test_inbox_of_a_decomposed_mailbox_is_normalised_and_delivers(cluster: Cluster) -> None:
    """StreamInbox's mailbox is NFC-normalised like a draft's: letters to "Phòng văn thư"
    are read by a back-end that spells it decomposed (the stream used to deliver nothing)."""
    assert MAILBOX_VIET_NFD != MAILBOX_VIET
    mailbox = f"{MAILBOX_VIET} {uuid.uuid4().hex[:8]}"  # this test's letter only
    async with (
        ExchangeClient(cluster.nodes[AGENCY_A].address, cluster.credentials(AGENCY_A)) as a,
        ExchangeClient(cluster.nodes[AGENCY_B].address, cluster.credentials(AGENCY_B)) as b,
    ):
        receipt = await a.send(to=[(AGENCY_B, mailbox)], subject="NFC inbox", body="x")
        letter = await _delivered(
            b, receipt.shams, timeout=20, mailbox=unicodedata.normalize("NFD", mailbox)
        )
    (recipient,) = letter.header.recipients  # type: ignore[attr-defined]
    assert recipient.mailbox == mailbox


@pytest.mark.parametrize(
    ("mailbox", "reason"),
    [
        ("reg\x00istry", "INVALID_TEXT"),
        ("\x1b[2J", "INVALID_TEXT"),
        ("next\u0085line", "INVALID_TEXT"),
        ("m" * 129, "TEXT_TOO_LONG"),
    ],
    ids=["nul", "escape", "nel", "129-chars"],
)
async def test_inbox_mailbox_that_no_draft_may_name_is_refused(
    cluster: Cluster, mailbox: str, reason: str
) -> None:
    """The mailbox of StreamInbox is checked as a draft's mailboxes are (a stream for a
    mailbox no letter can have used to be opened and stay silent)."""

    async def read() -> None:
        async with (
            ExchangeClient(cluster.nodes[AGENCY_B].address, cluster.credentials(AGENCY_B)) as b,
            contextlib.aclosing(b.inbox(mailbox)) as letters,
        ):
            await asyncio.wait_for(anext(letters), 5)  # a refusal comes at once

    refusal = await _assert_refused_on_node(cluster, AGENCY_B, read, INVALID, reason)
    assert refusal.details.startswith("mailbox "), refusal


async def test_node_keeps_serving_after_bad_input(cluster: Cluster) -> None:
    assert cluster.nodes[AGENCY_A].running
    await _still_serving(cluster, "bad submissions")


# -- DocumentService uploads -----------------------------------------------------------------


def _temp_files(cluster: Cluster, code: str) -> list[Path]:
    return list((cluster.root / f"node-{code}" / "documents" / "tmp").iterdir())


async def _upload(
    cluster: Cluster,
    code: str,
    messages: list[pb.UploadDocumentRequest],
    *,
    answers: int,
    half_close: bool = True,
) -> None:
    """Sends ``messages`` on an upload and reads ``answers`` answers after the first (the
    header's); anything the node refuses raises AioRpcError. Half-closes after the last,
    unless ``half_close`` is False: a write racing the node's refusal can make grpc report
    INTERNAL with the refusal's status lost (grpc/grpc#36066), so a test whose last
    message is the refused one writes nothing after it."""
    async with _client_channel(cluster, code) as channel:
        call = pb.DocumentServiceStub(channel).UploadDocument()
        try:
            await call.write(messages[0])
            first = await asyncio.wait_for(call.read(), READ_TIMEOUT)
            assert first is not grpc.aio.EOF
            assert not first.HasField("document"), first
            # A refusal may end the call before all is written: its status is then read.
            with contextlib.suppress(asyncio.InvalidStateError):
                for message in messages[1:]:
                    await call.write(message)
                if half_close:
                    await call.done_writing()
            for _ in range(answers):
                await asyncio.wait_for(call.read(), READ_TIMEOUT)
        finally:
            call.cancel()


@pytest.mark.parametrize(
    "digest",
    [b"\xab" * 31, b"\xab" * 33, hashlib.sha256(b"x").hexdigest().encode()],
    ids=["31-bytes", "33-bytes", "hex-text"],
)
async def test_upload_header_with_a_digest_not_32_bytes_is_refused_before_content(
    cluster: Cluster, digest: bytes
) -> None:
    """An announced SHA-256 that cannot be one is refused in the header's answer, not after
    the whole file was streamed (DATA_LOSS / DIGEST_MISMATCH, as it used to be)."""
    header = pb.UploadHeader(media_type="text/plain", size=1, sha256=digest)
    refusal = await _assert_refused_on_node(
        cluster,
        AGENCY_A,
        lambda: _upload(cluster, AGENCY_A, [pb.UploadDocumentRequest(header=header)], answers=0),
        INVALID,
        "INVALID_DIGEST",
    )
    assert refusal.fields == ("header.sha256",), refusal
    assert refusal.metadata == {"size": str(len(digest))}, refusal
    assert not _temp_files(cluster, AGENCY_A)


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        (pb.UploadDocumentRequest(), "UPLOAD_PART_MISSING"),
        (
            pb.UploadDocumentRequest(header=pb.UploadHeader(media_type="text/plain")),
            "UNEXPECTED_HEADER",
        ),
    ],
    ids=["no-part", "second-header"],
)
async def test_upload_message_after_the_header_that_is_not_a_chunk_is_refused(
    cluster: Cluster, extra: pb.UploadDocumentRequest, reason: str
) -> None:
    """Each gets its own reason: a message with no part set used to be called a header."""
    header = pb.UploadDocumentRequest(header=pb.UploadHeader(media_type="text/plain", size=2))
    messages = [header, pb.UploadDocumentRequest(chunk=b"a"), extra]
    await _assert_refused_on_node(
        cluster,
        AGENCY_A,
        lambda: _upload(cluster, AGENCY_A, messages, answers=1, half_close=False),
        INVALID,
        reason,
    )
    assert not _temp_files(cluster, AGENCY_A)


# -- 2. HubService.Connect frames ----------------------------------------------------------


async def _open_connect(channel: grpc.aio.Channel) -> grpc.aio.StreamStreamCall:
    call = channel.stream_stream(CONNECT, request_serializer=None, response_deserializer=None)()
    hello = pb.ConnectRequest(hello=pb.ConnectHello(software_version="security-input-test"))
    await call.write(hello.SerializeToString())
    first = await asyncio.wait_for(call.read(), READ_TIMEOUT)
    assert pb.ConnectResponse.FromString(first).WhichOneof("frame") == "welcome"
    return call


async def _answer(call: grpc.aio.StreamStreamCall, wanted: str | None) -> pb.ConnectResponse:
    """Reads until a frame of kind ``wanted`` (others are the hub's own pushes).

    An error status raises AioRpcError; ``wanted=None`` reads until the stream ends.
    """
    while True:
        raw = await asyncio.wait_for(call.read(), READ_TIMEOUT)
        assert raw is not grpc.aio.EOF, "the hub ended the stream with OK"
        frame = pb.ConnectResponse.FromString(raw)
        kind = frame.WhichOneof("frame")
        assert kind not in ("relay_results", "receipt_acks") or kind == wanted, frame
        if kind == wanted:
            return frame


async def _hub_refuses_frame(
    cluster: Cluster, raw: bytes, status: grpc.StatusCode, reason: str
) -> Refusal:
    letters = _hub_letters(cluster)
    before = await _rejections(cluster.hub)

    async def send() -> None:
        async with _hub_channel_as_c(cluster) as channel:
            call = await _open_connect(channel)
            await call.write(raw)
            await _answer(call, None)

    refusal = await _refused(send)
    assert (refusal.code, refusal.reason, refusal.domain) == (status, reason, DOMAIN), refusal
    assert _hub_letters(cluster) == letters
    after = await _rejections(cluster.hub)
    key = (status.name, reason)
    assert after.get(key, 0.0) - before.get(key, 0.0) == 1, (key, before.get(key), after.get(key))
    return refusal


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff\xff\xff\xff",
        b"\x0f",
        # a hello whose software_version is invalid UTF-8
        b"\x0a\x04\x0a\x02\xc3\x28",
        # an envelopes frame cut short
        pb.ConnectRequest(
            envelopes=pb.EnvelopeBatch(envelopes=[pb.Envelope(header=b"h" * 40)])
        ).SerializeToString()[:-3],
    ],
    ids=["garbage", "invalid-wire-type", "invalid-utf8", "truncated"],
)
async def test_malformed_connect_frame_ends_stream_with_malformed_message(
    cluster: Cluster, raw: bytes
) -> None:
    with pytest.raises(DecodeError):
        pb.ConnectRequest.FromString(raw)
    await _hub_refuses_frame(cluster, raw, INVALID, "MALFORMED_MESSAGE")


async def test_a_hello_saying_a_restore_from_no_valid_time_ends_the_stream_invalid_time(
    cluster: Cluster,
) -> None:
    hello = pb.ConnectHello(software_version="security-input-test")
    hello.node_restore.snapshot_time.CopyFrom(_ts(2**40))  # past year 9999
    before = await _rejections(cluster.hub)

    async def send() -> None:
        async with _hub_channel_as_c(cluster) as channel:
            call = channel.stream_stream(
                CONNECT, request_serializer=None, response_deserializer=None
            )()
            await call.write(pb.ConnectRequest(hello=hello).SerializeToString())
            await asyncio.wait_for(call.read(), READ_TIMEOUT)

    refusal = await _refused(send)
    assert (refusal.code, refusal.reason, refusal.domain) == (INVALID, "INVALID_TIME", DOMAIN)
    after = await _rejections(cluster.hub)
    key = (INVALID.name, "INVALID_TIME")
    assert after.get(key, 0.0) - before.get(key, 0.0) == 1, (key, before.get(key), after.get(key))


async def test_a_hello_saying_a_restore_from_the_last_valid_instant_is_welcomed(
    cluster: Cluster,
) -> None:
    # 9999-12-31T23:59:59.999999999Z is a valid Timestamp, but as float seconds it rounds up
    # into year 10000, which the hub's log line of the restore could not format.
    hello = pb.ConnectHello(software_version="security-input-test")
    hello.node_restore.snapshot_time.CopyFrom(_ts(253402300799, 999_999_999))
    async with _hub_channel_as_c(cluster) as channel:
        call = channel.stream_stream(CONNECT, request_serializer=None, response_deserializer=None)()
        await call.write(pb.ConnectRequest(hello=hello).SerializeToString())
        first = await asyncio.wait_for(call.read(), READ_TIMEOUT)
        assert first is not grpc.aio.EOF
        assert pb.ConnectResponse.FromString(first).WhichOneof("frame") == "welcome"
        call.cancel()
    assert "9999-12-31T23:59:59" in cluster.hub.log_tail(20_000)


async def test_a_hello_saying_a_restore_again_within_a_minute_is_refused_until_then(
    cluster: Cluster,
) -> None:
    # Each such hello has the hub read all the agency's notices kept (8 days of them): a
    # node saying so at every stream, hostile or stuck, had it read them at every stream.
    hello = pb.ConnectHello(software_version="security-input-test")
    hello.node_restore.snapshot_time.CopyFrom(_ts(1_700_000_000))
    raw = pb.ConnectRequest(hello=hello).SerializeToString()

    async def connect() -> None:
        async with _hub_channel_as_c(cluster) as channel:
            call = channel.stream_stream(
                CONNECT, request_serializer=None, response_deserializer=None
            )()
            await call.write(raw)
            first = await asyncio.wait_for(call.read(), READ_TIMEOUT)
            assert pb.ConnectResponse.FromString(first).WhichOneof("frame") == "welcome"
            call.cancel()

    with contextlib.suppress(grpc.aio.AioRpcError):  # an earlier test's may be that recent
        await connect()
    before = await _rejections(cluster.hub)
    refusal = await _refused(connect)
    assert (refusal.code, refusal.reason, refusal.domain) == (
        grpc.StatusCode.UNAVAILABLE,
        "NODE_RESTORE_TOO_SOON",
        DOMAIN,
    ), refusal
    after = await _rejections(cluster.hub)
    key = ("UNAVAILABLE", "NODE_RESTORE_TOO_SOON")
    assert after.get(key, 0.0) - before.get(key, 0.0) == 1, (key, before.get(key), after.get(key))


def _c_signer(cluster: Cluster) -> Signer:
    return _signer(cluster.pki.agency_dir(AGENCY_C))


@functools.cache
def _signer(directory: Path) -> Signer:
    return Signer.from_files(directory / "signing.key", directory / "signing.crt")


async def _send_frames_as_c(
    cluster: Cluster, frame: pb.ConnectRequest, wanted: str
) -> pb.ConnectResponse | Refusal:
    async with _hub_channel_as_c(cluster) as channel:
        call = await _open_connect(channel)
        try:
            await call.write(frame.SerializeToString())
            return await _answer(call, wanted)
        except grpc.aio.AioRpcError as err:
            return _refusal(err)
        finally:
            call.cancel()


def _assert_hub_status_allowed(refusal: Refusal) -> None:
    assert refusal.code in HUB_STREAM_CODES, refusal
    assert refusal.reason, refusal
    assert refusal.domain == DOMAIN, refusal


@pytest.mark.parametrize("timestamp", [_ts(2**62), _ts(0, -1)], ids=["seconds", "nanos"])
async def test_receipt_with_out_of_range_event_time_is_not_a_crash(
    cluster: Cluster, timestamp: timestamp_pb2.Timestamp
) -> None:
    """Unsigned evidence whose event_time is not a valid Timestamp: like any evidence that
    does not verify, it must be refused (not acknowledged) or end the stream with a reason.
    """
    content = pb.EvidenceContent(
        evidence_id=str(uuid.uuid4()), event=pb.EvidenceEvent.EVIDENCE_EVENT_DELIVERY
    )
    content.event_time.CopyFrom(timestamp)
    frame = pb.ConnectRequest(
        receipts=pb.EvidenceBatch(evidence=[pb.Evidence(content=content.SerializeToString())])
    )
    answer = await _send_frames_as_c(cluster, frame, "receipt_acks")
    if isinstance(answer, Refusal):
        _assert_hub_status_allowed(answer)
    else:
        assert list(answer.receipt_acks.evidence_ids) == []


async def test_signed_receipt_with_invalid_shams_is_not_a_crash(cluster: Cluster) -> None:
    """Evidence correctly signed by the connected node but naming no valid SHAMS number."""
    content = pb.EvidenceContent(
        evidence_id=str(uuid.uuid4()),
        event=pb.EvidenceEvent.EVIDENCE_EVENT_DELIVERY,
        issuer=f"urn:chapar:agency:{AGENCY_C}",
        recipient=AGENCY_C,
        shams=pb.Shams(origin="", domain=0, year=0, sequence=0),
    ).SerializeToString()
    signature = _c_signer(cluster).sign(EVIDENCE_PAYLOAD_TYPE, content)
    frame = pb.ConnectRequest(
        receipts=pb.EvidenceBatch(evidence=[pb.Evidence(content=content, signature=signature)])
    )
    answer = await _send_frames_as_c(cluster, frame, "receipt_acks")
    if isinstance(answer, Refusal):
        _assert_hub_status_allowed(answer)


def _signed_letter(
    cluster: Cluster,
    attachments: tuple[pb.AttachmentRef, ...] = (),
    **times: timestamp_pb2.Timestamp,
) -> pb.Envelope:
    """A letter from C to B, correct in every respect but the given timestamps (and
    attachment references, which the hub and B's node take as they are)."""
    body = b"time travel"
    header = pb.EnvelopeHeader(
        shams=pb.Shams(
            origin=AGENCY_C,
            domain=pb.ShamsDomain.SHAMS_DOMAIN_OUTGOING,
            year=2026,
            sequence=5_000_000 + uuid.uuid4().int % 1_000_000,
        ),
        sender=pb.Address(agency=AGENCY_C),
        recipients=[pb.Address(agency=AGENCY_B)],
        subject="timestamps",
        kind=pb.LetterKind.LETTER_KIND_LETTER,
        priority=pb.Priority.PRIORITY_NORMAL,
        content_type="text/plain; charset=utf-8",
        body_sha256=sha256(body),
        body_size=len(body),
        attachments=attachments,
    )
    header.create_time.FromDatetime(dt.datetime.now(dt.UTC))
    for name, value in times.items():
        getattr(header, name).CopyFrom(value)
    raw = header.SerializeToString()
    return pb.Envelope(
        header=raw, signature=_c_signer(cluster).sign(ENVELOPE_PAYLOAD_TYPE, raw), body=body
    )


async def test_attachment_references_to_others_documents_are_refused_and_give_no_rights(
    cluster: Cluster,
) -> None:
    """A (wrong) sender node signs a letter to B whose attachments name a digest B's node
    may hold for another of its mailboxes, under B's address or under another digest's.
    No recipient could ever fetch those (only the sender's own documents are granted), so
    the hub refuses the letter (RELAY_REJECTION DOCUMENT_NOT_OWNED) and B's node never
    sees it: nothing is indexed for B's mailboxes. (B's node refuses such a letter too,
    DELIVERY_FAILURE, should a hub relay one: tests/unit/test_document_store.py.)"""
    own, others = os.urandom(32), os.urandom(32)

    def ref(owner: str, digest: bytes, named: bytes | None = None) -> pb.AttachmentRef:
        return pb.AttachmentRef(
            uri=f"chapar://{owner}/documents/sha256/{digest.hex()}",
            sha256=named if named is not None else digest,
            size=10,
            media_type="application/pdf",
            file_name="x.pdf",
        )

    envelope = _signed_letter(
        cluster,
        attachments=(
            ref(AGENCY_C, own),  # C's own document
            ref(AGENCY_B, others),  # B's own store: not C's to give
            ref(AGENCY_C, own, named=others),  # address and digest differ
        ),
    )
    shams = format_shams(pb.EnvelopeHeader.FromString(envelope.header).shams)
    frame = pb.ConnectRequest(envelopes=pb.EnvelopeBatch(envelopes=[envelope]))
    answer = await _send_frames_as_c(cluster, frame, "relay_results")
    assert isinstance(answer, pb.ConnectResponse), answer
    (result,) = answer.relay_results.evidence
    content = pb.EvidenceContent.FromString(result.content)
    assert (content.event, content.reason) == (
        pb.EvidenceEvent.EVIDENCE_EVENT_RELAY_REJECTION,
        "DOCUMENT_NOT_OWNED",
    )
    b_db = cluster.root / f"node-{AGENCY_B}" / "node.db"
    assert not db_count(b_db, "SELECT count(*) FROM inbox WHERE shams = ?", (shams,))
    assert not _rows(b_db, "SELECT sha256 FROM letter_documents WHERE shams = ?", (shams,))


def _rows(path: Path, sql: str, params: tuple[object, ...]) -> list[object]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [r[0] for r in conn.execute(sql, params)]
    finally:
        conn.close()


async def test_a_letter_sent_again_after_aging_out_of_the_window_stays_accepted(
    cluster: Cluster,
) -> None:
    """The hub accepted a letter and the answer was lost (a broken stream); by the time the
    node sends it again it is older than the hub's window (seven days by default). It is
    the letter already queued: the hub answers with its RELAY_ACCEPTANCE again, not with a
    RELAY_REJECTION that would contradict the evidence it signed."""
    nearly_too_old = dt.datetime.now(dt.UTC) - dt.timedelta(days=7) + dt.timedelta(seconds=2)
    created = timestamp_pb2.Timestamp()
    created.FromDatetime(nearly_too_old)
    frame = pb.ConnectRequest(
        envelopes=pb.EnvelopeBatch(envelopes=[_signed_letter(cluster, create_time=created)])
    )
    first = await _send_frames_as_c(cluster, frame, "relay_results")
    assert isinstance(first, pb.ConnectResponse), first
    (accepted,) = first.relay_results.evidence
    event = pb.EvidenceContent.FromString(accepted.content).event
    assert event == pb.EvidenceEvent.EVIDENCE_EVENT_RELAY_ACCEPTANCE
    await asyncio.sleep(3)  # now out of the window: a new letter this old is rejected
    again = await _send_frames_as_c(cluster, frame, "relay_results")
    assert isinstance(again, pb.ConnectResponse), again
    assert [e.SerializeToString() for e in again.relay_results.evidence] == [
        accepted.SerializeToString()
    ]
    other = _signed_letter(cluster, create_time=created)  # another letter as old
    answer = await _send_frames_as_c(
        cluster, pb.ConnectRequest(envelopes=pb.EnvelopeBatch(envelopes=[other])), "relay_results"
    )
    assert isinstance(answer, pb.ConnectResponse), answer
    (rejection,) = answer.relay_results.evidence
    content = pb.EvidenceContent.FromString(rejection.content)
    assert content.event == pb.EvidenceEvent.EVIDENCE_EVENT_RELAY_REJECTION
    assert content.reason == "CREATE_TIME_OUT_OF_WINDOW"


@pytest.mark.parametrize(
    "times",
    [
        {"create_time": _ts(2**62)},
        {"create_time": _ts(0, -5)},
        {"expire_time": _ts(2**62)},
        {"expire_time": _ts(4_102_444_800, 2_000_000_000)},
    ],
    ids=["create-seconds", "create-nanos", "expire-seconds", "expire-nanos"],
)
async def test_signed_letter_with_out_of_range_timestamp_gets_relay_rejection(
    cluster: Cluster, times: dict[str, timestamp_pb2.Timestamp]
) -> None:
    letters = _hub_letters(cluster)
    before = await _rejections(cluster.hub)
    frame = pb.ConnectRequest(
        envelopes=pb.EnvelopeBatch(envelopes=[_signed_letter(cluster, **times)])
    )
    answer = await _send_frames_as_c(cluster, frame, "relay_results")
    assert isinstance(answer, pb.ConnectResponse), answer
    (evidence,) = answer.relay_results.evidence
    content = pb.EvidenceContent.FromString(evidence.content)
    assert content.event == pb.EvidenceEvent.EVIDENCE_EVENT_RELAY_REJECTION, content
    assert content.reason == "INVALID_TIME", content
    assert _hub_letters(cluster) == letters
    after = await _rejections(cluster.hub)
    key = ("INVALID_ARGUMENT", "INVALID_TIME")
    assert after.get(key, 0.0) - before.get(key, 0.0) == 1


# -- 2c. fuzzed Connect frames --------------------------------------------------------------

_INT32 = st.integers(-(2**31), 2**31 - 1)
_INT64 = st.integers(-(2**63), 2**63 - 1)
_CODES = st.one_of(
    st.sampled_from([AGENCY_C, AGENCY_C, AGENCY_B, AGENCY_A, "NOPE.99", "", AGENCY_C.lower()]),
    st.text(max_size=20),
)
_TIMESTAMPS = st.one_of(
    st.none(),
    st.builds(
        _ts,
        st.one_of(
            st.sampled_from(
                [0, 1, -1, 4_102_444_800, 253_402_300_799, 253_402_300_800, -62_135_596_801]
            ),
            _INT64,
        ),
        st.sampled_from([0, 999_999_999, 1_000_000_000, -1]),
    ),
)
_SHAMS = st.builds(
    pb.Shams,
    origin=_CODES,
    domain=st.one_of(st.sampled_from([1, 2, 0]), _INT32),
    year=st.one_of(st.just(2026), _INT32),
    sequence=st.one_of(st.sampled_from([1, 42]), _INT64),
)
_ADDRESSES = st.lists(st.builds(pb.Address, agency=_CODES, mailbox=st.text(max_size=8)), max_size=3)


@dataclass(frozen=True)
class Sig:
    """How to sign an item: ``c-signs`` is a real signature of the connected node."""

    mode: str
    algorithm: int
    key_id: bytes
    value: bytes

    def make(self, cluster: Cluster, payload_type: str, payload: bytes) -> pb.Signature:
        if self.mode == "c-signs":
            return _c_signer(cluster).sign(payload_type, payload)
        key = {
            "random": self.key_id,
            "c-key": _c_signer(cluster).key_id,
            "a-key": _signer(cluster.pki.agency_dir(AGENCY_A)).key_id,
        }[self.mode]
        return pb.Signature(algorithm=self.algorithm, key_id=key, value=self.value)


_SIGS = st.builds(
    Sig,
    mode=st.sampled_from(["c-signs", "random", "c-key", "a-key"]),
    algorithm=st.one_of(st.sampled_from([1, 2, 0]), _INT32),
    key_id=st.binary(max_size=40),
    value=st.binary(max_size=80),
)


def _with_time(message: object, name: str, value: timestamp_pb2.Timestamp | None) -> None:
    if value is not None:
        getattr(message, name).CopyFrom(value)


_C_SIGNS = Sig("c-signs", 0, b"", b"")
_VALID_SHAMS = st.builds(
    pb.Shams,
    origin=st.just(AGENCY_C),
    domain=st.just(pb.ShamsDomain.SHAMS_DOMAIN_OUTGOING),
    year=st.just(2026),
    sequence=st.integers(1, 2**63 - 1),
)


@st.composite
def _plausible_letters(draw: st.DrawFn) -> tuple[bytes, bytes, Sig]:
    """Signed by C, from C, body digest right: gets past the signature checks to the hub's
    checks of number, recipients and times. Its create_time is never "now", so the hub
    cannot accept it."""
    body = draw(st.binary(max_size=48))
    h = pb.EnvelopeHeader(
        shams=draw(st.one_of(_VALID_SHAMS, _SHAMS)),
        sender=pb.Address(agency=AGENCY_C),
        recipients=draw(st.one_of(st.just([pb.Address(agency=AGENCY_B)]), _ADDRESSES)),
        subject=draw(st.text(max_size=30)),
        kind=draw(_INT32),
        priority=draw(_INT32),
        body_sha256=sha256(body),
        body_size=len(body),
    )
    _with_time(h, "create_time", draw(_TIMESTAMPS))
    _with_time(h, "expire_time", draw(_TIMESTAMPS))
    return h.SerializeToString(), body, _C_SIGNS


@st.composite
def _plausible_receipts(draw: st.DrawFn) -> tuple[bytes, bytes, Sig]:
    """Signed by C as issuer and recipient, about any number (valid or not)."""
    c = pb.EvidenceContent(
        evidence_id=str(uuid.UUID(int=draw(st.integers(0, 2**128 - 1)))),
        event=draw(st.sampled_from([6, 7, 8])),
        issuer=f"urn:chapar:agency:{AGENCY_C}",
        recipient=AGENCY_C,
        envelope_sha256=draw(st.binary(max_size=32)),
    )
    if draw(st.booleans()):
        c.shams.CopyFrom(draw(st.one_of(_VALID_SHAMS, _SHAMS)))
    return c.SerializeToString(), b"", _C_SIGNS


@st.composite
def _random_letters(draw: st.DrawFn) -> tuple[bytes, bytes, Sig]:
    body = draw(st.binary(max_size=48))
    if draw(st.booleans()):
        header = draw(st.binary(max_size=160))
    else:
        h = pb.EnvelopeHeader(
            shams=draw(_SHAMS),
            sender=pb.Address(agency=draw(_CODES)),
            recipients=draw(_ADDRESSES),
            subject=draw(st.text(max_size=30)),
            kind=draw(_INT32),
            priority=draw(_INT32),
            content_type=draw(st.text(max_size=12)),
        )
        if draw(st.booleans()):
            h.in_reply_to.CopyFrom(draw(_SHAMS))
        # Never "now": with a create_time inside the hub's window a letter could be stored.
        _with_time(h, "create_time", draw(_TIMESTAMPS))
        _with_time(h, "expire_time", draw(_TIMESTAMPS))
        if draw(st.booleans()):
            h.body_sha256, h.body_size = sha256(body), len(body)
        else:
            h.body_sha256, h.body_size = draw(st.binary(max_size=40)), draw(_INT64)
        header = h.SerializeToString()
    return header, body, draw(_SIGS)


@st.composite
def _random_evidence(draw: st.DrawFn) -> tuple[bytes, bytes, Sig]:
    if draw(st.booleans()):
        content = draw(st.binary(max_size=160))
    else:
        c = pb.EvidenceContent(
            evidence_id=draw(st.text(max_size=36)),
            event=draw(st.one_of(st.sampled_from([6, 7, 8, 3]), _INT32)),
            issuer=draw(
                st.one_of(
                    st.sampled_from(
                        [f"urn:chapar:agency:{AGENCY_C}", f"urn:chapar:agency:{AGENCY_A}"]
                    ),
                    st.text(max_size=30),
                )
            ),
            envelope_sha256=draw(st.binary(max_size=40)),
            recipient=draw(_CODES),
            reason=draw(st.text(max_size=10)),
            detail=draw(st.text(max_size=10)),
        )
        if draw(st.booleans()):
            c.shams.CopyFrom(draw(_SHAMS))
        _with_time(c, "event_time", draw(_TIMESTAMPS))
        content = c.SerializeToString()
    return content, b"", draw(_SIGS)


@dataclass(frozen=True)
class Frame:
    kind: str  # raw | envelopes | receipts | hello | acks
    raw: bytes = b""
    items: tuple[tuple[bytes, bytes, Sig], ...] = ()
    text: str = ""
    number: int = 0
    ids: tuple[str, ...] = ()

    def encode(self, cluster: Cluster) -> bytes:
        if self.kind == "raw":
            return self.raw
        if self.kind == "envelopes":
            envelopes = [
                pb.Envelope(header=h, body=b, signature=s.make(cluster, ENVELOPE_PAYLOAD_TYPE, h))
                for h, b, s in self.items
            ]
            request = pb.ConnectRequest(envelopes=pb.EnvelopeBatch(envelopes=envelopes))
        elif self.kind == "receipts":
            evidence = [
                pb.Evidence(content=c, signature=s.make(cluster, EVIDENCE_PAYLOAD_TYPE, c))
                for c, _, s in self.items
            ]
            request = pb.ConnectRequest(receipts=pb.EvidenceBatch(evidence=evidence))
        elif self.kind == "hello":
            request = pb.ConnectRequest(
                hello=pb.ConnectHello(software_version=self.text, directory_version=self.number)
            )
        else:
            request = pb.ConnectRequest(
                evidence_acks=pb.EvidenceAckBatch(evidence_ids=list(self.ids))
            )
        return request.SerializeToString()


_FRAMES = st.one_of(
    st.builds(Frame, kind=st.just("raw"), raw=st.binary(max_size=200)),
    st.builds(
        Frame,
        kind=st.just("envelopes"),
        items=st.lists(st.one_of(_random_letters(), _plausible_letters()), max_size=3).map(tuple),
    ),
    st.builds(
        Frame,
        kind=st.just("receipts"),
        items=st.lists(st.one_of(_random_evidence(), _plausible_receipts()), max_size=3).map(tuple),
    ),
    st.builds(Frame, kind=st.just("hello"), text=st.text(max_size=20), number=_INT64),
    st.builds(
        Frame, kind=st.just("acks"), ids=st.lists(st.text(max_size=36), max_size=3).map(tuple)
    ),
)


def _expected(raw: bytes) -> tuple[str, int]:
    """What the hub must answer to ``raw``: parsed here exactly as the hub parses it."""
    try:
        request = pb.ConnectRequest.FromString(raw)
    except DecodeError:
        return "malformed", 0
    kind = request.WhichOneof("frame")
    if kind == "envelopes":
        return "relay_results", len(request.envelopes.envelopes)
    if kind == "receipts":
        return "receipt_acks", len(request.receipts.evidence)
    return "nothing", 0


async def _fuzz_stream(cluster: Cluster, frames: list[Frame]) -> None:
    async with _hub_channel_as_c(cluster) as channel:
        call = await _open_connect(channel)
        try:
            for frame in [*frames, Frame("receipts")]:  # the last one probes the stream
                raw = frame.encode(cluster)
                expected, count = _expected(raw)
                try:
                    await call.write(raw)
                    if expected == "nothing":
                        continue
                    answer = await _answer(call, None if expected == "malformed" else expected)
                except grpc.aio.AioRpcError as err:
                    refusal = _refusal(err)
                    if expected == "malformed":
                        assert (refusal.code, refusal.reason) == (INVALID, "MALFORMED_MESSAGE")
                    _assert_hub_status_allowed(refusal)
                    return
                if expected == "relay_results":
                    results = answer.relay_results.evidence
                    assert len(results) == count, answer
                    for evidence in results:
                        content = pb.EvidenceContent.FromString(evidence.content)
                        assert content.event == pb.EvidenceEvent.EVIDENCE_EVENT_RELAY_REJECTION
                        assert content.reason
                else:
                    assert len(answer.receipt_acks.evidence_ids) <= count
        finally:
            call.cancel()


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(frames=st.lists(_FRAMES, min_size=1, max_size=4))
def test_fuzzed_connect_frames_are_rejected_with_a_reason_and_nothing_is_stored(
    cluster: Cluster, frames: list[Frame]
) -> None:
    letters = _hub_letters(cluster)
    asyncio.run(_fuzz_stream(cluster, frames))
    assert _hub_letters(cluster) == letters
    assert cluster.hub.running


async def test_hub_keeps_serving_after_bad_frames(cluster: Cluster) -> None:
    assert cluster.hub.running
    await _still_serving(cluster, "bad Connect frames")


# -- size limits on a dedicated small cluster -----------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Hub max_frame_bytes and node A's [limits] max_message_bytes both 64 KiB; each node's
    back-end client "phong" is limited to the mailbox MAILBOX_VIET."""
    root = tmp_path_factory.mktemp("small-limits")
    started = asyncio.run(
        Cluster.start(
            root,
            [AGENCY_A, AGENCY_B, AGENCY_C],
            without_node=[AGENCY_C],
            hub_settings=f"max_frame_bytes = {SMALL}",
            node_settings=f'[[clients]]\nname = "phong"\nmailboxes = [{json.dumps(MAILBOX_VIET)}]',
        )
    )
    try:
        node = started.nodes[AGENCY_A]
        with node.config.open("a") as config:
            config.write(f"\n[limits]\nmax_message_bytes = {SMALL}\n")
        asyncio.run(node.restart())
        yield started
    finally:
        codes = started.stop()
        assert all(code == 0 for code in codes.values()), codes


async def test_message_over_node_limit_is_message_too_large(small: Cluster) -> None:
    raw = _request(body=b"\0" * SMALL).SerializeToString()
    assert len(raw) > SMALL
    refusal = await _assert_refused_on_node(
        small,
        AGENCY_A,
        lambda: _raw_unary(small, AGENCY_A, SUBMIT, raw),
        EXHAUSTED,
        "MESSAGE_TOO_LARGE",
    )
    assert refusal.metadata == {"limit": str(SMALL), "size": str(len(raw))}

    async def sdk_send() -> None:
        async with ExchangeClient(small.nodes[AGENCY_A].address, small.credentials(AGENCY_A)) as a:
            with pytest.raises(ResourceExhausted) as err:
                await a.send(to=[AGENCY_B], subject="too big", body=b"\1" * (SMALL + 1))
            raise err.value

    await _assert_refused_on_node(small, AGENCY_A, sdk_send, EXHAUSTED, "MESSAGE_TOO_LARGE")

    frame = pb.StreamSubmitEnvelopesRequest(requests=[_request(body=b"\2" * SMALL)])
    await _assert_refused_on_node(
        small, AGENCY_A, lambda: _stream_one_frame(small, frame), EXHAUSTED, "MESSAGE_TOO_LARGE"
    )


async def test_connect_frame_over_hub_limit_is_message_too_large(small: Cluster) -> None:
    frame = pb.ConnectRequest(hello=pb.ConnectHello(software_version="v" * SMALL))
    raw = frame.SerializeToString()
    refusal = await _hub_refuses_frame(small, raw, EXHAUSTED, "MESSAGE_TOO_LARGE")
    assert refusal.metadata == {"limit": str(SMALL), "size": str(len(raw))}


async def test_client_limited_to_a_mailbox_reads_its_inbox_by_the_decomposed_name(
    small: Cluster,
) -> None:
    """A client limited to "Phòng văn thư" that asks for the inbox of that mailbox spelt
    decomposed gets its letters (it used to be refused: PERMISSION_DENIED /
    MAILBOX_NOT_ALLOWED, the name compared before NFC)."""
    async with (
        ExchangeClient(small.nodes[AGENCY_A].address, small.credentials(AGENCY_A)) as a,
        ExchangeClient(
            small.nodes[AGENCY_B].address, client_credentials(small, AGENCY_B, "phong")
        ) as phong,
    ):
        receipt = await a.send(to=[(AGENCY_B, MAILBOX_VIET_NFD)], subject="NFC inbox", body="x")
        letter = await _delivered(phong, receipt.shams, timeout=20, mailbox=MAILBOX_VIET_NFD)
    (recipient,) = letter.header.recipients  # type: ignore[attr-defined]
    assert recipient.mailbox == MAILBOX_VIET


async def test_small_cluster_keeps_serving(small: Cluster) -> None:
    assert small.hub.running
    assert small.nodes[AGENCY_A].running
    await _still_serving(small, "oversized messages and frames")
