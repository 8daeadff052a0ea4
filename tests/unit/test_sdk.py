"""The client SDK against an in-process fake node: mapping, errors, streams, verification."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import fcntl
import json
import os
import queue
import re
import shutil
import signal
import string
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

import client_sdk
from client_sdk import (
    Attachment,
    ChaparError,
    Credentials,
    Draft,
    ExchangeClient,
    Receipt,
    SyncExchangeClient,
    Tracking,
    errors,
    format_shams,
    format_shams_checked,
    parse_shams,
    parse_shams_typed,
    pb,
)
from client_sdk._pb.chapar.exchange.v1.document_service_pb2_grpc import (
    add_DocumentServiceServicer_to_server,
)
from client_sdk.client import STREAM_FRAME_BYTES, partial_path
from client_sdk.identity import is_agency_code
from client_sdk.signing import ENVELOPE_PAYLOAD_TYPE, EVIDENCE_PAYLOAD_TYPE, Signer, key_id, sha256
from client_sdk.trust import TrustStore, VerificationError
from node import cli_client

SENDER = "000.00.00.G22"
OTHER = "000.00.00.G01"
THIRD = "MOFA.IR"  # neither sends nor receives the letters of these tests


# --- a fake node --------------------------------------------------------------------------


def rich_metadata(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    metadata: dict[str, str] | None = None,
    *,
    retry_seconds: float | None = None,
    violations: tuple[tuple[str, str], ...] = (),
) -> tuple[tuple[str, bytes], ...]:
    """Trailing metadata as the node writes it: google.rpc.Status with ErrorInfo etc."""
    details = []
    info = error_details_pb2.ErrorInfo(
        domain=errors.ERROR_DOMAIN, reason=reason, metadata=metadata or {}
    )
    packed = any_pb2.Any()
    packed.Pack(info)
    details.append(packed)
    if violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                for f, d in violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad)
        details.append(packed)
    if retry_seconds is not None:
        delay = duration_pb2.Duration()
        delay.FromTimedelta(dt.timedelta(seconds=retry_seconds))
        packed = any_pb2.Any()
        packed.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(packed)
    status = status_pb2.Status(code=code.value[0], message=message, details=details)
    return (("grpc-status-details-bin", status.SerializeToString()),)


@dataclass
class Abort:
    code: grpc.StatusCode
    message: str
    trailing: tuple[tuple[str, bytes], ...] = ()


def shams_of(sequence: int) -> pb.Shams:
    return pb.Shams(
        origin=SENDER, domain=pb.ShamsDomain.SHAMS_DOMAIN_OUTGOING, year=2026, sequence=sequence
    )


class FakeNode(pb.NodeServiceServicer):
    """Records requests and answers like a node, numbering letters 1, 2, 3 ..."""

    def __init__(self) -> None:
        self.submits: list[pb.SubmitEnvelopeRequest] = []
        self.batches: list[pb.BatchSubmitEnvelopesRequest] = []
        self.frames: list[pb.StreamSubmitEnvelopesRequest] = []
        self.acks: list[pb.AckEnvelopeRequest] = []
        self.ack_batches: list[int] = []
        self.ack_gate: asyncio.Event | None = None  # when set, ack calls wait for it
        self.ack_called = asyncio.Event()  # set by each acknowledgement batch
        self.ack_stream = True  # False: StreamAckEnvelopes is UNIMPLEMENTED (an older node)
        self.ack_stream_calls = 0  # acknowledgement streams asked for
        self.ack_streams_ended = 0  # ... and ended by the client, every batch answered
        self.unary_ack_calls = 0  # BatchAckEnvelopes calls
        self.break_ack_stream = False  # the next acknowledgement batch ends its stream
        # The next acknowledgement stream ends before answering, its status lost as grpc
        # sometimes reports a refusal that races the first write (grpc/grpc#36066).
        self.lose_ack_stream_status = False
        self.inbox_requests: list[pb.StreamInboxRequest] = []
        self.inbox_batches: list[list[pb.InboxLetter]] = []
        self.inbox_ends = False  # the inbox stream ends (OK) after its batches: a node stopping
        self.inbox_opened = asyncio.Event()  # set by each inbox stream
        self.get_response = pb.GetEnvelopeResponse()
        self.tree_response = pb.TrackCorrespondenceResponse()
        self.directory = pb.ListAgenciesResponse(
            agencies=[pb.Agency(code=OTHER, display_name="Ministry", state=pb.AGENCY_STATE_ACTIVE)],
            directory_version=3,
        )
        self.abort: Abort | None = None
        self.break_stream_at: int | None = None  # a submission stream fails on this frame
        self.end_stream_at: int | None = None  # ... or ends (OK, unanswered), as a node stopping
        self.sequence = 0

    def receipt(self, request: pb.SubmitEnvelopeRequest) -> pb.Receipt:
        self.sequence += 1
        shams = shams_of(self.sequence)
        content = pb.EvidenceContent(
            evidence_id=str(uuid.uuid4()),
            event=pb.EvidenceEvent.EVIDENCE_EVENT_SUBMISSION_ACCEPTANCE,
            issuer=f"urn:chapar:agency:{SENDER}",
            shams=shams,
            envelope_sha256=sha256(request.SerializeToString()),
            detail=request.request_id,
        )
        return pb.Receipt(
            shams=shams,
            shams_text=format_shams(shams),
            envelope_sha256=content.envelope_sha256,
            evidence=pb.Evidence(content=content.SerializeToString()),
        )

    def result(self, request: pb.SubmitEnvelopeRequest) -> pb.SubmitResult:
        if request.draft.subject == "bad":
            return pb.SubmitResult(
                request_id=request.request_id,
                error=pb.SubmitError(
                    code=grpc.StatusCode.NOT_FOUND.value[0],
                    reason="UNKNOWN_RECIPIENT",
                    message="no such agency",
                    metadata={"agency": request.draft.recipients[0].agency},
                ),
            )
        return pb.SubmitResult(request_id=request.request_id, receipt=self.receipt(request))

    async def _maybe_abort(self, context: Any) -> None:
        if self.abort is not None:
            await context.abort(
                self.abort.code, self.abort.message, trailing_metadata=self.abort.trailing
            )

    async def SubmitEnvelope(
        self, request: pb.SubmitEnvelopeRequest, context: Any
    ) -> pb.SubmitEnvelopeResponse:
        await self._maybe_abort(context)
        self.submits.append(request)
        return pb.SubmitEnvelopeResponse(receipt=self.receipt(request))

    async def BatchSubmitEnvelopes(
        self, request: pb.BatchSubmitEnvelopesRequest, context: Any
    ) -> pb.BatchSubmitEnvelopesResponse:
        await self._maybe_abort(context)
        self.batches.append(request)
        return pb.BatchSubmitEnvelopesResponse(results=[self.result(r) for r in request.requests])

    async def StreamSubmitEnvelopes(
        self, request_iterator: AsyncIterator[pb.StreamSubmitEnvelopesRequest], context: Any
    ) -> AsyncIterator[pb.StreamSubmitEnvelopesResponse]:
        async for frame in request_iterator:
            self.frames.append(frame)
            if self.break_stream_at is not None and len(self.frames) == self.break_stream_at:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "node restarting")
            if self.end_stream_at is not None and len(self.frames) == self.end_stream_at:
                return
            yield pb.StreamSubmitEnvelopesResponse(results=[self.result(r) for r in frame.requests])

    async def StreamInbox(
        self, request: pb.StreamInboxRequest, context: Any
    ) -> AsyncIterator[pb.StreamInboxResponse]:
        self.inbox_requests.append(request)
        self.inbox_opened.set()
        for batch in self.inbox_batches:
            yield pb.StreamInboxResponse(letters=batch)
        if not self.inbox_ends:
            await asyncio.Event().wait()  # like a real node: the stream stays open

    async def AckEnvelope(
        self, request: pb.AckEnvelopeRequest, context: Any
    ) -> pb.AckEnvelopeResponse:
        self.acks.append(request)
        content = pb.EvidenceContent(
            evidence_id="handover-1",
            event=pb.EvidenceEvent.EVIDENCE_EVENT_HANDOVER,
            shams=request.shams,
        )
        return pb.AckEnvelopeResponse(evidence=pb.Evidence(content=content.SerializeToString()))

    async def _ack_results(self, numbers: Sequence[pb.Shams], context: Any) -> list[pb.AckResult]:
        self.ack_batches.append(len(numbers))
        self.ack_called.set()
        if self.ack_gate is not None:
            await self.ack_gate.wait()
        results = []
        for shams in numbers:
            one = await self.AckEnvelope(pb.AckEnvelopeRequest(shams=shams), context)
            results.append(pb.AckResult(evidence=one.evidence))
        return results

    async def BatchAckEnvelopes(
        self, request: pb.BatchAckEnvelopesRequest, context: Any
    ) -> pb.BatchAckEnvelopesResponse:
        self.unary_ack_calls += 1
        return pb.BatchAckEnvelopesResponse(results=await self._ack_results(request.shams, context))

    async def StreamAckEnvelopes(
        self, request_iterator: AsyncIterator[pb.StreamAckEnvelopesRequest], context: Any
    ) -> AsyncIterator[pb.StreamAckEnvelopesResponse]:
        self.ack_stream_calls += 1
        if not self.ack_stream:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        if self.lose_ack_stream_status:
            self.lose_ack_stream_status = False
            await context.abort(grpc.StatusCode.INTERNAL, "Internal error from Core")
        # Like a real node: frames are handled concurrently and answered in order.
        answers: asyncio.Queue[asyncio.Task[list[pb.AckResult]] | str | None] = asyncio.Queue()

        async def read() -> None:
            async for frame in request_iterator:
                if self.break_ack_stream:
                    self.break_ack_stream = False
                    self.ack_batches.append(len(frame.shams))
                    await answers.put("break")
                    return
                await answers.put(asyncio.create_task(self._ack_results(frame.shams, context)))
            await answers.put(None)

        reader = asyncio.create_task(read())
        while (answer := await answers.get()) is not None:
            if answer == "break":
                await context.abort(grpc.StatusCode.UNAVAILABLE, "node restarting")
            assert not isinstance(answer, str)
            yield pb.StreamAckEnvelopesResponse(results=await answer)
        await reader
        self.ack_streams_ended += 1

    async def GetEnvelope(
        self, request: pb.GetEnvelopeRequest, context: Any
    ) -> pb.GetEnvelopeResponse:
        await self._maybe_abort(context)
        return self.get_response

    async def TrackCorrespondence(
        self, request: pb.TrackCorrespondenceRequest, context: Any
    ) -> pb.TrackCorrespondenceResponse:
        await self._maybe_abort(context)
        return self.tree_response

    async def ListAgencies(
        self, request: pb.ListAgenciesRequest, context: Any
    ) -> pb.ListAgenciesResponse:
        return self.directory


@pytest.fixture
async def fake_node() -> AsyncIterator[tuple[FakeNode, str]]:
    fake = FakeNode()
    server = grpc.aio.server()
    pb.add_NodeServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield fake, f"127.0.0.1:{port}"
    await server.stop(None)


@pytest.fixture
async def client(fake_node: tuple[FakeNode, str]) -> AsyncIterator[ExchangeClient]:
    channel = grpc.aio.insecure_channel(fake_node[1])
    yield ExchangeClient.from_channel(channel)
    await channel.close()


# --- a small PKI ----------------------------------------------------------------------------


@dataclass
class Pki:
    root: x509.Certificate
    intermediate: x509.Certificate
    signer: Signer
    dir: Path
    recipient_signer: Signer  # OTHER's: its node signs DELIVERY and HANDOVER
    third_signer: Signer  # THIRD's: a party to none of the letters

    @property
    def signing_certificates(self) -> list[x509.Certificate]:
        return [
            self.signer.certificate,
            self.recipient_signer.certificate,
            self.third_signer.certificate,
        ]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(
    subject: str,
    public_key: Any,
    issuer: tuple[x509.Certificate, Any] | None,
    issuer_key: Any,
    *,
    ca: bool = False,
    signing: bool = False,
    tls: bool = False,
    uri: str | None = None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer[0].subject if issuer else _name(subject))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=signing,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    sans: list[x509.GeneralName] = []
    if uri:
        sans.append(x509.UniformResourceIdentifier(uri))
    if tls:
        sans.append(x509.DNSName("localhost"))
        builder = builder.add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _key_pem(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Root, intermediate, SENDER's signing key, TLS for a node, a back-end client cert."""
    directory = tmp_path_factory.mktemp("pki")
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _issue("Root", root_key.public_key(), None, root_key, ca=True)
    inter_key = ec.generate_private_key(ec.SECP256R1())
    inter = _issue("Inter", inter_key.public_key(), (root, root_key), root_key, ca=True)

    def signer(label: str, agency: str) -> Signer:
        key = ed25519.Ed25519PrivateKey.generate()
        cert = _issue(
            label,
            key.public_key(),
            (inter, inter_key),
            inter_key,
            signing=True,
            uri=f"urn:chapar:agency:{agency}",
        )
        return Signer(key, cert)

    (directory / "ca").mkdir()
    (directory / "ca" / "root.crt").write_bytes(_pem(root))
    (directory / "ca" / "intermediate.crt").write_bytes(_pem(inter))
    for stem, uri in (("tls", f"urn:chapar:agency:{SENDER}"), ("client", None)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(
            stem,
            key.public_key(),
            (inter, inter_key),
            inter_key,
            tls=True,
            uri=uri or f"urn:chapar:client:{SENDER}:backend",
        )
        folder = directory / "agencies" / SENDER
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{stem}.crt").write_bytes(_pem(cert, inter))
        (folder / f"{stem}.key").write_bytes(_key_pem(key))
    return Pki(
        root,
        inter,
        signer("sign", SENDER),
        directory,
        signer("sign-other", OTHER),
        signer("sign-third", THIRD),
    )


def signed_letter(pki: Pki, sequence: int, subject: str = "Budget 2026") -> pb.Envelope:
    body = f"Dear colleagues,\nletter {sequence}".encode()
    header = pb.EnvelopeHeader(
        shams=shams_of(sequence),
        sender=pb.Address(agency=SENDER),
        recipients=[pb.Address(agency=OTHER, mailbox="desk")],
        subject=subject,
        kind=pb.LetterKind.LETTER_KIND_REPLY,
        in_reply_to=pb.Shams(
            origin=OTHER, domain=pb.ShamsDomain.SHAMS_DOMAIN_OUTGOING, year=2025, sequence=7
        ),
        content_type="text/plain; charset=utf-8",
        body_sha256=sha256(body),
        body_size=len(body),
    )
    header.create_time.FromDatetime(dt.datetime.now(dt.UTC))
    header_bytes = header.SerializeToString()
    signature = pki.signer.sign(ENVELOPE_PAYLOAD_TYPE, header_bytes)
    return pb.Envelope(header=header_bytes, signature=signature, body=body)


def signed_evidence(
    pki: Pki,
    envelope: pb.Envelope,
    event: pb.EvidenceEvent.ValueType,
    recipient: str = OTHER,
    *,
    by_sender: bool | None = None,
) -> pb.Evidence:
    """Evidence as its issuer signs it: a submission by the sender's node, the rest by the
    recipient's (``by_sender`` overrides, for forgeries)."""
    if by_sender is None:
        by_sender = event == pb.EvidenceEvent.EVIDENCE_EVENT_SUBMISSION_ACCEPTANCE
    signer, issuer = (pki.signer, SENDER) if by_sender else (pki.recipient_signer, OTHER)
    header = pb.EnvelopeHeader.FromString(envelope.header)
    content = pb.EvidenceContent(
        evidence_id=str(uuid.uuid4()),
        event=event,
        issuer=f"urn:chapar:agency:{issuer}",
        shams=header.shams,
        envelope_sha256=sha256(envelope.header),
        recipient=recipient
        if event != pb.EvidenceEvent.EVIDENCE_EVENT_SUBMISSION_ACCEPTANCE
        else "",
    )
    content.event_time.FromDatetime(dt.datetime.now(dt.UTC))
    data = content.SerializeToString()
    return pb.Evidence(content=data, signature=signer.sign(EVIDENCE_PAYLOAD_TYPE, data))


def inbox_letter(pki: Pki, sequence: int, subject: str = "Budget 2026") -> pb.InboxLetter:
    """A letter as the inbox stream brings it: signed, with its DELIVERY evidence."""
    envelope = signed_letter(pki, sequence, subject)
    return pb.InboxLetter(
        envelope=envelope,
        shams=shams_of(sequence),
        delivery=signed_evidence(pki, envelope, pb.EvidenceEvent.EVIDENCE_EVENT_DELIVERY),
    )


def get_response(pki: Pki, envelope: pb.Envelope) -> pb.GetEnvelopeResponse:
    return pb.GetEnvelopeResponse(
        envelope=envelope,
        direction=pb.LetterDirection.LETTER_DIRECTION_OUTGOING,
        evidence=[
            signed_evidence(pki, envelope, pb.EvidenceEvent.EVIDENCE_EVENT_SUBMISSION_ACCEPTANCE),
            signed_evidence(pki, envelope, pb.EvidenceEvent.EVIDENCE_EVENT_DELIVERY),
        ],
        certificates=[c.public_bytes(serialization.Encoding.DER) for c in pki.signing_certificates],
        statuses=[
            pb.RecipientStatus(agency=OTHER, state=pb.DeliveryState.DELIVERY_STATE_DELIVERED)
        ],
    )


# --- SHAMS ----------------------------------------------------------------------------------


@given(
    origin=st.from_regex(r"[A-Z0-9.\-]{2,64}", fullmatch=True).filter(is_agency_code),
    domain=st.sampled_from(
        [pb.ShamsDomain.SHAMS_DOMAIN_OUTGOING, pb.ShamsDomain.SHAMS_DOMAIN_INTERNAL]
    ),
    year=st.integers(1, 9999),
    sequence=st.integers(1, 2**63 - 1),
)
def test_shams_text_round_trips(origin: str, domain: Any, year: int, sequence: int) -> None:
    shams = pb.Shams(origin=origin, domain=domain, year=year, sequence=sequence)
    text = format_shams(shams)
    assert parse_shams(text) == shams
    assert format_shams(parse_shams(text)) == text


def test_format_shams_is_canonical() -> None:
    assert format_shams(shams_of(42)) == "000.00.00.G22/O/2026/0000042"
    big = pb.Shams(
        origin="G22", domain=pb.ShamsDomain.SHAMS_DOMAIN_INTERNAL, year=1404, sequence=123456789
    )
    assert format_shams(big) == "G22/I/1404/123456789"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "G22/O/2026",
        "G22/O/2026/0000042/1",
        "g22/O/2026/0000042",
        "G/O/2026/0000042",
        "G22/X/2026/0000042",
        "G22/o/2026/0000042",
        "G22/O/26/0000042",
        "G22/O/0000/0000042",
        "G22/O/\uff12\uff10\uff12\uff16/0000042",
        "G22/O/2026/42",
        "G22/O/2026/00000042",
        "G22/O/2026/0000000",
        "G22/O/2026/-000042",
        "G22/O/2026/99999999999999999999",
        "G22/O/2026/0000042\n",
        " G22/O/2026/0000042",
    ],
)
def test_parse_shams_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError, match="invalid SHAMS number"):
        parse_shams(text)


