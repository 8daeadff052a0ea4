"""The per-recipient lifecycle table (node.core.lifecycle): every (state, event) pair.

Expectations come from DESIGN.md §2 and the module's contract: moves go forward only along
SUBMITTED < RELAYED < DELIVERED < HANDED_OVER (a later event may skip steps when evidence
arrives out of order); rejections, failures and expiry are terminal; a late or repeated
event leaves the state as it is; a terminal state never changes.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from client_sdk import pb
from node.core import lifecycle
from node.core.evidence import event_name

S = pb.DeliveryState
E = pb.EvidenceEvent

UNSPECIFIED = S.DELIVERY_STATE_UNSPECIFIED
SUBMITTED = S.DELIVERY_STATE_SUBMITTED
RELAYED = S.DELIVERY_STATE_RELAYED
DELIVERED = S.DELIVERY_STATE_DELIVERED
HANDED_OVER = S.DELIVERY_STATE_HANDED_OVER
REJECTED = S.DELIVERY_STATE_REJECTED
FAILED = S.DELIVERY_STATE_FAILED
EXPIRED = S.DELIVERY_STATE_EXPIRED

EV_UNSPECIFIED = E.EVIDENCE_EVENT_UNSPECIFIED
SUB_ACC = E.EVIDENCE_EVENT_SUBMISSION_ACCEPTANCE
SUB_REJ = E.EVIDENCE_EVENT_SUBMISSION_REJECTION
RELAY_ACC = E.EVIDENCE_EVENT_RELAY_ACCEPTANCE
RELAY_REJ = E.EVIDENCE_EVENT_RELAY_REJECTION
RELAY_FAIL = E.EVIDENCE_EVENT_RELAY_FAILURE
DELIVERY = E.EVIDENCE_EVENT_DELIVERY
DELIVERY_FAIL = E.EVIDENCE_EVENT_DELIVERY_FAILURE
HANDOVER = E.EVIDENCE_EVENT_HANDOVER
EXPIRY = E.EVIDENCE_EVENT_EXPIRY

ALL_STATES = [UNSPECIFIED, SUBMITTED, RELAYED, DELIVERED, HANDED_OVER, REJECTED, FAILED, EXPIRED]
ALL_EVENTS = [
    EV_UNSPECIFIED,
    SUB_ACC,
    SUB_REJ,
    RELAY_ACC,
    RELAY_REJ,
    RELAY_FAIL,
    DELIVERY,
    DELIVERY_FAIL,
    HANDOVER,
    EXPIRY,
]
TERMINAL_STATES = {HANDED_OVER, REJECTED, FAILED, EXPIRED}
# Rank along the forward path; terminal failures have no rank (they end the path).
FORWARD_RANK: dict[int, int] = {SUBMITTED: 0, RELAYED: 1, DELIVERED: 2, HANDED_OVER: 3}

# Every pair, written out. `None` means "unchanged".
EXPECTED: dict[tuple[int, int], int | None] = {
    # No state yet: there is no row to move, evidence alone does not invent one.
    (UNSPECIFIED, EV_UNSPECIFIED): None,
    (UNSPECIFIED, SUB_ACC): None,
    (UNSPECIFIED, SUB_REJ): None,
    (UNSPECIFIED, RELAY_ACC): None,
    (UNSPECIFIED, RELAY_REJ): None,
    (UNSPECIFIED, RELAY_FAIL): None,
    (UNSPECIFIED, DELIVERY): None,
    (UNSPECIFIED, DELIVERY_FAIL): None,
    (UNSPECIFIED, HANDOVER): None,
    (UNSPECIFIED, EXPIRY): None,
    # SUBMITTED: every later event moves forward (out-of-order evidence may skip steps).
    (SUBMITTED, EV_UNSPECIFIED): None,
    (SUBMITTED, SUB_ACC): None,  # the submission evidence is what made it SUBMITTED
    (SUBMITTED, SUB_REJ): None,  # a rejected submission leaves no letter behind
    (SUBMITTED, RELAY_ACC): RELAYED,
    (SUBMITTED, RELAY_REJ): REJECTED,
    (SUBMITTED, RELAY_FAIL): FAILED,
    (SUBMITTED, DELIVERY): DELIVERED,
    (SUBMITTED, DELIVERY_FAIL): FAILED,
    (SUBMITTED, HANDOVER): HANDED_OVER,
    (SUBMITTED, EXPIRY): EXPIRED,
    # RELAYED: the hub accepted it, so a (stale) relay rejection no longer applies.
    (RELAYED, EV_UNSPECIFIED): None,
    (RELAYED, SUB_ACC): None,
    (RELAYED, SUB_REJ): None,
    (RELAYED, RELAY_ACC): None,
    (RELAYED, RELAY_REJ): None,
    (RELAYED, RELAY_FAIL): FAILED,
    (RELAYED, DELIVERY): DELIVERED,
    (RELAYED, DELIVERY_FAIL): FAILED,
    (RELAYED, HANDOVER): HANDED_OVER,
    (RELAYED, EXPIRY): EXPIRED,
    # DELIVERED: only the hand-over is still ahead; failures and expiry come too late.
    (DELIVERED, EV_UNSPECIFIED): None,
    (DELIVERED, SUB_ACC): None,
    (DELIVERED, SUB_REJ): None,
    (DELIVERED, RELAY_ACC): None,
    (DELIVERED, RELAY_REJ): None,
    (DELIVERED, RELAY_FAIL): None,
    (DELIVERED, DELIVERY): None,
    (DELIVERED, DELIVERY_FAIL): None,
    (DELIVERED, HANDOVER): HANDED_OVER,
    (DELIVERED, EXPIRY): None,
    # Terminal states never change.
    **{(HANDED_OVER, e): None for e in ALL_EVENTS},
    **{(REJECTED, e): None for e in ALL_EVENTS},
    **{(FAILED, e): None for e in ALL_EVENTS},
    **{(EXPIRED, e): None for e in ALL_EVENTS},
}


def _pair_id(state: int, event: int) -> str:
    return f"{lifecycle.state_name(state)}+{event_name(event)}"


def test_expectation_table_covers_every_state_event_pair() -> None:
    assert set(EXPECTED) == {(s, e) for s in S.values() for e in E.values()}


@pytest.mark.parametrize(
    ("state", "event", "expected"),
    [(s, e, new) for (s, e), new in EXPECTED.items()],
    ids=[_pair_id(s, e) for (s, e) in EXPECTED],
)
def test_advance_moves_each_state_event_pair_as_designed(
    state: int, event: int, expected: int | None
) -> None:
    step = lifecycle.advance(state, event)
    if expected is None:
        assert step == lifecycle.Transition(state, False)
    else:
        assert step == lifecycle.Transition(expected, True)


def test_terminal_set_is_handed_over_rejected_failed_expired() -> None:
    assert set(lifecycle.TERMINAL) == TERMINAL_STATES


def test_transition_table_never_leaves_a_terminal_state() -> None:
    assert not [pair for pair in lifecycle.TRANSITIONS if pair[0] in lifecycle.TERMINAL]


@pytest.mark.parametrize(
    ("state", "name"),
    [
        (UNSPECIFIED, "UNSPECIFIED"),
        (SUBMITTED, "SUBMITTED"),
        (RELAYED, "RELAYED"),
        (DELIVERED, "DELIVERED"),
        (HANDED_OVER, "HANDED_OVER"),
        (REJECTED, "REJECTED"),
        (FAILED, "FAILED"),
        (EXPIRED, "EXPIRED"),
    ],
)
def test_state_name_drops_the_enum_prefix(state: int, name: str) -> None:
    assert lifecycle.state_name(state) == name


def test_state_name_of_unknown_number_raises() -> None:
    with pytest.raises(ValueError, match="99"):
        lifecycle.state_name(99)


@given(
    start=st.sampled_from([SUBMITTED, RELAYED, DELIVERED, HANDED_OVER, REJECTED, FAILED, EXPIRED]),
    events=st.lists(st.sampled_from(ALL_EVENTS), max_size=30),
)
def test_no_event_sequence_moves_backwards_or_leaves_a_terminal_state(
    start: int, events: list[int]
) -> None:
    state = start
    for event in events:
        step = lifecycle.advance(state, event)
        assert step.changed == (step.state != state)
        if state in TERMINAL_STATES:
            assert step.state == state
        elif step.state in FORWARD_RANK:
            assert FORWARD_RANK[step.state] >= FORWARD_RANK[state]
        else:
            # Leaving the forward path is only ever into a terminal failure.
            assert step.state in {REJECTED, FAILED, EXPIRED}
        state = step.state


@given(events=st.lists(st.sampled_from(ALL_EVENTS), max_size=30))
def test_replaying_an_event_sequence_twice_is_idempotent(events: list[int]) -> None:
    # At-least-once delivery replays evidence: running the same events again changes nothing.
    state: int = SUBMITTED
    for event in events:
        state = lifecycle.advance(state, event).state
    replayed = state
    for event in events:
        replayed = lifecycle.advance(replayed, event).state
    assert replayed == state
