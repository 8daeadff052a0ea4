"""Tracking a correspondence tree, without servers: the node's call to the hub and how it
fails, and the SDK's tree (``Correspondence``) built from an answer, cycles included."""

from __future__ import annotations

from types import SimpleNamespace

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from client_sdk import Correspondence, pb
from client_sdk.shams import parse_shams
from client_sdk.trust import TrustStore
from node.agency import Agency
from node.core.errors import ChaparError, Code

X = "000.00.00.G22/O/2026/0000001"


def _failing(code: grpc.StatusCode, reason: str = "") -> SimpleNamespace:
    """A hub link whose stub answers Track with ``code`` (and an ErrorInfo ``reason``)."""
    trailing = grpc.aio.Metadata()
    if reason:
        info = any_pb2.Any()
        info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain="chapar.exchange"))
        status = status_pb2.Status(code=code.value[0], message="said the hub", details=[info])
        trailing = grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString()))

    async def track(request: pb.TrackRequest, timeout: float) -> pb.TrackResponse:
        assert 0 < timeout <= 10
        raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, "said the hub")

    return SimpleNamespace(stub=SimpleNamespace(Track=track))


async def test_without_the_hub_the_node_answers_unavailable_with_a_retry(agency: Agency) -> None:
    for link in (None, SimpleNamespace(stub=None), _failing(grpc.StatusCode.UNAVAILABLE)):
        agency.hub_link = link  # type: ignore[assignment]
        with pytest.raises(ChaparError) as caught:
            await agency._hub_track(parse_shams(X), None)
        assert (caught.value.code, caught.value.reason) == (Code.UNAVAILABLE, "HUB_UNAVAILABLE")
        assert caught.value.retry_after_s == 1.0
    agency.hub_link = _failing(grpc.StatusCode.DEADLINE_EXCEEDED)  # type: ignore[assignment]
    with pytest.raises(ChaparError) as late:
        await agency._hub_track(parse_shams(X), 30.0)
    assert late.value.reason == "HUB_UNAVAILABLE"


async def test_the_hubs_refusal_reaches_the_client_with_its_code_and_reason(
    agency: Agency,
) -> None:
    agency.hub_link = _failing(grpc.StatusCode.NOT_FOUND, "LETTER_NOT_FOUND")  # type: ignore[assignment]
    with pytest.raises(ChaparError) as caught:
        await agency._hub_track(parse_shams(X), None)
    assert (caught.value.code, caught.value.reason) == (Code.NOT_FOUND, "LETTER_NOT_FOUND")
    agency.hub_link = _failing(grpc.StatusCode.UNKNOWN)  # type: ignore[assignment]
    with pytest.raises(ChaparError) as unknown:
        await agency._hub_track(parse_shams(X), None)
    assert (unknown.value.code, unknown.value.reason) == (Code.INTERNAL, "HUB_ERROR")


def _tracked(shams: str, reply_to: str | None = None) -> pb.TrackedLetter:
    letter = pb.TrackedLetter(shams=parse_shams(shams), redacted=True)
    if reply_to is not None:
        letter.in_reply_to.CopyFrom(parse_shams(reply_to))
    return letter


def _number(sequence: int) -> str:
    return f"MOFA.IR/O/2026/{sequence:07d}"


def test_the_tree_is_rebuilt_from_the_links_each_letter_once_even_on_a_cycle() -> None:
    p, q, r, s, lost = (_number(i) for i in (1, 2, 3, 4, 5))
    response = pb.TrackResponse(
        letters=[
            _tracked(r, p),
            _tracked(p),
            _tracked(q, p),
            _tracked(s, _number(99)),  # its parent is not in the answer
            _tracked(lost, _number(6)),  # a cycle: 5 answers 6, 6 answers 5
            _tracked(_number(6), lost),
        ]
    )
    tree = Correspondence.from_response(response)
    assert tree.shams == r
    assert [t.shams for t in tree.roots] == [p, s, lost]
    assert [(depth, t.shams) for depth, t in tree.walk()] == [
        (0, p),
        (1, r),
        (1, q),
        (0, s),
        (0, lost),
        (1, _number(6)),
    ]
    assert tree.letter(parse_shams(q)) is tree.letters[2]
    # Redacted letters carry nothing to verify.
    assert tree.verify(TrustStore([])) == []
    with pytest.raises(ValueError, match="no letter"):
        Correspondence.from_response(pb.TrackResponse())
