"""The hub's document relay ends a fetch OK only when the owner pushed the whole document.

A hub shutting down ends an owner's PushDocument call as if the owner had finished (the
request iterator just stops). The relay then used to end the fetch with OK after part of
the document, and the fetching node stored a short file and failed with SIZE_MISMATCH
instead of resuming. Driven here with stand-ins for the hub and the gRPC contexts.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from client_sdk import pb
from node.core.documents import MAX_EMPTY_CHUNKS
from node.core.errors import ChaparError, Code
from node.hub_documents import DocumentRelay

OWNER, FETCHER = "SENDER.A", "RECIPIENT.B"
URI = f"chapar://{OWNER}/documents/sha256/{'ab' * 32}"


class _Context:
    def __init__(self, agency: str) -> None:
        self.agency = agency
        self.written: list[Any] = []
        self.aborted: tuple[grpc.StatusCode, str] | None = None
        self.reason = ""  # of the abort's ErrorInfo
        self.retry_after: float | None = None  # of its RetryInfo

    async def write(self, message: Any) -> None:
        self.written.append(message)

    async def abort(
        self,
        code: grpc.StatusCode,
        details: str,
        trailing_metadata: tuple[tuple[str, bytes], ...] = (),
    ) -> None:
        self.aborted = (code, details)
        for key, value in trailing_metadata:
            if key == "grpc-status-details-bin":
                for detail in status_pb2.Status.FromString(value).details:
                    info = error_details_pb2.ErrorInfo()
                    retry = error_details_pb2.RetryInfo()
                    if detail.Unpack(info):
                        self.reason = info.reason
                    elif detail.Unpack(retry):
                        self.retry_after = retry.retry_delay.ToTimedelta().total_seconds()
        raise grpc.aio.AbortError()


class _Hub:
    def __init__(self) -> None:
        self.out: asyncio.Queue[pb.ConnectResponse] = asyncio.Queue()
        self._sessions = {OWNER: SimpleNamespace(out=self.out)}
        self.store = SimpleNamespace(may_fetch=self._may_fetch)

    @staticmethod
    async def _may_fetch(digest: bytes, owner: str, agency: str) -> bool:
        return True

    @staticmethod
    def _peer(context: _Context) -> tuple[str, int]:
        return context.agency, 1

    @staticmethod
    def refusal(agency: str, certificate: int) -> ChaparError | None:
        return None


async def _relay(
    offset: int, size: int, pushed: list[bytes | pb.PushDocumentRequest]
) -> tuple[_Context, _Context]:
    """Runs a fetch from ``offset`` and the owner's push of ``pushed`` chunks (or messages
    as they are); returns the fetch's and the push's contexts once both ended."""
    relay = DocumentRelay(_Hub())  # type: ignore[arg-type]
    hub: _Hub = relay.hub  # type: ignore[assignment]
    fetching, pushing = _Context(FETCHER), _Context(OWNER)
    fetch = asyncio.create_task(
        relay.fetch(pb.FetchDocumentRequest(uri=URI, offset=offset), fetching)  # type: ignore[arg-type]
    )
    request = (await asyncio.wait_for(hub.out.get(), 5)).document_request

    async def push() -> AsyncIterator[pb.PushDocumentRequest]:
        yield pb.PushDocumentRequest(header=pb.PushHeader(request_id=request.request_id, size=size))
        for item in pushed:
            yield pb.PushDocumentRequest(chunk=item) if isinstance(item, bytes) else item

    with contextlib.suppress(grpc.aio.AbortError):
        await relay.push(push(), pushing)  # type: ignore[arg-type]
    with contextlib.suppress(grpc.aio.AbortError):
        await asyncio.wait_for(fetch, 5)
    return fetching, pushing


async def test_a_push_cut_short_ends_the_fetch_unavailable_so_the_node_resumes() -> None:
    fetching, pushing = await _relay(0, 100, [b"x" * 40])
    assert fetching.aborted is not None
    assert fetching.aborted[0] == grpc.StatusCode.UNAVAILABLE
    assert "ended after 40 of 100 bytes" in fetching.aborted[1]
    assert [m.chunk for m in fetching.written if m.chunk] == [b"x" * 40]  # what came, came
    assert pushing.aborted is not None
    assert pushing.aborted[0] == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(("offset", "pushed"), [(0, [b"x" * 60, b"y" * 40]), (60, [b"y" * 40])])
async def test_a_whole_push_from_the_asked_offset_ends_the_fetch_ok(
    offset: int, pushed: list[bytes]
) -> None:
    fetching, pushing = await _relay(offset, 100, pushed)
    assert fetching.aborted is None
    assert pushing.aborted is None
    assert fetching.written[0].size == 100
    assert b"".join(m.chunk for m in fetching.written[1:]) == b"".join(pushed)


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        (pb.PushDocumentRequest(header=pb.PushHeader(size=100)), "UNEXPECTED_HEADER"),
        (pb.PushDocumentRequest(), "PUSH_PART_MISSING"),
    ],
    ids=["second-header", "no-part"],
)
async def test_a_push_message_after_the_header_that_is_not_a_chunk_is_refused(
    extra: pb.PushDocumentRequest, reason: str
) -> None:
    """Once passed over as an empty chunk: the push is refused with its own reason, and the
    fetch is not ended OK on what such an owner sends (it breaks off, to be resumed)."""
    fetching, pushing = await _relay(0, 100, [b"x" * 60, extra, b"y" * 40])
    assert pushing.aborted is not None
    assert (pushing.aborted[0], pushing.reason) == (grpc.StatusCode.INVALID_ARGUMENT, reason)
    assert fetching.aborted is not None
    assert (fetching.aborted[0], fetching.reason) == (
        grpc.StatusCode.UNAVAILABLE,
        "PUSH_INTERRUPTED",
    )
    assert b"".join(m.chunk for m in fetching.written[1:]) == b"x" * 60


@pytest.mark.parametrize("chunks", [[b"x" * 60], []], ids=["after-a-chunk", "before-any"])
async def test_a_push_ended_with_an_error_reason_ends_the_fetch_data_loss(
    chunks: list[bytes],
) -> None:
    """The owner found its copy corrupt while pushing it, and ends its push with
    error_reason in place of the rest: the fetch ends DATA_LOSS / DOCUMENT_CORRUPT (not
    resumed, not a digest mismatch the fetching node finds at its end), the push OK."""
    corrupt = pb.PushDocumentRequest(error_reason="DOCUMENT_CORRUPT")
    fetching, pushing = await _relay(0, 100, [*chunks, corrupt])
    assert fetching.aborted is not None
    assert (fetching.aborted[0], fetching.reason) == (
        grpc.StatusCode.DATA_LOSS,
        "DOCUMENT_CORRUPT",
    )
    assert f"the node of {OWNER} found its copy" in fetching.aborted[1]
    assert b"".join(m.chunk for m in fetching.written[1:]) == b"".join(chunks)
    assert pushing.aborted is None, f"the owner's push ended {pushing.aborted} ({pushing.reason})"


async def test_an_owners_error_reason_is_logged_by_the_hub_cut_short(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """error_reason is the owner's text, up to a message's size: the hub logged it whole,
    so that a hostile node wrote a line of megabytes into the hub's log at each push it
    ended so. Its start is logged; the fetch's status carries none of it."""
    said = "DOCUMENT_CORRUPT " + "x" * 1_000_000
    with caplog.at_level("WARNING", logger="chapar"):
        fetching, _ = await _relay(0, 100, [pb.PushDocumentRequest(error_reason=said)])
    assert fetching.aborted is not None
    assert "xxx" not in fetching.aborted[1]
    lines = [r.getMessage() for r in caplog.records if "ended after" in r.getMessage()]
    assert len(lines) == 1
    assert "DOCUMENT_CORRUPT" in lines[0]
    assert len(lines[0]) < 300, len(lines[0])


