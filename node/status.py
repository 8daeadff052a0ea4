"""``chapar status TARGET``: one screen about a running node or hub, for a person at a terminal.

It reads the server's Prometheus endpoint, the same numbers the dashboards and alerts use,
so the terminal and the dashboards never disagree, and it needs no new RPC and no write
access: only network reach to the metrics port (which operators bind to a management
network) and, where a server has ``metrics_tls = true``, a certificate of the national CA
(``--ca``, ``--cert``, ``--key``). TARGET is ``HOST:PORT`` of the metrics endpoint (read
over https when those are given), an ``https://`` URL, or with ``--demo DIR`` the word
``hub`` or an agency code from ``DIR/addresses.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import math
import socket
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from node.cli_output import emit

__all__ = ["Snapshot", "client_context", "fetch", "register", "render"]

_LAST_ERRORS = 5


@dataclass
class Snapshot:
    """The samples of one scrape: name -> list of (labels, value)."""

    samples: dict[str, list[tuple[dict[str, str], float]]] = field(
        default_factory=lambda: defaultdict(list)
    )

    def value(self, name: str, default: float | None = None, **labels: str) -> float | None:
        for got, value in self.samples.get(name, []):
            if all(got.get(k) == v for k, v in labels.items()):
                return value
        return default

    def series(self, name: str) -> list[tuple[dict[str, str], float]]:
        return self.samples.get(name, [])


def parse(text: str) -> Snapshot:
    snap = Snapshot()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            snap.samples[sample.name].append((dict(sample.labels), float(sample.value)))
    return snap


def fetch(address: str, timeout: float = 10.0, tls: ssl.SSLContext | None = None) -> Snapshot:
    """Scrapes ``address`` (``HOST:PORT`` or a URL); ``tls`` for an https:// endpoint, or
    for ``HOST:PORT`` read over https."""
    return parse(_scrape(address, timeout, tls).decode("utf-8"))


def _url(address: str, tls: bool) -> str:
    if address.startswith(("http://", "https://")):
        return address
    return f"{'https' if tls else 'http'}://{address}/metrics"


def _scrape(address: str, timeout: float, tls: ssl.SSLContext | None) -> bytes:
    url = _url(address, tls is not None)
    with urllib.request.urlopen(url, timeout=timeout, context=tls) as response:  # noqa: S310 - http(s) only
        body: bytes = response.read()
    return body


def client_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """Verifies the server against ``ca`` and presents ``cert`` (with its chain) and ``key``."""
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(cert), str(key))
    return context


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def _rank(labels: dict[str, str]) -> tuple[bool, int]:
    """Where a top-N sample sorts: by its rank, one that is no integer last."""
    rank = labels.get("rank", "0")
    return (False, int(rank)) if rank.isdecimal() else (True, 0)


def _offset(seconds: float) -> str:
    """The hub's clock against ours: "3 s ahead of ours", "10 min behind ours"."""
    if math.isnan(seconds):
        return "?"
    return f"{_age(abs(seconds))} {'ahead of' if seconds >= 0 else 'behind'} ours"


def _time_of_day(seconds: float) -> str:
    """``seconds`` since the epoch as HH:MM:SS in UTC; "?" for a value that is no time (NaN,
    an infinity, out of the years a datetime holds: a proxy's or a broken exporter's)."""
    try:
        return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%H:%M:%S")
    except (ValueError, OverflowError, OSError):
        return "?"


