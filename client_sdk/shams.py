"""The SHAMS national document number in its text forms.

This module owns the one text format of a number, ``<origin>/<domain>/<year>/<sequence>``,
e.g. ``000.00.00.G22/O/2026/0000042``: the domain is ``O`` (outgoing) or ``I`` (internal),
the year has four digits and the sequence is zero-padded to seven digits (more when it is
larger). Parsing accepts only the canonical form, so the text is a unique key of a letter.
Pure functions, no I/O: the node imports them too. A national format would replace this
module and nothing else.

People quote and type these numbers, so a number has a checked form too, for them only:
the canonical text, ``:`` and a check character, ``000.00.00.G22/O/2026/0000042:3``
(``format_shams_checked``). The check character is ISO 7064 MOD 37,36 (python-stdnum's)
over the canonical text's letters and digits, in order, the separators ``.``, ``-`` and
``/`` left out (``0000000G22O20260000042`` here); it is a digit or a capital letter. The
separator is ``:`` because no canonical number holds one (an origin is A-Z, 0-9, ``.`` and
``-``, and ``-`` already occurs in agency codes), so a typed text is one form or the other,
never both. ``parse_shams_typed`` reads what a person typed: the canonical form or the
checked form, a wrong check character refused as probably mistyped.

What is caught, exactly. The check covers the letters and digits: any one of them typed as
another letter or digit is always caught, and so is the check character's own typo. Two
adjacent characters swapped are caught unless they are neighbours in the alphabet 0-9A-Z
taken as a circle (0 and 1, 9 and A, Z and 0): such a swap goes unseen at one running value
of the reckoning in 36, which MOD 37,36 does not promise against (1 in 630 of all swaps of
two different characters). The form catches any ``/`` moved, added, lost or mistyped, and a
domain, year or sequence of the wrong shape. Two more typos slip past both. A ``.`` or ``-`` of
the origin moved, or typed for the other, is not seen at all, and one typed for a letter
or digit, or the other way round, is caught 35 times in 36: such a typo reads as an origin
that no agency has in practice. The ``:`` typed as a digit, when the check character is a
digit and the sequence has no leading zero, reads as a canonical number with a sequence a
hundred times past the one given (the ``:`` lost: ten times), which the exchange has not
reached. The canonical form
stays the only key: stores, the wire and the logs never carry the check character.
"""

from __future__ import annotations

import functools
import re

from stdnum.iso7064 import mod_37_36

from client_sdk import pb
from client_sdk.identity import is_agency_code

__all__ = ["format_shams", "format_shams_checked", "parse_shams", "parse_shams_typed"]

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
_CHECK_SEPARATOR = ":"
# MOD 37,36's alphabet: what the check covers, and what a check character is.
_ALPHANUMERIC = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# The agency codes seen as origins are few: each checked once (a bounded memo).
_is_origin = functools.lru_cache(maxsize=1024)(is_agency_code)


def format_shams(shams: pb.Shams) -> str:
    """The canonical text of ``shams``; raises ValueError when it is not a valid number."""
    # Each field read once, the origin's check remembered and %-formatting (a letter's
    # number is formatted a few times at each server it passes: a third of the cost).
    origin, domain, year, sequence = shams.origin, shams.domain, shams.year, shams.sequence
    letter = _LETTER_OF_DOMAIN.get(domain)
    if letter is None:
        raise ValueError(f"SHAMS number without a valid domain: {domain}")
    if not _is_origin(origin):
        raise ValueError(f"SHAMS number with an invalid origin {origin!r}")
    if not 1 <= year <= 9999:
        raise ValueError(f"SHAMS number with an invalid year {year}")
    if not 1 <= sequence <= _MAX_SEQUENCE:
        raise ValueError(f"SHAMS number with an invalid sequence {sequence}")
    return "%s/%s/%04d/%07d" % (origin, letter, year, sequence)  # noqa: UP031 (the fastest)


def format_shams_checked(shams: pb.Shams | str) -> str:
    """The checked text of ``shams`` (its message, or its canonical text), for people to
    read and type: the canonical text, ``:`` and its check character. Raises ValueError
    when it is not a valid number."""
    canonical = format_shams(shams) if isinstance(shams, pb.Shams) else _canonical(shams)
    return f"{canonical}{_CHECK_SEPARATOR}{_check_character(canonical)}"


def parse_shams(text: str) -> pb.Shams:
    """Parses the canonical text form; raises ValueError on anything else."""
    return _parse(text, text)


def parse_shams_typed(text: str) -> pb.Shams:
    """Parses a number as a person typed it: the canonical form or the checked form.
    Raises ValueError on anything else, saying the number was probably mistyped when its
    check character is not the one its letters and digits give."""
    canonical, separator, check = text.rpartition(_CHECK_SEPARATOR)
    if not separator:
        return _parse(text, text)
    shams = _parse(canonical, text)
    if len(check) != 1 or check not in _ALPHANUMERIC:
        raise _malformed(
            text,
            f"the check character after {_CHECK_SEPARATOR!r} must be one digit or capital letter",
        )
    if check != _check_character(canonical):
        # The right character is not said: a person would copy it and keep the typo.
        raise ValueError(
            f"SHAMS number {_shown(text)!r} does not match its check character {check}: it was"
            " probably mistyped (a character changed, or two swapped); check it against"
            " where it was written"
        )
    return shams


def _canonical(text: str) -> str:
    _parse(text, text)
    return text


def _check_character(canonical: str) -> str:
    letters_and_digits = "".join(c for c in canonical if c in _ALPHANUMERIC)
    check: str = mod_37_36.calc_check_digit(letters_and_digits)
    return check


def _parse(text: str, typed: str) -> pb.Shams:
    """``text`` parsed as a canonical number; the ValueError names ``typed``, what was given."""
    parts = text.split("/")
    if len(parts) != 4:
        raise _malformed(typed, "expected <origin>/<O|I>/<year>/<sequence>")
    origin, letter, year, sequence = parts
    if not is_agency_code(origin):
        raise _malformed(typed, "origin is not an agency code")
    domain = _DOMAIN_OF_LETTER.get(letter)
    if domain is None:
        raise _malformed(typed, "domain must be O or I")
    if _YEAR_RE.fullmatch(year) is None or year == "0000":
        raise _malformed(typed, "year must have four digits")
    if _SEQUENCE_RE.fullmatch(sequence) is None:
        raise _malformed(typed, "sequence must have seven digits, or more without leading zeros")
    number = int(sequence)
    if not 1 <= number <= _MAX_SEQUENCE:
        raise _malformed(typed, "sequence out of range")
    return pb.Shams(origin=origin, domain=domain, year=int(year), sequence=number)


def _malformed(text: str, why: str) -> ValueError:
    return ValueError(f"invalid SHAMS number {_shown(text)!r}: {why}")


def _shown(text: str) -> str:
    return text if len(text) <= 100 else text[:100] + "..."
