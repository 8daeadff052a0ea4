"""Configuration: one TOML file per node or hub, validated at start.

A bad file stops start-up with a ConfigError naming the key and what is wrong with it.
Relative paths are resolved against the directory of the configuration file.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from cryptography import x509

from certs.pki import revocation_entry, revocation_file_lines
from client_sdk.identity import Identity, is_agency_code
from node.core.documents import DocumentLimits, base_media_type
from node.core.errors import ChaparError
from node.core.letters import LetterLimits, normalise_text
from node.storage.db import Durability

__all__ = [
    "AgencyEntry",
    "ConfigError",
    "HubConfig",
    "NodeConfig",
    "SigningConfig",
    "Table",
    "TlsConfig",
    "config_keys",
    "load_hub_config",
    "load_node_config",
    "read_certificate_file",
    "read_certificates",
    "read_revocation_file",
    "read_revocation_times",
    "read_revocations",
    "read_table",
]

DEFAULT_LISTEN = "127.0.0.1:0"
# keepalive_s becomes gRPC options in milliseconds, which must fit in 32 bits; pings more
# often than every second are no use (and servers refuse them: min_ping_interval, 1 s).
KEEPALIVE_RANGE_S = (1.0, 3600.0)
# Upper bounds of the other intervals and delays: past them a value is a slip (seconds
# typed as milliseconds) rather than a choice. What acts every so often (expiry, reload;
# the gauges at most every minute: MAX_METRICS_INTERVAL_S), and what a stop or a reconnect
# waits, at most an hour: letters expire, a revocation takes effect and a node comes back
# at most that late. Retention may run as
# seldom as once a week; a retry delay quoted to back-ends (RetryInfo, int64 milliseconds
# to the nodes) and the clock skew tolerated are at most a day; a letter may have waited
# in an outbox for a year at most. Retention periods (how long to keep) have none: a
# century means "keep", and harms nothing.
HOUR_S = 3600.0
DAY_S = 86400.0
WEEK_S = 7 * DAY_S
# The longest period of the gauges' refresh: ChaparMetricsStale (ops/prometheus) fires when
# they are 120 s old, so a refresh on time must come well within that. Refreshing costs a
# few milliseconds at a million letters queued (BENCHMARKS.md): nothing gained by waiting
# longer, and alerts judging gauges minutes old.
MAX_METRICS_INTERVAL_S = 60.0
# The shortest period of a repeating task: at 0 it ran again at once, a core kept busy for
# ever (retention walks the whole document store each time).
MIN_INTERVAL_S = 0.1
MIN_RECONNECT_S = 0.2  # the backoff's first step: a cap of 0 reconnected with no pause
MAX_LETTER_AGE_S = 366 * DAY_S
# The largest message a server takes (node.server's gRPC options): a frame or message
# limit above it could never be reached.
MAX_MESSAGE = 256 * 1024 * 1024
# The most letters a node's frame to the hub may carry (node.relay_batch at most): the hub
# checks a frame's letters in one turn of its event loop, which every other agency's stream
# waits for, so a frame's count is bounded, not only its bytes.
MAX_FRAME_LETTERS = 4096
# The most letters hub.queue_quota may let wait for one recipient: a billion letters of
# about 3.2 KB (OPERATIONS.md) is 3.2 TB of queue for one agency, past which a value is a
# slip (or a wish for no quota, which the hub does not offer: a queue must stop somewhere
# before the disk does). One past a float's range stopped the hub (quota * 0.9).
MAX_QUEUE_QUOTA = 1_000_000_000


# What numbering and signing add to a draft's bytes in its envelope, at most (the number,
# times, sender, signature, key id and a batch's inclusion proof).
ENVELOPE_EXTRA_BYTES = 4096


def frame_room(max_frame_bytes: int) -> int:
    """The bytes of letters a node puts in a frame to a hub that takes ``max_frame_bytes``:
    what is left after the frame's own fields (a few bytes a letter, 64 KiB allowed)."""
    return max_frame_bytes - min(64 * 1024, max_frame_bytes // 8)


_STATES = ("active", "suspended", "retired")
_ALGORITHMS = ("ed25519", "ecdsa-p256")


class ConfigError(ValueError):
    """The configuration is unusable; the message names the key."""


@dataclass(frozen=True)
class TlsConfig:
    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class SigningConfig:
    cert: Path
    key: Path
    algorithm: str | None = None
    intermediates: Path | None = None


@dataclass(frozen=True)
class AgencyEntry:
    code: str
    name: str
    state: str
    signing_certificates: list[Path]


@dataclass(frozen=True)
class HubConfig:
    name: str
    listen: str
    database: Path
    tls: TlsConfig
    signing: SigningConfig
    agencies: list[AgencyEntry]
    ready_file: Path | None = None
    durability: Durability = "full"
    metrics_listen: str = ""
    metrics_tls: bool = False  # /metrics over HTTPS, clients need a certificate of the CA
    max_frame_bytes: int = 32 * 1024 * 1024
    grace_s: float = 5.0
    delivery_window: int = 1024
    queue_quota: int = 100_000
    quota_retry_after_s: float = 30.0
    expiry_interval_s: float = 1.0
    retention_s: float = 30 * 86400.0
    purge_interval_s: float = 3600.0
    revocation_file: Path | None = None
    reload_interval_s: float = 5.0
    clock_skew_s: float = 300.0
    max_letter_age_s: float = 7 * 86400.0
    metrics_interval_s: float = 5.0
    metrics_top_n: int = 10
    keepalive_s: float = 20.0

    @property
    def identity(self) -> Identity:
        return Identity.for_hub(self.name)


@dataclass(frozen=True)
class NodeConfig:
    agency: str
    listen: str
    hub: str
    database: Path
    tls: TlsConfig
    signing: SigningConfig
    limits: LetterLimits = field(default_factory=LetterLimits)
    ready_file: Path | None = None
    durability: Durability = "full"
    metrics_listen: str = ""
    metrics_tls: bool = False  # /metrics over HTTPS, clients need a certificate of the CA
    max_message_bytes: int = 16 * 1024 * 1024
    relay_frame_bytes: int = 8 * 1024 * 1024
    grace_s: float = 5.0
    relay_batch: int = 256
    reconnect_max_s: float = 10.0
    retention_s: float = 30 * 86400.0
    purge_interval_s: float = 3600.0
    reload_interval_s: float = 5.0
    # Back-end client name -> the mailboxes it may use; a client not listed may use all.
    clients: dict[str, frozenset[str]] = field(default_factory=dict)
    metrics_interval_s: float = 5.0
    documents: DocumentLimits = field(default_factory=DocumentLimits)
    documents_dir: Path = Path("documents")
    # Documents older than this that no letter kept whole still references are removed;
    # 0 keeps every document.
    documents_retention_s: float = 0.0
    keepalive_s: float = 20.0
    # The hub's name (urn:chapar:hub:<name>), accepted alone before the node holds a
    # directory; "" takes the first hub to attest (trust on first use). Once a directory is
    # saved, the hub it names is the one accepted (Agency.hub_identity).
    hub_name: str = ""

    @property
    def identity(self) -> Identity:
        return Identity.for_agency(self.agency)


class Table:
    """Typed access to one TOML table, with the key path for messages (ConfigError). Also
    read by other TOML files of ours (``loadtest.targets``): one set of checks, one wording."""

    def __init__(self, data: Mapping[str, Any], path: str, base: Path) -> None:
        self.data = data
        self.path = path
        self.base = base
        # Keys read so far, and the tables opened below this one: what is left is unknown.
        self.known: set[str] = set()
        self.children: list[Table] = []

    def _key(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str, default: Any = None) -> Any:
        self.known.add(key)
        return self.data.get(key, default)

    def child(self, data: Mapping[str, Any], path: str) -> Table:
        table = Table(data, path, self.base)
        self.children.append(table)
        return table

    def key_paths(self) -> set[str]:
        """Dotted paths of the leaf keys read here and below (list indices dropped)."""
        base = re.sub(r"\[\d+\]", "", self.path)
        paths = {f"{base}.{k}" if base else k for k in self.known}
        for child in self.children:
            paths.discard(re.sub(r"\[\d+\]", "", child.path))
            paths |= child.key_paths()
        return paths

    def reject_unknown(self) -> None:
        """A key nobody read is a typo or a setting this version lacks: refuse it."""
        for key in self.data:
            if key not in self.known:
                what = "table" if isinstance(self.data[key], dict | list) else "key"
                raise ConfigError(f"{self._key(key)}: unknown {what}")
        for child in self.children:
            child.reject_unknown()

    def table(self, key: str, *, required: bool = True) -> Table:
        value = self.get(key)
        if value is None:
            if required:
                raise ConfigError(f"[{self._key(key)}]: missing table")
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{self._key(key)}: must be a table")
        return self.child(value, self._key(key))

    def text(self, key: str, default: str | None = None) -> str:
        value = self.get(key, default)
        if value is None:
            raise ConfigError(f"{self._key(key)}: missing")
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{self._key(key)}: must be a non-empty string")
        return value

    def optional_text(self, key: str) -> str:
        """The key's non-empty string, or "" when the key is absent."""
        if key not in self.data:
            self.known.add(key)
            return ""
        return self.text(key)

    def integer(
        self, key: str, default: int, *, minimum: int = 1, maximum: int | None = None
    ) -> int:
        value = self.get(key, default)
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or value < minimum
            or (maximum is not None and value > maximum)
        ):
            rule = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
            raise ConfigError(f"{self._key(key)}: must be an integer {rule}")
        return value

    def number(self, key: str, default: float, *, maximum: float | None = None) -> float:
        if maximum is not None:
            return self.between(key, default, 0.0, maximum)
        return self._number(key, default, ">= 0", lambda v: v >= 0)

    def positive(self, key: str, default: float, *, maximum: float | None = None) -> float:
        if maximum is None:
            return self._number(key, default, "> 0", lambda v: v > 0)
        return self._number(
            key, default, f"> 0 and at most {_shown(maximum)}", lambda v: 0 < v <= maximum
        )

    def between(self, key: str, default: float, low: float, high: float) -> float:
        return self._number(
            key, default, f"from {_shown(low)} to {_shown(high)}", lambda v: low <= v <= high
        )

    def _number(self, key: str, default: float, rule: str, fits: Callable[[float], bool]) -> float:
        """A finite number that ``fits`` (described by ``rule``): NaN compares False with
        everything, so an unguarded ``< 0`` let it (and inf) through to where it breaks."""
        value = self.get(key, default)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ConfigError(f"{self._key(key)}: must be a number {rule}")
        try:
            number = float(value)  # an integer of 309 digits or more overflows
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            shown = f", not {value}" if isinstance(value, float) else ""
            raise ConfigError(f"{self._key(key)}: must be a finite number {rule}{shown}")
        if not fits(number):
            raise ConfigError(f"{self._key(key)}: must be a number {rule}")
        return number

    def flag(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self._key(key)}: must be true or false")
        return value

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.text(key, default)
        if value not in choices:
            raise ConfigError(
                f"{self._key(key)}: must be one of {', '.join(choices)}, not {value!r}"
            )
        return value

    def path_(self, key: str, *, must_exist: bool = True, default: str | None = None) -> Path:
        raw = self.text(key, default)
        path = (self.base / raw).resolve()
        if must_exist and not path.is_file():
            raise ConfigError(f"{self._key(key)}: no such file {path}")
        return path

    def optional_path(self, key: str, *, must_exist: bool = True) -> Path | None:
        if key not in self.data:
            self.known.add(key)
            return None
        return self.path_(key, must_exist=must_exist)

    def listen(
        self,
        key: str,
        *,
        optional: bool = False,
        default: str | None = DEFAULT_LISTEN,
        dial: bool = False,
    ) -> str:
        """A HOST:PORT; ``default=None`` makes the key required. An address to listen on may
        have port 0 (any free port); one to dial (``dial``) may not."""
        if optional and key not in self.data:
            self.known.add(key)
            return ""
        value = self.text(key, default)
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ConfigError(f"{self._key(key)}: must be HOST:PORT, not {value!r}")
        if dial and int(port) == 0:
            raise ConfigError(
                f"{self._key(key)}: must be HOST:PORT with a port from 1 to 65535, not {value!r}"
            )
        return value


