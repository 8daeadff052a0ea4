"""Running servers for ``chapar loadtest --targets FILE``: a TOML file naming the nodes.

The harness then starts nothing: it drives the listed agency nodes through ``client_sdk``
as their back-ends, and reads each server's CPU and memory from its Prometheus metrics.
Letters go from each listed node to the next one, so list at least two::

    ca = "pki/ca/root.crt"              # the CA the servers' TLS certificates chain to
    hub_metrics = "10.0.0.5:9100"       # optional: the hub's /metrics, for its figures

    [[nodes]]
    agency = "SENDER.A"
    address = "10.0.0.6:7001"           # the node's agency API
    cert = "pki/agencies/SENDER.A/client.crt"   # a back-end client of that agency
    key = "pki/agencies/SENDER.A/client.key"
    metrics = "10.0.0.6:9101"           # optional; an https:// URL uses cert and key

    [[nodes]]
    agency = "RECIPIENT.B"
    ...

Relative paths are read from the file's folder. Use agencies kept for testing: the harness
acknowledges the letters it finds from the listed agencies, as their back-end would.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from client_sdk.credentials import Credentials
from client_sdk.identity import is_agency_code
from node.config import ConfigError, Table, read_table
from node.status import client_context

__all__ = ["Endpoint", "Targets", "TargetsError", "load_targets"]


class TargetsError(ValueError):
    """The targets file cannot be used; the message says which entry and why."""


@dataclass(frozen=True)
class Endpoint:
    """One agency node: where its agency API listens, a back-end's credentials for it,
    and where its metrics are ("" when not given)."""

    agency: str
    address: str
    credentials: Credentials
    metrics: str = ""
    metrics_tls: ssl.SSLContext | None = None


@dataclass(frozen=True)
class Targets:
    nodes: tuple[Endpoint, ...]  # letters go from each node to the next
    hub_metrics: str = ""
    hub_metrics_tls: ssl.SSLContext | None = None


def load_targets(path: Path) -> Targets:
    """Reads and checks a targets file; TargetsError says what is wrong with it. The
    checks and their wording are the servers' configuration files' (``node.config``)."""
    try:
        table = read_table(path)  # its messages name the file
    except ConfigError as exc:
        raise TargetsError(f"targets file {exc}") from None
    try:
        return _targets(table)
    except ConfigError as exc:
        raise TargetsError(f"targets file {path}: {exc}") from None


def _targets(t: Table) -> Targets:
    entries = t.get("nodes", [])
    if not isinstance(entries, list) or len(entries) < 2:
        raise ConfigError("list at least two [[nodes]]; letters go from each to the next")
    ca = t.path_("ca")
    nodes: list[Endpoint] = []
    first_files: tuple[Path, Path] | None = None  # a back-end's certificate, for hub_metrics
    for i, entry in enumerate(entries):
        where = f"nodes[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: must be a table")
        n = t.child(entry, where)
        agency = n.text("agency")
        if not is_agency_code(agency):
            raise ConfigError(f"{where}.agency: {agency!r} is not an agency code")
        if any(e.agency == agency for e in nodes):
            raise ConfigError(f"{where}.agency: {agency} is listed twice")
        cert, key = n.path_("cert"), n.path_("key")
        try:
            credentials = Credentials.from_files(ca, cert, key)
        except (OSError, ValueError) as exc:  # a key not the certificate's among them
            raise ConfigError(f"{where}: {exc} (cert {cert}, key {key})") from None
        identity = credentials.identity()
        if identity is None or identity.kind != "client" or identity.agency != agency:
            who = identity.uri if identity is not None else "no Chapar identity"
            raise ConfigError(f"{where}: {cert} is not a back-end client of {agency} ({who})")
        first_files = first_files or (cert, key)
        metrics = n.optional_text("metrics")
        address = n.text("address")
        nodes.append(
            Endpoint(agency, address, credentials, metrics, _metrics_tls(metrics, ca, cert, key))
        )
    assert first_files is not None
    hub_metrics = t.optional_text("hub_metrics")  # any listed back-end's certificate will do
    t.reject_unknown()
    return Targets(tuple(nodes), hub_metrics, _metrics_tls(hub_metrics, ca, *first_files))


def _metrics_tls(metrics: str, ca: Path, cert: Path, key: Path) -> ssl.SSLContext | None:
    """The client context for an https:// metrics URL (None for plain HTTP)."""
    if not metrics.startswith("https://"):
        return None
    try:
        return client_context(ca, cert, key)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise ConfigError(f"metrics {metrics}: cannot use {cert} and {key}: {exc}") from None