def _bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def render(snap: Snapshot, target: str) -> str:
    build = snap.series("chapar_build_info")
    info = build[0][0] if build else {}
    role = info.get("role", "?")
    ready = snap.value("chapar_ready")
    lines = [
        f"Chapar {role} at {target}   version {info.get('version', '?')}   "
        f"{'READY (SERVING)' if ready == 1 else 'NOT READY (NOT_SERVING)'}",
        "",
    ]
    if role == "hub":
        lines += [
            f"Connected nodes      {_count(snap.value('chapar_hub_connected_nodes'))}",
            f"Letters queued       {_count(snap.value('chapar_hub_queue_depth'))}",
            f"Oldest queued        {_age(snap.value('chapar_hub_queue_oldest_age_seconds'))}",
        ]
        ages = {
            labels["agency"]: v
            for labels, v in snap.series("chapar_hub_queue_top_oldest_age_seconds")
        }
        top = sorted(snap.series("chapar_hub_queue_top_depth"), key=lambda s: _rank(s[0]))
        if top:
            lines.append("Deepest queues       rank  agency                 depth  oldest")
            for labels, depth in top:
                agency = labels.get("agency", "?")
                lines.append(
                    f"                     {labels.get('rank', '?'):>4}  {agency:<20} "
                    f"{depth:>7.0f}  {_age(ages.get(agency))}"
                )
    else:
        connected = snap.value("chapar_node_hub_connected")
        hub = "up" if connected == 1 else "DOWN"
        if snap.value("chapar_node_in_directory") == 0:
            hub += " - this agency is not in the hub's directory: letters refused"
        lines += [
            f"Hub stream           {hub}"
            f"   (reconnects {_count(snap.value('chapar_hub_link_reconnects_total'))})",
            f"Outbox (to relay)    {_count(snap.value('chapar_node_outbox_depth'))}"
            f"   oldest {_age(snap.value('chapar_node_outbox_oldest_age_seconds'))}",
            f"Inbox (not acked)    {_count(snap.value('chapar_node_inbox_unacked'))}",
        ]
        offset = snap.value("chapar_node_hub_clock_offset_seconds")
        if offset is not None:
            lines.append(f"Hub clock            {_offset(offset)}")
    letters = [
        f"{labels.get('stage', '?')} {labels.get('outcome', '?')} {value:.0f}"
        for labels, value in snap.series("chapar_letters_total")
        if value > 0
    ]
    lines.append(f"Letters              {', '.join(letters) if letters else 'none yet'}")
    lines.append(
        f"Database             {_bytes(snap.value('chapar_store_bytes'))}"
        f"   disk free {_bytes(snap.value('chapar_store_filesystem_free_bytes'))}"
    )
    for labels, seconds in snap.series("chapar_certificate_expiry_seconds"):
        lines.append(f"Certificate {labels.get('certificate', '?'):<9} expires in {_age(seconds)}")
    counts = {
        (labels.get("code", "?"), labels.get("reason", "?")): v
        for labels, v in snap.series("chapar_rejections_total")
    }
    # The latest first; a value that is no time (shown "?") after those that are.
    dated = [
        (labels, when, _time_of_day(when))
        for labels, when in snap.series("chapar_last_rejection_timestamp_seconds")
    ]
    last = sorted(dated, key=lambda s: s[1] if s[2] != "?" else -math.inf, reverse=True)
    if last:
        lines.append("Last errors          when (UTC)  code / reason (count)")
        for labels, _, at in last[:_LAST_ERRORS]:
            key = (labels.get("code", "?"), labels.get("reason", "?"))
            lines.append(
                f"                     {at:<8}    {key[0]} / {key[1]} ({counts.get(key, 0):.0f})"
            )
    else:
        lines.append("Last errors          none")
    return "\n".join(lines)