def _shown(limit: float) -> str:
    """A bound as a reader would write it: 31622400, not 3.16224e+07."""
    return str(int(limit)) if limit.is_integer() else str(limit)


def read_table(path: Path) -> Table:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such configuration file") from exc
    except OSError as exc:  # a folder, no permission ...
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return Table(data, "", path.parent.resolve())


def read_certificates(path: Path, key: str) -> list[x509.Certificate]:
    """The PEM certificates in ``path`` (at least one); else a ConfigError naming ``key``
    (a key file given for a certificate is the usual mix-up)."""
    return read_certificate_file(path, key)[1]


def read_certificate_file(path: Path, key: str) -> tuple[bytes, list[x509.Certificate]]:
    """``path``'s bytes and the PEM certificates in them, as ``read_certificates``."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from exc
    try:
        certificates = x509.load_pem_x509_certificates(data)
        for certificate in certificates:
            certificate.extensions  # noqa: B018  # malformed ones raise only when read
    # ValueError, and cryptography's InvalidVersion and DuplicateExtension, which are not
    # ValueErrors: a hub reloading such a file raised half-way, and one starting stopped
    # "by an unexpected error" instead of naming the key.
    except Exception as exc:
        raise ConfigError(f"{key}: not a valid PEM certificate: {path} ({exc})") from exc
    return data, certificates


def _tls(t: Table) -> TlsConfig:
    tls = t.table("tls")
    return TlsConfig(ca=tls.path_("ca"), cert=tls.path_("cert"), key=tls.path_("key"))


def _signing(t: Table) -> SigningConfig:
    s = t.table("signing")
    algorithm = s.choice("algorithm", "auto", ("auto", *_ALGORITHMS))
    return SigningConfig(
        cert=s.path_("cert"),
        key=s.path_("key"),
        algorithm=None if algorithm == "auto" else algorithm,
        intermediates=s.optional_path("intermediates"),
    )


def load_hub_config(path: Path) -> HubConfig:
    t = read_table(path)
    config = _hub_config(t)
    t.reject_unknown()
    return config


def config_keys(role: str, path: Path) -> set[str]:
    """Every key the parser of ``role`` (hub or node) reads, as dotted paths.

    ``agencies[0].code`` becomes ``agencies.code``. Used to check that docs/OPERATIONS.md
    documents exactly the keys there are.
    """
    t = read_table(path)
    _hub_config(t) if role == "hub" else _node_config(t)
    return t.key_paths()


def _hub_config(t: Table) -> HubConfig:
    hub = t.table("hub")
    name = hub.text("name")
    try:
        Identity.for_hub(name)
    except ValueError as exc:
        raise ConfigError(f"hub.name: {exc}") from exc
    agencies: list[AgencyEntry] = []
    raw = t.get("agencies", [])
    if not isinstance(raw, list) or not raw:
        raise ConfigError("[[agencies]]: at least one agency is required")
    seen: set[str] = set()
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise ConfigError(f"agencies[{i}]: must be a table")
        a = t.child(item, f"agencies[{i}]")
        code = a.text("code")
        if not is_agency_code(code):
            raise ConfigError(f"agencies[{i}].code: {code!r} is not 2-64 characters of A-Z 0-9 . -")
        if code in seen:
            raise ConfigError(f"agencies[{i}].code: {code} is listed twice")
        seen.add(code)
        certs = a.get("signing_certificates")
        if not isinstance(certs, list) or not certs or not all(isinstance(c, str) for c in certs):
            raise ConfigError(f"agencies[{i}].signing_certificates: must be a list of file paths")
        paths = []
        for j, c in enumerate(certs):
            p = (t.base / c).resolve()
            if not p.is_file():
                raise ConfigError(f"agencies[{i}].signing_certificates[{j}]: no such file {p}")
            paths.append(p)
        agencies.append(
            AgencyEntry(code, a.text("name", code), a.choice("state", "active", _STATES), paths)
        )
    return HubConfig(
        name=name,
        listen=hub.listen("listen"),
        database=hub.path_("database", must_exist=False, default="hub.db"),
        tls=_tls(t),
        signing=_signing(t),
        agencies=agencies,
        ready_file=hub.optional_path("ready_file", must_exist=False),
        durability=cast(Durability, hub.choice("durability", "full", ("full", "normal"))),
        metrics_listen=hub.listen("metrics_listen", optional=True),
        metrics_tls=hub.flag("metrics_tls", False),
        # At least a frame of one receipt of the largest a hub keeps (64 KiB): below, a
        # node could not answer a letter at all.
        max_frame_bytes=hub.integer(
            "max_frame_bytes", 32 * 1024 * 1024, minimum=64 * 1024, maximum=MAX_MESSAGE
        ),
        grace_s=hub.number("shutdown_grace_s", 5.0, maximum=HOUR_S),
        delivery_window=hub.integer("delivery_window", 1024, maximum=1_000_000),
        queue_quota=hub.integer("queue_quota", 100_000, maximum=MAX_QUEUE_QUOTA),
        quota_retry_after_s=hub.number("quota_retry_after_s", 30.0, maximum=DAY_S),
        expiry_interval_s=hub.between("expiry_interval_s", 1.0, MIN_INTERVAL_S, HOUR_S),
        retention_s=hub.number("retention_s", 30 * 86400.0),
        purge_interval_s=hub.between("purge_interval_s", 3600.0, MIN_INTERVAL_S, WEEK_S),
        revocation_file=hub.optional_path("revocation_file", must_exist=False),
        reload_interval_s=hub.between("reload_interval_s", 5.0, MIN_INTERVAL_S, HOUR_S),
        clock_skew_s=hub.number("clock_skew_s", 300.0, maximum=DAY_S),
        max_letter_age_s=hub.number("max_letter_age_s", 7 * 86400.0, maximum=MAX_LETTER_AGE_S),
        metrics_interval_s=hub.between(
            "metrics_interval_s", 5.0, MIN_INTERVAL_S, MAX_METRICS_INTERVAL_S
        ),
        metrics_top_n=hub.integer("metrics_top_n", 10, maximum=1000),
        keepalive_s=hub.between("keepalive_s", 20.0, *KEEPALIVE_RANGE_S),
    )


def read_revocations(path: Path | None) -> list[str]:
    """Revoked serials (hexadecimal, one per line, '#' comments) from the revocation file:
    every one, whether for all time or from a time on (``read_revocation_times``).

    A missing file means nothing is revoked; a malformed line is a ConfigError.
    """
    return read_revocation_file(path)[0]


def read_revocation_times(path: Path | None) -> dict[str, dt.datetime]:
    """The serials of the revocation file revoked from a time on (``SERIAL TIME`` lines,
    the time RFC 3339 with its offset), each with its time: the earliest, when listed more
    than once. A serial also listed with no time is revoked for all time: not here."""
    return read_revocation_file(path)[1]


def read_revocation_file(path: Path | None) -> tuple[list[str], dict[str, dt.datetime]]:
    """``read_revocations`` and ``read_revocation_times`` of one read of the file (two
    reads could straddle its replacement and disagree)."""
    entries = _revocation_entries(path)
    forever: set[int] = set()
    times: dict[int, tuple[str, dt.datetime]] = {}
    for serial, since in entries:
        number = int(serial, 16)
        if since is None:
            forever.add(number)
        elif number not in times or since < times[number][1]:
            times[number] = (times.get(number, (serial, since))[0], since)
    timed = {serial: since for number, (serial, since) in times.items() if number not in forever}
    return [serial for serial, _ in entries], timed


def _revocation_entries(path: Path | None) -> list[tuple[str, dt.datetime | None]]:
    if path is None or not path.exists():
        return []
    entries: list[tuple[str, dt.datetime | None]] = []
    for number, line in enumerate(revocation_file_lines(path.read_bytes()), start=1):
        try:
            entry = revocation_entry(line)
        except ValueError as exc:
            raise ConfigError(f"revocation_file {path}, line {number}: {exc}") from None
        if entry is not None:
            entries.append(entry)
    return entries


def _clients(t: Table, agency: str, max_mailbox_chars: int) -> dict[str, frozenset[str]]:
    """[[clients]]: each back-end client's name (as its certificate carries it) and the
    mailboxes it may use (as letters carry them). A name or mailbox nothing can match is
    refused: its limit would never apply, and the back-end meant would use every mailbox."""
    raw = t.get("clients", [])
    if not isinstance(raw, list):
        raise ConfigError("[[clients]]: must be an array of tables")
    clients: dict[str, frozenset[str]] = {}
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise ConfigError(f"clients[{i}]: must be a table")
        c = t.child(item, f"clients[{i}]")
        name = c.text("name")
        try:
            Identity.for_client(agency, name)  # the rule of the certificates it must match
        except ValueError:
            raise ConfigError(
                f"clients[{i}].name: {name!r} is no client certificate's name"
                f" (urn:chapar:client:{agency}:NAME, NAME 1-64 characters of a-z 0-9 . -,"
                " the first a letter or digit)"
            ) from None
        mailboxes = c.get("mailboxes")
        if not isinstance(mailboxes, list) or not all(isinstance(m, str) for m in mailboxes):
            raise ConfigError(f"clients[{i}].mailboxes: must be a list of mailbox names")
        if name in clients:
            raise ConfigError(f"clients[{i}].name: {name} is listed twice")
        boxes: set[str] = set()
        for j, mailbox in enumerate(mailboxes):
            try:  # as the node reads a letter's mailboxes (NFC, checked): else none matches
                boxes.add(
                    normalise_text(
                        mailbox, "the mailbox", max_chars=max_mailbox_chars, required=False
                    )
                )
            except ChaparError as exc:
                raise ConfigError(
                    f"clients[{i}].mailboxes[{j}]: {exc.message}, so no letter can name it"
                ) from None
        clients[name] = frozenset(boxes)
    return clients


def _documents(t: Table) -> tuple[DocumentLimits, Path, float]:
    docs = t.table("documents", required=False)
    defaults = DocumentLimits()
    raw = docs.get("media_types", sorted(defaults.media_types))
    if (
        not isinstance(raw, list)
        or not raw
        or not all(isinstance(m, str) and "/" in m and m == base_media_type(m) for m in raw)
    ):
        raise ConfigError(
            "documents.media_types: must be a non-empty list of lower-case type/subtype strings"
        )
    limits = DocumentLimits(
        max_file_bytes=docs.integer("max_file_bytes", defaults.max_file_bytes),
        media_types=frozenset(raw),
    )
    directory = docs.path_("directory", must_exist=False, default="documents")
    return limits, directory, docs.number("retention_s", 0.0)


def load_node_config(path: Path) -> NodeConfig:
    t = read_table(path)
    config = _node_config(t)
    t.reject_unknown()
    return config


def _node_config(t: Table) -> NodeConfig:
    node = t.table("node")
    agency = node.text("agency")
    if not is_agency_code(agency):
        raise ConfigError(f"node.agency: {agency!r} is not 2-64 characters of A-Z 0-9 . -")
    hub_name = node.optional_text("hub_name")
    if hub_name:
        try:
            Identity.for_hub(hub_name)
        except ValueError as exc:
            raise ConfigError(
                f"node.hub_name: {exc} (the name, as the hub's hub.name: not its URI)"
            ) from exc
    limits = t.table("limits", required=False)
    defaults = LetterLimits()
    documents, documents_dir, documents_retention_s = _documents(t)
    config = NodeConfig(
        agency=agency,
        listen=node.listen("listen"),
        # No default, nor port 0: a node dialling port 0 for ever.
        hub=node.listen("hub", default=None, dial=True),
        database=node.path_("database", must_exist=False, default="node.db"),
        tls=_tls(t),
        signing=_signing(t),
        limits=LetterLimits(
            max_body_bytes=limits.integer("max_body_bytes", defaults.max_body_bytes),
            max_recipients=limits.integer("max_recipients", defaults.max_recipients),
            max_subject_chars=limits.integer("max_subject_chars", defaults.max_subject_chars),
        ),
        ready_file=node.optional_path("ready_file", must_exist=False),
        durability=cast(Durability, node.choice("durability", "full", ("full", "normal"))),
        metrics_listen=node.listen("metrics_listen", optional=True),
        metrics_tls=node.flag("metrics_tls", False),
        max_message_bytes=limits.integer(
            "max_message_bytes", 16 * 1024 * 1024, maximum=MAX_MESSAGE
        ),
        relay_frame_bytes=node.integer("relay_frame_bytes", 8 * 1024 * 1024, maximum=MAX_MESSAGE),
        grace_s=node.number("shutdown_grace_s", 5.0, maximum=HOUR_S),
        relay_batch=node.integer("relay_batch", 256, maximum=MAX_FRAME_LETTERS),
        reconnect_max_s=node.between("reconnect_max_s", 10.0, MIN_RECONNECT_S, HOUR_S),
        clients=_clients(t, agency, defaults.max_mailbox_chars),
        retention_s=node.number("retention_s", 30 * 86400.0),
        purge_interval_s=node.between("purge_interval_s", 3600.0, MIN_INTERVAL_S, WEEK_S),
        reload_interval_s=node.between("reload_interval_s", 5.0, MIN_INTERVAL_S, HOUR_S),
        metrics_interval_s=node.between(
            "metrics_interval_s", 5.0, MIN_INTERVAL_S, MAX_METRICS_INTERVAL_S
        ),
        documents=documents,
        documents_dir=documents_dir,
        documents_retention_s=documents_retention_s,
        keepalive_s=node.between("keepalive_s", 20.0, *KEEPALIVE_RANGE_S),
        hub_name=hub_name,
    )
    if config.limits.max_body_bytes > config.max_message_bytes:
        if "max_body_bytes" in limits.data:  # set so: no such letter could be submitted
            raise ConfigError(
                f"limits.max_body_bytes ({config.limits.max_body_bytes}) is larger than"
                f" limits.max_message_bytes ({config.max_message_bytes}): no such letter"
                " could be submitted"
            )
        # Only the message limit lowered: the body's default follows it down.
        config = dataclasses.replace(
            config,
            limits=dataclasses.replace(config.limits, max_body_bytes=config.max_message_bytes),
        )
    return config
