"""A retry (same request_id, same draft) whose checks refuse it while the first submission
is still being written is answered with the first's receipt once that commits: the letter
is accepted, and a refusal would deny it."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from client_sdk import pb
from client_sdk.identity import Identity
from node.agency import Access, Agency
from node.core.errors import ChaparError
from tests.unit.conftest import RECIPIENT, SENDER


def _request(request_id: str) -> pb.SubmitEnvelopeRequest:
    return pb.SubmitEnvelopeRequest(
        request_id=request_id,
        draft=pb.LetterDraft(
            recipients=[pb.Address(agency=RECIPIENT)], subject="retried", body=b"r"
        ),
    )


def _held(agency: Agency) -> tuple[asyncio.Event, asyncio.Event]:
    """Holds the store's submissions until the first event is set; the second is set once
    one is being written."""
    release, writing = asyncio.Event(), asyncio.Event()
    submit = agency.store.submit

    async def slow_submit(request_ids: Sequence[str], **kwargs: Any) -> Any:
        writing.set()
        await release.wait()
        return await submit(request_ids, **kwargs)

    agency.store.submit = slow_submit  # type: ignore[method-assign]
    return release, writing


async def _first_being_written(
    agency: Agency, access: Access
) -> tuple[asyncio.Event, asyncio.Task[list[Any]]]:
    """Submits request "kept-1" and returns once the store is writing it, held until the
    event is set; the task is the submission."""
    release, writing = _held(agency)
    first = asyncio.create_task(agency._submit([_request("kept-1")], access))
    await asyncio.wait_for(writing.wait(), 5)
    return release, first


async def test_a_refused_retry_of_a_letter_being_written_gets_its_receipt(agency: Agency) -> None:
    access = Access(Identity.for_agency(SENDER), None)
    release, first = await _first_being_written(agency, access)
    # Meanwhile the recipient's hub queue filled: a new letter to it is refused.
    agency.full_recipients = frozenset({RECIPIENT})
    retry = asyncio.create_task(agency._submit([_request("kept-1")], access))
    other = asyncio.create_task(agency._submit([_request("kept-2")], access))
    (refused,) = await asyncio.wait_for(other, 5)
    assert isinstance(refused, ChaparError)
    assert refused.reason == "RECIPIENT_QUEUE_FULL"
    release.set()
    (accepted,) = await asyncio.wait_for(first, 5)
    (again,) = await asyncio.wait_for(retry, 5)
    assert isinstance(accepted, pb.Receipt)
    assert isinstance(again, pb.Receipt), again
    assert again.shams_text == accepted.shams_text


async def test_a_refused_retry_of_another_draft_under_a_request_id_being_written_is_refused(
    agency: Agency,
) -> None:
    access = Access(Identity.for_agency(SENDER), None)
    release, first = await _first_being_written(agency, access)
    agency.full_recipients = frozenset({RECIPIENT})
    changed = _request("kept-1")
    changed.draft.subject = "not the same letter"
    retry = asyncio.create_task(agency._submit([changed], access))
    release.set()
    (accepted,) = await asyncio.wait_for(first, 5)
    (refused,) = await asyncio.wait_for(retry, 5)
    assert isinstance(accepted, pb.Receipt)
    assert isinstance(refused, ChaparError)
    assert refused.reason == "RECIPIENT_QUEUE_FULL"


async def test_a_retry_of_a_letter_whose_caller_left_while_it_was_written_gets_its_receipt(
    agency: Agency,
) -> None:
    access = Access(Identity.for_agency(SENDER), None)
    release, first = await _first_being_written(agency, access)
    first.cancel()  # its deadline passed: the letter is stored all the same
    agency.full_recipients = frozenset({RECIPIENT})
    retry = asyncio.create_task(agency._submit([_request("kept-1")], access))
    await asyncio.sleep(0.05)
    release.set()
    (again,) = await asyncio.wait_for(retry, 5)
    assert isinstance(again, pb.Receipt), again


def _checking(agency: Agency) -> tuple[asyncio.Event, asyncio.Event]:
    """Holds the look-up of a reply's thread (a check) until the first event is set; the
    second is set once one is waiting."""
    release, checking = asyncio.Event(), asyncio.Event()
    held_letter = agency.store.held_letter

    async def slow_held_letter(shams: str) -> Any:
        checking.set()
        await release.wait()
        return await held_letter(shams)

    agency.store.held_letter = slow_held_letter  # type: ignore[method-assign]
    return release, checking


def _reply(request_id: str) -> pb.SubmitEnvelopeRequest:
    request = _request(request_id)
    request.draft.in_reply_to.CopyFrom(
        pb.Shams(origin=RECIPIENT, domain=pb.SHAMS_DOMAIN_OUTGOING, year=2026, sequence=1)
    )
    return request


@pytest.mark.parametrize("first_call", ["stored", "cancelled"])
async def test_a_retry_of_a_letter_that_passed_its_checks_waits_for_its_call(
    agency: Agency, first_call: str
) -> None:
    # The first call's letter passed its checks while a later letter of the same call is
    # still being checked: a refused retry of it waits for that call. Stored, the retry
    # gets its receipt; the call cancelled before storing anything, it keeps its refusal
    # (and does not wait for ever).
    access = Access(Identity.for_agency(SENDER), None)
    release, checking = _checking(agency)
    first = asyncio.create_task(agency._submit([_request("kept-1"), _reply("kept-2")], access))
    await asyncio.wait_for(checking.wait(), 5)
    agency.full_recipients = frozenset({RECIPIENT})
    retry = asyncio.create_task(agency._submit([_request("kept-1")], access))
    await asyncio.sleep(0.05)
    assert not retry.done()
    if first_call == "cancelled":
        first.cancel()
        (refused,) = await asyncio.wait_for(retry, 5)
        assert isinstance(refused, ChaparError)
        assert refused.reason == "RECIPIENT_QUEUE_FULL"
        assert not agency._unsettled
        return
    release.set()
    accepted, _ = await asyncio.wait_for(first, 5)
    (again,) = await asyncio.wait_for(retry, 5)
    assert isinstance(accepted, pb.Receipt)
    assert isinstance(again, pb.Receipt), again
    assert again.shams_text == accepted.shams_text
    assert not agency._unsettled


async def test_a_batch_that_holds_a_letter_and_its_refused_retry_answers_both_with_its_receipt(
    agency: Agency,
) -> None:
    # The same request twice in one call, the second refused by a check that changed in
    # between (the thread look-up of a reply lets the quota change): the retry within the
    # call waits for no letter of its own.
    access = Access(Identity.for_agency(SENDER), None)
    release, checking = _checking(agency)
    reply = _reply("kept-1")
    call = asyncio.create_task(agency._submit([reply, _request("kept-2"), reply], access))
    await asyncio.wait_for(checking.wait(), 5)
    agency.full_recipients = frozenset({RECIPIENT})
    release.set()
    first, refused, again = await asyncio.wait_for(call, 5)
    assert isinstance(first, pb.Receipt)
    assert isinstance(refused, ChaparError)
    assert isinstance(again, pb.Receipt), again
    assert again.shams_text == first.shams_text
