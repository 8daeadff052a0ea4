"""The blocking twin of ``ExchangeClient`` for back-ends without an event loop.

``SyncExchangeClient`` runs a private event loop in a background thread and forwards each
call to an ``ExchangeClient`` living on it (``asyncio.run_coroutine_threadsafe``), so both
clients share one implementation and behave identically: same arguments, same results,
same exceptions. Streams become blocking iterators.

::

    with SyncExchangeClient("node.example:7443", Credentials.from_pki(pki, "G22")) as c:
        receipt = c.send(to=["000.00.00.G01"], subject="Budget", body="...")
        for letter in c.inbox():
            letter.ack()
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import datetime as dt
import queue
import threading
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc

from client_sdk import pb
from client_sdk.client import (
    DEFAULT_KEEPALIVE_S,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_STREAM_BATCH_SIZE,
    DEFAULT_STREAM_LINGER_S,
    DEFAULT_TIMEOUT,
    AttachmentLike,
    Correspondence,
    Draft,
    ExchangeClient,
    KindLike,
    PriorityLike,
    Receipt,
    Recipient,
    ShamsLike,
    StatusLike,
    Tracking,
    _AttachmentFields,
    _client_closed,
    _closed_under_call,
    _LetterFields,
)
from client_sdk.credentials import Credentials
from client_sdk.errors import ChaparError
from client_sdk.trust import TrustStore

__all__ = ["SyncAttachment", "SyncExchangeClient", "SyncLetter"]

_T = TypeVar("_T")
_POLL_SECONDS = 0.1  # how often blocked helper threads look whether they should stop


class _LoopThread:
    """An event loop running forever in a daemon thread; ``run`` blocks on a coroutine."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._closing = False
        # Taken to submit a call and to start closing: a call submitted once close() has
        # cancelled the others would wait for ever on the stopped loop.
        self._lock = threading.Lock()
        self._close_lock = threading.Lock()  # one close() at a time; the others wait for it
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="chapar-sdk-loop", daemon=True
        )
        self._thread.start()

    def run(
        self,
        coro: Coroutine[Any, Any, _T],
        *,
        refused: Callable[[], ChaparError] = _client_closed,
    ) -> _T:
        """Runs ``coro`` on the loop; on a closed client raises ``refused()`` instead:
        FailedPrecondition for a call that would begin now, Cancelled (``_closed_under_call``)
        for the next step of a stream that was open."""
        with self._lock:
            if self._closing or self.loop.is_closed():  # as the async client says it
                coro.close()
                raise refused()
            future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return self._result(future)

    def _result(self, future: concurrent.futures.Future[_T]) -> _T:
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            if self._closing:  # another thread closed the client under this call
                raise _closed_under_call() from None
            raise
        except BaseException:
            # KeyboardInterrupt in the caller's thread: do not leave the call running.
            future.cancel()
            raise

    def close(self) -> None:
        with self._close_lock:
            if not self.loop.is_closed():
                self._close()

    def _close(self) -> None:
        with self._lock:
            self._closing = True
        # Calls other threads still wait on (a stream waiting for drafts or letters) end
        # now, each caller with CLIENT_CLOSED: once the loop stops they would wait for ever.
        # (New calls are refused from here on.)
        self._result(asyncio.run_coroutine_threadsafe(_cancel_others(), self.loop))
        self._result(asyncio.run_coroutine_threadsafe(self.loop.shutdown_asyncgens(), self.loop))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


async def _cancel_others() -> None:
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)


@dataclass(frozen=True, slots=True)
class SyncAttachment(_AttachmentFields):
    """An attachment of a received letter; ``attachment.save(path)`` blocks."""

    _client: SyncExchangeClient = field(repr=False, compare=False)

    def save(self, path: Path | str, *, timeout: float | None = None) -> Path:
        """Downloads and verifies the attachment; see ``ExchangeClient.fetch``."""
        return self._client.fetch(self.ref(), path, timeout=timeout)

    def save_into(self, directory: Path | str, *, timeout: float | None = None) -> Path:
        """Downloads into ``directory`` under ``safe_file_name``, beside a file of that name
        holding another document; see ``Attachment.save_into``."""
        return self._client.fetch(
            self.ref(), Path(directory) / self.safe_file_name, timeout=timeout, keep_others=True
        )


