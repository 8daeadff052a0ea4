"""The SHAMS national document number in its canonical text form.

This module owns the one text format of a number, ``<origin>/<domain>/<year>/<sequence>``,
e.g. ``000.00.00.G22/O/2026/0000042``: the domain is ``O`` (outgoing) or ``I`` (internal),
the year has four digits and the sequence is zero-padded to seven digits (more when it is
larger). Parsing accepts only the canonical form, so the text is a unique key of a letter.
Pure functions, no I/O: the node imports them too. A national format would replace this
module and nothing else.
"""

from __future__ import annotations

import re

from client_sdk import pb
from client_sdk.identity import is_agency_code

__all__ = ["format_shams", "parse_shams"]

_LETTER_OF_DOMAIN: dict[int, str] = {
    pb.ShamsDomain.SHAMS_DOMAIN_OUTGOING: "O",
    pb.ShamsDomain.SHAMS_DOMAIN_INTERNAL: "I",
}
_DOMAIN_OF_LETTER: dict[str, pb.ShamsDomain.ValueType] = {
    "O": pb.ShamsDomain.SHAMS_DOMAIN_OUTGOING,
    "I": pb.ShamsDomain.SHAMS_DOMAIN_INTERNAL,
}
_YEAR_RE = re.compile(r"[0-9]{4}")
# Exactly seven digits, or more without a leading zero: one text per number.
_SEQUENCE_RE = re.compile(r"[0-9]{7}|[1-9][0-9]{7,18}")
_MAX_SEQUENCE = 2**63 - 1  # int64 in the proto


def format_shams(shams: pb.Shams) -> str:
    """The canonical text of ``shams``; raises ValueError when it is not a valid number."""
    letter = _LETTER_OF_DOMAIN.get(shams.domain)
    if letter is None:
        raise ValueError(f"SHAMS number without a valid domain: {shams.domain}")
    if not is_agency_code(shams.origin):
        raise ValueError(f"SHAMS number with an invalid origin {shams.origin!r}")
    if not 1 <= shams.year <= 9999:
        raise ValueError(f"SHAMS number with an invalid year {shams.year}")
    if not 1 <= shams.sequence <= _MAX_SEQUENCE:
        raise ValueError(f"SHAMS number with an invalid sequence {shams.sequence}")
    return f"{shams.origin}/{letter}/{shams.year:04d}/{shams.sequence:07d}"


def parse_shams(text: str) -> pb.Shams:
    """Parses the canonical text form; raises ValueError on anything else."""
    parts = text.split("/")
    if len(parts) != 4:
        raise _malformed(text, "expected <origin>/<O|I>/<year>/<sequence>")
    origin, letter, year, sequence = parts
    if not is_agency_code(origin):
        raise _malformed(text, "origin is not an agency code")
    domain = _DOMAIN_OF_LETTER.get(letter)
    if domain is None:
        raise _malformed(text, "domain must be O or I")
    if _YEAR_RE.fullmatch(year) is None or year == "0000":
        raise _malformed(text, "year must have four digits")
    if _SEQUENCE_RE.fullmatch(sequence) is None:
        raise _malformed(text, "sequence must have seven digits, or more without leading zeros")
    number = int(sequence)
    if not 1 <= number <= _MAX_SEQUENCE:
        raise _malformed(text, "sequence out of range")
    return pb.Shams(origin=origin, domain=domain, year=int(year), sequence=number)


def _malformed(text: str, why: str) -> ValueError:
    shown = text if len(text) <= 100 else text[:100] + "..."
    return ValueError(f"invalid SHAMS number {shown!r}: {why}")
