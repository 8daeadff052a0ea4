"""Tracking a correspondence tree, without servers: the node's call to the hub and how it
fails, and the SDK's tree (``Correspondence``) built from an answer, cycles included."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from client_sdk import Correspondence, format_shams_checked, pb
from client_sdk.shams import parse_shams
from client_sdk.trust import TrustStore, VerificationError
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
    # The letter asked for came redacted: not an answer about it.
    with pytest.raises(VerificationError) as caught:
        tree.verify(TrustStore([]))
    assert caught.value.reason == "TRACK_MISMATCH"
    with pytest.raises(ValueError, match="no letter"):
        Correspondence.from_response(pb.TrackResponse())


def _unsigned(shams: str, sender: str, reply_to: str | None = None) -> pb.TrackedLetter:
    """A letter shown in full whose envelope the hub's retention removed, no evidence."""
    letter = pb.TrackedLetter(
        shams=parse_shams(shams),
        sender=sender,
        recipients=["10861234567"],
        kind=pb.LetterKind.LETTER_KIND_LETTER,
    )
    if reply_to is not None:
        letter.in_reply_to.CopyFrom(parse_shams(reply_to))
    return letter


def _refusal(tree: Correspondence) -> str:
    with pytest.raises(VerificationError) as caught:
        tree.verify(TrustStore([]))
    return str(caught.value)


def test_a_letter_without_its_envelope_is_unsigned_and_its_sender_must_be_its_numbers_origin() -> (
    None
):
    x = _number(1)
    honest = Correspondence.from_response(pb.TrackResponse(letters=[_unsigned(x, "MOFA.IR")]))
    assert honest.verify(TrustStore([])) == []
    assert not honest.letters[0].signed
    assert not honest.letters[0].redacted
    lying = Correspondence.from_response(pb.TrackResponse(letters=[_unsigned(x, "ORG-D")]))
    assert "not the origin of its number" in _refusal(lying)


def test_a_redacted_letter_carrying_more_than_its_links_does_not_verify_nor_show() -> None:
    x, z = _number(1), _number(2)
    smuggled = _tracked(z, x)
    smuggled.recipients.append("SMUGGLED")
    smuggled.status = pb.BusinessStatus.BUSINESS_STATUS_COMPLETED
    smuggled.evidence.add(content=b"x")
    tree = Correspondence.from_response(
        pb.TrackResponse(letters=[_unsigned(x, "MOFA.IR"), smuggled])
    )
    shown = tree.letter(z)
    assert shown is not None
    assert (shown.recipients, shown.status, shown.evidence, shown.envelope, shown.signed) == (
        (),
        None,
        [],
        None,
        False,
    )
    assert "redacted letter carries evidence, recipients, status" in _refusal(tree)


def test_an_answer_about_another_letter_than_asked_does_not_verify() -> None:
    x, y = _number(1), _number(2)
    answer = pb.TrackResponse(letters=[_unsigned(y, "MOFA.IR", x), _unsigned(x, "MOFA.IR")])
    assert Correspondence.from_response(answer).verify(TrustStore([])) == []
    about_y = Correspondence.from_response(answer, asked=x)
    assert about_y.shams == x
    assert "not the tree of" in _refusal(about_y)
    with pytest.raises(ValueError, match="invalid SHAMS number"):
        Correspondence.from_response(answer, asked="no number")


def test_chapar_track_tree_marks_the_letter_asked_for_and_says_an_account_is_unsigned() -> None:
    from node.cli_client import _tree_line, _tree_row

    x, y = _number(1), _number(2)
    answer = pb.TrackResponse(letters=[_unsigned(y, "MOFA.IR", x), _unsigned(x, "MOFA.IR")])
    tree = Correspondence.from_response(answer, asked=x)  # an answer about another letter
    rows = [_tree_row(depth, letter, tree.shams) for depth, letter in tree.walk()]
    assert [(r["shams"], r["asked"], r["signed"]) for r in rows] == [
        (x, True, False),
        (y, False, False),
    ]
    assert _tree_line(rows[1]) == (
        f"{format_shams_checked(y)}  LETTER  MOFA.IR -> 10861234567  no evidence  unsigned (body and header purged"
        " by retention)"
    )


class _Aborted(Exception):
    pass


class _Context:
    """What ``abort`` uses of a servicer context."""

    async def abort(self, code: grpc.StatusCode, message: str, trailing_metadata: object) -> None:
        raise _Aborted(code)


async def test_reasons_the_hub_answers_with_do_not_grow_the_nodes_metrics_without_bound(
    agency: Agency,
) -> None:
    # The node answers a back-end's TrackCorrespondence (and a download fetched through the
    # hub) with the hub's ErrorInfo reason, and counts it in chapar_rejections_total and
    # chapar_last_rejection_timestamp_seconds under that reason: a hub answering each call
    # with a reason of its own making (any string, kilobytes long) added two series a call
    # to the node's scrape and to its memory, for good. Labels take bounded values only
    # (DESIGN section 10): a reason not of our form, or new past MAX_REASONS, is OTHER.
    from node import metrics
    from node.rpc.errors import abort

    def label_sets() -> set[tuple[str, str]]:
        return {
            (sample.labels["code"], sample.labels["reason"])
            for metric in (metrics.REJECTIONS, metrics.LAST_REJECTION)
            for family in metric.collect()
            for sample in family.samples
        }

    before = label_sets()
    reasons = [f"HUB_SAYS_{i}" for i in range(1000)] + ["X" * 5000, "not\nours", "NOT_A_PARTY"]
    answered: list[str] = []
    try:
        for reason in reasons:
            agency.hub_link = _failing(grpc.StatusCode.PERMISSION_DENIED, reason)  # type: ignore[assignment]
            with pytest.raises(ChaparError) as caught:
                await agency._hub_track(parse_shams(X), None)
            answered.append(caught.value.reason)
            with pytest.raises(_Aborted):
                await abort(_Context(), caught.value)  # type: ignore[arg-type]
        grown = label_sets() - before
        bound = getattr(metrics, "MAX_REASONS", 0)
        assert len(grown) <= bound + 1, f"{len(grown)} new label sets for {len(reasons)} calls"
        assert all(len(reason) <= 64 for _, reason in grown)
        # The back-end is still told the hub's reason, as the hub gave it.
        assert answered == reasons
    finally:  # what other tests count starts again from what it was
        for code, reason in label_sets() - before:
            for metric in (metrics.REJECTIONS, metrics.LAST_REJECTION):
                with contextlib.suppress(KeyError):
                    metric.remove(code, reason)
        reset = getattr(metrics, "_forget_reasons", None)
        if reset is not None:
            reset()
