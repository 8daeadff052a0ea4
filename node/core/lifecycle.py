"""Everything that decides where a letter stands for one recipient lives here.

The lifecycle is a table: (state, evidence event) -> new state. Evidence can arrive out of
order after a reconnect (a DELIVERY routed back before the RELAY_ACCEPTANCE of a resent
batch), so the table moves forward only; a late or repeated event leaves the state as it is.
Terminal states (HANDED_OVER, REJECTED, FAILED, EXPIRED) never change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from client_sdk import pb

__all__ = ["TERMINAL", "TRANSITIONS", "Transition", "advance", "state_name"]

S = pb.DeliveryState
E = pb.EvidenceEvent

SUBMITTED: Final = S.DELIVERY_STATE_SUBMITTED
RELAYED: Final = S.DELIVERY_STATE_RELAYED
DELIVERED: Final = S.DELIVERY_STATE_DELIVERED
HANDED_OVER: Final = S.DELIVERY_STATE_HANDED_OVER
REJECTED: Final = S.DELIVERY_STATE_REJECTED
FAILED: Final = S.DELIVERY_STATE_FAILED
EXPIRED: Final = S.DELIVERY_STATE_EXPIRED

TERMINAL: Final = frozenset({HANDED_OVER, REJECTED, FAILED, EXPIRED})

# (state, event) -> new state. Pairs not listed leave the state unchanged.
TRANSITIONS: Final[dict[tuple[int, int], int]] = {
    (SUBMITTED, E.EVIDENCE_EVENT_RELAY_ACCEPTANCE): RELAYED,
    (SUBMITTED, E.EVIDENCE_EVENT_RELAY_REJECTION): REJECTED,
    (SUBMITTED, E.EVIDENCE_EVENT_RELAY_FAILURE): FAILED,
    (SUBMITTED, E.EVIDENCE_EVENT_DELIVERY): DELIVERED,
    (SUBMITTED, E.EVIDENCE_EVENT_DELIVERY_FAILURE): FAILED,
    (SUBMITTED, E.EVIDENCE_EVENT_HANDOVER): HANDED_OVER,
    (SUBMITTED, E.EVIDENCE_EVENT_EXPIRY): EXPIRED,
    (RELAYED, E.EVIDENCE_EVENT_RELAY_FAILURE): FAILED,
    (RELAYED, E.EVIDENCE_EVENT_DELIVERY): DELIVERED,
    (RELAYED, E.EVIDENCE_EVENT_DELIVERY_FAILURE): FAILED,
    (RELAYED, E.EVIDENCE_EVENT_HANDOVER): HANDED_OVER,
    (RELAYED, E.EVIDENCE_EVENT_EXPIRY): EXPIRED,
    (DELIVERED, E.EVIDENCE_EVENT_HANDOVER): HANDED_OVER,
}


@dataclass(frozen=True, slots=True)
class Transition:
    """The outcome of one event: the new state and whether it changed."""

    state: int
    changed: bool


def advance(state: int, event: int) -> Transition:
    """Applies ``event`` to ``state`` per the table."""
    new = TRANSITIONS.get((state, event))
    if new is None:
        return Transition(state, False)
    return Transition(new, True)


def state_name(state: int) -> str:
    """``DELIVERY_STATE_DELIVERED`` -> ``DELIVERED``."""
    return pb.DeliveryState.Name(state).removeprefix("DELIVERY_STATE_")  # type: ignore[arg-type]