async def test_a_push_of_too_many_empty_chunks_is_refused_and_the_fetch_breaks_off() -> None:
    """A 0-byte chunk adds nothing to the bytes relayed, so an owner could hold a push (and
    the fetch it answers, whose stall timer each chunk reset) open for ever with them. More
    than MAX_EMPTY_CHUNKS refuse the push with its reason; the fetch breaks off, to be
    resumed from the bytes it has."""
    fetching, pushing = await _relay(
        0, 100, [b"x" * 60] + [b""] * (MAX_EMPTY_CHUNKS + 1) + [b"y" * 40]
    )
    assert pushing.aborted is not None
    assert (pushing.aborted[0], pushing.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "PUSH_EMPTY_CHUNKS",
    )
    assert fetching.aborted is not None
    assert (fetching.aborted[0], fetching.reason) == (
        grpc.StatusCode.UNAVAILABLE,
        "PUSH_INTERRUPTED",
    )
    assert b"".join(m.chunk for m in fetching.written[1:]) == b"x" * 60


async def test_a_push_with_a_few_empty_chunks_ends_the_fetch_ok_without_them() -> None:
    fetching, pushing = await _relay(0, 100, [b"", b"x" * 60, b"", b"", b"y" * 40, b""])
    assert fetching.aborted is None
    assert pushing.aborted is None
    assert [m.chunk for m in fetching.written[1:]] == [b"x" * 60, b"y" * 40]