def test_format_shams_rejects_invalid_numbers() -> None:
    with pytest.raises(ValueError, match="domain"):
        format_shams(pb.Shams(origin="G22", year=2026, sequence=1))
    with pytest.raises(ValueError, match="sequence"):
        format_shams(shams_of(0))


# --- SHAMS check character (ISO 7064 MOD 37,36) ---------------------------------------------

_ALNUM = string.digits + string.ascii_uppercase  # MOD 37,36's alphabet, in its order
_FORM = _ALNUM + "./-:"  # every character a checked number holds
_SHAMS_NUMBERS = st.builds(
    pb.Shams,
    origin=st.from_regex(r"[A-Z0-9.\-]{2,64}", fullmatch=True).filter(is_agency_code),
    domain=st.sampled_from(
        [pb.ShamsDomain.SHAMS_DOMAIN_OUTGOING, pb.ShamsDomain.SHAMS_DOMAIN_INTERNAL]
    ),
    year=st.integers(1, 9999),
    sequence=st.integers(1, 2**63 - 1),
)


def _mod_37_36(text: str) -> str:
    """ISO 7064 MOD 37,36 as the standard writes it (hybrid system, M = 36): the test's
    own reckoning, checked against the standard's example below, not the library's."""
    product = 36
    for char in text:
        total = (product + _ALNUM.index(char)) % 36 or 36
        product = total * 2 % 37
    return _ALNUM[(37 - product) % 36]


def test_the_reckoning_of_the_tests_gives_the_standards_example() -> None:
    assert _mod_37_36("A12425GABC1234002") == "M"  # ISO 7064, MOD 37,36


def test_the_checked_form_of_the_design_example() -> None:
    assert format_shams_checked(shams_of(42)) == "000.00.00.G22/O/2026/0000042:3"
    assert format_shams_checked("000.00.00.G22/O/2026/0000042") == "000.00.00.G22/O/2026/0000042:3"
    big = pb.Shams(
        origin="G22", domain=pb.ShamsDomain.SHAMS_DOMAIN_INTERNAL, year=1404, sequence=123456789
    )
    assert format_shams_checked(big) == "G22/I/1404/123456789:W"


@given(number=_SHAMS_NUMBERS)
def test_the_check_character_is_mod_37_36_of_the_letters_and_digits(number: pb.Shams) -> None:
    canonical = format_shams(number)
    checked = format_shams_checked(number)
    letters_and_digits = "".join(c for c in canonical if c in _ALNUM)
    assert checked == f"{canonical}:{_mod_37_36(letters_and_digits)}"
    assert parse_shams_typed(checked) == number
    assert parse_shams_typed(canonical) == number


def test_parse_shams_stays_strict_about_the_checked_form() -> None:
    with pytest.raises(ValueError, match="invalid SHAMS number"):
        parse_shams("000.00.00.G22/O/2026/0000042:J")


def test_format_shams_checked_takes_only_valid_numbers() -> None:
    with pytest.raises(ValueError, match="sequence"):
        format_shams_checked(shams_of(0))
    with pytest.raises(ValueError, match="invalid SHAMS number"):
        format_shams_checked("000.00.00.G22/O/2026/0000042:J")


def test_a_wrong_check_character_is_refused_as_probably_mistyped() -> None:
    typed = "000.00.00.G22/O/2026/0000024:3"  # the last two digits swapped
    with pytest.raises(ValueError, match="probably mistyped") as refused:
        parse_shams_typed(typed)
    assert typed in str(refused.value)
    assert ":7" not in str(refused.value)  # the right one (7) is not given away: check the text
    assert parse_shams_typed("000.00.00.G22/O/2026/0000024:7") == shams_of(24)


@pytest.mark.parametrize(
    "text",
    [
        "000.00.00.G22/O/2026/0000042:",
        "000.00.00.G22/O/2026/0000042:j",
        "000.00.00.G22/O/2026/0000042:JJ",
        "000.00.00.G22/O/2026/0000042:*",
        "000.00.00.G22/O/2026/0000042 J",
        "000.00.00.G22/O/2026/42:J",
        ":J",
    ],
)
def test_parse_shams_typed_refuses_a_malformed_number(text: str) -> None:
    with pytest.raises(ValueError, match="invalid SHAMS number"):
        parse_shams_typed(text)


_PUNCTUATION = str.maketrans("", "", ".-")


def _neighbours(a: str, b: str) -> bool:
    """Next to each other in MOD 37,36's alphabet, taken as a circle (0 1, 9 A, Z 0)."""
    return a in _ALNUM and b in _ALNUM and (_ALNUM.index(a) - _ALNUM.index(b)) % 36 in (1, 35)


def test_a_swap_of_two_neighbours_in_the_alphabet_can_go_unseen() -> None:
    """What MOD 37,36 does not promise (the module's docstring says it): two adjacent
    characters that are next to each other in 0-9A-Z, swapped, give the same check
    character at one running value in 36."""
    number = pb.Shams(origin="11", domain=pb.ShamsDomain.SHAMS_DOMAIN_OUTGOING, year=1, sequence=1)
    assert format_shams_checked(number) == "11/O/0001/0000001:1"
    assert parse_shams_typed("11/O/0010/0000001:1").year == 10  # "01" typed "10": unseen
    with pytest.raises(ValueError, match="mistyped"):
        parse_shams_typed("11/O/0001/0000010:1")  # the same swap elsewhere: seen


def _read(typed: str) -> pb.Shams | None:
    try:
        return parse_shams_typed(typed)
    except ValueError:
        return None


@settings(max_examples=40, deadline=None)
@given(number=_SHAMS_NUMBERS)
def test_every_single_typo_of_a_checked_number_is_refused(number: pb.Shams) -> None:
    """Every character changed into any other the form uses, and every two adjacent
    characters swapped: refused (mistyped, or malformed), but for the origin's '.' and '-',
    which the check does not cover, and the ':' typed as a digit, which makes a canonical
    number (the module's docstring says both)."""
    canonical = format_shams(number)
    checked = format_shams_checked(number)
    typos = []  # (position, the characters, only moved or punctuation for punctuation, text)
    for i, char in enumerate(checked):
        for other in _FORM.replace(char, ""):
            moved = {char, other} <= set(".-")
            typos.append((i, char + other, moved, checked[:i] + other + checked[i + 1 :]))
        if i + 1 < len(checked) and checked[i + 1] != char:
            swapped = checked[:i] + checked[i + 1] + char + checked[i + 2 :]
            typos.append((i, char + checked[i + 1], True, swapped))
    for i, chars, moved, typed in typos:
        if _neighbours(*chars) and moved:
            continue  # MOD 37,36 misses 1 in 36 of these: the test below
        if i < len(number.origin) and set(chars) & set(".-"):
            # Outside the check: such a typo can only be read as another origin. One that
            # leaves the letters and digits as they were (a '.' or '-' moved, or one for the
            # other) is not seen at all; one that adds or drops a letter or digit is caught
            # 35 times in 36, with no guarantee.
            read = _read(typed)
            if read is not None:
                kept = (read.domain, read.year, read.sequence)
                assert kept == (number.domain, number.year, number.sequence), typed
                if moved:
                    assert read.origin.translate(_PUNCTUATION) == number.origin.translate(
                        _PUNCTUATION
                    ), typed
            continue
        if typed.find(":") < 0 <= i - len(canonical):  # ':' typed as a digit (or ':' lost)
            # Read as the canonical number with the two digits after its sequence when they
            # make a sequence (no leading zero): one a hundred times past the one given.
            read = _read(typed)
            if read is not None:
                assert format_shams(read) == typed, typed
                assert read.sequence >= 100 * number.sequence, typed
            continue
        with pytest.raises(ValueError, match=r"mistyped|invalid SHAMS number"):
            parse_shams_typed(typed)


# --- send -----------------------------------------------------------------------------------


async def test_send_maps_every_field_and_returns_receipt(
    client: ExchangeClient, fake_node: tuple[FakeNode, str]
) -> None:
    fake = fake_node[0]
    expire = dt.datetime(2026, 5, 1, 12, 30, tzinfo=dt.UTC)
    receipt = await client.send(
        to=[OTHER, ("000.00.00.G05", "legal")],
        subject="Budget 2026",
        body="سلام, xin chào",
        kind="reply",
        in_reply_to="000.00.00.G01/O/2025/0000007",
        priority="very-urgent",
        expire_time=expire,
        request_id="req-1",
        metadata=pb.DocumentMetadata(document_code="12/BTC"),
    )
    (request,) = fake.submits
    draft = request.draft
    assert request.request_id == "req-1"
    assert [(a.agency, a.mailbox) for a in draft.recipients] == [
        (OTHER, ""),
        ("000.00.00.G05", "legal"),
    ]
    assert draft.subject == "Budget 2026"
    assert draft.body == "سلام, xin chào".encode()
    assert draft.content_type == "text/plain; charset=utf-8"
    assert draft.kind == pb.LetterKind.LETTER_KIND_REPLY
    assert draft.priority == pb.Priority.PRIORITY_VERY_URGENT
    assert format_shams(draft.in_reply_to) == "000.00.00.G01/O/2025/0000007"
    assert draft.expire_time.ToDatetime(tzinfo=dt.UTC) == expire
    assert draft.metadata.document_code == "12/BTC"

    assert isinstance(receipt, Receipt)
    assert receipt.shams == "000.00.00.G22/O/2026/0000001"
    assert receipt.shams_pb == shams_of(1)
    assert receipt.request_id == "req-1"
    assert receipt.envelope_sha256 == sha256(request.SerializeToString())
    content = receipt.content()
    assert content.event == pb.EvidenceEvent.EVIDENCE_EVENT_SUBMISSION_ACCEPTANCE
    assert content.detail == "req-1"


async def test_send_defaults_bytes_body_and_fresh_request_id(
    client: ExchangeClient, fake_node: tuple[FakeNode, str]
) -> None:
    first = await client.send(to=OTHER, subject="s", body=b"\x00\x01")
    second = await client.send(to=[OTHER], subject="s", body=b"\x00\x01")
    a, b = fake_node[0].submits
    assert [r.agency for r in a.draft.recipients] == [OTHER]  # a bare str is one recipient
    assert a.draft.body == b"\x00\x01"
    assert a.draft.content_type == ""  # the node's default applies
    assert a.draft.kind == pb.LetterKind.LETTER_KIND_LETTER
    assert a.draft.priority == pb.Priority.PRIORITY_UNSPECIFIED
    assert not a.draft.HasField("in_reply_to")
    assert str(uuid.UUID(a.request_id)) == a.request_id
    assert a.request_id != b.request_id
    assert (first.request_id, second.request_id) == (a.request_id, b.request_id)


def test_draft_rejects_bad_values_before_any_call() -> None:
    with pytest.raises(ValueError, match="letter kind"):
        Draft(to=[OTHER], subject="s", kind="memo").to_request()
    with pytest.raises(ValueError, match="priority"):
        Draft(to=[OTHER], subject="s", priority=99).to_request()
    with pytest.raises(ValueError, match="invalid SHAMS"):
        Draft(to=[OTHER], subject="s", in_reply_to="nope").to_request()
    with pytest.raises(ValueError, match="timezone"):
        Draft(to=[OTHER], subject="s", expire_time=dt.datetime(2026, 1, 1))


@pytest.mark.parametrize(
    "expire",
    [
        dt.datetime.max.replace(tzinfo=dt.timezone(-dt.timedelta(hours=5))),
        dt.datetime.min.replace(tzinfo=dt.timezone(dt.timedelta(hours=3, minutes=30))),
    ],
    ids=["year-10000-in-utc", "year-0-in-utc"],
)
def test_a_draft_whose_expire_time_is_out_of_range_in_utc_is_a_value_error(
    expire: dt.datetime,
) -> None:
    """An aware datetime a Timestamp cannot hold once in UTC (datetime.max west of
    Greenwich, as "never"): the draft raised OverflowError ("date value out of range"),
    which the documented ValueError of a bad draft does not catch."""
    with pytest.raises(ValueError, match="invalid draft: expire_time"):
        Draft(to=[OTHER], subject="s", expire_time=expire)


def test_draft_keeps_its_request_id_so_resubmitting_is_idempotent() -> None:
    draft = Draft(to=[OTHER], subject="s", body="x")
    assert draft.request_id
    assert draft.to_request().request_id == draft.to_request().request_id == draft.request_id


async def test_a_draft_is_built_once_and_one_changed_since_is_sent_as_it_is_now(
    client: ExchangeClient, fake_node: tuple[FakeNode, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A draft's request was built when it was made (to check its values) and again when a
    # stream or a call sent it: 1.8 us, about 3 % of the load generator's CPU. A draft of
    # immutable values now sends the request it was made with; one holding a protobuf
    # message (its metadata here), which its caller may change, is built when sent.
    built = 0
    to_request = Draft.to_request

    def counting(self: Draft) -> pb.SubmitEnvelopeRequest:
        nonlocal built
        built += 1
        return to_request(self)

    monkeypatch.setattr(Draft, "to_request", counting)
    drafts = [Draft(to=[OTHER], subject=f"once {i}", body="x") for i in range(3)]
    changing = Draft(
        to=[OTHER], subject="changed", metadata=pb.DocumentMetadata(signer_name="before")
    )
    changing.metadata.signer_name = "after"  # type: ignore[union-attr]
    assert built == 4
    results = [r async for r in client.send_stream([*drafts, changing])]
    assert all(isinstance(r, Receipt) for r in results)
    await client.send(to=[OTHER], subject="one call", body="y")
    assert built == 4 + 1 + 1, "a draft of immutable values was built again to be sent"
    sent = [r for frame in fake_node[0].frames for r in frame.requests]
    assert [r.draft.subject for r in sent] == ["once 0", "once 1", "once 2", "changed"]
    assert sent[3].draft.metadata.signer_name == "after"
    assert [r.request_id for r in sent[:3]] == [d.request_id for d in drafts]


# --- errors ---------------------------------------------------------------------------------


async def test_abort_with_error_info_becomes_not_found(
    client: ExchangeClient, fake_node: tuple[FakeNode, str]
) -> None:
    fake_node[0].abort = Abort(
        grpc.StatusCode.NOT_FOUND,
        "unknown recipient 000.00.00.G99",
        rich_metadata(
            grpc.StatusCode.NOT_FOUND,
            "unknown recipient 000.00.00.G99",
            "UNKNOWN_RECIPIENT",
            {"agency": "000.00.00.G99"},
        ),
    )
    with pytest.raises(errors.NotFound) as caught:
        await client.send(to=["000.00.00.G99"], subject="s", body="b")
    err = caught.value
    assert err.code == grpc.StatusCode.NOT_FOUND
    assert err.reason == "UNKNOWN_RECIPIENT"
    assert err.message == "unknown recipient 000.00.00.G99"
    assert err.metadata == {"agency": "000.00.00.G99"}
    assert err.retry_after is None
    assert not err.retryable
    assert isinstance(err.__cause__, grpc.RpcError)


async def test_retry_info_becomes_retry_after(
    client: ExchangeClient, fake_node: tuple[FakeNode, str]
) -> None:
    fake_node[0].abort = Abort(
        grpc.StatusCode.UNAVAILABLE,
        "hub unreachable",
        rich_metadata(
            grpc.StatusCode.UNAVAILABLE, "hub unreachable", "HUB_UNAVAILABLE", retry_seconds=2.5
        ),
    )
    with pytest.raises(errors.Unavailable) as caught:
        await client.send(to=[OTHER], subject="s", body="b")
    assert caught.value.retry_after == 2.5
    assert caught.value.reason == "HUB_UNAVAILABLE"
    assert caught.value.retryable


async def test_bad_request_field_violations_are_kept(
    client: ExchangeClient, fake_node: tuple[FakeNode, str]
) -> None:
    fake_node[0].abort = Abort(
        grpc.StatusCode.INVALID_ARGUMENT,
        "bad letter",
        rich_metadata(
            grpc.StatusCode.INVALID_ARGUMENT,
            "bad letter",
            "INVALID_FIELD",
            violations=(("draft.subject", "must not be empty"),),
        ),
    )
    with pytest.raises(errors.InvalidArgument) as caught:
        await client.send(to=[OTHER], subject="", body="b")
    assert caught.value.field_violations == [("draft.subject", "must not be empty")]


async def test_abort_without_details_keeps_code_and_message(
    client: ExchangeClient, fake_node: tuple[FakeNode, str]
) -> None:
    fake_node[0].abort = Abort(grpc.StatusCode.DATA_LOSS, "disk gone")
    with pytest.raises(errors.DataLoss) as caught:
        await client.track("000.00.00.G22/O/2026/0000001")
    assert caught.value.code == grpc.StatusCode.DATA_LOSS
    assert (caught.value.reason, caught.value.message) == ("", "disk gone")


async def test_server_cancelled_call_is_cancelled_and_retryable(
    client: ExchangeClient, fake_node: tuple[FakeNode, str]
) -> None:
    fake_node[0].abort = Abort(grpc.StatusCode.CANCELLED, "server shutting down")
    with pytest.raises(errors.Cancelled) as caught:
        await client.track("000.00.00.G22/O/2026/0000001")
    assert caught.value.retryable


async def test_unreachable_node_is_unavailable() -> None:
    async with grpc.aio.insecure_channel("127.0.0.1:1") as channel:
        client = ExchangeClient.from_channel(channel, timeout=5)
        with pytest.raises(errors.Unavailable):
            await client.agencies()


VALIDITY = errors.CertificateValidity(
    dt.datetime(2026, 1, 1, tzinfo=dt.UTC), dt.datetime(2026, 4, 1, 12, 30, 5, tzinfo=dt.UTC)
)


def test_own_certificate_validity_refuses_only_outside_its_window_saying_why() -> None:
    for inside in (VALIDITY.not_before, dt.datetime(2026, 2, 1, tzinfo=dt.UTC), VALIDITY.not_after):
        assert VALIDITY.refusal(inside) is None
    expired = VALIDITY.refusal(VALIDITY.not_after + dt.timedelta(seconds=1))
    assert isinstance(expired, errors.FailedPrecondition)
    assert (expired.reason, expired.retryable) == ("CLIENT_CERTIFICATE_NOT_VALID", False)
    assert "expired at 2026-04-01 12:30:05 UTC" in expired.message
    assert "chapar pki renew" in expired.message
    assert expired.metadata == {
        "not_before": "2026-01-01T00:00:00+00:00",
        "not_after": "2026-04-01T12:30:05+00:00",
    }
    early = VALIDITY.refusal(VALIDITY.not_before - dt.timedelta(seconds=1))
    assert early is not None
    assert early.reason == "CLIENT_CERTIFICATE_NOT_VALID"
    assert "not valid before 2026-01-01 00:00:00 UTC" in early.message


def _rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="failed to connect"
    )


def test_unavailable_becomes_certificate_not_valid_only_once_the_certificate_expired() -> None:
    expired = errors.CertificateValidity(
        VALIDITY.not_before, dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    )
    valid = errors.CertificateValidity(
        VALIDITY.not_before, dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    )
    unavailable = _rpc_error(grpc.StatusCode.UNAVAILABLE)
    refused = errors.from_rpc_error(unavailable, certificate=expired)
    assert isinstance(refused, errors.FailedPrecondition)
    assert (refused.reason, refused.retryable) == ("CLIENT_CERTIFICATE_NOT_VALID", False)
    # Inside the window, or not knowing the certificate: what gRPC said.
    assert type(errors.from_rpc_error(unavailable, certificate=valid)) is errors.Unavailable
    assert type(errors.from_rpc_error(unavailable)) is errors.Unavailable
    # Other codes are the node's answers on a connection it accepted: not looked at.
    deadline = errors.from_rpc_error(
        _rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED), certificate=expired
    )
    assert type(deadline) is errors.DeadlineExceeded


