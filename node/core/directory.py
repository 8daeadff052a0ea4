"""A read-only view of the exchange directory: which agencies exist and may act.

Built from the ``Directory`` message the hub publishes; the hub builds that message from
its configuration. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from client_sdk import pb
from node.core.errors import ChaparError, Code

__all__ = ["DirectoryView"]


@dataclass(frozen=True)
class DirectoryView:
    """Lookup over one version of the directory."""

    message: pb.Directory

    def __post_init__(self) -> None:
        object.__setattr__(self, "_agencies", {a.code: a for a in self.message.agencies})

    @property
    def version(self) -> int:
        return self.message.version

    def agency(self, code: str) -> pb.Agency | None:
        agencies: dict[str, pb.Agency] = self._agencies  # type: ignore[attr-defined]
        return agencies.get(code)

    def __iter__(self) -> Iterator[pb.Agency]:
        return iter(self.message.agencies)

    def require_recipient(self, code: str, field: str) -> pb.Agency:
        """The recipient agency, or NOT_FOUND / FAILED_PRECONDITION."""
        agency = self.agency(code)
        if agency is None:
            raise ChaparError(
                Code.NOT_FOUND,
                "UNKNOWN_RECIPIENT",
                f"no agency {code} in the directory",
                metadata={"agency": code},
                field_violations=[(field, "unknown agency")],
            )
        if agency.state != pb.AGENCY_STATE_ACTIVE:
            raise ChaparError(
                Code.FAILED_PRECONDITION,
                "RECIPIENT_INACTIVE",
                f"agency {code} is {_state(agency)}",
                metadata={"agency": code, "state": _state(agency)},
            )
        return agency

    def require_sender(self, code: str) -> pb.Agency:
        """The sending agency, or PERMISSION_DENIED / FAILED_PRECONDITION."""
        agency = self.agency(code)
        if agency is None:
            raise ChaparError(
                Code.PERMISSION_DENIED,
                "UNKNOWN_SENDER",
                f"no agency {code} in the directory",
                metadata={"agency": code},
            )
        if agency.state != pb.AGENCY_STATE_ACTIVE:
            raise ChaparError(
                Code.FAILED_PRECONDITION,
                "SENDER_INACTIVE",
                f"agency {code} is {_state(agency)}",
                metadata={"agency": code, "state": _state(agency)},
            )
        return agency


def _state(agency: pb.Agency) -> str:
    return pb.AgencyState.Name(agency.state).removeprefix("AGENCY_STATE_").lower()