async def test_a_push_that_stalls_ends_the_fetch_unavailable_and_then_the_push(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An owner alive and connected (keepalive answered) whose push stops sending: the fetch
    waited for ever, and the back-end's download with it. It now ends UNAVAILABLE after
    the owner's silence, so that the fetching node resumes, and the push ends too when it
    sends again."""
    monkeypatch.setattr("node.hub_documents._OWNER_ANSWER_S", 0.3)
    relay = DocumentRelay(_Hub())  # type: ignore[arg-type]
    hub: _Hub = relay.hub  # type: ignore[assignment]
    fetching, pushing = _Context(FETCHER), _Context(OWNER)
    fetch = asyncio.create_task(
        relay.fetch(pb.FetchDocumentRequest(uri=URI), fetching)  # type: ignore[arg-type]
    )
    request = (await asyncio.wait_for(hub.out.get(), 5)).document_request
    unstuck = asyncio.Event()

    async def push() -> AsyncIterator[pb.PushDocumentRequest]:
        yield pb.PushDocumentRequest(header=pb.PushHeader(request_id=request.request_id, size=100))
        yield pb.PushDocumentRequest(chunk=b"x" * 40)
        await unstuck.wait()  # the owner's disk hangs
        yield pb.PushDocumentRequest(chunk=b"y" * 60)

    pusher = asyncio.create_task(relay.push(push(), pushing))  # type: ignore[arg-type]
    with contextlib.suppress(grpc.aio.AbortError):
        await asyncio.wait_for(fetch, 5)
    assert fetching.aborted is not None
    assert (fetching.aborted[0], fetching.reason) == (grpc.StatusCode.UNAVAILABLE, "PUSH_STALLED")
    assert b"".join(m.chunk for m in fetching.written[1:]) == b"x" * 40
    assert not pusher.done()
    unstuck.set()
    with contextlib.suppress(grpc.aio.AbortError):
        await asyncio.wait_for(pusher, 5)
    assert pushing.aborted is not None
    assert (pushing.aborted[0], pushing.reason) == (grpc.StatusCode.UNAVAILABLE, "FETCH_ENDED")


async def test_an_owner_answering_not_found_has_its_push_end_ok_not_fetch_ended() -> None:
    """An owner that does not hold the document pushes a header with error_reason and ends
    its stream (node.documents.push: write, done_writing). The fetch reads that header and
    ends NOT_FOUND at once (setting ``gone``) while the hub still waits for the push's
    end; the push then puts its end marker. Before today that put found room and the push
    ended OK; now ``_put`` raises FETCH_ENDED as soon as ``gone`` is set, so every such
    answer ends the owner's push UNAVAILABLE/FETCH_ENDED (a warning on the owner node and
    a counted rejection on the hub) though nothing went wrong."""
    relay = DocumentRelay(_Hub())  # type: ignore[arg-type]
    hub: _Hub = relay.hub  # type: ignore[assignment]
    fetching, pushing = _Context(FETCHER), _Context(OWNER)
    fetch = asyncio.create_task(
        relay.fetch(pb.FetchDocumentRequest(uri=URI), fetching)  # type: ignore[arg-type]
    )
    request = (await asyncio.wait_for(hub.out.get(), 5)).document_request

    async def push() -> AsyncIterator[pb.PushDocumentRequest]:
        yield pb.PushDocumentRequest(
            header=pb.PushHeader(request_id=request.request_id, error_reason="DOCUMENT_NOT_FOUND")
        )
        await asyncio.sleep(0.05)  # the owner's half-close crosses the network

    with contextlib.suppress(grpc.aio.AbortError):
        await relay.push(push(), pushing)  # type: ignore[arg-type]
    with contextlib.suppress(grpc.aio.AbortError):
        await asyncio.wait_for(fetch, 5)
    assert fetching.aborted is not None
    assert fetching.aborted[0] == grpc.StatusCode.NOT_FOUND
    assert pushing.aborted is None, f"the owner's push ended {pushing.aborted} ({pushing.reason})"


async def _answered(error_reason: str) -> tuple[_Context, _Context]:
    """A fetch whose owner answers with a header carrying ``error_reason``, and ends its
    push (node.documents.push); the fetch's and the push's contexts once both ended."""
    relay = DocumentRelay(_Hub())  # type: ignore[arg-type]
    hub: _Hub = relay.hub  # type: ignore[assignment]
    fetching, pushing = _Context(FETCHER), _Context(OWNER)
    fetch = asyncio.create_task(
        relay.fetch(pb.FetchDocumentRequest(uri=URI), fetching)  # type: ignore[arg-type]
    )
    request = (await asyncio.wait_for(hub.out.get(), 5)).document_request

    async def push() -> AsyncIterator[pb.PushDocumentRequest]:
        yield pb.PushDocumentRequest(
            header=pb.PushHeader(request_id=request.request_id, error_reason=error_reason)
        )

    with contextlib.suppress(grpc.aio.AbortError):
        await relay.push(push(), pushing)  # type: ignore[arg-type]
    with contextlib.suppress(grpc.aio.AbortError):
        await asyncio.wait_for(fetch, 1)  # at once: not the owner's 30 s to answer
    return fetching, pushing


async def test_an_owner_whose_storage_failed_ends_the_fetch_unavailable_not_not_found() -> None:
    """An owner whose document store fails to look the document up answers STORAGE_FAILED
    in its header's error_reason. The hub took every error_reason for DOCUMENT_NOT_FOUND:
    the fetching node's back-end was told, not to retry, that the owner has no such
    document. It is UNAVAILABLE / OWNER_STORAGE_FAILED now, with a delay to retry after."""
    fetching, pushing = await _answered("STORAGE_FAILED")
    assert fetching.aborted is not None
    assert (fetching.aborted[0], fetching.reason) == (
        grpc.StatusCode.UNAVAILABLE,
        "OWNER_STORAGE_FAILED",
    )
    assert f"the node of {OWNER}" in fetching.aborted[1]
    assert fetching.retry_after == 5.0
    assert pushing.aborted is None, f"the owner's push ended {pushing.aborted} ({pushing.reason})"


@pytest.mark.parametrize("said", ["DOCUMENT_NOT_FOUND", "SOMETHING_NEWER"])
async def test_an_owners_not_found_or_unknown_header_reason_ends_the_fetch_not_found(
    said: str,
) -> None:
    """DOCUMENT_NOT_FOUND stays NOT_FOUND; so does a reason this hub does not know (from a
    newer node), at once, as every error_reason was before OWNER_STORAGE_FAILED."""
    fetching, pushing = await _answered(said)
    assert fetching.aborted is not None
    assert (fetching.aborted[0], fetching.reason) == (
        grpc.StatusCode.NOT_FOUND,
        "DOCUMENT_NOT_FOUND",
    )
    assert pushing.aborted is None


async def test_a_fetch_whose_request_cannot_reach_the_owner_ends_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The owner's Connect stream is full (its node reads slowly, or its session has just
    ended: then nobody ever reads the queue again). The fetch waited for room to ask the
    owner with no bound: the fetching node's call hung for ever, and every download of
    that document on that node joined the hung fetch. Asking the owner counts now against
    the time the owner has to answer."""
    monkeypatch.setattr("node.hub_documents._OWNER_ANSWER_S", 0.3)
    relay = DocumentRelay(_Hub())  # type: ignore[arg-type]
    hub: _Hub = relay.hub  # type: ignore[assignment]
    full: asyncio.Queue[pb.ConnectResponse] = asyncio.Queue(1)
    full.put_nowait(pb.ConnectResponse())  # a frame nobody takes
    hub._sessions[OWNER] = SimpleNamespace(out=full)
    fetching = _Context(FETCHER)
    with contextlib.suppress(grpc.aio.AbortError):
        await asyncio.wait_for(relay.fetch(pb.FetchDocumentRequest(uri=URI), fetching), 5)  # type: ignore[arg-type]
    assert fetching.aborted is not None
    assert (fetching.aborted[0], fetching.reason) == (
        grpc.StatusCode.UNAVAILABLE,
        "OWNER_NOT_ANSWERING",
    )
    assert not relay._transfers
    assert full.qsize() == 1  # no request left behind to reach the owner later


