"""Chapar identities: who a certificate speaks for, read from its SAN URI.

Identity lives only in a ``urn:chapar:`` SAN URI, never in the CN or a host name:

* ``urn:chapar:agency:<CODE>``        an agency's node (TLS) or signing key
* ``urn:chapar:hub:<NAME>``           the exchange hub
* ``urn:chapar:client:<CODE>:<NAME>`` a back-end system of agency CODE talking to its node
* ``urn:chapar:auditor:<NAME>``       an auditor, who may track any letter
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from cryptography import x509

__all__ = [
    "AGENCY_CODE_RE",
    "Identity",
    "IdentityKind",
    "identity_of_certificate",
    "is_agency_code",
]

# At least one letter or digit, so a code can never be "." or ".." when used as a path segment.
AGENCY_CODE_RE = re.compile(r"(?=[.\-]*[A-Z0-9])[A-Z0-9.\-]{2,64}")
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9.\-]{0,63}")
_PREFIX = "urn:chapar:"

IdentityKind = Literal["agency", "hub", "client", "auditor"]


def is_agency_code(code: str) -> bool:
    """True when ``code`` is 2-64 characters of A-Z, 0-9, '.' and '-'."""
    return AGENCY_CODE_RE.fullmatch(code) is not None


@dataclass(frozen=True, slots=True)
class Identity:
    """A parsed Chapar identity. ``agency`` is the agency code for agency and client kinds."""

    kind: IdentityKind
    name: str
    agency: str = ""

    @property
    def uri(self) -> str:
        if self.kind == "client":
            return f"{_PREFIX}client:{self.agency}:{self.name}"
        return f"{_PREFIX}{self.kind}:{self.name}"

    def __str__(self) -> str:
        return self.uri

    @classmethod
    def for_agency(cls, code: str) -> Identity:
        if not is_agency_code(code):
            raise ValueError(f"invalid agency code {code!r}")
        return cls("agency", code, code)

    @classmethod
    def for_hub(cls, name: str) -> Identity:
        if _NAME_RE.fullmatch(name) is None:
            raise ValueError(f"invalid hub name {name!r}")
        return cls("hub", name)

    @classmethod
    def for_client(cls, agency: str, name: str) -> Identity:
        if not is_agency_code(agency) or _NAME_RE.fullmatch(name) is None:
            raise ValueError(f"invalid client identity {agency!r}:{name!r}")
        return cls("client", name, agency)

    @classmethod
    def for_auditor(cls, name: str) -> Identity:
        if _NAME_RE.fullmatch(name) is None:
            raise ValueError(f"invalid auditor name {name!r}")
        return cls("auditor", name)

    @classmethod
    def parse(cls, uri: str) -> Identity:
        """Parses a ``urn:chapar:`` URI; raises ValueError when it is not one."""
        if not uri.startswith(_PREFIX):
            raise ValueError(f"not a Chapar identity: {uri!r}")
        kind, _, rest = uri[len(_PREFIX) :].partition(":")
        if kind == "agency":
            return cls.for_agency(rest)
        if kind == "hub":
            return cls.for_hub(rest)
        if kind == "auditor":
            return cls.for_auditor(rest)
        if kind == "client":
            agency, _, name = rest.partition(":")
            return cls.for_client(agency, name)
        raise ValueError(f"unknown identity kind in {uri!r}")


def identity_of_certificate(cert: x509.Certificate) -> Identity | None:
    """The certificate's single Chapar identity, or None if it has none or several."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = [
        u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith(_PREFIX)
    ]
    if len(uris) != 1:
        return None
    try:
        return Identity.parse(uris[0])
    except ValueError:
        return None
