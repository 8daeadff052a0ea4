"""The node's hub link when the hub refuses its stream: it learns why, wherever the refusal
comes (the hub may answer before it reads the node's hello, and the write then raises it)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from client_sdk import pb
from node.core.directory import DirectoryView
from node.core.errors import ChaparError, Code
from node.rpc import hub_link
from node.rpc.errors import to_status
from node.rpc.hub_link import HubLink

AGENCY = "10861234567"


def _refusal(code: Code, reason: str, grpc_code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    status = to_status(ChaparError(code, reason, f"no agency {AGENCY} in the directory"))
    return grpc.aio.AioRpcError(
        grpc_code,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString())),
        details=status.message,
    )


UNKNOWN = _refusal(Code.PERMISSION_DENIED, "UNKNOWN_SENDER", grpc.StatusCode.PERMISSION_DENIED)
# grpc may report a stream's refusal as INTERNAL, its status lost (grpc/grpc#36066).
LOST = grpc.aio.AioRpcError(grpc.StatusCode.INTERNAL, grpc.aio.Metadata(), grpc.aio.Metadata())


class _Call:
    def __init__(self, refusal: grpc.aio.AioRpcError, on: str) -> None:
        self.refusal = refusal
        self.on = on

    async def write(self, frame: Any) -> None:
        if self.on == "write":
            raise self.refusal

    async def read(self) -> Any:
        raise self.refusal

    def cancel(self) -> None:
        pass


class _Channel:
    def __init__(self, call: _Call) -> None:
        self.call = call

    def stream_stream(self, *args: Any, **kwargs: Any) -> Any:
        return lambda: self.call


class _Stub:
    def __init__(self, answer: grpc.aio.AioRpcError | pb.Directory) -> None:
        self.answer = answer

    async def GetDirectory(self, request: Any, timeout: float) -> Any:
        if isinstance(self.answer, grpc.aio.AioRpcError):
            raise self.answer
        return pb.GetDirectoryResponse(directory=self.answer)


def _agency() -> SimpleNamespace:
    told: list[bool] = []
    directories: list[pb.Directory] = []
    saved: list[bool] = []

    async def set_directory(directory: pb.Directory, *, persist: bool = True) -> None:
        directories.append(directory)
        saved.append(persist)

    def own_state() -> int | None:
        own = [a for d in directories[-1:] for a in d.agencies if a.code == AGENCY]
        return own[0].state if own else None

    return SimpleNamespace(
        config=SimpleNamespace(hub="hub.example:443", keepalive_s=20.0, agency=AGENCY),
        numbers_unconfirmed=None,  # not restored: the hello says nothing of a restore
        directory=None,
        told=told,
        set_in_directory=told.append,
        directories=directories,
        saved=saved,
        set_directory=set_directory,
        own_state=own_state,
    )


def _hub(monkeypatch: pytest.MonkeyPatch, call: _Call, stub: _Stub) -> None:
    channel = _Channel(call)

    @asynccontextmanager
    async def secure_channel(*args: Any, **kwargs: Any) -> AsyncIterator[_Channel]:
        yield channel

    monkeypatch.setattr(grpc.aio, "secure_channel", secure_channel)
    monkeypatch.setattr(pb, "HubServiceStub", lambda _: stub)


@pytest.mark.parametrize("on", ["write", "read"])
@pytest.mark.parametrize(
    ("connect", "directory"),
    [(UNKNOWN, UNKNOWN), (LOST, UNKNOWN), (UNKNOWN, LOST)],
    ids=["both-say-unknown", "connect-status-lost", "directory-status-lost"],
)
async def test_a_node_refused_as_unknown_learns_it_is_not_in_the_directory(
    monkeypatch: pytest.MonkeyPatch,
    on: str,
    connect: grpc.aio.AioRpcError,
    directory: grpc.aio.AioRpcError,
) -> None:
    _hub(monkeypatch, _Call(connect, on), _Stub(directory))
    agency = _agency()
    link = HubLink(agency, grpc.ssl_channel_credentials())  # type: ignore[arg-type]
    with pytest.raises(hub_link._Refused):
        await link._session()
    assert agency.told == [False]


@pytest.mark.parametrize("on", ["write", "read"])
async def test_a_suspended_node_refused_its_stream_reads_its_state_from_the_directory(
    monkeypatch: pytest.MonkeyPatch, on: str
) -> None:
    suspended = _refusal(
        Code.FAILED_PRECONDITION, "SENDER_INACTIVE", grpc.StatusCode.FAILED_PRECONDITION
    )
    directory = pb.Directory(
        version=7, agencies=[pb.Agency(code=AGENCY, state=pb.AGENCY_STATE_SUSPENDED)]
    )
    _hub(monkeypatch, _Call(suspended, on), _Stub(directory))
    agency = _agency()
    link = HubLink(agency, grpc.ssl_channel_credentials())  # type: ignore[arg-type]
    with pytest.raises(hub_link._Refused) as refused:  # said once by the agency, not here
        await link._session()
    assert refused.value.__cause__ is suspended
    assert agency.directories == [directory]
    assert agency.told == [True]  # listed: the directory says the rest


async def test_an_active_node_refused_for_another_reason_reports_the_refusal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Its agency is active in the directory: the refusal is something else, and is raised
    # as it came (logged at each retry), not taken for a suspension.
    directory = pb.Directory(
        version=7, agencies=[pb.Agency(code=AGENCY, state=pb.AGENCY_STATE_ACTIVE)]
    )
    _hub(monkeypatch, _Call(LOST, "read"), _Stub(directory))
    agency = _agency()
    link = HubLink(agency, grpc.ssl_channel_credentials())  # type: ignore[arg-type]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await link._session()
    assert refused.value is LOST
    assert agency.directories == [directory]


@pytest.mark.parametrize("on", ["write", "read"])
async def test_a_server_that_refuses_without_attesting_cannot_poison_the_directory_held(
    monkeypatch: pytest.MonkeyPatch, on: str
) -> None:
    # Only a welcome carries the hub's attestation. A server that is not the hub (any
    # agency's node certificate naming the address) could answer Connect with a refusal
    # instead, and the link applied its unsigned directory whole and saved it: revoked
    # serials, other agencies' states, a version of its choice (a review's proof). Of its
    # answer only this agency's own state is taken now, onto the directory held, unsaved.
    other = "000.00.00.G22"
    suspended = _refusal(
        Code.FAILED_PRECONDITION, "SENDER_INACTIVE", grpc.StatusCode.FAILED_PRECONDITION
    )
    held = pb.Directory(
        version=5,
        agencies=[
            pb.Agency(code=AGENCY, state=pb.AGENCY_STATE_ACTIVE),
            pb.Agency(code=other, state=pb.AGENCY_STATE_ACTIVE),
        ],
    )
    forged = pb.Directory(
        version=999,
        agencies=[
            pb.Agency(code=AGENCY, state=pb.AGENCY_STATE_SUSPENDED),
            pb.Agency(code=other, state=pb.AGENCY_STATE_SUSPENDED),
        ],
        revoked_serials=["1", "2", "3"],  # every real signing certificate's serial, say
    )
    _hub(monkeypatch, _Call(suspended, on), _Stub(forged))
    agency = _agency()
    agency.directory = DirectoryView(held)
    link = HubLink(agency, grpc.ssl_channel_credentials())  # type: ignore[arg-type]
    with pytest.raises(hub_link._Refused):
        await link._session()
    (applied,) = agency.directories
    assert agency.saved == [False]
    assert (applied.version, list(applied.revoked_serials)) == (5, [])
    states = {a.code: a.state for a in applied.agencies}
    assert states == {AGENCY: pb.AGENCY_STATE_SUSPENDED, other: pb.AGENCY_STATE_ACTIVE}