@pytest.mark.parametrize(
    ("delay", "seconds"),
    [
        (duration_pb2.Duration(seconds=2**62), None),
        (duration_pb2.Duration(seconds=-(2**62)), None),
        (duration_pb2.Duration(seconds=315_576_000_001), None),
        (duration_pb2.Duration(seconds=1, nanos=-(10**9)), None),
        (duration_pb2.Duration(seconds=-5), 0.0),
        (duration_pb2.Duration(seconds=2, nanos=500_000_000), 2.5),
    ],
    ids=["huge", "huge-negative", "past-10000-years", "nanos-out-of-range", "negative", "valid"],
)
def test_a_retry_delay_that_is_no_duration_is_no_retry_after(
    delay: duration_pb2.Duration, seconds: float | None
) -> None:
    """A status's RetryInfo, or a batch result's retry_delay, out of the Duration range
    raised OverflowError ("Python int too large to convert to C int") out of the error's
    translation, in place of the node's refusal; a negative one was given as it is, which
    time.sleep(retry_after) refuses (ValueError)."""
    retry = any_pb2.Any()
    retry.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    status = status_pb2.Status(
        code=grpc.StatusCode.UNAVAILABLE.value[0], message="later", details=[retry]
    )
    trailing = grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString()))
    failed = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), trailing, details="later"
    )
    error = errors.from_rpc_error(failed)
    assert (type(error), error.message, error.retry_after) == (errors.Unavailable, "later", seconds)
    submitted = errors.from_submit_error(
        pb.SubmitError(code=14, reason="RECIPIENT_QUEUE_FULL", retry_delay=delay)
    )
    assert (submitted.reason, submitted.retry_after) == ("RECIPIENT_QUEUE_FULL", seconds)


async def test_a_client_whose_certificate_expired_fails_calls_and_streams_as_not_valid(
    client: ExchangeClient, fake_node: tuple[FakeNode, str]
) -> None:
    # The certificate the client was made with (read at construction) has expired since:
    # Unavailable, on a call or a stream, is the node refusing it. (The integration test
    # test_calls_after_the_client_certificate_expired_fail_as_not_valid_not_unavailable
    # does this with a real expiry and a real node.)
    client._certificate = errors.CertificateValidity(
        VALIDITY.not_before, dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    )
    fake = fake_node[0]
    fake.abort = Abort(grpc.StatusCode.UNAVAILABLE, "Socket closed")
    with pytest.raises(errors.FailedPrecondition) as caught:
        await client.send(to=[OTHER], subject="s", body="b")
    assert caught.value.reason == "CLIENT_CERTIFICATE_NOT_VALID"
    assert isinstance(caught.value.__cause__, grpc.RpcError)
    assert [d.subject for d in caught.value.unanswered] == ["s"]

    fake.break_stream_at = 1
    drafts = [Draft(to=[OTHER], subject=f"e{i}") for i in range(3)]
    with pytest.raises(errors.FailedPrecondition) as caught:
        async for _ in client.send_stream(drafts, batch_size=1, max_in_flight=1):
            pass
    assert caught.value.reason == "CLIENT_CERTIFICATE_NOT_VALID"
    assert caught.value.unanswered[0] is drafts[0]  # none answered: to send again, renewed
    fake.frames.clear()  # the next stream breaks on its first frame too
    async with client.shared_stream() as shared:
        with pytest.raises(errors.FailedPrecondition) as caught:
            await shared.send(Draft(to=[OTHER], subject="shared"))
    assert caught.value.reason == "CLIENT_CERTIFICATE_NOT_VALID"
    fake.break_ack_stream = True  # Letter.ack: the acknowledgement stream
    with pytest.raises(errors.FailedPrecondition) as caught:
        await client._acks.ack(shams_of(1))
    assert caught.value.reason == "CLIENT_CERTIFICATE_NOT_VALID"

    fake.abort = Abort(grpc.StatusCode.NOT_FOUND, "no such letter")
    with pytest.raises(errors.NotFound):  # the node's own answer stays what it is
        await client.track("000.00.00.G22/O/2026/0000001")


# --- batches and streams --------------------------------------------------------------------


async def test_send_many_returns_receipts_and_errors_in_order(
    client: ExchangeClient, fake_node: tuple[FakeNode, str]
) -> None:
    drafts = [Draft(to=[OTHER], subject="ok" if i % 3 else "bad", body="x") for i in range(300)]
    results = await client.send_many(drafts)
    fake = fake_node[0]
    assert [len(b.requests) for b in fake.batches] == [256, 44]
    assert len(results) == 300
    for i, (draft, result) in enumerate(zip(drafts, results, strict=True)):
        if i % 3:
            assert isinstance(result, Receipt)
            assert result.request_id == draft.request_id
        else:
            assert isinstance(result, errors.NotFound)
            assert result.reason == "UNKNOWN_RECIPIENT"
            assert result.metadata == {"agency": OTHER}
    receipts = [r for r in results if isinstance(r, Receipt)]
    assert [r.shams_pb.sequence for r in receipts] == list(range(1, 201))


async def test_send_many_of_nothing_makes_no_call(
    client: ExchangeClient, fake_node: tuple[FakeNode, str]
) -> None:
    assert await client.send_many([]) == []
    assert fake_node[0].batches == []


async def test_send_stream_yields_results_in_order_across_batches(
    client: ExchangeClient, fake_node: tuple[FakeNode, str]
) -> None:
    drafts = [Draft(to=[OTHER], subject="bad" if i == 70 else f"n{i}") for i in range(150)]
    results = [r async for r in client.send_stream(drafts, batch_size=64, max_in_flight=2)]
    fake = fake_node[0]
    assert [len(f.requests) for f in fake.frames] == [64, 64, 22]
    sent = [r.request_id for f in fake.frames for r in f.requests]
    assert sent == [d.request_id for d in drafts]
    assert isinstance(results[70], errors.NotFound)
    ok = [r for r in results if isinstance(r, Receipt)]
    assert len(ok) == 149
    assert [r.request_id for r in ok] == [d.request_id for i, d in enumerate(drafts) if i != 70]


async def test_send_stream_sends_a_trickle_without_waiting_for_full_batches(
    client: ExchangeClient,
) -> None:
    # A producer that waits for each result before making the next draft would deadlock
    # if the stream waited for a full batch.
    answered = asyncio.Event()

    async def one_at_a_time() -> AsyncIterator[Draft]:
        for i in range(3):
            answered.clear()
            yield Draft(to=[OTHER], subject=f"t{i}")
            await answered.wait()

    seen: list[str] = []
    async with asyncio.timeout(10):
        async for result in client.send_stream(one_at_a_time(), batch_size=64):
            assert isinstance(result, Receipt)
            seen.append(result.shams)
            answered.set()
    assert seen == [f"000.00.00.G22/O/2026/000000{i}" for i in (1, 2, 3)]


async def test_send_stream_refuses_a_bad_batch_size_or_linger(client: ExchangeClient) -> None:
    drafts = [Draft(to=[OTHER], subject="x")]
    for kwargs in ({"batch_size": 0}, {"batch_size": 257}, {"linger_s": -0.001}, {"linger_s": 2}):
        with pytest.raises(ValueError, match="need"):
            async for _ in client.send_stream(drafts, **kwargs):  # type: ignore[arg-type]
                pass


async def test_send_stream_sends_at_once_on_a_quiet_stream_and_lingers_on_a_busy_one(
    client: ExchangeClient, fake_node: tuple[FakeNode, str]
) -> None:
    # Quiet: no frame unanswered and none sent within the linger. The first draft finds a
    # new stream, the second one second after the first was answered: both go at once.
    # The third comes right after the second's answer, so it waits the linger (1 s).
    answered = asyncio.Event()
    loop = asyncio.get_running_loop()
    produced: list[float] = []

    async def drafts() -> AsyncIterator[Draft]:
        for i, pause in enumerate((1.1, 0.0, None)):
            produced.append(loop.time())
            yield Draft(to=[OTHER], subject=f"s{i}")
            await answered.wait()
            answered.clear()
            if pause:
                await asyncio.sleep(pause)

    took = []
    async for result in client.send_stream(drafts(), linger_s=1.0):
        assert isinstance(result, Receipt)
        took.append(loop.time() - produced[len(took)])
        answered.set()
    assert took[0] < 0.9
    assert took[1] < 0.9
    assert took[2] >= 1.0
    assert [len(f.requests) for f in fake_node[0].frames] == [1, 1, 1]


async def test_send_stream_raises_what_broke_the_producer(client: ExchangeClient) -> None:
    async def broken() -> AsyncIterator[Draft]:
        yield Draft(to=[OTHER], subject="first")
        raise RuntimeError("producer failed")

    results: list[Receipt | ChaparError] = []

    async def consume() -> None:
        async for result in client.send_stream(broken()):
            results.append(result)

    with pytest.raises(RuntimeError, match="producer failed"):
        await consume()
    assert len(results) == 1
    assert isinstance(results[0], Receipt)


async def test_send_stream_raises_unavailable_when_the_node_ends_the_stream_under_a_write(
    client: ExchangeClient, fake_node: tuple[FakeNode, str]
) -> None:
    # The node ends the stream at its first frame while the writer still has frames to
    # write: whichever of the write or the read meets the end, the caller gets the status
    # as a ChaparError, not asyncio's "RPC already finished".
    fake_node[0].break_stream_at = 1
    for _ in range(5):
        fake_node[0].frames.clear()
        drafts = [Draft(to=[OTHER], subject=f"w{i}") for i in range(400)]
        with pytest.raises(errors.Unavailable):
            async for _ in client.send_stream(drafts, batch_size=1, max_in_flight=64):
                pass


async def test_a_stream_a_stopping_node_ended_unanswered_raises_a_retryable_error(
    client: ExchangeClient, fake_node: tuple[FakeNode, str]
) -> None:
    # A stopping node answers the frames it has read and ends the stream (OK): the drafts
    # it had not read may go again under their request ids, so the error is retryable.
    fake = fake_node[0]
    fake.end_stream_at = 2
    drafts = [Draft(to=[OTHER], subject=f"e{i}") for i in range(3)]
    got: list[Receipt | ChaparError] = []

    async def send() -> None:
        async for result in client.send_stream(drafts, batch_size=1, max_in_flight=1):
            got.append(result)

    with pytest.raises(errors.Unavailable) as caught:
        await send()
    assert (caught.value.reason, caught.value.retryable) == ("STREAM_ENDED", True)
    assert [r.request_id for r in got if isinstance(r, Receipt)] == [drafts[0].request_id]
    fake.end_stream_at = None
    again = [r async for r in client.send_stream(drafts[1:])]  # the same drafts: safe
    assert [r.request_id for r in again if isinstance(r, Receipt)] == [
        d.request_id for d in drafts[1:]
    ]


async def test_a_broken_send_stream_says_which_drafts_it_took_and_did_not_answer(
    client: ExchangeClient, fake_node: tuple[FakeNode, str]
) -> None:
    # The stream takes drafts from the producer ahead of the wire (frames in flight, and a
    # buffer before them): when it breaks, the error lists every one of those it did not
    # answer, in order, so that the caller can send them again (same request ids).
    fake_node[0].break_stream_at = 3
    produced: list[Draft] = []

    async def drafts() -> AsyncIterator[Draft]:
        for i in range(40):
            produced.append(Draft(to=[OTHER], subject=f"u{i}"))
            yield produced[-1]

    got: list[Receipt | ChaparError] = []

    async def send() -> None:
        async for result in client.send_stream(drafts(), batch_size=2, max_in_flight=2):
            got.append(result)

    with pytest.raises(errors.Unavailable) as caught:
        await send()
    unanswered = caught.value.unanswered
    assert len(got) < 6 < len(got) + len(unanswered)  # frame 3 and what was taken after it
    assert list(unanswered) == produced[len(got) :]
    assert errors.ChaparError("x").unanswered == ()  # other errors list nothing


async def test_a_broken_sync_send_stream_says_which_drafts_it_took_and_did_not_answer(
    fake_node: tuple[FakeNode, str],
) -> None:
    fake, target = fake_node
    fake.break_stream_at = 2
    produced: list[Draft] = []

    def drafts() -> Iterator[Draft]:
        for i in range(40):
            produced.append(Draft(to=[OTHER], subject=f"s{i}"))
            yield produced[-1]

    def blocking() -> tuple[list[Receipt | ChaparError], errors.ChaparError]:
        got: list[Receipt | ChaparError] = []
        with SyncExchangeClient.from_channel_factory(
            lambda: grpc.aio.insecure_channel(target)
        ) as sync:
            try:
                for result in sync.send_stream(drafts(), batch_size=1, max_in_flight=1):
                    got.append(result)
            except errors.ChaparError as error:
                return got, error
        raise AssertionError("the stream did not break")

    got, error = await asyncio.to_thread(blocking)
    assert isinstance(error, errors.Unavailable)
    assert len(got) < 2 < len(got) + len(error.unanswered)
    # Drafts waiting in the hand-off to the loop's thread are listed too.
    assert list(error.unanswered) == produced[len(got) :]


async def test_a_blocking_send_stream_sends_its_last_frame_when_its_drafts_end(
    fake_node: tuple[FakeNode, str],
) -> None:
    # A producer taking a little time a draft (building it, reading a database), then done:
    # the frame after the first (the stream busy, a frame just sent) waited out the whole
    # linger for drafts that could not come any more, although the iterable had ended.
    fake, target = fake_node

    def drafts() -> Iterator[Draft]:
        for i in range(3):
            time.sleep(0.01)
            yield Draft(to=[OTHER], subject=f"l{i}")

    def blocking() -> tuple[float, list[Receipt | ChaparError]]:
        with SyncExchangeClient.from_channel_factory(
            lambda: grpc.aio.insecure_channel(target)
        ) as sync:
            started = time.monotonic()
            results = list(sync.send_stream(drafts(), linger_s=1.0))
            return time.monotonic() - started, results

    took, results = await asyncio.to_thread(blocking)
    assert [type(r) for r in results] == [Receipt] * 3
    assert sum(len(f.requests) for f in fake.frames) == 3
    assert took < 1.0, f"{took:.2f} s: a frame waited out the linger (1 s) after the end"


async def test_a_draft_the_sync_send_stream_takes_after_it_broke_is_listed_as_unanswered(
    fake_node: tuple[FakeNode, str],
) -> None:
    # The helper thread waits inside the caller's iterable (a queue, say) when the stream
    # breaks; the draft it takes when one comes is not sent, and must not vanish: it joins
    # the error's ``unanswered``, for the caller to send again.
    fake, target = fake_node
    fake.break_stream_at = 1
    work: queue.Queue[Draft | None] = queue.Queue()
    first, late = Draft(to=[OTHER], subject="first"), Draft(to=[OTHER], subject="late")
    work.put(first)

    def blocking() -> tuple[list[Draft], list[Draft]]:
        with SyncExchangeClient.from_channel_factory(
            lambda: grpc.aio.insecure_channel(target)
        ) as sync:
            try:
                for _ in sync.send_stream(iter(work.get, None), batch_size=1, max_in_flight=1):
                    pass
            except errors.ChaparError as error:
                raised = list(error.unanswered)
                work.put(late)  # the helper thread, waiting in work.get, takes it
                deadline = time.monotonic() + 5
                while late not in error.unanswered and time.monotonic() < deadline:
                    time.sleep(0.01)
                return raised, list(error.unanswered)
        raise AssertionError("the stream did not break")

    raised, later = await asyncio.to_thread(blocking)
    assert raised == [first]
    assert work.empty()
    assert later == [first, late]


async def test_shared_stream_answers_each_concurrent_caller_and_sends_them_together(
    client: ExchangeClient, fake_node: tuple[FakeNode, str]
) -> None:
    drafts = [Draft(to=[OTHER], subject="bad" if i == 7 else f"c{i}") for i in range(40)]
    async with client.shared_stream(batch_size=16) as shared:
        outcomes = await asyncio.gather(*(shared.send(d) for d in drafts), return_exceptions=True)
    assert isinstance(outcomes[7], errors.NotFound)
    ok = [o for o in outcomes if isinstance(o, Receipt)]
    assert [o.request_id for o in ok] == [d.request_id for i, d in enumerate(drafts) if i != 7]
    frames = fake_node[0].frames
    assert [len(f.requests) for f in frames] == [16, 16, 8]  # one stream, full frames
    assert [r.request_id for f in frames for r in f.requests] == [d.request_id for d in drafts]


