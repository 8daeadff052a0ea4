"""Why a node is not SERVING, as its health and log say: a suspended or retired agency's
node used to say only "hub stream down" (the hub refuses its stream), which sends an
operator looking at the network instead of the directory."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from client_sdk import pb
from node.agency import Agency
from node.core.directory import DirectoryView
from node.server import _node_trouble

CODE = "RECIPIENT.B"


def _agency(state: int) -> SimpleNamespace:
    directory = pb.Directory(version=1)
    directory.agencies.add(code=CODE, state=state)
    agency = SimpleNamespace(
        directory=DirectoryView(directory),
        in_directory=True,
        hub_connected=False,  # the hub refuses its stream
        numbers_unconfirmed=None,
        config=SimpleNamespace(agency=CODE),
        signing_certificate_fault=lambda: "",
    )
    agency.own_state = lambda: Agency.own_state(agency)  # type: ignore[arg-type]
    return agency


@pytest.mark.parametrize(
    ("state", "why"),
    [
        (pb.AGENCY_STATE_ACTIVE, "hub stream down"),
        (pb.AGENCY_STATE_SUSPENDED, "agency suspended in the hub's directory"),
        (pb.AGENCY_STATE_RETIRED, "agency retired in the hub's directory"),
    ],
)
def test_a_node_says_its_agency_is_suspended_or_retired_not_only_that_its_stream_is_down(
    state: int, why: str
) -> None:
    assert _node_trouble(_agency(state)) == why  # type: ignore[arg-type]


def test_a_restored_node_without_the_hub_says_it_refuses_letters_not_only_holds_them() -> None:
    # Without its stream a node still takes letters into its outbox; a node restored from
    # a backup does not, until the hub has told it which numbers it holds.
    agency = _agency(pb.AGENCY_STATE_ACTIVE)
    agency.numbers_unconfirmed = 1_700_000_000.0
    why = _node_trouble(agency)  # type: ignore[arg-type]
    assert why.startswith("hub stream down")
    assert "letters refused until the hub confirms the numbers" in why


def test_a_node_whose_signing_certificate_expired_says_so() -> None:
    # It refuses every letter (CERTIFICATE_EXPIRED: the hub would refuse them) with its
    # hub stream up and its store writing: nothing else said it was not serving.
    agency = _agency(pb.AGENCY_STATE_ACTIVE)
    agency.hub_connected = True
    agency.store = SimpleNamespace(db=SimpleNamespace(is_open=True, write_failing=False))
    assert _node_trouble(agency) == ""  # type: ignore[arg-type]
    fault = "this node's signing certificate expired at 2026-01-01 00:00:00 UTC"
    agency.signing_certificate_fault = lambda: fault
    assert _node_trouble(agency) == f"{fault}: letters refused"  # type: ignore[arg-type]