@dataclass(frozen=True, slots=True)
class SyncLetter(_LetterFields):
    """A letter from ``SyncExchangeClient.inbox``; ``letter.ack()`` blocks."""

    _client: SyncExchangeClient = field(repr=False, compare=False)

    @property
    def attachments(self) -> list[SyncAttachment]:
        """The letter's attachments (references signed by the sender)."""
        return [
            SyncAttachment(r.uri, r.sha256, r.size, r.media_type, r.file_name, self._client)
            for r in self.header.attachments
        ]

    def ack(self) -> pb.Evidence:
        """Acknowledges the letter; returns the node's HANDOVER evidence (idempotent).

        As ``Letter.ack``: on the client's acknowledgement stream, together with the
        acknowledgements other threads make meanwhile."""
        return self._client._ack_letter(self.shams_pb)


class SyncExchangeClient:
    """Blocking client of one node; use as ``with SyncExchangeClient(...) as client``."""

    def __init__(
        self,
        target: str,
        credentials: Credentials,
        *,
        server_name: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        keepalive_s: float | None = DEFAULT_KEEPALIVE_S,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        """Same arguments as ``ExchangeClient``."""

        async def make() -> ExchangeClient:
            return ExchangeClient(
                target,
                credentials,
                server_name=server_name,
                timeout=timeout,
                keepalive_s=keepalive_s,
                options=options,
            )

        self._start(make)

    @classmethod
    def from_channel_factory(
        cls,
        make_channel: Callable[[], grpc.aio.Channel],
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> SyncExchangeClient:
        """A client over a channel made by ``make_channel``, called on the client's loop.

        A ``grpc.aio`` channel belongs to the loop it was made on, hence a factory rather
        than a channel. The client closes the channel when it is closed.
        """

        async def make() -> ExchangeClient:
            client = ExchangeClient.from_channel(make_channel(), timeout=timeout)
            client._owns_channel = True
            return client

        client = cls.__new__(cls)
        client._start(make)
        return client

    def _start(self, make: Callable[[], Coroutine[Any, Any, ExchangeClient]]) -> None:
        self._close_lock = threading.Lock()
        self._portal = _LoopThread()
        try:
            self._client = self._portal.run(make())
        except BaseException:
            self._portal.close()
            raise

    def __enter__(self) -> SyncExchangeClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel (if the client made it) and stops the background loop.

        Closing again does nothing; threads closing at once each return once it is closed
        (the first closes it, the others wait for that)."""
        with self._close_lock:
            if self._portal.loop.is_closed():
                return
            try:
                self._portal.run(self._client.close())
            finally:
                self._portal.close()

    def send(
        self,
        *,
        to: Sequence[Recipient],
        subject: str,
        body: bytes | str,
        kind: KindLike = "letter",
        in_reply_to: ShamsLike | None = None,
        priority: PriorityLike | None = None,
        content_type: str | None = None,
        expire_time: dt.datetime | None = None,
        request_id: str | None = None,
        metadata: pb.DocumentMetadata | None = None,
        attachments: Sequence[AttachmentLike] = (),
        sender_mailbox: str = "",
        status: StatusLike | None = None,
        timeout: float | None = None,
    ) -> Receipt:
        """Submits one letter; see ``ExchangeClient.send``."""
        return self._portal.run(
            self._client.send(
                to=to,
                subject=subject,
                body=body,
                kind=kind,
                in_reply_to=in_reply_to,
                priority=priority,
                content_type=content_type,
                expire_time=expire_time,
                request_id=request_id,
                metadata=metadata,
                attachments=attachments,
                sender_mailbox=sender_mailbox,
                status=status,
                timeout=timeout,
            )
        )

    def send_status(
        self,
        about: ShamsLike,
        status: StatusLike,
        note: str = "",
        *,
        to: Sequence[Recipient] = (),
        subject: str | None = None,
        request_id: str | None = None,
        sender_mailbox: str = "",
        timeout: float | None = None,
    ) -> Receipt:
        """Reports a business status about a letter; see ``ExchangeClient.send_status``."""
        return self._portal.run(
            self._client.send_status(
                about,
                status,
                note,
                to=to,
                subject=subject,
                request_id=request_id,
                sender_mailbox=sender_mailbox,
                timeout=timeout,
            )
        )

    def send_many(
        self, letters: Sequence[Draft], *, timeout: float | None = None
    ) -> list[Receipt | ChaparError]:
        """Submits many letters; see ``ExchangeClient.send_many``."""
        return self._portal.run(self._client.send_many(letters, timeout=timeout))

    def send_stream(
        self,
        drafts: Iterable[Draft],
        *,
        batch_size: int = DEFAULT_STREAM_BATCH_SIZE,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        linger_s: float = DEFAULT_STREAM_LINGER_S,
    ) -> Iterator[Receipt | ChaparError]:
        """Submits letters over one stream; see ``ExchangeClient.send_stream``.

        ``drafts`` is read in a helper thread, so it may block (e.g. on a queue); its
        drafts then reach the stream as an async iterable's do (a frame on a busy stream
        waits ``linger_s`` for more, and goes as soon as ``drafts`` ends). A
        ``ChaparError`` that ends the stream lists in ``unanswered`` every draft taken from
        ``drafts`` and not answered, those on their way to the loop's thread included. If
        the helper thread was waiting inside ``drafts`` when the stream ended, the one
        draft it takes when ``drafts`` gives it is not sent either: it is added to the
        error's ``unanswered`` then, and the thread takes nothing more.
        """
        stop = threading.Event()
        handoff: queue.Queue[Draft | _End | _Failed] = queue.Queue(
            maxsize=batch_size * max_in_flight
        )
        taken = _Taken()
        feeder = threading.Thread(
            target=_feed, args=(drafts, handoff, stop, taken), name="chapar-sdk-feed", daemon=True
        )
        feeder.start()
        results = self._client.send_stream(
            _drain(handoff), batch_size=batch_size, max_in_flight=max_in_flight, linger_s=linger_s
        )
        try:
            for result in self._iterate(results):
                taken.drafts.popleft()
                yield result
        except ChaparError as error:
            with taken.lock:  # a draft the feeder takes after this joins error.unanswered
                stop.set()
                error.unanswered = tuple(taken.drafts)
                taken.error = error
            raise
        finally:
            # The feeder notices within _POLL_SECONDS, unless it is blocked inside
            # ``drafts`` itself; it is a daemon thread, so it is not joined.
            stop.set()

    def inbox(self, mailbox: str | None = None) -> Iterator[SyncLetter]:
        """Blocking iterator over the inbox stream; see ``ExchangeClient.inbox``."""
        for letter in self._iterate(self._client.inbox(mailbox)):
            shared = {f.name: getattr(letter, f.name) for f in fields(_LetterFields)}
            yield SyncLetter(**shared, _client=self)

    def ack(self, shams: ShamsLike, *, timeout: float | None = None) -> pb.Evidence:
        """Acknowledges a received letter; see ``ExchangeClient.ack``."""
        return self._portal.run(self._client.ack(shams, timeout=timeout))

    def _ack_letter(self, shams: pb.Shams) -> pb.Evidence:
        """What ``SyncLetter.ack`` does: ``Letter.ack``'s gathered batches on the stream."""
        return self._portal.run(self._client._acks.ack(shams))

    def ack_many(
        self, numbers: Sequence[ShamsLike], *, timeout: float | None = None
    ) -> list[pb.Evidence | ChaparError]:
        """Acknowledges several letters in one call; see ``ExchangeClient.ack_many``."""
        return self._portal.run(self._client.ack_many(numbers, timeout=timeout))

    def track(self, shams: ShamsLike, *, timeout: float | None = None) -> Tracking:
        """Fetches a letter with its evidence; see ``ExchangeClient.track``."""
        return self._portal.run(self._client.track(shams, timeout=timeout))

    def track_correspondence(
        self, shams: ShamsLike, *, timeout: float | None = None
    ) -> Correspondence:
        """The correspondence tree around a letter; see
        ``ExchangeClient.track_correspondence``."""
        return self._portal.run(self._client.track_correspondence(shams, timeout=timeout))

    def evidence_bundle(
        self, shams: ShamsLike, *, timeout: float | None = None
    ) -> pb.EvidenceBundle:
        """A letter with its evidence, to save; see ``ExchangeClient.evidence_bundle``."""
        return self._portal.run(self._client.evidence_bundle(shams, timeout=timeout))

    def agencies(self, *, timeout: float | None = None) -> list[pb.Agency]:
        """The agencies of the exchange; see ``ExchangeClient.agencies``."""
        return self._portal.run(self._client.agencies(timeout=timeout))

    def trust_from_directory(
        self, trust: TrustStore, *, timeout: float | None = None
    ) -> TrustStore:
        """The directory's certificates and revocations added to ``trust``; see
        ``ExchangeClient.trust_from_directory``."""
        return self._portal.run(self._client.trust_from_directory(trust, timeout=timeout))

    def revocations(self, *, timeout: float | None = None) -> list[int]:
        """Serials of revoked certificates; see ``ExchangeClient.revocations``."""
        return self._portal.run(self._client.revocations(timeout=timeout))

    def upload(
        self,
        path: Path | str,
        *,
        media_type: str | None = None,
        file_name: str | None = None,
        timeout: float | None = None,
    ) -> pb.AttachmentRef:
        """Uploads a file to the document store; see ``ExchangeClient.upload``."""
        return self._portal.run(
            self._client.upload(path, media_type=media_type, file_name=file_name, timeout=timeout)
        )

    def fetch(
        self,
        document: pb.AttachmentRef | str,
        path: Path | str,
        *,
        timeout: float | None = None,
        keep_others: bool = False,
    ) -> Path:
        """Downloads and verifies a document; see ``ExchangeClient.fetch``."""
        return self._portal.run(
            self._client.fetch(document, path, timeout=timeout, keep_others=keep_others)
        )

    def download(
        self, uri: str, *, offset: int = 0, timeout: float | None = None
    ) -> Iterator[bytes]:
        """Blocking iterator over a document's bytes; see ``ExchangeClient.download``."""
        return self._iterate(self._client.download(uri, offset=offset, timeout=timeout))

    def stat(self, uri: str, *, timeout: float | None = None) -> pb.StatDocumentResponse:
        """Whether the node holds a document; see ``ExchangeClient.stat``."""
        return self._portal.run(self._client.stat(uri, timeout=timeout))

    def _iterate(self, stream: AsyncGenerator[_T, None]) -> Iterator[_T]:
        """Drives an async iterator on the loop, one item per blocking step."""
        steps = _Steps(stream)
        interrupted = False  # a step ended by an exception (Ctrl-C, the stream's error)
        # Once the stream has begun, a client closed meanwhile cancelled it (the async
        # client's reader gets Cancelled then too), even if this thread was between two
        # steps when it closed: "the call was not made" is for a stream not begun.
        refused: Callable[[], ChaparError] = _client_closed
        try:
            while True:
                try:
                    item = self._portal.run(steps.next(), refused=refused)
                    refused = _closed_under_call
                except StopAsyncIteration:
                    return
                except BaseException:
                    interrupted = True
                    raise
                yield item
        finally:
            if not self._portal.loop.is_closed():
                if interrupted:
                    # What ended the step is what the caller gets, not an error of closing.
                    with contextlib.suppress(Exception):
                        self._portal.run(steps.close())
                else:
                    self._portal.run(steps.close())


class _Steps(Generic[_T]):
    """An async generator driven one step at a time from another thread. It keeps the task
    of the last step, so that closing waits for a step the caller's thread cancelled (Ctrl-C
    cancels it on the loop and returns at once): ``aclose()`` while its ``anext`` still runs
    raises RuntimeError ("asynchronous generator is already running")."""

    def __init__(self, stream: AsyncGenerator[_T, None]) -> None:
        self._stream = stream
        self._step: asyncio.Task[Any] | None = None

    async def next(self) -> _T:
        self._step = asyncio.current_task()
        return await anext(self._stream)

    async def close(self) -> None:
        # The cancellation reaches the step's task before this runs (both are handed to the
        # loop in that order), so waiting here sees the step end.
        if self._step is not None:
            await asyncio.wait([self._step])  # at once if it has ended; never raises
        await self._stream.aclose()


class _End:
    pass


@dataclass(frozen=True, slots=True)
class _Failed:
    error: BaseException


@dataclass(slots=True)
class _Taken:
    """The drafts a sync ``send_stream`` took from its iterable and has not answered yet,
    and the error that ended the stream, once one did."""

    drafts: collections.deque[Draft] = field(default_factory=collections.deque)
    lock: threading.Lock = field(default_factory=threading.Lock)
    error: ChaparError | None = None


def _feed(
    drafts: Iterable[Draft],
    handoff: queue.Queue[Draft | _End | _Failed],
    stop: threading.Event,
    taken: _Taken,
) -> None:
    """Feeder thread: moves drafts from a blocking iterable to the loop's side."""

    def put(item: Draft | _End | _Failed) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=_POLL_SECONDS)
            except queue.Full:
                continue
            return True
        return False

    try:
        for draft in drafts:
            with taken.lock:
                if taken.error is not None:
                    # Taken after the stream broke (this thread was waiting inside
                    # ``drafts``): not sent, so listed for the caller to send again.
                    taken.error.unanswered = (*taken.error.unanswered, draft)
                    return
                if stop.is_set():  # the caller stopped reading: nothing more is sent
                    return
                taken.drafts.append(draft)
            if not put(draft):
                return
    except Exception as exc:  # raised to the caller through the stream
        put(_Failed(exc))
    else:
        put(_End())


async def _drain(handoff: queue.Queue[Draft | _End | _Failed]) -> AsyncGenerator[Draft, None]:
    """Loop side of the hand-off: takes what is ready, waits in a thread when empty."""
    while True:
        try:
            item = handoff.get_nowait()
        except queue.Empty:
            try:
                # A bounded wait, so the helper thread ends soon after the stream does.
                item = await asyncio.to_thread(handoff.get, True, _POLL_SECONDS)
            except queue.Empty:
                continue
        if isinstance(item, _End):
            return
        if isinstance(item, _Failed):
            raise item.error
        yield item