async def test_shared_stream_builds_each_draft_once(
    client: ExchangeClient, fake_node: tuple[FakeNode, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request built to check a draft when it is made is the one that goes."""
    built: list[str] = []
    real = Draft.to_request

    def counting(draft: Draft) -> pb.SubmitEnvelopeRequest:
        built.append(draft.subject)
        return real(draft)

    monkeypatch.setattr(Draft, "to_request", counting)
    drafts = [Draft(to=[OTHER], subject=f"once {i}") for i in range(20)]  # checked as made
    async with client.shared_stream(batch_size=8) as shared:
        receipts = await asyncio.gather(*(shared.send(d) for d in drafts))
    assert [r.request_id for r in receipts] == [d.request_id for d in drafts]
    assert sorted(built) == sorted(d.subject for d in drafts)
    sent = [r.draft.subject for f in fake_node[0].frames for r in f.requests]
    assert sent == [d.subject for d in drafts]


async def test_shared_stream_refuses_a_bad_draft_to_its_caller_only(
    client: ExchangeClient, fake_node: tuple[FakeNode, str]
) -> None:
    async with client.shared_stream() as shared:
        before, odd, after = await asyncio.gather(
            shared.send(Draft(to=[OTHER], subject="before")),
            asyncio.to_thread(Draft, to=[OTHER], subject="odd", kind="no-such-kind"),
            shared.send(Draft(to=[OTHER], subject="after")),
            return_exceptions=True,
        )
    assert isinstance(odd, ValueError)  # where the draft is made, since it is checked there
    assert isinstance(before, Receipt)
    assert isinstance(after, Receipt)
    sent = [r.draft.subject for f in fake_node[0].frames for r in f.requests]
    assert sent == ["before", "after"]
    with pytest.raises(RuntimeError, match="closed"):
        await shared.send(Draft(to=[OTHER], subject="late"))


async def test_shared_stream_break_fails_the_unanswered_and_the_next_send_reopens(
    client: ExchangeClient, fake_node: tuple[FakeNode, str]
) -> None:
    fake = fake_node[0]
    fake.break_stream_at = 2
    first, lost = Draft(to=[OTHER], subject="a"), Draft(to=[OTHER], subject="b")
    async with client.shared_stream() as shared:
        assert isinstance(await shared.send(first), Receipt)
        with pytest.raises(errors.Unavailable):
            await shared.send(lost)
        again = await shared.send(lost)  # the same draft, so the same request id
    assert again.request_id == lost.request_id
    assert [[r.draft.subject for r in f.requests] for f in fake.frames] == [["a"], ["b"], ["b"]]


async def test_shared_stream_break_while_closing_fails_the_queued_drafts_retryably(
    client: ExchangeClient, fake_node: tuple[FakeNode, str]
) -> None:
    # aclose() waits for the drafts given before it; the stream breaks under the first
    # frame, and no new stream opens once closing. The drafts it had not taken were not
    # sent: their callers learn the stream ended (retryable), not a bare RuntimeError.
    fake = fake_node[0]
    fake.break_stream_at = 1
    drafts = [Draft(to=[OTHER], subject=f"q{i}") for i in range(12)]
    shared = client.shared_stream(batch_size=1, max_in_flight=1)
    sends = [asyncio.create_task(shared.send(d)) for d in drafts]
    await asyncio.sleep(0)  # every draft is queued
    await shared.aclose()
    outcomes = await asyncio.gather(*sends, return_exceptions=True)
    assert all(isinstance(o, errors.Unavailable) and o.retryable for o in outcomes), outcomes
    last = outcomes[-1]  # never taken: the stream broke at the first frame
    assert isinstance(last, errors.Unavailable)
    assert last.reason == "STREAM_ENDED"
    assert len(fake.frames) == 1


async def test_shared_stream_does_not_send_a_draft_whose_caller_gave_up(
    client: ExchangeClient, fake_node: tuple[FakeNode, str]
) -> None:
    async with client.shared_stream() as shared:
        given_up = asyncio.create_task(shared.send(Draft(to=[OTHER], subject="gone")))
        await asyncio.sleep(0)  # it is queued, the stream not yet reading
        given_up.cancel()
        kept = await shared.send(Draft(to=[OTHER], subject="kept"))
    assert given_up.cancelled()
    assert kept.shams == "000.00.00.G22/O/2026/0000001"
    assert [r.draft.subject for f in fake_node[0].frames for r in f.requests] == ["kept"]


# --- documents ------------------------------------------------------------------------------


class FakeDocuments(pb.DocumentServiceServicer):
    """Serves one document in small chunks; a download can be held or broken part-way."""

    chunk = 1000

    def __init__(self) -> None:
        self.content = bytes(range(256)) * 40  # 10 chunks and a bit
        digest = sha256(self.content)
        self.ref = pb.AttachmentRef(
            uri=f"chapar://{SENDER}/documents/sha256/{digest.hex()}",
            sha256=digest,
            size=len(self.content),
            media_type="application/pdf",
            file_name="report.pdf",
        )
        self.offsets: list[int] = []  # one per download
        self.served = asyncio.Event()  # set once a download has sent a chunk
        self.gate: asyncio.Event | None = None  # when set, the first download waits for it
        self.break_first_after: int | None = None  # the first download fails after n chunks

    async def DownloadDocument(
        self, request: pb.DownloadDocumentRequest, context: Any
    ) -> AsyncIterator[pb.DownloadDocumentResponse]:
        first = not self.offsets
        self.offsets.append(request.offset)
        info = pb.DocumentInfo(uri=self.ref.uri, sha256=self.ref.sha256, size=self.ref.size)
        yield pb.DownloadDocumentResponse(document=info)
        for n, at in enumerate(range(request.offset, len(self.content), self.chunk)):
            if first and n == 2 and self.gate is not None:
                await self.gate.wait()
            if first and n == self.break_first_after:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "owner went away")
            yield pb.DownloadDocumentResponse(chunk=self.content[at : at + self.chunk])
            self.served.set()


@pytest.fixture
async def documents() -> AsyncIterator[tuple[FakeDocuments, ExchangeClient]]:
    fake = FakeDocuments()
    server = grpc.aio.server()
    add_DocumentServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield fake, ExchangeClient.from_channel(channel)
    await channel.close()
    await server.stop(None)


async def test_two_downloads_into_one_path_at_once_both_end_with_the_verified_file(
    documents: tuple[FakeDocuments, ExchangeClient], tmp_path: Path
) -> None:
    # Both used to append to one partial file, and both failed (the mixed file is caught
    # and not kept). The second now waits for the first and takes the file it left.
    fake, client = documents
    fake.gate = asyncio.Event()
    out = tmp_path / "report.pdf"
    first = asyncio.create_task(client.fetch(fake.ref, out))
    await fake.served.wait()  # the first is writing its partial file
    second = asyncio.create_task(client.fetch(fake.ref, out))
    await asyncio.sleep(0.2)  # the second has found the partial file taken
    fake.gate.set()
    assert await asyncio.gather(first, second) == [out, out]
    assert out.read_bytes() == fake.content
    assert fake.offsets == [0]  # the second did not download it again
    assert not partial_path(out, fake.ref.sha256).exists()


async def test_a_download_waiting_for_another_into_its_path_resumes_what_that_one_left(
    documents: tuple[FakeDocuments, ExchangeClient], tmp_path: Path
) -> None:
    fake, client = documents
    fake.gate = asyncio.Event()
    fake.break_first_after = 4  # the first breaks after 4 chunks, leaving them in its file
    out = tmp_path / "report.pdf"
    first = asyncio.create_task(client.fetch(fake.ref, out))
    await fake.served.wait()
    second = asyncio.create_task(client.fetch(fake.ref, out))
    await asyncio.sleep(0.2)
    fake.gate.set()
    with pytest.raises(errors.Unavailable):
        await first
    assert await second == out
    assert out.read_bytes() == fake.content
    assert fake.offsets == [0, 4 * FakeDocuments.chunk]
    assert not partial_path(out, fake.ref.sha256).exists()


async def test_a_download_waits_while_another_process_holds_the_part_file(
    documents: tuple[FakeDocuments, ExchangeClient], tmp_path: Path
) -> None:
    # The lock is a plain flock on the partial file, so any process taking it is waited for.
    fake, client = documents
    out = tmp_path / "report.pdf"
    with partial_path(out, fake.ref.sha256).open("ab") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        held.write(fake.content[: 3 * FakeDocuments.chunk])
        held.flush()
        fetching = asyncio.create_task(client.fetch(fake.ref, out))
        await asyncio.sleep(0.3)
        assert not fetching.done()
        assert fake.offsets == []
    assert await fetching == out
    assert out.read_bytes() == fake.content
    assert fake.offsets == [3 * FakeDocuments.chunk]


async def test_a_download_waiting_for_another_gives_up_at_its_timeout(
    documents: tuple[FakeDocuments, ExchangeClient], tmp_path: Path
) -> None:
    # It waited for ever behind a download that did not end, its timeout unheeded.
    fake, client = documents
    out = tmp_path / "report.pdf"
    with partial_path(out, fake.ref.sha256).open("ab") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(errors.DeadlineExceeded) as late:
            await asyncio.wait_for(client.fetch(fake.ref, out, timeout=0.3), 5)
    assert late.value.reason == "DOWNLOAD_IN_PROGRESS"
    assert fake.offsets == []


class _ManyDocuments(pb.DocumentServiceServicer):
    """Serves any document added to it, whole, in chunks of 1,000 bytes."""

    def __init__(self) -> None:
        self.by_uri: dict[str, bytes] = {}

    def add(self, content: bytes, name: str) -> pb.AttachmentRef:
        digest = sha256(content)
        uri = f"chapar://{SENDER}/documents/sha256/{digest.hex()}"
        self.by_uri[uri] = content
        return pb.AttachmentRef(uri=uri, sha256=digest, size=len(content),
                                media_type="application/pdf", file_name=name)  # fmt: skip

    async def DownloadDocument(
        self, request: pb.DownloadDocumentRequest, context: Any
    ) -> AsyncIterator[pb.DownloadDocumentResponse]:
        content = self.by_uri[request.uri]
        if request.offset > len(content):
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, "past the end")
        info = pb.DocumentInfo(uri=request.uri, sha256=sha256(content), size=len(content))
        yield pb.DownloadDocumentResponse(document=info)
        for at in range(request.offset, len(content), 1000):
            yield pb.DownloadDocumentResponse(chunk=content[at : at + 1000])


@pytest.mark.parametrize("first_size", [5000, 20000])  # smaller, then larger than the second
async def test_attachments_saved_into_one_directory_never_take_each_others_files(
    tmp_path: Path, first_size: int
) -> None:
    # Attachments named "contract.pdf.part" and "contract.pdf" (one letter, or two from
    # any senders): saving the second took the first, saved already, for its partial
    # download, and truncated it or deleted it. And one of the same name as a file saved
    # before, from another letter, replaced it.
    docs = _ManyDocuments()
    server = grpc.aio.server()
    add_DocumentServiceServicer_to_server(docs, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    client = ExchangeClient.from_channel(channel)
    contents = [b"A" * first_size, b"B" * 10000, b"C" * 3000, b"B" * 10000]
    names = ["contract.pdf.part", "contract.pdf", "contract.pdf", "contract.pdf"]
    try:
        saved = [
            await Attachment.from_ref(docs.add(c, n), client).save_into(tmp_path)
            for c, n in zip(contents, names, strict=True)
        ]
    finally:
        await channel.close()
        await server.stop(None)
    assert [p.name for p in saved] == [
        "contract.pdf.part",
        "contract.pdf",
        f"contract-{sha256(contents[2]).hex()[:16]}.pdf",  # another document of that name
        "contract.pdf",  # the same document again: the file that holds it
    ]
    assert [p.read_bytes() for p in saved] == contents
    assert sorted(os.listdir(tmp_path)) == sorted({p.name for p in saved})  # nothing partial


# --- inbox ----------------------------------------------------------------------------------


async def test_an_inbox_letter_naming_no_valid_letter_it_answers_is_still_handed_over(
    client: ExchangeClient, fake_node: tuple[FakeNode, str], pki: Pki
) -> None:
    # A hub let such letters through before it checked in_reply_to: parsing it raised a
    # bare ValueError out of the back-end's inbox loop, at that letter every time.
    header = pb.EnvelopeHeader.FromString(signed_letter(pki, 12).header)
    header.in_reply_to.CopyFrom(pb.Shams(origin="X"))
    header_bytes = header.SerializeToString()
    envelope = pb.Envelope(
        header=header_bytes,
        signature=pki.signer.sign(ENVELOPE_PAYLOAD_TYPE, header_bytes),
        body=signed_letter(pki, 12).body,
    )
    fake_node[0].inbox_batches = [[pb.InboxLetter(envelope=envelope, shams=shams_of(12))]]
    async with contextlib.aclosing(client.inbox()) as inbox:
        letter = await anext(inbox)
    assert letter.shams.endswith("/0000012")
    assert letter.in_reply_to is None
    assert letter.header.in_reply_to.origin == "X"  # the signed header as it is


async def test_inbox_yields_letters_and_ack_hands_over(
    client: ExchangeClient, fake_node: tuple[FakeNode, str], pki: Pki
) -> None:
    fake = fake_node[0]
    envelopes = [signed_letter(pki, n) for n in (1, 2, 3)]
    items = [
        pb.InboxLetter(
            envelope=env,
            shams=shams_of(n),
            shams_text=format_shams(shams_of(n)),
            delivery=signed_evidence(pki, env, pb.EvidenceEvent.EVIDENCE_EVENT_DELIVERY),
        )
        for n, env in zip((1, 2, 3), envelopes, strict=True)
    ]
    fake.inbox_batches = [items[:2], items[2:]]
    letters = []
    async with contextlib.aclosing(client.inbox(mailbox="desk")) as inbox:
        async for letter in inbox:
            letters.append(letter)
            if len(letters) == 3:
                break
    assert fake.inbox_requests[0].mailbox == "desk"
    assert [letter.shams for letter in letters] == [
        "000.00.00.G22/O/2026/0000001",
        "000.00.00.G22/O/2026/0000002",
        "000.00.00.G22/O/2026/0000003",
    ]
    second = letters[1]
    assert second.sender == SENDER
    assert second.recipients == (OTHER,)
    assert second.subject == "Budget 2026"
    assert second.text == "Dear colleagues,\nletter 2"
    assert second.kind == "REPLY"
    assert second.in_reply_to == "000.00.00.G01/O/2025/0000007"
    assert second.create_time is not None
    assert second.create_time.tzinfo is not None
    assert second.envelope == envelopes[1]

    evidence = await second.ack()
    assert [a.shams for a in fake.acks] == [shams_of(2)]
    content = pb.EvidenceContent.FromString(evidence.content)
    assert content.event == pb.EvidenceEvent.EVIDENCE_EVENT_HANDOVER

    trust = TrustStore([pki.root], [pki.intermediate])
    trust.add_certificates(pki.signing_certificates)
    delivery = second.verify(trust)
    assert (delivery.event, delivery.recipient) == ("DELIVERY", OTHER)

    # Acknowledgements made together travel in one call, each with its own answer.
    fake.acks.clear()
    both = await asyncio.gather(letters[0].ack(), letters[2].ack())
    assert fake.ack_batches == [1, 2]
    assert [a.shams for a in fake.acks] == [shams_of(1), shams_of(3)]
    assert [pb.EvidenceContent.FromString(e.content).shams for e in both] == [
        shams_of(1),
        shams_of(3),
    ]


async def test_a_letter_labelled_with_another_number_than_its_sender_signed_fails_verify(
    client: ExchangeClient, fake_node: tuple[FakeNode, str], pki: Pki
) -> None:
    # The node's label (InboxLetter.shams) is not signed: a node that labels letter 1 as
    # letter 2 would have it acknowledged, counted and filed as 2 by a back-end that trusts
    # the label. verify() checks the label against the signed header.
    fake = fake_node[0]
    item = inbox_letter(pki, 1)
    item.shams.CopyFrom(shams_of(2))
    fake.inbox_batches = [[item, inbox_letter(pki, 3)]]
    trust = TrustStore([pki.root], [pki.intermediate])
    trust.add_certificates(pki.signing_certificates)
    async with contextlib.aclosing(client.inbox()) as inbox:
        mislabelled, honest = await anext(inbox), await anext(inbox)
    assert mislabelled.shams == "000.00.00.G22/O/2026/0000002"
    with pytest.raises(VerificationError) as caught:
        mislabelled.verify(trust)
    assert caught.value.reason == "EVIDENCE_MISMATCH"
    assert honest.verify(trust).event == "DELIVERY"


async def test_an_inbox_stream_the_node_ends_raises_stream_ended_after_its_letters(
    client: ExchangeClient, fake_node: tuple[FakeNode, str], pki: Pki
) -> None:
    # A stopping node ends the inbox stream (OK): the back-end's reading loop must learn
    # it (and read again), not end as if the inbox had no more letters, ever.
    fake = fake_node[0]
    fake.inbox_batches = [[inbox_letter(pki, 1)]]
    fake.inbox_ends = True
    read: list[str] = []

    async def read_all() -> None:
        async for letter in client.inbox():
            read.append(letter.shams)

    with pytest.raises(errors.Unavailable) as caught:
        await read_all()
    assert read == ["000.00.00.G22/O/2026/0000001"]
    assert (caught.value.reason, caught.value.retryable) == ("STREAM_ENDED", True)


async def test_an_inbox_read_when_its_channel_closes_raises_client_closed_not_cancelled(
    fake_node: tuple[FakeNode, str],
) -> None:
    # A shutdown handler closes the client while a task reads the inbox: grpc.aio cancels
    # the call under the reader, which must get a ChaparError, not a CancelledError that
    # reads as its own task's cancellation (a TaskGroup would then swallow it).
    channel = grpc.aio.insecure_channel(fake_node[1])
    client = ExchangeClient.from_channel(channel)
    reading = asyncio.create_task(anext(client.inbox()))
    await asyncio.wait_for(fake_node[0].inbox_opened.wait(), 5)
    await channel.close()
    with pytest.raises(errors.Cancelled) as caught:
        await asyncio.wait_for(reading, 5)
    assert caught.value.reason == "CLIENT_CLOSED"


async def test_sends_on_a_closed_client_leave_no_task_behind(
    fake_node: tuple[FakeNode, str],
) -> None:
    channel = grpc.aio.insecure_channel(fake_node[1])
    client = ExchangeClient.from_channel(channel)
    await channel.close()
    before = asyncio.all_tasks()
    for n in range(3):  # each a new stream, refused before it is made
        with pytest.raises(errors.FailedPrecondition):
            async with client.shared_stream() as shared:
                await shared.send(Draft(to=[OTHER], subject=f"late {n}"))
    for _ in range(20):
        await asyncio.sleep(0)
    assert asyncio.all_tasks() - before == set()


async def test_a_letter_acknowledged_after_its_client_closed_gets_client_closed(
    fake_node: tuple[FakeNode, str], pki: Pki
) -> None:
    # A back-end that reconnects after a node restart still holds letters of the old
    # client; acknowledging one must raise a ChaparError it can handle, not grpc's own.
    fake = fake_node[0]
    fake.inbox_batches = [[inbox_letter(pki, 1)]]
    channel = grpc.aio.insecure_channel(fake_node[1])
    client = ExchangeClient.from_channel(channel)
    async with contextlib.aclosing(client.inbox()) as inbox:
        letter = await anext(inbox)
    await channel.close()

    with pytest.raises(errors.FailedPrecondition) as caught:
        await letter.ack()
    assert (caught.value.reason, caught.value.retryable) == ("CLIENT_CLOSED", False)
    with pytest.raises(errors.FailedPrecondition):
        await client.agencies()
    assert fake.acks == []


async def test_acks_gather_while_a_call_is_in_flight_and_go_together_after_it(
    client: ExchangeClient, fake_node: tuple[FakeNode, str]
) -> None:
    fake = fake_node[0]
    fake.ack_gate = asyncio.Event()
    first = asyncio.create_task(client._acks.ack(shams_of(1)))
    await asyncio.wait_for(fake.ack_called.wait(), 5)  # a lone one goes at once, alone
    later = []
    for n in (2, 3, 4):  # one per event-loop turn, while the first call is held
        later.append(asyncio.create_task(client._acks.ack(shams_of(n))))
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    assert fake.ack_batches == [1]  # no call while one is in flight: they gather
    fake.ack_gate.set()
    evidence = await asyncio.gather(first, *later)
    assert fake.ack_batches == [1, 3]  # then all three in one call
    assert [pb.EvidenceContent.FromString(e.content).shams for e in evidence] == [
        shams_of(n) for n in (1, 2, 3, 4)
    ]


async def test_a_full_batch_of_acks_goes_without_waiting_for_the_call_in_flight(
    client: ExchangeClient, fake_node: tuple[FakeNode, str]
) -> None:
    fake = fake_node[0]
    fake.ack_gate = asyncio.Event()
    client._acks._max_batch = 2
    first = asyncio.create_task(client._acks.ack(shams_of(1)))
    await asyncio.wait_for(fake.ack_called.wait(), 5)
    fake.ack_called.clear()
    full = [asyncio.create_task(client._acks.ack(shams_of(n))) for n in (2, 3)]
    await asyncio.wait_for(fake.ack_called.wait(), 5)
    assert fake.ack_batches == [1, 2]  # the full batch did not wait for the first call
    fake.ack_gate.set()
    await asyncio.gather(first, *full)


async def test_more_acks_in_one_turn_than_a_batch_holds_share_the_stream_one_write_at_a_time(
    client: ExchangeClient, fake_node: tuple[FakeNode, str]
) -> None:
    # A back-end acknowledging a whole inbox at once: the full batches go while another is
    # unanswered, so two batches are written on the one stream at the same moment. gRPC
    # takes one write at a time on a call (a second fails the whole call): they must queue.
    fake = fake_node[0]
    numbers = range(1, 2 * 256 + 2)
    evidence = await asyncio.gather(*(client._acks.ack(shams_of(n)) for n in numbers))
    assert [pb.EvidenceContent.FromString(e.content).shams for e in evidence] == [
        shams_of(n) for n in numbers
    ]
    assert sorted(fake.ack_batches) == [1, 256, 256]
    assert (fake.ack_stream_calls, fake.unary_ack_calls) == (1, 0)


async def test_acks_go_on_one_stream_that_the_client_ends_when_it_closes(
    fake_node: tuple[FakeNode, str],
) -> None:
    fake = fake_node[0]
    channel = grpc.aio.insecure_channel(fake_node[1])
    client = ExchangeClient.from_channel(channel)
    evidence = [await client._acks.ack(shams_of(n)) for n in (1, 2, 3)]  # one at a time
    assert [pb.EvidenceContent.FromString(e.content).shams for e in evidence] == [
        shams_of(n) for n in (1, 2, 3)
    ]
    assert (fake.ack_stream_calls, fake.unary_ack_calls, fake.ack_batches) == (1, 0, [1, 1, 1])
    assert fake.ack_streams_ended == 0
    await client.close()
    assert fake.ack_streams_ended == 1  # half-closed by the client, not cancelled
    # The channel is the caller's and stays open: a letter acknowledged after close goes
    # by one call, and no stream is left open behind the closed client.
    late = await client._acks.ack(shams_of(4))
    assert pb.EvidenceContent.FromString(late.content).shams == shams_of(4)
    assert (fake.ack_stream_calls, fake.unary_ack_calls) == (1, 1)
    await channel.close()


async def test_acks_fall_back_to_batch_calls_with_a_node_without_the_stream(
    client: ExchangeClient, fake_node: tuple[FakeNode, str]
) -> None:
    fake = fake_node[0]
    fake.ack_stream = False
    first = await client._acks.ack(shams_of(1))
    second = await client._acks.ack(shams_of(2))
    assert [pb.EvidenceContent.FromString(e.content).shams for e in (first, second)] == [
        shams_of(1),
        shams_of(2),
    ]
    # The stream is asked for once, from then on every batch is a BatchAckEnvelopes call;
    # twice when grpc lost the first refusal's status (it raced the first write and was
    # reported as the write's failure, grpc/grpc#36066): that batch went by a call too.
    assert fake.unary_ack_calls == 2
    assert fake.ack_stream_calls in (1, 2)


async def test_an_ack_stream_that_ends_before_its_first_answer_sends_the_batch_by_a_call(
    client: ExchangeClient, fake_node: tuple[FakeNode, str]
) -> None:
    fake = fake_node[0]
    fake.lose_ack_stream_status = True
    evidence = await client._acks.ack(shams_of(1))
    assert pb.EvidenceContent.FromString(evidence.content).shams == shams_of(1)
    assert fake.unary_ack_calls == 1
    again = await client._acks.ack(shams_of(2))  # the stream is tried again
    assert pb.EvidenceContent.FromString(again.content).shams == shams_of(2)
    assert (fake.ack_stream_calls, fake.unary_ack_calls) == (2, 1)


async def test_a_broken_ack_stream_fails_its_batch_and_the_next_ack_opens_another(
    client: ExchangeClient, fake_node: tuple[FakeNode, str]
) -> None:
    fake = fake_node[0]
    await client._acks.ack(shams_of(1))
    fake.break_ack_stream = True
    with pytest.raises(errors.Unavailable):
        await client._acks.ack(shams_of(2))
    again = await client._acks.ack(shams_of(2))  # acknowledging again is safe
    assert pb.EvidenceContent.FromString(again.content).shams == shams_of(2)
    assert (fake.ack_stream_calls, fake.unary_ack_calls) == (2, 0)


async def test_an_ack_batch_unanswered_in_time_raises_and_ends_its_stream(
    fake_node: tuple[FakeNode, str],
) -> None:
    fake = fake_node[0]
    fake.ack_gate = asyncio.Event()
    channel = grpc.aio.insecure_channel(fake_node[1])
    client = ExchangeClient.from_channel(channel, timeout=0.3)
    with pytest.raises(errors.DeadlineExceeded) as caught:
        await client._acks.ack(shams_of(1))
    assert caught.value.reason == "ACK_TIMEOUT"
    fake.ack_gate.set()
    again = await client._acks.ack(shams_of(1))
    assert pb.EvidenceContent.FromString(again.content).shams == shams_of(1)
    assert fake.ack_stream_calls == 2  # the late answer could not be matched: a new stream
    await client.close()
    await channel.close()


# --- track and verify -----------------------------------------------------------------------


async def test_track_verifies_letter_and_evidence(
    client: ExchangeClient, fake_node: tuple[FakeNode, str], pki: Pki
) -> None:
    envelope = signed_letter(pki, 5)
    fake_node[0].get_response = get_response(pki, envelope)
    tracking = await client.track(shams_of(5))
    assert tracking.shams == "000.00.00.G22/O/2026/0000005"
    assert tracking.direction == "OUTGOING"
    assert tracking.statuses == {OTHER: "DELIVERED"}
    assert tracking.header.subject == "Budget 2026"
    verified = tracking.verify(TrustStore([pki.root], [pki.intermediate]))
    assert [v.event for v in verified] == ["SUBMISSION_ACCEPTANCE", "DELIVERY"]
    assert [v.issuer for v in verified] == [
        f"urn:chapar:agency:{SENDER}",  # the sender's node accepted the submission
        f"urn:chapar:agency:{OTHER}",  # the recipient's node delivered
    ]
    assert verified[1].recipient == OTHER
    assert verified[1].event_time is not None


async def test_track_verify_rejects_tampered_and_foreign_evidence(
    client: ExchangeClient, fake_node: tuple[FakeNode, str], pki: Pki
) -> None:
    envelope = signed_letter(pki, 6)
    response = get_response(pki, envelope)
    tampered = pb.EvidenceContent.FromString(response.evidence[1].content)
    tampered.recipient = "000.00.00.G77"
    response.evidence[1].content = tampered.SerializeToString()
    fake_node[0].get_response = response
    tracking = await client.track("000.00.00.G22/O/2026/0000006")
    with pytest.raises(VerificationError) as caught:
        tracking.verify(TrustStore([pki.root], [pki.intermediate]))
    assert caught.value.reason == "SIGNATURE_INVALID"

    # Validly signed evidence about another letter is not evidence about this one.
    response = get_response(pki, envelope)
    response.evidence.append(
        signed_evidence(pki, signed_letter(pki, 7), pb.EvidenceEvent.EVIDENCE_EVENT_DELIVERY)
    )
    fake_node[0].get_response = response
    tracking = await client.track("000.00.00.G22/O/2026/0000006")
    with pytest.raises(VerificationError) as caught:
        tracking.verify(TrustStore([pki.root], [pki.intermediate]))
    assert caught.value.reason == "EVIDENCE_MISMATCH"


@pytest.mark.parametrize(
    ("event", "recipient", "by_sender"),
    [
        # the sender's own key on the recipient's HANDOVER, naming the recipient
        (pb.EvidenceEvent.EVIDENCE_EVENT_HANDOVER, OTHER, True),
        # the recipient's key on a HANDOVER it claims for an agency that is no recipient
        (pb.EvidenceEvent.EVIDENCE_EVENT_HANDOVER, "000.00.00.G77", False),
        # an agency's key on what only the hub attests
        (pb.EvidenceEvent.EVIDENCE_EVENT_RELAY_ACCEPTANCE, OTHER, False),
        # the recipient's key on the sender's acceptance
        (pb.EvidenceEvent.EVIDENCE_EVENT_SUBMISSION_ACCEPTANCE, "", False),
    ],
    ids=[
        "handover-by-sender",
        "handover-for-a-stranger",
        "relay-by-agency",
        "submission-by-recipient",
    ],
)
async def test_track_verify_refuses_evidence_its_signer_may_not_attest(
    client: ExchangeClient,
    fake_node: tuple[FakeNode, str],
    pki: Pki,
    event: pb.EvidenceEvent.ValueType,
    recipient: str,
    by_sender: bool,
) -> None:
    # Validly signed, about this very letter, and still no evidence: a signature proves who
    # signed, not that the signer's word counts for the event. Verified before this check,
    # a sender could show a HANDOVER "by" its recipient signed with its own key.
    envelope = signed_letter(pki, 8)
    response = get_response(pki, envelope)
    response.evidence.append(signed_evidence(pki, envelope, event, recipient, by_sender=by_sender))
    fake_node[0].get_response = response
    tracking = await client.track("000.00.00.G22/O/2026/0000008")
    with pytest.raises(VerificationError) as caught:
        tracking.verify(TrustStore([pki.root], [pki.intermediate]))
    assert caught.value.reason == "ISSUER_NOT_ALLOWED"


async def test_track_verify_needs_the_right_root(
    client: ExchangeClient, fake_node: tuple[FakeNode, str], pki: Pki
) -> None:
    fake_node[0].get_response = get_response(pki, signed_letter(pki, 8))
    tracking = await client.track("000.00.00.G22/O/2026/0000008")
    other_key = ec.generate_private_key(ec.SECP256R1())
    other_root = _issue("Other", other_key.public_key(), None, other_key, ca=True)
    with pytest.raises(VerificationError) as caught:
        tracking.verify(TrustStore([other_root], [pki.intermediate]))
    assert caught.value.reason == "CERTIFICATE_UNTRUSTED"


async def test_an_evidence_bundle_verifies_from_its_bytes_with_its_revocations(
    client: ExchangeClient, fake_node: tuple[FakeNode, str], pki: Pki
) -> None:
    fake_node[0].get_response = get_response(pki, signed_letter(pki, 9))
    bundle = await client.evidence_bundle(shams_of(9))
    assert bundle.saved_time.seconds > 0
    tracking = Tracking.from_bundle(bundle.SerializeToString())
    assert tracking.shams == "000.00.00.G22/O/2026/0000009"
    verified = tracking.verify(TrustStore([pki.root], [pki.intermediate]))
    assert [v.event for v in verified] == ["SUBMISSION_ACCEPTANCE", "DELIVERY"]
    # The revocations it was saved with count, beside the verifier's own.
    leaves = [x509.load_der_x509_certificate(der) for der in bundle.letter.certificates]
    bundle.revoked_serials.extend(f"{c.serial_number:x}" for c in leaves)
    revoked = Tracking.from_bundle(bundle.SerializeToString())
    trust = TrustStore([pki.root], [pki.intermediate], revoked_serials={7})
    with pytest.raises(VerificationError) as caught:
        revoked.verify(trust)
    assert caught.value.reason == "CERTIFICATE_REVOKED"
    assert 7 in trust.revoked_serials


def _tree_of(*sequences: int) -> pb.TrackCorrespondenceResponse:
    """A tree answer of these letters, in this order (the first is the one it tracks)."""
    return pb.TrackCorrespondenceResponse(
        letters=[pb.TrackedLetter(shams=shams_of(n), redacted=True) for n in sequences]
    )


@pytest.mark.parametrize("call", ["track", "evidence_bundle", "track_correspondence"])
async def test_an_answer_about_another_letter_than_the_one_asked_is_refused(
    client: ExchangeClient, fake_node: tuple[FakeNode, str], pki: Pki, call: str
) -> None:
    """A node (faulty, or hostile) answers the request about letter 12 with letter 11's
    tracking, bundle or tree. Each is letter 11's, signed, and verifies as such: it was
    taken as the answer about 12 (``chapar track 12`` printed 11's, "verified"). The SDK
    refuses it, the blocking client too."""
    fake, target = fake_node
    fake.get_response = get_response(pki, signed_letter(pki, 11))
    fake.tree_response = _tree_of(11, 12)  # 12 is in it, but not as the letter tracked
    asked, answered = format_shams(shams_of(12)), format_shams(shams_of(11))
    with pytest.raises(errors.InternalError) as caught:
        await getattr(client, call)(asked)
    assert caught.value.reason == "LETTER_MISMATCH"
    assert caught.value.metadata == {"asked": asked, "answered": answered}
    assert not caught.value.retryable

    def blocking() -> str:
        with SyncExchangeClient.from_channel_factory(
            lambda: grpc.aio.insecure_channel(target)
        ) as sync:
            with pytest.raises(errors.InternalError) as caught:
                getattr(sync, call)(shams_of(12))
            return caught.value.reason

    assert await asyncio.to_thread(blocking) == "LETTER_MISMATCH"
    if call != "track_correspondence":
        # An envelope whose header names no letter is about none asked for either.
        fake.get_response.envelope.header = pb.EnvelopeHeader(subject="x").SerializeToString()
        with pytest.raises(errors.InternalError) as caught:
            await getattr(client, call)(asked)
        assert (caught.value.reason, caught.value.metadata["answered"]) == ("LETTER_MISMATCH", "")
    # The same answers, asked about the letters they are about, are taken.
    fake.get_response = get_response(pki, signed_letter(pki, 11))
    taken = await getattr(client, call)(answered)
    if call == "evidence_bundle":
        taken = Tracking.from_bundle(taken)
    assert taken.shams == answered
    if call == "track_correspondence":
        fake.tree_response = _tree_of(12, 11)
        tree = await client.track_correspondence(asked)
        assert [t.shams for t in tree.letters] == [asked, answered]


# --- business status updates ----------------------------------------------------------------

S = pb.BusinessStatus
_SIGNERS = {SENDER: "signer", OTHER: "recipient_signer", THIRD: "third_signer"}


def signed_status_update(
    pki: Pki,
    about: pb.Envelope,
    sequence: int,
    status: int,
    *,
    by: str = OTHER,
    to: Sequence[str] = (SENDER,),
    note: bytes = b"noted",
    seconds_later: int = 0,
    about_shams: pb.Shams | None = None,
) -> pb.Envelope:
    """A status update about the letter ``about``, signed by agency ``by``'s key."""
    header = pb.EnvelopeHeader(
        shams=pb.Shams(
            origin=by, domain=pb.ShamsDomain.SHAMS_DOMAIN_OUTGOING, year=2026, sequence=sequence
        ),
        sender=pb.Address(agency=by),
        recipients=[pb.Address(agency=a) for a in to],
        subject="status",
        kind=pb.LetterKind.LETTER_KIND_STATUS_UPDATE,
        status=status,  # type: ignore[arg-type]
        in_reply_to=about_shams or pb.EnvelopeHeader.FromString(about.header).shams,
        content_type="text/plain; charset=utf-8",
        body_sha256=sha256(note),
        body_size=len(note),
    )
    header.create_time.FromDatetime(
        dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=seconds_later)
    )
    data = header.SerializeToString()
    signer: Signer = getattr(pki, _SIGNERS[by])
    return pb.Envelope(header=data, signature=signer.sign(ENVELOPE_PAYLOAD_TYPE, data), body=note)


def with_updates(
    pki: Pki, envelope: pb.Envelope, updates: Sequence[pb.Envelope], latest: int
) -> pb.GetEnvelopeResponse:
    response = get_response(pki, envelope)
    response.status_updates.extend(updates)
    response.statuses[0].business_status = latest  # type: ignore[assignment]
    return response


async def test_track_shows_the_status_updates_and_verifies_each_offline(
    client: ExchangeClient, fake_node: tuple[FakeNode, str], pki: Pki
) -> None:
    letter = signed_letter(pki, 20)
    accepted = signed_status_update(pki, letter, 1, S.BUSINESS_STATUS_ACCEPTED)
    completed = signed_status_update(
        pki, letter, 2, S.BUSINESS_STATUS_COMPLETED, seconds_later=1, note=b"done"
    )
    recall = signed_status_update(
        pki, letter, 30, S.BUSINESS_STATUS_RECALL_REQUESTED, by=SENDER, to=[OTHER]
    )
    fake_node[0].get_response = with_updates(
        pki, letter, [accepted, completed, recall], S.BUSINESS_STATUS_COMPLETED
    )
    tracking = await client.track(shams_of(20))
    assert [(u.agency, u.status, u.note) for u in tracking.status_updates] == [
        (OTHER, "ACCEPTED", "noted"),
        (OTHER, "COMPLETED", "done"),
        (SENDER, "RECALL_REQUESTED", "noted"),
    ]
    assert tracking.status_updates[1].shams == "000.00.00.G01/O/2026/0000002"
    assert tracking.status_updates[1].time is not None
    assert tracking.business_statuses == {OTHER: "COMPLETED"}
    verified = tracking.verify(TrustStore([pki.root], [pki.intermediate]))
    assert [v.event for v in verified] == ["SUBMISSION_ACCEPTANCE", "DELIVERY"]
    # A node returns the updates without their notes: the signed status still verifies,
    # and the note is said not to be held (None), not to be empty. An update signed
    # without a note has an empty one, checked as any body.
    completed.ClearField("body")
    silent = signed_status_update(
        pki, letter, 3, S.BUSINESS_STATUS_COMPLETED, seconds_later=2, note=b""
    )
    fake_node[0].get_response = with_updates(
        pki, letter, [accepted, completed, silent], S.BUSINESS_STATUS_COMPLETED
    )
    without = await client.track(shams_of(20))
    assert [u.note for u in without.status_updates] == ["noted", None, ""]
    without.verify(TrustStore([pki.root], [pki.intermediate]))
    # A body that is there is always checked, on an update signed with a note or without.
    completed.body = b"other"
    silent.body = b"added"
    for changed in (completed, silent):
        fake_node[0].get_response = with_updates(
            pki, letter, [changed], S.BUSINESS_STATUS_COMPLETED
        )
        tracking = await client.track(shams_of(20))
        with pytest.raises(VerificationError) as caught:
            tracking.verify(TrustStore([pki.root], [pki.intermediate]))
        assert caught.value.reason == "BODY_DIGEST_MISMATCH"


def _by_a_third_party(pki: Pki, letter: pb.Envelope) -> tuple[list[pb.Envelope], int]:
    return [signed_status_update(pki, letter, 1, S.BUSINESS_STATUS_COMPLETED, by=THIRD)], 0


def _to_a_third_party(pki: Pki, letter: pb.Envelope) -> tuple[list[pb.Envelope], int]:
    return [signed_status_update(pki, letter, 1, S.BUSINESS_STATUS_ACCEPTED, to=[THIRD])], 0


def _about_another_letter(pki: Pki, letter: pb.Envelope) -> tuple[list[pb.Envelope], int]:
    other = signed_status_update(
        pki, letter, 1, S.BUSINESS_STATUS_ACCEPTED, about_shams=shams_of(99)
    )
    return [other], 0


def _recall_by_a_recipient(pki: Pki, letter: pb.Envelope) -> tuple[list[pb.Envelope], int]:
    return [signed_status_update(pki, letter, 1, S.BUSINESS_STATUS_RECALL_REQUESTED)], 0


def _status_changed_after_signing(pki: Pki, letter: pb.Envelope) -> tuple[list[pb.Envelope], int]:
    update = signed_status_update(pki, letter, 1, S.BUSINESS_STATUS_REJECTED)
    header = pb.EnvelopeHeader.FromString(update.header)
    header.status = S.BUSINESS_STATUS_COMPLETED
    update.header = header.SerializeToString()
    return [update], S.BUSINESS_STATUS_COMPLETED


def _note_changed_after_signing(pki: Pki, letter: pb.Envelope) -> tuple[list[pb.Envelope], int]:
    update = signed_status_update(pki, letter, 1, S.BUSINESS_STATUS_REJECTED, note=b"wrong office")
    update.body = b"all fine"
    return [update], S.BUSINESS_STATUS_REJECTED


def _latest_claimed_unsigned(pki: Pki, letter: pb.Envelope) -> tuple[list[pb.Envelope], int]:
    return [signed_status_update(pki, letter, 1, S.BUSINESS_STATUS_ACCEPTED)], (
        S.BUSINESS_STATUS_COMPLETED
    )


def _latest_left_out(pki: Pki, letter: pb.Envelope) -> tuple[list[pb.Envelope], int]:
    # REJECTED shown as the latest while a later numbered COMPLETED is there (listed
    # first: the latest is the one numbered last, not the one listed last).
    early = signed_status_update(pki, letter, 1, S.BUSINESS_STATUS_REJECTED)
    late = signed_status_update(pki, letter, 2, S.BUSINESS_STATUS_COMPLETED, seconds_later=5)
    return [late, early], S.BUSINESS_STATUS_REJECTED


@pytest.mark.parametrize(
    ("forge", "reason", "where"),
    [
        (_by_a_third_party, "NOT_A_PARTY", "status update 1: "),
        (_to_a_third_party, "NOT_A_PARTY", "status update 1: "),
        (_about_another_letter, "STATUS_UPDATE_MISMATCH", "status update 1: "),
        (_recall_by_a_recipient, "STATUS_WRONG_DIRECTION", "status update 1: "),
        (_status_changed_after_signing, "SIGNATURE_INVALID", "status update 1: "),
        (_note_changed_after_signing, "BODY_DIGEST_MISMATCH", "status update 1: "),
        (_latest_claimed_unsigned, "STATUS_MISMATCH", f"{OTHER}'s latest status"),
        (_latest_left_out, "STATUS_MISMATCH", f"{OTHER}'s latest status"),
    ],
    ids=[
        "by-a-third-party",
        "to-a-third-party",
        "about-another-letter",
        "recall-by-a-recipient",
        "status-changed",
        "note-changed",
        "latest-unsigned",
        "latest-not-the-last-numbered",
    ],
)
async def test_track_verify_refuses_a_status_update_that_is_not_about_this_letter_by_its_party(
    client: ExchangeClient,
    fake_node: tuple[FakeNode, str],
    pki: Pki,
    forge: Callable[[Pki, pb.Envelope], tuple[list[pb.Envelope], int]],
    reason: str,
    where: str,
) -> None:
    # Each is validly signed by an agency of the exchange (but the tampered ones): the
    # letter and its evidence verify, and the update must not pass with them.
    letter = signed_letter(pki, 21)
    updates, latest = forge(pki, letter)
    fake_node[0].get_response = with_updates(pki, letter, updates, latest)
    tracking = await client.track(shams_of(21))
    with pytest.raises(VerificationError) as caught:
        tracking.verify(TrustStore([pki.root], [pki.intermediate]))
    assert caught.value.reason == reason
    assert str(caught.value).startswith(where), str(caught.value)


async def test_track_of_a_response_with_a_malformed_number_is_an_internal_error(
    client: ExchangeClient, fake_node: tuple[FakeNode, str], pki: Pki
) -> None:
    # A header that parses but carries no valid SHAMS number, the letter's or a status
    # update's: MALFORMED_RESPONSE, as a header that does not parse; no bare ValueError.
    letter = signed_letter(pki, 25)
    update = signed_status_update(pki, letter, 4, S.BUSINESS_STATUS_ACCEPTED)
    header = pb.EnvelopeHeader.FromString(update.header)
    header.shams.domain = pb.ShamsDomain.SHAMS_DOMAIN_UNSPECIFIED
    update.header = header.SerializeToString()
    fake_node[0].get_response = with_updates(pki, letter, [update], S.BUSINESS_STATUS_ACCEPTED)
    with pytest.raises(errors.InternalError) as malformed:
        await client.track(shams_of(25))
    assert malformed.value.reason == "MALFORMED_RESPONSE"
    bad_letter = pb.EnvelopeHeader.FromString(letter.header)
    bad_letter.shams.origin = "not an agency"
    letter.header = bad_letter.SerializeToString()
    fake_node[0].get_response = get_response(pki, letter)
    with pytest.raises(errors.InternalError) as malformed:
        await client.track(shams_of(25))
    assert malformed.value.reason == "MALFORMED_RESPONSE"


async def test_send_status_sends_a_status_update_to_the_other_side_of_the_letter(
    client: ExchangeClient, fake_node: tuple[FakeNode, str]
) -> None:
    about = "000.00.00.G01/O/2026/0000007"
    receipt = await client.send_status(about, "accepted", note="Assigned to the budget office")
    await client.send_status(parse_shams(about), "06", to=[OTHER], subject="Done", request_id="r")
    first, second = fake_node[0].submits
    draft = first.draft
    assert draft.kind == pb.LetterKind.LETTER_KIND_STATUS_UPDATE
    assert draft.status == S.BUSINESS_STATUS_ACCEPTED
    assert format_shams(draft.in_reply_to) == about
    assert list(draft.recipients) == []  # the node addresses it
    assert draft.subject == f"ACCEPTED: {about}"
    assert draft.body == b"Assigned to the budget office"
    assert receipt.request_id == first.request_id
    assert second.draft.status == S.BUSINESS_STATUS_COMPLETED  # edXML's code "06"
    assert [r.agency for r in second.draft.recipients] == [OTHER]
    assert (second.draft.subject, second.request_id) == ("Done", "r")
    # The general path carries it too; a bad status is refused before any call.
    request = Draft(to=(), subject="s", kind="status-update", status="recall-requested")
    assert request.to_request().draft.status == S.BUSINESS_STATUS_RECALL_REQUESTED
    for bad in ("finished", 7, "BUSINESS_STATUS_UNSPECIFIED", "99"):
        with pytest.raises(ValueError, match="business status"):
            Draft(to=[OTHER], subject="s", kind="status_update", status=bad).to_request()
    with pytest.raises(ValueError, match="business status"):
        await client.send_status(about, "done")
    assert len(fake_node[0].submits) == 2


async def test_an_inbox_letter_that_is_a_status_update_says_its_status(
    client: ExchangeClient, fake_node: tuple[FakeNode, str], pki: Pki
) -> None:
    letter = signed_letter(pki, 22)
    update = signed_status_update(
        pki, letter, 3, S.BUSINESS_STATUS_RECALL_REQUESTED, by=SENDER, to=[OTHER]
    )
    fake_node[0].inbox_batches = [
        [
            pb.InboxLetter(envelope=letter, shams=shams_of(22)),
            pb.InboxLetter(
                envelope=update, shams=pb.EnvelopeHeader.FromString(update.header).shams
            ),
        ]
    ]
    got = []
    async with contextlib.aclosing(client.inbox()) as inbox:
        async for item in inbox:
            got.append(item)
            if len(got) == 2:
                break
    assert [(g.kind, g.status, g.in_reply_to) for g in got] == [
        ("REPLY", None, "000.00.00.G01/O/2025/0000007"),
        ("STATUS_UPDATE", "RECALL_REQUESTED", "000.00.00.G22/O/2026/0000022"),
    ]


def test_a_bundle_claiming_its_body_purged_still_has_a_body_it_carries_checked(
    pki: Pki,
) -> None:
    # body_purged is not signed: set on a bundle whose body was changed, it let the changed
    # body through as verified (chapar verify said "verified": true).
    bundle = pb.EvidenceBundle(letter=get_response(pki, signed_letter(pki, 11)))
    bundle.letter.body_purged = True
    bundle.letter.envelope.body = b"pay 1000000 to mallory"
    with pytest.raises(VerificationError) as caught:
        Tracking.from_bundle(bundle.SerializeToString()).verify(
            TrustStore([pki.root], [pki.intermediate])
        )
    assert caught.value.reason == "BODY_DIGEST_MISMATCH"
    bundle.letter.envelope.body = b""  # really purged: the signatures still verify
    purged = Tracking.from_bundle(bundle.SerializeToString())
    assert purged.verify(TrustStore([pki.root], [pki.intermediate]))
    good = pki.signer.certificate.public_bytes(serialization.Encoding.DER)
    version = good.index(bytes.fromhex("a003020102"))  # [0] EXPLICIT INTEGER 2: v3
    bad_version = good[:version] + bytes.fromhex("a003020109") + good[version + 5 :]
    for der in (b"not DER", bad_version):  # a ValueError, an InvalidVersion
        bundle.letter.ClearField("certificates")
        bundle.letter.certificates.append(der)
        with pytest.raises(VerificationError) as caught:
            Tracking.from_bundle(bundle.SerializeToString()).verify(TrustStore([pki.root]))
        assert caught.value.reason == "CERTIFICATE_MALFORMED"


def test_a_signed_evidence_of_an_unknown_event_is_refused_as_such() -> None:
    from client_sdk.trust import check_attestation

    content = pb.EvidenceContent(event=99, issuer=f"urn:chapar:agency:{OTHER}")  # type: ignore[arg-type]
    with pytest.raises(VerificationError) as caught:  # was a ValueError from the enum
        check_attestation(content, sender=SENDER, recipients=[OTHER])
    assert caught.value.reason == "ISSUER_NOT_ALLOWED"


def test_the_cli_prints_an_evidence_of_an_unknown_event_as_malformed() -> None:
    from node.cli_client import _unverified

    content = pb.EvidenceContent(event=99, evidence_id="x")  # type: ignore[arg-type]
    described = _unverified(pb.Evidence(content=content.SerializeToString()))
    assert described["event"] == "MALFORMED"


async def test_a_letter_of_another_kind_says_no_status_whatever_its_header_sets(
    client: ExchangeClient, fake_node: tuple[FakeNode, str]
) -> None:
    header = pb.EnvelopeHeader(
        shams=shams_of(24),
        sender=pb.Address(agency=OTHER),
        recipients=[pb.Address(agency=SENDER)],
        subject="not an update",
        kind=pb.LetterKind.LETTER_KIND_LETTER,
        status=S.BUSINESS_STATUS_COMPLETED,
    )
    fake_node[0].inbox_batches = [
        [
            pb.InboxLetter(
                envelope=pb.Envelope(header=header.SerializeToString()), shams=shams_of(24)
            )
        ]
    ]
    async with contextlib.aclosing(client.inbox()) as inbox:
        letter = await anext(inbox)
    assert (letter.kind, letter.status) == ("LETTER", None)


@pytest.mark.parametrize(
    "data",
    [
        b"not a bundle",
        b"",  # a bundle without a letter
        pb.EvidenceBundle(
            letter=pb.GetEnvelopeResponse(envelope=pb.Envelope(header=b"\xff\xff"))
        ).SerializeToString(),
        pb.EvidenceBundle(
            letter=pb.GetEnvelopeResponse(envelope=pb.Envelope()), revoked_serials=["zz"]
        ).SerializeToString(),
    ],
    ids=["junk", "empty", "header", "serial"],
)
def test_what_is_not_an_evidence_bundle_is_refused_as_such(data: bytes) -> None:
    with pytest.raises(VerificationError) as caught:
        Tracking.from_bundle(data)
    assert caught.value.reason == "BUNDLE_MALFORMED"


async def test_the_directory_gives_a_trust_store_every_intermediate_ca_and_revocation(
    client: ExchangeClient, fake_node: tuple[FakeNode, str]
) -> None:
    # An exchange may have several intermediate CAs (DESIGN section 3); a back-end's own
    # chain holds only its own, so a key issued under another did not verify anywhere.
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _issue("Root", root_key.public_key(), None, root_key, ca=True)
    own_key, other_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(2))
    own = _issue("Inter 1", own_key.public_key(), (root, root_key), root_key, ca=True)
    other = _issue("Inter 2", other_key.public_key(), (root, root_key), root_key, ca=True)
    signing = _issue(
        "sign",
        ed25519.Ed25519PrivateKey.generate().public_key(),
        (other, other_key),
        other_key,
        signing=True,
        uri=f"urn:chapar:agency:{OTHER}",
    )
    der = serialization.Encoding.DER
    with pytest.raises(VerificationError) as untrusted:
        TrustStore([root], [own]).verify_certificate(signing, "signing")
    assert untrusted.value.reason == "CERTIFICATE_UNTRUSTED"
    fake_node[0].directory.agencies[0].signing_certificates.append(signing.public_bytes(der))
    fake_node[0].directory.intermediate_certificates.append(other.public_bytes(der))
    fake_node[0].directory.revoked_serials.append("1f")
    trust = await client.trust_from_directory(TrustStore([root], [own], revoked_serials={7}))
    assert trust.verify_certificate(signing, "signing").agency == OTHER
    assert trust.certificate(key_id(signing)) == signing
    assert trust.revoked_serials == {7, 0x1F}
    fake_node[0].directory.revoked_serials.append("not hex")
    with pytest.raises(errors.InternalError) as malformed:
        await client.trust_from_directory(TrustStore([root]))
    assert malformed.value.reason == "MALFORMED_RESPONSE"


async def test_agencies_lists_the_directory(client: ExchangeClient) -> None:
    (agency,) = await client.agencies()
    assert (agency.code, agency.state) == (OTHER, pb.AGENCY_STATE_ACTIVE)


# --- sync client ----------------------------------------------------------------------------


def test_a_sync_call_made_while_the_client_is_closing_is_refused_not_left_waiting() -> None:
    # close() cancels the calls under way, then stops the loop: a call submitted between
    # the two (a reader thread slow to start) would wait for ever on the stopped loop. It
    # is refused at once instead (seen as a reader left waiting in a loaded full run).
    from client_sdk.sync import _LoopThread

    portal = _LoopThread()
    portal._closing = True  # close() has begun in another thread
    try:
        with pytest.raises(errors.ChaparError) as refused:
            portal.run(asyncio.sleep(0))
        assert refused.value.reason == "CLIENT_CLOSED"
    finally:
        portal._closing = False
        portal.close()


@pytest.mark.parametrize("reading", ["send_stream", "inbox"])
async def test_a_sync_client_closed_from_another_thread_ends_a_blocked_reader(
    fake_node: tuple[FakeNode, str], reading: str
) -> None:
    # One thread waits on a stream (drafts that have not come yet, or an empty inbox);
    # another closes the client at shutdown. The waiting thread must learn it, not wait
    # for ever on a loop that no longer runs, nor get a bare CancelledError.
    target = fake_node[1]
    outcome: list[BaseException] = []
    sync = SyncExchangeClient.from_channel_factory(lambda: grpc.aio.insecure_channel(target))
    work: queue.Queue[Draft | None] = queue.Queue()

    def reader() -> None:
        try:
            if reading == "send_stream":
                for _ in sync.send_stream(iter(work.get, None)):
                    pass
            else:
                for _ in sync.inbox():
                    pass
        except BaseException as exc:  # what the reader learns
            outcome.append(exc)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    await asyncio.sleep(0.5)  # the reader is waiting
    await asyncio.to_thread(sync.close)
    await asyncio.to_thread(thread.join, 10)
    work.put(None)
    assert not thread.is_alive(), "the reader is still waiting"
    (error,) = outcome
    assert isinstance(error, errors.Cancelled), repr(error)
    assert error.reason == "CLIENT_CLOSED"


@pytest.mark.parametrize(
    "pause",
    [None, 0.0, 0.005, 0.05],
    ids=["between-letters", "waiting", "waiting-5ms", "waiting-50ms"],
)
async def test_an_inbox_its_sync_client_closed_under_ends_cancelled_as_the_async_one(
    fake_node: tuple[FakeNode, str], pki: Pki, pause: float | None
) -> None:
    # One thread reads the inbox, another closes the client at shutdown. The async client's
    # reader then gets Cancelled (CLIENT_CLOSED: its stream was cancelled, see
    # test_an_inbox_read_when_its_channel_closes_raises_client_closed_not_cancelled). The
    # blocking one's got that only if grpc cancelled its waiting step first: when close()
    # cancelled the step (the waiting cases, now and then), and always between two letters
    # (handling the last one, pause None here) when it asked for the next, it got
    # FailedPrecondition "the client is closed: the call was not made", which is what a
    # call begun on a closed client gets, not a stream that was open.
    fake_node[0].inbox_batches = [[inbox_letter(pki, 1)]]
    for _ in range(3):  # the waiting cases race the close: a few rounds
        error = await _inbox_reader_when_closed(fake_node[1], pause)
        assert isinstance(error, errors.Cancelled), repr(error)
        assert error.reason == "CLIENT_CLOSED"


async def _inbox_reader_when_closed(target: str, pause: float | None) -> BaseException:
    """What a thread reading a blocking client's inbox learns when another closes the
    client: after its first letter, while it handles it (``pause`` None) or ``pause``
    seconds after it asked for the next."""
    sync = SyncExchangeClient.from_channel_factory(lambda: grpc.aio.insecure_channel(target))
    read, closed = threading.Event(), threading.Event()
    outcome: list[BaseException] = []

    def reader() -> None:
        letters = sync.inbox()
        try:
            next(letters)
            read.set()
            if pause is None:
                closed.wait(10)  # handling the letter while the client closes
            next(letters)
        except BaseException as exc:  # what the reader learns
            outcome.append(exc)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    assert await asyncio.to_thread(read.wait, 10)
    if pause is not None:
        await asyncio.sleep(pause)  # the reader asks for the next letter meanwhile
    await asyncio.to_thread(sync.close)
    closed.set()
    await asyncio.to_thread(thread.join, 10)
    assert not thread.is_alive(), "the reader is still waiting"
    (error,) = outcome
    return error


async def test_a_sync_client_closed_by_two_threads_at_once_closes_once_and_both_return(
    fake_node: tuple[FakeNode, str],
) -> None:
    target = fake_node[1]
    sync = SyncExchangeClient.from_channel_factory(lambda: grpc.aio.insecure_channel(target))
    client, portal = sync._client, sync._portal
    real_close, real_stop = client.close, portal.loop.stop
    closes, stops = [], []

    async def slow_close() -> None:  # both threads are inside close() at once
        closes.append(1)
        await asyncio.sleep(0.2)
        await real_close()

    def counted_stop() -> None:
        stops.append(1)
        real_stop()

    client.close = slow_close  # type: ignore[method-assign]
    portal.loop.stop = counted_stop  # type: ignore[method-assign]
    start = threading.Barrier(2)
    outcomes: list[BaseException | None] = []

    def close() -> None:
        start.wait()
        try:
            sync.close()
            outcomes.append(None)
        except BaseException as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=close, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        await asyncio.to_thread(thread.join, 10)
    assert not any(t.is_alive() for t in threads), "a close() is still waiting"
    assert outcomes == [None, None]
    assert (len(closes), len(stops)) == (1, 1)
    assert portal.loop.is_closed()
    sync.close()  # and once more, later: nothing to do


async def test_sync_client_sends_and_streams_like_the_async_one(
    fake_node: tuple[FakeNode, str], pki: Pki
) -> None:
    fake, target = fake_node
    fake.inbox_batches = [
        [
            pb.InboxLetter(
                envelope=signed_letter(pki, 9),
                shams=shams_of(9),
                delivery=signed_evidence(
                    pki, signed_letter(pki, 9), pb.EvidenceEvent.EVIDENCE_EVENT_DELIVERY
                ),
            )
        ]
    ]

    def blocking() -> tuple[Receipt, list[Receipt | ChaparError], str, int]:
        with SyncExchangeClient.from_channel_factory(
            lambda: grpc.aio.insecure_channel(target)
        ) as sync:
            receipt = sync.send(to=[OTHER], subject="sync", body="hello", request_id="r-sync")
            streamed = list(sync.send_stream(Draft(to=[OTHER], subject=f"s{i}") for i in range(5)))
            inbox = sync.inbox()
            letter = next(inbox)
            handover = letter.ack()
            inbox.close()
            fake.get_response = get_response(pki, signed_letter(pki, 10))
            bundle = sync.evidence_bundle(shams_of(10))
            assert Tracking.from_bundle(bundle.SerializeToString()).shams.endswith("/0000010")
            fake.abort = Abort(grpc.StatusCode.NOT_FOUND, "gone")
            with pytest.raises(errors.NotFound):
                sync.track("000.00.00.G22/O/2026/0000009")
        with pytest.raises(errors.FailedPrecondition) as closed:  # as the async client
            letter.ack()
        assert closed.value.reason == "CLIENT_CLOSED"
        event = pb.EvidenceContent.FromString(handover.content).event
        return receipt, streamed, letter.shams, event

    receipt, streamed, shams, event = await asyncio.to_thread(blocking)
    (request,) = fake.submits
    assert request.request_id == "r-sync"
    assert request.draft.body == b"hello"
    assert request.draft.content_type == "text/plain; charset=utf-8"
    assert receipt.shams == "000.00.00.G22/O/2026/0000001"
    assert [r.shams for r in streamed if isinstance(r, Receipt)] == [
        f"000.00.00.G22/O/2026/000000{i}" for i in range(2, 7)
    ]
    assert shams == "000.00.00.G22/O/2026/0000009"
    assert event == pb.EvidenceEvent.EVIDENCE_EVENT_HANDOVER
    assert [a.shams for a in fake.acks] == [shams_of(9)]
    assert (fake.ack_stream_calls, fake.ack_batches) == (1, [1])  # on the stream, as async


# --- credentials and CLI over real mutual TLS ----------------------------------------------


def test_credentials_from_pki_reads_the_agency_client_files(pki: Pki) -> None:
    creds = Credentials.from_pki(pki.dir, SENDER)
    identity = creds.identity()
    assert identity is not None
    assert identity.uri == f"urn:chapar:client:{SENDER}:backend"
    assert "private_key" not in repr(creds)
    store = creds.trust_store()
    store.add_certificates([pki.signer.certificate])
    assert store.verify_certificate(pki.signer.certificate, "signing").agency == SENDER
    with pytest.raises(ValueError, match="invalid client identity"):
        Credentials.from_pki(pki.dir, "../etc")
    with pytest.raises(ValueError, match="not PEM"):
        Credentials(b"junk", b"junk", b"junk")


def test_credentials_refuse_a_key_that_is_not_the_certificates(pki: Pki) -> None:
    """A mixed-up key file (here the node's TLS key beside the client certificate) is named
    at once, not left to the handshake (where gRPC says only UNAVAILABLE)."""
    folder = pki.dir / "agencies" / SENDER
    with pytest.raises(
        ValueError, match=r"^client private key does not match the client certificate$"
    ):
        Credentials.from_files(
            pki.dir / "ca" / "root.crt", folder / "client.crt", folder / "tls.key"
        )
    with pytest.raises(
        ValueError, match=r"^client private key does not match the client certificate$"
    ):
        Credentials(
            (pki.dir / "ca" / "root.crt").read_bytes(),
            (folder / "client.key").read_bytes(),
            (folder / "tls.crt").read_bytes(),
        )


def test_credentials_name_a_chain_in_the_wrong_order(pki: Pki) -> None:
    """The intermediate first and the client certificate after it (files concatenated the
    other way round): the key is the chain's second certificate's, and the error says the
    order is wrong, not that the key is someone else's."""
    folder = pki.dir / "agencies" / SENDER
    leaf, intermediate = x509.load_pem_x509_certificates((folder / "client.crt").read_bytes())
    reversed_chain = b"".join(
        c.public_bytes(serialization.Encoding.PEM) for c in (intermediate, leaf)
    )
    with pytest.raises(ValueError, match=r"client certificate chain: .*first.*leaf first"):
        Credentials(
            (pki.dir / "ca" / "root.crt").read_bytes(),
            (folder / "client.key").read_bytes(),
            reversed_chain,
        )


def test_credentials_name_a_chain_that_cannot_reach_the_root(pki: Pki, tmp_path: Path) -> None:
    """A client certificate without its intermediate (the leaf alone in the file) or from
    another CA: the file and the issuer that is missing are named at load. The handshake
    said only UNAVAILABLE, which a back-end retries for ever."""
    root = pki.dir / "ca" / "root.crt"
    folder = pki.dir / "agencies" / SENDER
    leaf, _ = x509.load_pem_x509_certificates((folder / "client.crt").read_bytes())
    leaf_only = tmp_path / "client.crt"
    leaf_only.write_bytes(_pem(leaf))
    inter = re.escape(pki.intermediate.subject.rfc4514_string())
    with pytest.raises(
        ValueError, match=rf"^{re.escape(str(leaf_only))} does not chain to .*{inter}"
    ):
        Credentials.from_files(root, leaf_only, folder / "client.key")
    with pytest.raises(ValueError, match=rf"^client certificate chain does not chain to .*{inter}"):
        Credentials(root.read_bytes(), (folder / "client.key").read_bytes(), _pem(leaf))
    # Another CA's whole chain but its root: the root is what is missing.
    other_root_key = ec.generate_private_key(ec.SECP256R1())
    other_root = _issue("Other Root", other_root_key.public_key(), None, other_root_key, ca=True)
    other_key = ec.generate_private_key(ec.SECP256R1())
    other_inter = _issue(
        "Other Inter", other_key.public_key(), (other_root, other_root_key), other_root_key, ca=True
    )
    key = ec.generate_private_key(ec.SECP256R1())
    other_leaf = _issue(
        "other client",
        key.public_key(),
        (other_inter, other_key),
        other_key,
        tls=True,
        uri=f"urn:chapar:client:{SENDER}:backend",
    )
    missing = r'no certificate of "CN=Other Root", the issuer of "CN=Other Inter", is in either$'
    with pytest.raises(ValueError, match=missing):
        Credentials(root.read_bytes(), _key_pem(key), _pem(other_leaf, other_inter))
    alone = _issue(
        "alone", key.public_key(), None, key, tls=True, uri=f"urn:chapar:client:{SENDER}:x"
    )
    with pytest.raises(ValueError, match=r'"CN=alone" is self-signed and not one of them$'):
        Credentials(root.read_bytes(), _key_pem(key), _pem(alone))
    # The leaf alone still loads when the roots given hold its intermediate.
    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes(_pem(pki.root, pki.intermediate))
    assert Credentials.from_files(bundle, leaf_only, folder / "client.key").identity() is not None


def test_credentials_name_an_issuer_given_with_another_key_as_such() -> None:
    """The intermediate renewed with a new key, the client certificate issued by the new
    one, and the file still holding the old intermediate (same name): the error said that
    no certificate of that name was given, when one was, the one of the old key."""
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _issue("Root", root_key.public_key(), None, root_key, ca=True)
    old_key, new_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    old_inter = _issue("Inter", old_key.public_key(), (root, root_key), root_key, ca=True)
    new_inter = _issue("Inter", new_key.public_key(), (root, root_key), root_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = _issue(
        "client",
        key.public_key(),
        (new_inter, new_key),
        new_key,
        tls=True,
        uri=f"urn:chapar:client:{SENDER}:backend",
    )
    given = r'the certificate of "CN=Inter" given is not the issuer of "CN=client" \(another key'
    with pytest.raises(ValueError, match=given):
        Credentials(_pem(root), _key_pem(key), _pem(leaf, old_inter))
    # The renewed intermediate in its place: it loads.
    assert Credentials(_pem(root), _key_pem(key), _pem(leaf, new_inter)).identity() is not None


def _encrypted(key_file: Path, out: Path, form: str) -> Path:
    """``key_file``'s key written encrypted under a passphrase, as PKCS#8 or in OpenSSL's
    traditional form (``Proc-Type: 4,ENCRYPTED``)."""
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    fmt = {
        "pkcs8": serialization.PrivateFormat.PKCS8,
        "traditional": serialization.PrivateFormat.TraditionalOpenSSL,
    }[form]
    out.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, fmt, serialization.BestAvailableEncryption(b"secret")
        )
    )
    return out