async def test_a_fetch_still_asking_a_slow_owner_ends_at_once_when_its_fetcher_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reload that no longer admits the fetching node ends its fetch at once with the
    status a new call would get (``end_refused``). A fetch still waiting for room on the
    owner's Connect stream to ask it (a slow reader) was not ended: it waited the owner's
    whole time to answer (30 s) and then said UNAVAILABLE / OWNER_NOT_ANSWERING, which
    tells the revoked node to retry."""
    monkeypatch.setattr("node.hub_documents._OWNER_ANSWER_S", 3.0)
    relay = DocumentRelay(_Hub())  # type: ignore[arg-type]
    hub: _Hub = relay.hub  # type: ignore[assignment]
    full: asyncio.Queue[pb.ConnectResponse] = asyncio.Queue(1)
    full.put_nowait(pb.ConnectResponse())  # a frame the slow owner has not taken yet
    hub._sessions[OWNER] = SimpleNamespace(out=full)
    revoked = ChaparError(Code.UNAUTHENTICATED, "CERTIFICATE_REVOKED", "client certificate refused")
    fetching = _Context(FETCHER)
    fetch = asyncio.create_task(relay.fetch(pb.FetchDocumentRequest(uri=URI), fetching))  # type: ignore[arg-type]
    for _ in range(100):  # registered, and waiting for room to ask the owner
        if relay._transfers:
            break
        await asyncio.sleep(0.01)
    assert relay._transfers
    # A reload now: it no longer admits the fetcher.
    hub.refusal = lambda agency, certificate: revoked if agency == FETCHER else None  # type: ignore[method-assign]
    relay.end_refused()
    with contextlib.suppress(grpc.aio.AbortError):
        await asyncio.wait_for(fetch, 1.0)
    assert fetching.aborted is not None
    assert (fetching.aborted[0], fetching.reason) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "CERTIFICATE_REVOKED",
    )
    assert not relay._transfers