def _resolve(ns: argparse.Namespace) -> str:
    if ns.demo is None:
        return str(ns.target)
    path = ns.demo / "addresses.json"
    try:
        addresses = json.loads(path.read_text())
    except OSError as exc:
        raise SystemExit(f"error: cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # json.JSONDecodeError, UnicodeDecodeError
        raise SystemExit(f"error: {path} is not JSON: {exc}") from None
    metrics = addresses.get("metrics") if isinstance(addresses, dict) else None
    if not isinstance(metrics, dict):
        raise SystemExit(f"error: {path} lists no metrics addresses")
    if ns.target == "hub":
        address = metrics.get("hub")
    else:
        nodes = metrics.get("nodes")
        if not isinstance(nodes, dict) or ns.target not in nodes:
            raise SystemExit(f"error: no node {ns.target} in {path}")
        address = nodes[ns.target]
    if not isinstance(address, str) or not address:  # "": that server serves no metrics
        raise SystemExit(f"error: {path} has no metrics address for {ns.target}")
    return address


def _status(ns: argparse.Namespace) -> int:
    address = _resolve(ns)
    tls_files = (ns.ca, ns.cert, ns.key)
    if any(tls_files) and not all(tls_files):
        print("error: --ca, --cert and --key go together", file=sys.stderr)
        return 2
    tls = None
    if ns.ca:
        for option, path in (("--ca", ns.ca), ("--cert", ns.cert), ("--key", ns.key)):
            if not path.is_file():
                print(f"error: {option} {path}: no such file", file=sys.stderr)
                return 2
        try:
            tls = client_context(ns.ca, ns.cert, ns.key)
        except (OSError, ssl.SSLError) as exc:  # not PEM, a key not the certificate's ...
            print(
                f"error: cannot load --ca {ns.ca}, --cert {ns.cert} and --key {ns.key}: {exc}",
                file=sys.stderr,
            )
            return 2
    try:
        body = _scrape(address, 10.0, tls)
    except urllib.error.HTTPError as exc:  # a refusal says why in its body (403: revoked)
        print(f"error: cannot read metrics at {address}: {_refusal(exc)}", file=sys.stderr)
        return 1
    # URLError and ssl.SSLError are OSErrors; http.client.InvalidURL ("a:b") and a reply
    # that is not HTTP/1 are HTTPExceptions; a URL urllib cannot split is a ValueError.
    except (OSError, http.client.HTTPException, ValueError) as exc:
        said = _failure(exc, address, ns.ca, tls, ns.cert)
        print(f"error: cannot read metrics at {address}: {said}", file=sys.stderr)
        return 1
    try:
        snap = parse(body.decode("utf-8"))
    except ValueError:  # not Prometheus text, or not UTF-8
        snap = Snapshot()
    if not snap.series("chapar_build_info"):
        print(f"error: {address} answers, but not with a Chapar server's metrics", file=sys.stderr)
        return 1
    emit([render(snap, address)], f"the status of {address} could not be printed")
    return 0


# OpenSSL's verify codes (X509_V_ERR_*): the name dialled is not the certificate's
# (HOSTNAME_MISMATCH, IP_ADDRESS_MISMATCH); no way to a CA trusted (UNABLE_TO_GET_ISSUER_CERT,
# DEPTH_ZERO_SELF_SIGNED_CERT, SELF_SIGNED_CERT_IN_CHAIN, UNABLE_TO_GET_ISSUER_CERT_LOCALLY,
# UNABLE_TO_VERIFY_LEAF_SIGNATURE, CERT_SIGNATURE_FAILURE).
_NAME_MISMATCH = frozenset({62, 64})
_NO_CHAIN = frozenset({2, 7, 18, 19, 20, 21})


def _failure(
    exc: Exception,
    address: str,
    ca: Path | None,
    tls: ssl.SSLContext | None = None,
    cert: Path | None = None,
) -> str:
    """What went wrong, and for the two ways of missing a ``metrics_tls`` server (https
    without a certificate of its CA, plain HTTP to it) what to give instead. A certificate
    refused for another cause (issued for another name than the one dialled, expired) is
    said so, not as one of an unknown CA; and so is our ``cert`` refused by the server as
    one of a CA it does not trust."""
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if tls is not None and _alert(reason, address, tls) == "TLSV1_ALERT_UNKNOWN_CA":
        return (
            f"the server refused our client certificate --cert {cert} (TLS alert: unknown CA):"
            " is it issued by the CA the server trusts?"
        )
    if isinstance(reason, ssl.SSLCertVerificationError):
        failed = f"certificate verify failed ({_one_line(reason.verify_message)})"
        if reason.verify_code in _NAME_MISMATCH:  # the CA is right: the name dialled is not
            host = urllib.parse.urlsplit(_url(address, ca is not None)).hostname
            return (
                f"{failed}: the server's certificate does not name {host}; give the host"
                " name or address it was issued for"
            )
        if reason.verify_code not in _NO_CHAIN:  # expired, not yet valid, ...: said above
            return failed
        if ca is not None:
            return f"{failed}: the server's certificate does not chain to --ca {ca}"
        return (
            f"{failed}: the server's certificate is not from a CA this machine trusts; for a"
            " server with metrics_tls give --ca (the national root certificate), --cert and --key"
        )
    plain = _url(address, ca is not None).startswith("http://")
    if plain and isinstance(reason, ConnectionResetError | http.client.BadStatusLine):
        said = _one_line(
            reason.strerror if isinstance(reason, OSError) and reason.strerror else reason
        )
        return (
            f"{said}: the server closed the connection without an HTTP answer; if it has"
            " metrics_tls, give --ca, --cert and --key (or an https:// URL)"
        )
    return _one_line(exc)


# What a scrape whose client certificate the server refused mostly fails with instead of
# the server's alert (see _alert).
_CUT = (ssl.SSLEOFError, ConnectionResetError, ConnectionAbortedError, BrokenPipeError)


def _alert(reason: object, address: str, tls: ssl.SSLContext) -> str | None:
    """The TLS alert (OpenSSL's name: ``TLSV1_ALERT_UNKNOWN_CA``) with which the server
    ended a scrape over https, or None. Under TLS 1.3 the handshake ends before the server
    checks our certificate, and the request is written at once: the server's alert races
    that write, and the scrape most often fails with the connection cut under it (``EOF
    occurred in violation of protocol``), the alert lost. Then a connection of its own,
    that writes nothing, hears it (at most a second, and only after such a failure: a
    server that took our certificate says nothing, waiting for a request)."""
    if isinstance(reason, ssl.SSLError) and not isinstance(reason, ssl.SSLEOFError):
        return reason.reason
    url = urllib.parse.urlsplit(_url(address, True))
    if not isinstance(reason, _CUT) or url.scheme != "https" or url.hostname is None:
        return None
    try:
        with (
            socket.create_connection((url.hostname, url.port or 443), timeout=1.0) as raw,
            tls.wrap_socket(raw, server_hostname=url.hostname) as conn,
        ):
            conn.recv(1)
    except ssl.SSLError as exc:
        return exc.reason
    except (OSError, ValueError):  # a timeout: nothing said; or the address is gone
        return None
    return None


def _refusal(exc: urllib.error.HTTPError) -> str:
    """``HTTP 403: CERTIFICATE_REVOKED: client certificate refused``: the status and the
    start of the body, where the server says why; its characters that do not print (the
    server's text, on the operator's terminal) as spaces."""
    try:
        said = exc.read(200).decode("utf-8", "replace")
    except (OSError, http.client.HTTPException):
        said = ""
    said = "".join(c if c.isprintable() else " " for c in said)
    return _one_line(f"HTTP {exc.code}: {said.strip() or exc.reason}")


def _one_line(exc: Exception | str, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("status", help="one screen about a running node or hub (from its metrics)")
    p.add_argument(
        "target",
        help="HOST:PORT of the metrics endpoint (https with --ca), an https:// URL,"
        " or with --demo: hub or an agency code",
    )
    p.add_argument(
        "--demo", type=Path, metavar="DIR", help="read addresses from DIR/addresses.json"
    )
    p.add_argument("--ca", type=Path, help="CA certificate (for metrics_tls servers)")
    p.add_argument("--cert", type=Path, help="client certificate, with its chain")
    p.add_argument("--key", type=Path, help="client private key")
    p.set_defaults(func=_status)