@pytest.mark.parametrize("form", ["pkcs8", "traditional"])
def test_credentials_name_an_encrypted_key_file_as_encrypted(
    pki: Pki, tmp_path: Path, form: str
) -> None:
    """A client key protected by a passphrase: one error naming the file and saying it is
    encrypted, from from_files and from_pki alike (it said only "not a PEM private key",
    naming no file)."""
    folder = pki.dir / "agencies" / SENDER
    key = _encrypted(folder / "client.key", tmp_path / "client.key", form)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(key))} is encrypted"):
        Credentials.from_files(pki.dir / "ca" / "root.crt", folder / "client.crt", key)
    copy = tmp_path / "pki"
    shutil.copytree(pki.dir, copy)
    _encrypted(folder / "client.key", copy / "agencies" / SENDER / "client.key", form)
    where = re.escape(str(copy / "agencies" / SENDER / "client.key"))
    with pytest.raises(ValueError, match=rf"^{where} is encrypted"):
        Credentials.from_pki(copy, SENDER)


@pytest.fixture
async def tls_node(
    pki: Pki, fake_node: tuple[FakeNode, str]
) -> AsyncIterator[tuple[FakeNode, str]]:
    folder = pki.dir / "agencies" / SENDER
    server = grpc.aio.server()
    pb.add_NodeServiceServicer_to_server(fake_node[0], server)
    creds = grpc.ssl_server_credentials(
        [((folder / "tls.key").read_bytes(), (folder / "tls.crt").read_bytes())],
        root_certificates=(pki.dir / "ca" / "root.crt").read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    yield fake_node[0], f"localhost:{port}"
    await server.stop(None)


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="chapar")
    cli_client.register(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(argv)
    code: int = ns.func(ns)
    return code


async def test_cli_send_and_track_over_mutual_tls(
    tls_node: tuple[FakeNode, str], pki: Pki, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    fake, target = tls_node
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "addresses.json").write_text(
        json.dumps({"hub": "127.0.0.1:1", "nodes": {SENDER: target}, "pki": str(pki.dir)})
    )
    code = await asyncio.to_thread(
        run_cli, "send", "--demo", str(demo), "--agency", SENDER, "--to", OTHER,
        "--subject", "Budget", "--body", "hello", "--kind", "inquiry", "--json",
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    printed = json.loads(out)
    assert printed["shams"] == "000.00.00.G22/O/2026/0000001"
    assert printed["shams_checked"] == "000.00.00.G22/O/2026/0000001:L"  # added beside it
    assert printed["evidence"]["event"] == "SUBMISSION_ACCEPTANCE"
    assert fake.submits[0].draft.kind == pb.LetterKind.LETTER_KIND_INQUIRY
    code = await asyncio.to_thread(
        run_cli, "send", "--demo", str(demo), "--agency", SENDER, "--to", OTHER,
        "--subject", "Budget", "--body", "hello",
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == "000.00.00.G22/O/2026/0000002:J"  # the number to quote

    fake.get_response = get_response(pki, signed_letter(pki, 1))
    code = await asyncio.to_thread(
        run_cli, "track", "000.00.00.G22/O/2026/0000001", "--pki", str(pki.dir),
        "--agency", SENDER, "--node", target,
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert out.startswith("000.00.00.G22/O/2026/0000001:L  OUTGOING")
    assert f"{OTHER}  DELIVERED" in out
    assert out.count("verified") == 2

    fake.abort = Abort(
        grpc.StatusCode.NOT_FOUND,
        "no such letter",
        rich_metadata(grpc.StatusCode.NOT_FOUND, "no such letter", "LETTER_NOT_FOUND"),
    )
    code = await asyncio.to_thread(
        run_cli, "track", "000.00.00.G22/O/2026/0000099", "--demo", str(demo), "--agency", SENDER
    )
    out, err = capsys.readouterr()
    assert code == 1
    assert err == "error: NOT_FOUND LETTER_NOT_FOUND: no such letter\n"


async def test_cli_track_saves_the_evidence_bundle_readable_by_its_owner_only(
    tls_node: tuple[FakeNode, str], pki: Pki, tmp_path: Path
) -> None:
    """The bundle holds the letter's body: it is written mode 0600 as the keys are, whatever
    the umask lets through, and a file it replaces keeps none of its wider mode."""
    fake, target = tls_node
    fake.get_response = get_response(pki, signed_letter(pki, 3))
    conn = ["--pki", str(pki.dir), "--agency", SENDER, "--node", target]
    fresh, replaced = tmp_path / "fresh.bundle", tmp_path / "replaced.bundle"
    replaced.write_bytes(b"an older bundle")
    replaced.chmod(0o644)
    umask = os.umask(0o022)  # a common one: before, the bundle came out 0644
    try:
        for path in (fresh, replaced):
            code = await asyncio.to_thread(
                run_cli, "track", format_shams(shams_of(3)), *conn, "--save", str(path)
            )
            assert code == 0
    finally:
        os.umask(umask)
    for path in (fresh, replaced):
        assert oct(path.stat().st_mode & 0o777) == oct(0o600), path
        assert Tracking.from_bundle(path.read_bytes()).shams == format_shams(shams_of(3))


async def test_cli_inbox_acks_and_agencies_over_mutual_tls(
    tls_node: tuple[FakeNode, str], pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    fake, target = tls_node
    fake.inbox_batches = [[inbox_letter(pki, 4, subject="Circular 4")]]
    conn = ["--pki", str(pki.dir), "--agency", SENDER, "--node", target]
    code = await asyncio.to_thread(run_cli, "inbox", *conn, "--ack", "--limit", "1")
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    first, second = out.splitlines()
    assert first == f"000.00.00.G22/O/2026/0000004:F  from {SENDER}  Circular 4  | Dear colleagues,"
    assert second.startswith("  HANDOVER ")
    assert [a.shams for a in fake.acks] == [shams_of(4)]

    # Without --limit the stream stays open: --timeout ends the listening, not in error.
    code = await asyncio.to_thread(run_cli, "inbox", *conn, "--json", "--timeout", "0.5")
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    (line,) = out.splitlines()
    printed = json.loads(line)
    assert printed["subject"] == "Circular 4"
    assert (printed["shams"], printed["shams_checked"]) == (
        "000.00.00.G22/O/2026/0000004",
        "000.00.00.G22/O/2026/0000004:F",
    )
    assert len(fake.acks) == 1

    # --json --ack: the letter's object (printed before it is acknowledged), then its
    # handover's.
    code = await asyncio.to_thread(run_cli, "inbox", *conn, "--json", "--ack", "--limit", "1")
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    letter, handed = (json.loads(line) for line in out.splitlines())
    assert (letter["subject"], "handover" in letter) == ("Circular 4", False)
    assert handed["shams"] == letter["shams"]
    assert handed["handover"]["event"] == "HANDOVER"
    assert len(fake.acks) == 2

    code = await asyncio.to_thread(run_cli, "agencies", *conn, "--json")
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert json.loads(out) == [{"code": OTHER, "display_name": "Ministry", "state": "ACTIVE"}]

    def sync_agencies() -> list[pb.Agency]:
        with SyncExchangeClient(target, Credentials.from_pki(pki.dir, SENDER)) as sync:
            return sync.agencies()

    assert [a.code for a in await asyncio.to_thread(sync_agencies)] == [OTHER]


async def test_cli_sends_a_status_update_and_track_prints_the_statuses(
    tls_node: tuple[FakeNode, str], pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    fake, target = tls_node
    conn = ["--pki", str(pki.dir), "--agency", SENDER, "--node", target]
    about = "000.00.00.G01/O/2026/0000007"
    code = await asyncio.to_thread(
        run_cli, "send", *conn, "--status", "accepted", "--in-reply-to", about, "--json"
    )
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    (request,) = fake.submits
    assert request.draft.kind == pb.LetterKind.LETTER_KIND_STATUS_UPDATE
    assert request.draft.status == S.BUSINESS_STATUS_ACCEPTED
    assert format_shams(request.draft.in_reply_to) == about
    assert list(request.draft.recipients) == []  # the node addresses it
    assert request.draft.subject == f"ACCEPTED: {about}"
    code = await asyncio.to_thread(run_cli, "send", *conn, "--subject", "x", "--body", "y")
    out, err = capsys.readouterr()
    assert code == 1
    assert err == "error: INVALID_ARGUMENT MISSING_OPTION: a letter needs --to\n"
    assert len(fake.submits) == 1

    letter = signed_letter(pki, 23)
    updates = [
        signed_status_update(pki, letter, 1, S.BUSINESS_STATUS_ACCEPTED),
        signed_status_update(
            pki, letter, 2, S.BUSINESS_STATUS_COMPLETED, seconds_later=1, note=b"done\nall"
        ),
    ]
    fake.get_response = with_updates(pki, letter, updates, S.BUSINESS_STATUS_COMPLETED)
    code = await asyncio.to_thread(run_cli, "track", format_shams(shams_of(23)), *conn)
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert f"  {OTHER}  DELIVERED  status COMPLETED\n" in out
    lines = out.split("status updates:\n")[1].splitlines()
    assert [line.split("  ")[1] for line in lines] == ["ACCEPTED", "COMPLETED"]
    assert lines[1].endswith(f"to {SENDER}  000.00.00.G01/O/2026/0000002:O  | done all  verified")
    code = await asyncio.to_thread(run_cli, "track", format_shams(shams_of(23)), *conn, "--json")
    out, err = capsys.readouterr()
    printed = json.loads(out)
    assert printed["business_statuses"] == {OTHER: "COMPLETED"}
    assert [(u["from"], u["status"], u["verified"]) for u in printed["status_updates"]] == [
        (OTHER, "ACCEPTED", True),
        (OTHER, "COMPLETED", True),
    ]
    completed = printed["status_updates"][1]
    assert (completed["shams"], completed["shams_checked"]) == (
        "000.00.00.G01/O/2026/0000002",
        "000.00.00.G01/O/2026/0000002:O",
    )


def test_cli_reports_missing_credentials_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("agencies", "--node", "127.0.0.1:1") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: INVALID_ARGUMENT CREDENTIALS_MISSING: ")
    assert err.count("\n") == 1


# --- public names ---------------------------------------------------------------------------


def test_public_names_are_exactly_the_documented_ones() -> None:
    assert set(client_sdk.__all__) == {
        "ExchangeClient",
        "SyncExchangeClient",
        "Credentials",
        "Receipt",
        "Letter",
        "Tracking",
        "Correspondence",
        "TreeLetter",
        "StatusUpdate",
        "VerifiedEvidence",
        "Draft",
        "Attachment",
        "ChaparError",
        "InvalidArgument",
        "NotFound",
        "AlreadyExists",
        "PermissionDenied",
        "Unauthenticated",
        "FailedPrecondition",
        "ResourceExhausted",
        "Unavailable",
        "DeadlineExceeded",
        "Cancelled",
        "OutOfRange",
        "DataLoss",
        "InternalError",
        "format_shams",
        "format_shams_checked",
        "parse_shams",
        "parse_shams_typed",
        "save_bundle",
    }
    for name in client_sdk.__all__:
        assert getattr(client_sdk, name).__module__.startswith("client_sdk.")
    classes = [getattr(errors, n) for n in errors.__all__ if isinstance(getattr(errors, n), type)]
    assert len(classes) == 14
    assert all(issubclass(c, ChaparError) for c in classes)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("report.pdf", "report.pdf"),
        ("گزارش بودجه.pdf", "گزارش بودجه.pdf"),
        ("../../home/svc/.bashrc", "bashrc"),  # never hidden: partial downloads are
        (".report.pdf.abababababababab.part", "report.pdf.abababababababab.part"),
        ("/etc/cron.d/evil", "evil"),
        ("..\\evil.exe", "evil.exe"),
        ("..", None),
        ("", None),
        ("dir/", None),
        # Control characters: NUL ended save_into with a bare ValueError ("embedded null
        # byte"), the others made names a shell or a listing shows falsely.
        ("a\x00b.pdf", "a_b.pdf"),
        ("line\nbreak\r.pdf", "line_break_.pdf"),
        ("\x1b[31mred.pdf", "_[31mred.pdf"),
        ("\x00", "_"),
    ],
)
def test_an_attachment_name_cannot_lead_out_of_the_directory_it_is_saved_into(
    name: str, expected: str | None
) -> None:
    # The name comes from the sender's signed header: a sender node of another agency
    # (or an older node, which took any name) chooses it. save_into() uses safe_file_name.
    uri = "chapar://000.00.00.G22/documents/sha256/" + "ab" * 32
    attachment = Attachment(uri, b"\xab" * 32, 10, "application/pdf", name, None)  # type: ignore[arg-type]
    safe = attachment.safe_file_name
    assert safe == (expected or "attachment-" + "ab" * 8)
    assert (Path("/inbox") / safe).parent == Path("/inbox")


@pytest.mark.parametrize(
    "bad",
    [
        {"kind": "memo"},
        {"priority": 99},
        {"in_reply_to": "not a number"},
        {"status": "maybe"},
        {"subject": 7},
        {"to": [("ONE.PART",)]},
    ],
)
async def test_a_draft_with_a_bad_value_is_refused_where_it_is_made(
    client: ExchangeClient, fake_node: tuple[FakeNode, str], bad: dict[str, Any]
) -> None:
    """Found when a stream built its frame, a bad value ended send_stream with a bare
    ValueError and lost the good drafts taken around it, and a send_many after earlier
    calls had been accepted. Now the back-end's own line that makes the draft raises."""
    with pytest.raises(ValueError, match="invalid draft"):
        Draft(**{"to": [OTHER], "subject": "s", **bad})
    results = [
        r async for r in client.send_stream(Draft(to=[OTHER], subject=f"{i}") for i in range(5))
    ]
    assert all(isinstance(r, Receipt) for r in results)


class _LateNode(FakeNode):
    """Stores a submitted letter, then answers too late while ``late`` is set."""

    late = True

    async def SubmitEnvelope(self, request: pb.SubmitEnvelopeRequest, context: Any) -> Any:
        answer = await super().SubmitEnvelope(request, context)
        if self.late:
            await asyncio.sleep(1.0)
        return answer


async def test_a_send_that_fails_after_the_node_took_it_can_be_sent_again_safely() -> None:
    """``send`` without a request id: a deadline that passes after the node stored the
    letter is retryable, and the error carries the draft with the id made for it, so the
    retry is the same letter, not a second one."""
    fake = _LateNode()
    server = grpc.aio.server()
    pb.add_NodeServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    client = ExchangeClient.from_channel(channel)
    try:
        with pytest.raises(errors.DeadlineExceeded) as info:
            await client.send(to=[OTHER], subject="Budget", body="once", timeout=0.2)
        assert info.value.retryable
        (draft,) = info.value.unanswered
        fake.late = False
        (again,) = await client.send_many(list(info.value.unanswered))
        assert isinstance(again, Receipt)
        assert again.request_id == draft.request_id
        sent = [r.request_id for r in fake.submits]
        sent += [r.request_id for b in fake.batches for r in b.requests]
        assert sent == [draft.request_id, draft.request_id]  # the same letter, twice asked
    finally:
        await channel.close()
        await server.stop(None)


_BIG_MESSAGES = 64 * 1024 * 1024


async def _serve(servicer: Any, add: Any, limit: int = _BIG_MESSAGES) -> tuple[Any, str]:
    """A fake server taking messages of up to ``limit`` bytes (a node takes 16 MiB)."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", _BIG_MESSAGES),
        ]
    )
    add(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


class _CountingNode(FakeNode):
    """Counts the SubmitEnvelope calls under way at once."""

    def __init__(self) -> None:
        super().__init__()
        self.now = self.most = 0

    async def SubmitEnvelope(self, request: pb.SubmitEnvelopeRequest, context: Any) -> Any:
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            await asyncio.sleep(0.05)
            return await super().SubmitEnvelope(request, context)
        finally:
            self.now -= 1


async def test_letters_too_big_for_a_frame_go_alone_but_within_max_in_flight() -> None:
    # Each went by a call of its own at once, however many: no backpressure.
    node = _CountingNode()
    server, address = await _serve(node, pb.add_NodeServiceServicer_to_server)
    channel = grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", -1)])
    client = ExchangeClient.from_channel(channel)
    body = b"x" * (STREAM_FRAME_BYTES + 1)
    try:
        drafts = [Draft(to=[OTHER], subject=f"big {i}", body=body) for i in range(6)]
        results = [r async for r in client.send_stream(drafts, batch_size=1, max_in_flight=2)]
    finally:
        await channel.close()
        await server.stop(None)
    assert [r.request_id for r in results if isinstance(r, Receipt)] == [
        d.request_id for d in drafts
    ]
    assert node.most == 2


async def test_a_draft_large_by_more_than_its_body_goes_alone_too() -> None:
    # Frames were cut by body bytes: a 17 MiB subject rode in a frame with the others, and
    # the node's refusal of the whole message failed them all, not retryable.
    node = FakeNode()
    server, address = await _serve(node, pb.add_NodeServiceServicer_to_server, 16 * 1024 * 1024)
    channel = grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", -1)])
    client = ExchangeClient.from_channel(channel)
    small = [Draft(to=[OTHER], subject=f"small {i}", body="ok") for i in range(4)]
    odd = Draft(to=[OTHER], subject="s" * (17 * 1024 * 1024), body="ok")
    try:
        async with client.shared_stream() as shared:
            outcomes = await asyncio.gather(
                *(shared.send(d) for d in [*small[:2], odd, *small[2:]]), return_exceptions=True
            )
    finally:
        await channel.close()
        await server.stop(None)
    assert all(isinstance(o, Receipt) for o in outcomes[:2] + outcomes[3:]), outcomes
    assert isinstance(outcomes[2], errors.ResourceExhausted), outcomes[2]


class _GatedDocuments(pb.DocumentServiceServicer):
    """Serves documents by digest; each download waits at ``gate`` after its header."""

    def __init__(self, contents: Sequence[bytes]) -> None:
        self.by_digest = {sha256(c): c for c in contents}
        self.gate = asyncio.Event()

    async def DownloadDocument(
        self, request: pb.DownloadDocumentRequest, context: Any
    ) -> AsyncIterator[pb.DownloadDocumentResponse]:
        digest = bytes.fromhex(request.uri.rsplit("/", 1)[1])
        content = self.by_digest[digest]
        info = pb.DocumentInfo(uri=request.uri, sha256=digest, size=len(content))
        yield pb.DownloadDocumentResponse(document=info)
        await self.gate.wait()
        yield pb.DownloadDocumentResponse(chunk=content[request.offset :])


def _attachment_of(content: bytes, name: str, client: ExchangeClient) -> Attachment:
    digest = sha256(content)
    ref = pb.AttachmentRef(
        uri=f"chapar://{SENDER}/documents/sha256/{digest.hex()}",
        sha256=digest,
        size=len(content),
        media_type="application/pdf",
        file_name=name,
    )
    return Attachment.from_ref(ref, client)


async def test_two_documents_of_one_name_saved_into_one_directory_at_once_keep_both(
    tmp_path: Path,
) -> None:
    # Both saw no file of that name, and the second rename replaced the first's file:
    # both calls returned contract.pdf, holding one document.
    one, two = b"contract of letter one", b"contract of letter two!"
    docs = _GatedDocuments([one, two])
    server, address = await _serve(docs, add_DocumentServiceServicer_to_server)
    channel = grpc.aio.insecure_channel(address)
    client = ExchangeClient.from_channel(channel)
    try:
        saving = [
            asyncio.create_task(_attachment_of(c, "contract.pdf", client).save_into(tmp_path))
            for c in (one, two)
        ]
        await asyncio.sleep(0.2)
        docs.gate.set()
        paths = await asyncio.gather(*saving)
    finally:
        await channel.close()
        await server.stop(None)
    assert [p.read_bytes() for p in paths] == [one, two]
    assert len(set(paths)) == 2


async def test_an_attachment_with_a_long_name_in_another_script_is_saved(tmp_path: Path) -> None:
    # 116 Persian letters and ".pdf": 236 bytes, within the 255 a file name may have; the
    # partial file's longer name went past it (OSError, not a ChaparError).
    content = b"a letter's attachment"
    docs = _GatedDocuments([content, content + b"!"])
    docs.gate.set()
    await asyncio.to_thread((tmp_path / "cut").mkdir)
    server, address = await _serve(docs, add_DocumentServiceServicer_to_server)
    channel = grpc.aio.insecure_channel(address)
    client = ExchangeClient.from_channel(channel)
    long_name, longer = "\u0646" * 116 + ".pdf", "\u0646" * 200 + ".pdf"
    try:
        saved = await _attachment_of(content, long_name, client).save_into(tmp_path)
        again = await _attachment_of(content + b"!", long_name, client).save_into(tmp_path)
        cut = await _attachment_of(content, longer, client).save_into(tmp_path / "cut")
    finally:
        await channel.close()
        await server.stop(None)
    assert saved.name == long_name
    assert saved.read_bytes() == content
    assert again != saved  # another document of that name: beside it, within 255 bytes
    assert again.read_bytes() == content + b"!"
    assert cut.name.endswith(".pdf")
    assert len(cut.name.encode()) <= 255


# --- review: a producer that fails, plain iterable against async iterable -------------------


async def test_send_stream_of_a_plain_iterable_sends_what_came_before_its_producer_failed(
    client: ExchangeClient, fake_node: tuple[FakeNode, str]
) -> None:
    # With an async iterable (test_send_stream_raises_what_broke_the_producer) and with the
    # blocking twin, the drafts given before the producer failed are sent and answered, then
    # the failure is raised. With a plain iterable the frame being filled is dropped: the
    # drafts taken from the caller's iterable are neither sent nor answered nor listed, and
    # the caller cannot tell which of them went.
    def broken() -> Iterator[Draft]:
        yield Draft(to=[OTHER], subject="first")
        raise RuntimeError("producer failed")

    results: list[Receipt | ChaparError] = []

    async def consume() -> None:
        async for result in client.send_stream(broken()):
            results.append(result)

    with pytest.raises(RuntimeError, match="producer failed"):
        await consume()
    sent = [r.draft.subject for f in fake_node[0].frames for r in f.requests]
    assert sent == ["first"], sent
    assert len(results) == 1
    assert isinstance(results[0], Receipt)


async def test_sync_send_stream_sends_what_came_before_its_producer_failed(
    fake_node: tuple[FakeNode, str],
) -> None:
    # The twin of the test above, passing on the blocking client: the behaviour the async
    # client's plain-iterable path does not match.
    fake, target = fake_node

    def broken() -> Iterator[Draft]:
        yield Draft(to=[OTHER], subject="first")
        raise RuntimeError("producer failed")

    def blocking() -> list[Receipt | ChaparError]:
        got: list[Receipt | ChaparError] = []

        def consume(sync: SyncExchangeClient) -> None:
            for result in sync.send_stream(broken()):
                got.append(result)

        with (
            SyncExchangeClient.from_channel_factory(
                lambda: grpc.aio.insecure_channel(target)
            ) as sync,
            pytest.raises(RuntimeError, match="producer failed"),
        ):
            consume(sync)
        return got

    got = await asyncio.to_thread(blocking)
    assert [r.draft.subject for f in fake.frames for r in f.requests] == ["first"]
    assert len(got) == 1
    assert isinstance(got[0], Receipt)


# --- review: Ctrl-C in a blocking stream ----------------------------------------------------


def test_ctrl_c_while_a_blocking_inbox_waits_raises_keyboard_interrupt() -> None:
    # A back-end reads its inbox with the blocking client in its main thread and stops on
    # Ctrl-C (``except KeyboardInterrupt``). The interrupt cancels the ``anext`` under way on
    # the loop, but ``_iterate``'s finally calls ``stream.aclose()`` at once, while that
    # ``anext`` is still running on the loop: RuntimeError ("aclose(): asynchronous
    # generator is already running") replaces the KeyboardInterrupt. (No async fixture: the
    # test's own loop does not run while a blocking call waits, so the fake node runs on a
    # loop of its own.)
    fake = FakeNode()
    started = threading.Event()
    stop: list[Callable[[], None]] = []
    address: list[str] = []

    def serve() -> None:
        async def run() -> None:
            server = grpc.aio.server()
            pb.add_NodeServiceServicer_to_server(fake, server)
            address.append(f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}")
            await server.start()
            done = asyncio.Event()
            loop = asyncio.get_running_loop()
            stop.append(lambda: loop.call_soon_threadsafe(done.set))
            started.set()
            await done.wait()
            await server.stop(None)

        asyncio.run(run())

    server_thread = threading.Thread(target=serve, daemon=True)
    server_thread.start()
    assert started.wait(10)
    main = threading.get_ident()

    def press_ctrl_c() -> None:
        deadline = time.monotonic() + 10
        while not fake.inbox_requests and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # the main thread waits for the next letter by now
        signal.pthread_kill(main, signal.SIGINT)

    client = SyncExchangeClient.from_channel_factory(lambda: grpc.aio.insecure_channel(address[0]))
    raised: BaseException | None = None
    try:
        presser = threading.Thread(target=press_ctrl_c)
        presser.start()
        try:
            for _ in client.inbox():
                pass
        except BaseException as exc:  # what the caller gets is the point
            raised = exc
        presser.join()
    finally:
        client.close()
        stop[0]()
        server_thread.join(10)
    assert isinstance(raised, KeyboardInterrupt), repr(raised)
