"""The client-side ``chapar`` commands: ``send``, ``inbox``, ``track``, ``fetch``, ``agencies``,
and ``verify`` (offline, no node).

They are what an operator or a script does in place of an agency back-end, and they are
built only on the public SDK (``client_sdk``), so they double as its smallest example.
``node.cli`` builds the main parser and calls ``register``. Each command finds its node
and credentials one of three ways::

    --demo DIR --agency CODE              DIR/addresses.json names the node and the PKI
    --pki DIR --agency CODE --node H:P    the agency's back-end client certificate
    --ca F --cert F --key F --node H:P    explicit PEM files

A SHAMS number a person types (``track SHAMS``, ``send --in-reply-to SHAMS``) is taken in
its canonical form or its checked form (``client_sdk.shams``: ``...0000042:3``), and handed
on to the node canonical; one whose check character does not match is refused before
anything else is done, ``INVALID_SHAMS``, as probably mistyped. What the commands print for
people shows each number in its checked form, the one to quote; ``--json`` keeps ``shams``
canonical, the letter's key, and adds ``shams_checked`` beside it. Messages on stderr name
numbers canonical, as the logs do.

Failures print one line, ``error: <CODE> <REASON>: <message>``, on stderr and exit 1; one
to write standard output is ``OUTPUT_FAILED`` (``node.cli_output``), whichever command it was.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import functools
import json
import math
import sys
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError

from certs.pki import rfc3339_time
from client_sdk import (
    ChaparError,
    Credentials,
    DeadlineExceeded,
    ExchangeClient,
    Letter,
    StatusUpdate,
    Tracking,
    TreeLetter,
    Unavailable,
    format_shams,
    format_shams_checked,
    parse_shams_typed,
    pb,
    save_bundle,
)
from client_sdk.client import DEFAULT_TIMEOUT
from client_sdk.identity import Identity
from client_sdk.trust import TrustStore, VerificationError
from node.cli_output import OutputFailed, emit, fail, failed

__all__ = ["register"]

_ADDRESSES_FILE = "addresses.json"
_EXIT_INTERRUPTED = 130


class _UsageError(Exception):
    """A problem with the command line or local files; ``reason`` is UPPER_SNAKE."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class _Connection:
    target: str
    credentials: Credentials
    server_name: str | None

    def client(self, timeout: float | None = DEFAULT_TIMEOUT) -> ExchangeClient:
        return ExchangeClient(
            self.target, self.credentials, server_name=self.server_name, timeout=timeout
        )


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds the client commands and the offline ``verify`` to the ``chapar`` parser."""
    common = _connection_options()

    send = subparsers.add_parser(
        "send", parents=[common], help="submit a letter to the node and print its receipt"
    )
    send.add_argument(
        "--to",
        action="append",
        default=[],
        metavar="CODE[:MAILBOX]",
        help="recipient agency (repeatable); a status update without it goes to the other"
        " side of its letter",
    )
    send.add_argument(
        "--subject", help="required but for a status update (default: '<STATUS>: <SHAMS>')"
    )
    body = send.add_mutually_exclusive_group()
    body.add_argument("--body", metavar="TEXT", help="the letter's text (a status update's note)")
    body.add_argument("--body-file", type=Path, metavar="PATH", help="read the body from PATH")
    send.add_argument("--content-type", help="media type of --body-file (default: text)")
    send.add_argument(
        "--kind",
        choices=_names(pb.LetterKind, "LETTER_KIND_"),
        help="default: letter, or status_update with --status",
    )
    send.add_argument(
        "--status",
        choices=_names(pb.BusinessStatus, "BUSINESS_STATUS_"),
        help="the business status a status update reports about --in-reply-to",
    )
    send.add_argument("--priority", choices=_names(pb.Priority, "PRIORITY_"))
    send.add_argument(
        "--in-reply-to",
        metavar="SHAMS",
        help="the letter's number, with its check character or not",
    )
    send.add_argument("--request-id", metavar="ID", help="idempotency key (default: a UUID)")
    send.add_argument(
        "--attach",
        action="append",
        type=Path,
        default=[],
        metavar="FILE",
        help="upload FILE to the node's document store and reference it (repeatable)",
    )
    send.add_argument("--json", action="store_true", help="print JSON")
    send.set_defaults(func=_handler(_send))

    fetch = subparsers.add_parser(
        "fetch",
        parents=[common],
        help="download a document through the node; the file appears only if its digest checks",
    )
    fetch.add_argument("uri", metavar="URI", help="chapar://<agency>/documents/sha256/<hex>")
    fetch.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="PATH",
        help="where to save it (mode 0600: it is letter content)",
    )
    fetch.add_argument("--json", action="store_true", help="print JSON")
    fetch.set_defaults(func=_handler(_fetch))

    inbox = subparsers.add_parser(
        "inbox", parents=[common], help="print letters waiting in the agency's inbox"
    )
    inbox.add_argument("--mailbox", help="only letters for this mailbox")
    inbox.add_argument(
        "--ack",
        action="store_true",
        help="acknowledge (hand over) each letter once it is printed, then print its HANDOVER"
        " evidence; a letter that could not be printed is not acknowledged",
    )
    inbox.add_argument("--limit", type=int, metavar="N", help="stop after N letters")
    inbox.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="stop listening after SECONDS; an acknowledgement under way then is waited for"
        " (each acknowledgement up to SECONDS)",
    )
    inbox.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per letter (with --ack, each followed by one"
        ' {"shams", "handover"} object)',
    )
    inbox.add_argument(
        "--listening-line",
        action="store_true",
        help="print one line on stderr, 'listening: ...', once the node has opened the inbox"
        " stream (from then on a letter that arrives is printed), for a script that waits"
        " for it",
    )
    inbox.set_defaults(func=_handler(_inbox))

    track = subparsers.add_parser(
        "track", parents=[common], help="show a letter's state and verify its evidence"
    )
    track.add_argument(
        "shams",
        metavar="SHAMS",
        help="e.g. 000.00.00.G22/O/2026/0000042, or with its check character as `send`"
        " prints it, 000.00.00.G22/O/2026/0000042:3",
    )
    track.add_argument("--json", action="store_true", help="print JSON")
    shown = track.add_mutually_exclusive_group()
    shown.add_argument(
        "--tree",
        action="store_true",
        help="show the correspondence tree around the letter as the hub recorded it "
        "(replies, status updates, forwards) and verify it",
    )
    shown.add_argument(
        "--save",
        type=Path,
        metavar="FILE",
        help="also save the letter, its evidence and the revocations as an evidence bundle "
        "that `chapar verify` checks offline (mode 0600: it holds the letter's body)",
    )
    _hub_option(track)
    track.set_defaults(func=_handler(_track))

    verify = subparsers.add_parser(
        "verify",
        help="verify a saved evidence bundle offline, with the root CA certificate alone",
    )
    verify.add_argument("bundle", type=Path, metavar="FILE", help="from `chapar track --save`")
    roots = verify.add_mutually_exclusive_group(required=True)
    roots.add_argument("--ca", type=Path, metavar="PEM", help="root CA certificate")
    roots.add_argument("--pki", type=Path, metavar="DIR", help="PKI directory (its root CA)")
    verify.add_argument(
        "--revoked",
        action="append",
        default=[],
        metavar="SERIAL[@TIME]",
        help="a certificate serial (hexadecimal) revoked since the bundle was saved, for all"
        " time or from TIME on (RFC 3339 with its offset) (repeatable)",
    )
    _hub_option(verify)
    verify.add_argument("--json", action="store_true", help="print JSON")
    verify.set_defaults(func=_handler(_verify))

    agencies = subparsers.add_parser(
        "agencies", parents=[common], help="list the agencies of the exchange"
    )
    agencies.add_argument("--json", action="store_true", help="print JSON")
    agencies.set_defaults(func=_handler(_agencies))


def _connection_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("node and credentials")
    group.add_argument("--node", metavar="HOST:PORT", help="address of the agency's node")
    group.add_argument("--agency", metavar="CODE", help="agency code (with --pki or --demo)")
    group.add_argument("--pki", type=Path, metavar="DIR", help="PKI directory (chapar pki)")
    group.add_argument(
        "--demo", type=Path, metavar="DIR", help=f"demo directory ({_ADDRESSES_FILE})"
    )
    group.add_argument("--ca", type=Path, metavar="PEM", help="root CA certificate")
    group.add_argument("--cert", type=Path, metavar="PEM", help="client certificate chain")
    group.add_argument("--key", type=Path, metavar="PEM", help="client private key")
    group.add_argument(
        "--server-name", metavar="NAME", help="name to check the node's TLS certificate against"
    )
    return parent


def _names(enum: Any, prefix: str) -> list[str]:
    names: list[str] = enum.DESCRIPTOR.values_by_name
    return [n.removeprefix(prefix).lower() for n in names if not n.endswith("_UNSPECIFIED")]


def _connection(ns: argparse.Namespace) -> _Connection:
    target: str | None = ns.node
    if ns.demo is not None:
        agency = _require_agency(ns, "--demo")
        pki, target = _demo_addresses(ns.demo / _ADDRESSES_FILE, agency, target)
        credentials = Credentials.from_pki(pki, agency)
    elif ns.pki is not None:
        credentials = Credentials.from_pki(ns.pki, _require_agency(ns, "--pki"))
    elif ns.ca is not None and ns.cert is not None and ns.key is not None:
        credentials = Credentials.from_files(ns.ca, ns.cert, ns.key)
    else:
        raise _UsageError(
            "CREDENTIALS_MISSING",
            "give --demo DIR --agency CODE, --pki DIR --agency CODE, or --ca/--cert/--key",
        )
    if not target:
        raise _UsageError("NODE_MISSING", "give --node HOST:PORT")
    return _Connection(target, credentials, ns.server_name)


def _demo_addresses(path: Path, agency: str, target: str | None) -> tuple[Path, str]:
    """The PKI directory from ``addresses.json``, and ``target`` or else the address of
    ``agency``'s node there."""
    addresses = json.loads(path.read_text())  # OSError, ValueError: the handler's words
    if not isinstance(addresses, dict):
        raise _UsageError("DEMO_INCOMPLETE", f"{path} is not a JSON object")
    pki = addresses.get("pki")
    if not isinstance(pki, str) or not pki:
        raise _UsageError("DEMO_INCOMPLETE", f"{path} has no entry pki")
    if target:
        return Path(pki), target
    nodes = addresses.get("nodes")
    node = nodes.get(agency) if isinstance(nodes, dict) else None
    if not isinstance(node, str) or not node:
        raise _UsageError("DEMO_INCOMPLETE", f"{path} has no entry nodes.{agency}")
    return Path(pki), node


def _require_agency(ns: argparse.Namespace, option: str) -> str:
    if not ns.agency:
        raise _UsageError("AGENCY_MISSING", f"{option} needs --agency CODE")
    agency: str = ns.agency
    return agency


def _handler(
    command: Callable[[argparse.Namespace], Coroutine[Any, Any, int]],
) -> Callable[[argparse.Namespace], int]:
    """Runs a command's coroutine; turns every expected failure into one stderr line."""

    def handler(ns: argparse.Namespace) -> int:
        try:
            return asyncio.run(command(ns))
        except ChaparError as exc:
            return fail(exc.code.name, exc.reason, exc.message)
        except VerificationError as exc:
            return fail("VERIFICATION_FAILED", exc.reason, str(exc))
        except _UsageError as exc:
            return fail("INVALID_ARGUMENT", exc.reason, str(exc))
        except OutputFailed as exc:  # standard output: no file of the command's, no value
            return failed(exc)
        except OSError as exc:
            return fail("INVALID_ARGUMENT", "FILE_UNREADABLE", str(exc))
        except ValueError as exc:
            return fail("INVALID_ARGUMENT", "BAD_VALUE", str(exc))
        except KeyboardInterrupt:
            return _EXIT_INTERRUPTED

    return handler


def _typed_shams(text: str) -> str:
    """The canonical text of a number a person typed, canonical or checked: what the SDK
    and the node take. A malformed or mistyped one is ``INVALID_SHAMS``."""
    try:
        return format_shams(parse_shams_typed(text))
    except ValueError as exc:
        raise _UsageError("INVALID_SHAMS", str(exc)) from None


def _recipient(text: str) -> str | tuple[str, str]:
    agency, sep, mailbox = text.partition(":")
    return (agency, mailbox) if sep else agency


def _evidence(content: pb.EvidenceContent) -> dict[str, Any]:
    return {
        "event": pb.EvidenceEvent.Name(content.event).removeprefix("EVIDENCE_EVENT_"),
        "evidence_id": content.evidence_id,
        "issuer": content.issuer,
        "recipient": content.recipient,
        "event_time": (
            content.event_time.ToJsonString() if content.HasField("event_time") else None
        ),
        "reason": content.reason,
    }


def _evidence_line(described: dict[str, Any]) -> str:
    parts = [described["event"], described["event_time"] or "-", described["issuer"]]
    if described["recipient"]:
        parts.append(f"recipient {described['recipient']}")
    if described["reason"]:
        parts.append(f"reason {described['reason']}")
    parts.append(f"id {described['evidence_id']}")
    return "  ".join(parts)


def _json_line(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


async def _send(ns: argparse.Namespace) -> int:
    kind: str = ns.kind or ("status_update" if ns.status else "letter")
    body_given = ns.body if ns.body is not None else ns.body_file
    given = {"--to": ns.to, "--subject": ns.subject, "--body": body_given}
    missing = [option for option, value in given.items() if value is None or value == []]
    if missing and kind != "status_update":
        raise _UsageError("MISSING_OPTION", f"a letter needs {', '.join(missing)}")
    in_reply_to = _typed_shams(ns.in_reply_to) if ns.in_reply_to else ns.in_reply_to
    connection = _connection(ns)
    body: bytes | str = ns.body_file.read_bytes() if ns.body_file is not None else (ns.body or "")
    subject: str = ns.subject
    if subject is None:  # a status update's (the node refuses an empty one)
        subject = f"{(ns.status or 'status').upper()}: {in_reply_to or '-'}"
    async with connection.client() as client:
        receipt = await client.send(
            to=[_recipient(t) for t in ns.to],
            subject=subject,
            body=body,
            kind=kind,
            priority=ns.priority,
            in_reply_to=in_reply_to,
            content_type=ns.content_type,
            request_id=ns.request_id,
            attachments=list(ns.attach),
            status=ns.status,
        )
        tracking = await client.track(receipt.shams) if ns.attach else None
    evidence = _evidence(receipt.content())
    refs = list(tracking.header.attachments) if tracking is not None else []
    if ns.json:
        lines = [
            _json_line(
                {
                    "shams": receipt.shams,
                    "shams_checked": format_shams_checked(receipt.shams),
                    "request_id": receipt.request_id,
                    "envelope_sha256": receipt.envelope_sha256.hex(),
                    "evidence": evidence,
                    "attachments": [_ref_json(r) for r in refs],
                }
            )
        ]
    else:
        lines = [format_shams_checked(receipt.shams), _evidence_line(evidence)]
        lines += [
            f"attachment {ref.uri}  {ref.size} bytes  {ref.media_type}  {ref.file_name}"
            for ref in refs
        ]
    emit(
        lines,
        f"letter {receipt.shams} was submitted; its receipt could not be printed: send it again"
        f" with --request-id {receipt.request_id} for the receipt (not a second letter)",
    )
    return 0


def _ref_json(ref: pb.AttachmentRef) -> dict[str, Any]:
    return {
        "uri": ref.uri,
        "sha256": ref.sha256.hex(),
        "size": ref.size,
        "media_type": ref.media_type,
        "file_name": ref.file_name,
    }


async def _fetch(ns: argparse.Namespace) -> int:
    connection = _connection(ns)
    async with connection.client() as client:
        with _saving(ns.out):
            path = await client.fetch(ns.uri, ns.out)
    size = path.stat().st_size
    if ns.json:
        line = _json_line({"uri": ns.uri, "path": str(path), "size": size, "verified": True})
    else:
        line = f"{path}  {size} bytes  SHA-256 verified"
    emit([line], f"{path} was saved, its digest verified; that could not be printed")
    return 0


def _letter_json(letter: Letter) -> dict[str, Any]:
    return {
        "shams": letter.shams,
        "shams_checked": format_shams_checked(letter.shams),
        "from": letter.sender,
        "to": list(letter.recipients),
        "subject": letter.subject,
        "kind": letter.kind,
        "status": letter.status,
        "in_reply_to": letter.in_reply_to,
        "create_time": letter.create_time.isoformat() if letter.create_time else None,
        "content_type": letter.header.content_type,
        "body": letter.text,
        "attachments": [_ref_json(r) for r in letter.header.attachments],
    }


def _letter_lines(letter: Letter, *, as_json: bool) -> list[str]:
    """What ``inbox`` prints of a letter, before it is acknowledged."""
    if as_json:
        return [json.dumps(_letter_json(letter), ensure_ascii=False)]
    first_line = next(iter(letter.text.splitlines()), "")
    number = format_shams_checked(letter.shams)
    lines = [f"{number}  from {letter.sender}  {letter.subject}  | {first_line}"]
    if letter.status is not None:
        about = format_shams_checked(letter.in_reply_to) if letter.in_reply_to else "-"
        lines.append(f"  status {letter.status} about {about}")
    lines += [
        f"  attachment {ref.uri}  {ref.size} bytes  {ref.file_name}"
        for ref in letter.header.attachments
    ]
    return lines


def _handover_line(letter: Letter, handover: pb.Evidence, *, as_json: bool) -> str:
    """What ``inbox --ack`` prints once a letter is handed over: its HANDOVER evidence."""
    described = _evidence(pb.EvidenceContent.FromString(handover.content))
    if as_json:
        return json.dumps({"shams": letter.shams, "handover": described}, ensure_ascii=False)
    return f"  {_evidence_line(described)}"


async def _inbox(ns: argparse.Namespace) -> int:
    if ns.limit is not None and ns.limit < 1:
        raise _UsageError("BAD_LIMIT", "--limit must be at least 1")
    if ns.timeout is not None and not (math.isfinite(ns.timeout) and ns.timeout > 0):
        raise _UsageError("BAD_TIMEOUT", "--timeout must be a number of seconds above 0")
    connection = _connection(ns)
    count = 0
    # Each acknowledgement is answered within --timeout (the SDK's deadline on it), or fails.
    async with connection.client(ns.timeout or DEFAULT_TIMEOUT) as client:
        if ns.timeout is not None:
            # The timeout ends listening to a node that answers: one that never does (hung,
            # or not the node) is a failure, not an empty inbox.
            try:
                await asyncio.wait_for(client.wait_connected(), ns.timeout)
            except TimeoutError:
                raise Unavailable(
                    f"the node at {ns.node or 'the address given'} did not answer within"
                    f" {ns.timeout:g} s",
                    reason="NODE_NOT_ANSWERING",
                ) from None
        deadline = None if ns.timeout is None else asyncio.get_running_loop().time() + ns.timeout
        opened = functools.partial(_listening, ns.mailbox) if ns.listening_line else None
        async with contextlib.aclosing(client.inbox(ns.mailbox, on_open=opened)) as letters:
            while True:
                # The timeout ends the wait for the next letter only. Cutting an
                # acknowledgement under way would leave a letter the node may have handed
                # over with no HANDOVER printed, and the command ending 0 as if all were done.
                listening = asyncio.timeout_at(deadline)
                try:
                    async with listening:
                        letter = await anext(letters)
                except TimeoutError:
                    if not listening.expired():
                        raise
                    break
                # Printed first, acknowledged after: a letter whose lines could not be
                # written (the reader went, as `| head -1` does) is not handed over; it
                # stays in the inbox. Interrupted in between, it is printed again next
                # time rather than handed over unseen. So is a letter the output's
                # encoding cannot show: it is printed as it is or not at all.
                left = "not acknowledged: it" if ns.ack else "it"
                emit(
                    _letter_lines(letter, as_json=ns.json),
                    f"letter {letter.shams} could not be printed; {left} stays in the inbox",
                )
                if ns.ack:
                    handover = await _acknowledged(letter, ns.timeout or DEFAULT_TIMEOUT)
                    emit(
                        [_handover_line(letter, handover, as_json=ns.json)],
                        f"letter {letter.shams} was printed and handed over; its HANDOVER"
                        " evidence could not be printed",
                    )
                count += 1
                if ns.limit is not None and count >= ns.limit:
                    break
    return 0


def _listening(mailbox: str | None) -> None:
    """``inbox --listening-line``'s line: the node has opened the stream. Only a hint, on
    stderr: a stderr that cannot take it does not stop the command."""
    of = f"mailbox {mailbox!r}" if mailbox else "all the mailboxes this client may read"
    with contextlib.suppress(OSError, UnicodeEncodeError):
        print(f"listening: the inbox stream of {of} is open", file=sys.stderr, flush=True)


async def _acknowledged(letter: Letter, within: float) -> pb.Evidence:
    """``letter.ack()``; a failure names the printed letter, whose handing over is then
    unknown (the node may have taken the acknowledgement and its answer been lost)."""
    try:
        return await letter.ack()
    except ChaparError as exc:
        check = f"`chapar track {letter.shams}` tells whether it was handed over"
        if isinstance(exc, DeadlineExceeded) and exc.reason == "ACK_TIMEOUT":
            raise DeadlineExceeded(
                f"letter {letter.shams} was printed, and the node did not answer its"
                f" acknowledgement within {within:g} s: it may have been handed over; {check}"
                " (if not, the next `chapar inbox` prints it again)",
                reason="ACK_UNANSWERED",
            ) from exc
        raise ChaparError(
            f"letter {letter.shams} was printed, and its acknowledgement failed: {exc.message};"
            f" {check}",
            code=exc.code,
            reason=exc.reason,
            metadata=exc.metadata,
        ) from exc


async def _track(ns: argparse.Namespace) -> int:
    shams = _typed_shams(ns.shams)
    connection = _connection(ns)
    if ns.tree:
        return await _track_tree(ns, shams, connection)
    async with connection.client() as client:
        # The bundle carries the exchange's revocations: what a revoked key signed does not
        # show as verified here either.
        bundle = await client.evidence_bundle(shams)
    undone = f"the tracking of {shams} could not be printed"
    if ns.save is not None:
        with _saving(ns.save):
            save_bundle(ns.save, bundle)
        undone += f" (its evidence bundle is saved in {ns.save})"
    return _verified_or_failed(
        ns, Tracking.from_bundle(bundle), connection.credentials.trust_store(), undone, _hubs(ns)
    )


async def _track_tree(ns: argparse.Namespace, shams: str, connection: _Connection) -> int:
    """``track --tree``: the hub's tree, verified with the exchange's revocations too (with
    their times: what a key retired from a time on signed before it verifies)."""
    async with connection.client() as client:
        tree = await client.track_correspondence(shams)
        trust = await client.trust_from_directory(connection.credentials.trust_store())
    failure: VerificationError | None = None
    try:
        tree.verify(trust, hubs=_hubs(ns))
    except VerificationError as exc:
        failure = exc
    rows = [_tree_row(depth, letter, tree.shams) for depth, letter in tree.walk()]
    if ns.json:
        lines = [
            _json_line(
                {
                    "shams": tree.shams,
                    "letters": rows,
                    "truncated": tree.truncated,
                    "verified": failure is None,
                }
            )
        ]
    else:
        lines = ["  " * row["depth"] + _tree_line(row) for row in rows]
        if tree.truncated:
            lines.append("(the hub cut the tree: track a letter of the missing part to see it)")
        lines.append("verified" if failure is None else "NOT VERIFIED")
    emit(lines, _undone(f"the correspondence tree of {shams} could not be printed", failure))
    if failure is not None:
        raise failure
    return 0


def _tree_row(depth: int, letter: TreeLetter, asked: str) -> dict[str, Any]:
    return {
        "depth": depth,
        "shams": letter.shams,
        "shams_checked": format_shams_checked(letter.shams),
        "asked": letter.shams == asked,
        "redacted": letter.redacted,
        "in_reply_to": letter.in_reply_to,
        "kind": letter.kind,
        "status": letter.status,
        "from": letter.sender,
        "to": list(letter.recipients),
        "last_event": letter.last_event,
        "envelope_held": letter.envelope is not None,
        "signed": letter.signed,
    }


def _tree_line(row: dict[str, Any]) -> str:
    mark = "  <- asked" if row["asked"] else ""
    if row["redacted"]:
        return f"{row['shams_checked']}  redacted{mark}"
    parts = [row["shams_checked"], row["kind"] or "links unknown"]
    if row["status"]:
        parts.append(row["status"])
    parts.append(f"{row['from']} -> {','.join(row['to'])}")
    parts.append(row["last_event"] or "no evidence")
    if not row["signed"]:  # the account above is the hub's word, no signed header checks it
        parts.append("unsigned (body and header purged by retention)")
    return "  ".join(parts) + mark


async def _verify(ns: argparse.Namespace) -> int:
    """Offline: reads nothing but the bundle and the root CA, talks to no one."""
    trust = TrustStore.from_pem_files(ns.ca if ns.ca is not None else ns.pki / "ca" / "root.crt")
    tracking = Tracking.from_bundle(ns.bundle.read_bytes())
    forever: list[int] = []
    since: dict[int, dt.datetime] = {}
    for given in ns.revoked:  # SERIAL or SERIAL@TIME; ValueError: BAD_VALUE
        serial, at, time = given.partition("@")
        number, when = int(serial, 16), rfc3339_time(time) if at else None
        if when is None:
            forever.append(number)
        else:
            since[number] = min(since.get(number, when), when)
    # A serial given both ways: for all time.
    trust.set_revoked(forever, {n: t for n, t in since.items() if n not in forever})
    return _verified_or_failed(
        ns, tracking, trust, f"the verification of {ns.bundle} could not be printed", _hubs(ns)
    )


def _hub_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--hub",
        action="append",
        default=[],
        metavar="NAME",
        help="the hub whose relay and expiry evidence counts (its name, or its"
        " urn:chapar:hub: URI; repeatable, for a hub renamed while the letter went);"
        " without it, any hub the CA certified (each evidence line names its issuer)",
    )


def _hubs(ns: argparse.Namespace) -> list[str] | None:
    return [_hub_uri(name) for name in ns.hub] or None


def _hub_uri(name: str) -> str:
    """A hub's identity URI from its name or URI; ValueError (BAD_VALUE) for neither."""
    return Identity.for_hub(name.removeprefix("urn:chapar:hub:")).uri


def _verified_or_failed(
    ns: argparse.Namespace,
    tracking: Tracking,
    trust: TrustStore,
    undone: str,
    hubs: Sequence[str] | None = None,
) -> int:
    """Prints the tracking, each evidence marked verified only if the whole chain is (with
    hub evidence only from ``hubs``, if given); ``undone`` says what a failure to print it
    leaves undone."""
    failure: VerificationError | None = None
    try:
        verified = [_evidence(v.content) for v in tracking.verify(trust, hubs=hubs)]
    except VerificationError as exc:
        failure = exc
        verified = [_unverified(e) for e in tracking.evidence]
    # Status updates are shown verified only when everything is, evidence likewise.
    emit(
        _tracking_lines(ns, tracking, verified, verified=failure is None), _undone(undone, failure)
    )
    if failure is not None:
        raise failure
    return 0


def _undone(undone: str, failure: VerificationError | None) -> str:
    """What a failure to print a verification leaves undone, and its verdict: a failed
    verification must not read, on standard error, like an output error alone."""
    if failure is None:
        return f"{undone} (it verified)"
    return f"{undone}; it did NOT verify: {failure.reason} {failure}"


@contextlib.contextmanager
def _saving(path: Path) -> Iterator[None]:
    """Around the writing of a file the command line names (``--save``, ``--out``): an
    OSError is ``FILE_UNWRITABLE`` and names that path, not the temporary file beside it."""
    try:
        yield
    except OSError as exc:
        raise _UsageError("FILE_UNWRITABLE", f"cannot save {path}: {exc.strerror or exc}") from exc


def _unverified(evidence: pb.Evidence) -> dict[str, Any]:
    try:
        return _evidence(pb.EvidenceContent.FromString(evidence.content))
    except (DecodeError, ValueError):  # ValueError: an unknown event, a bad time
        return {"event": "MALFORMED", "evidence_id": "", "issuer": "", "recipient": "",
                "event_time": None, "reason": ""}  # fmt: skip


def _tracking_lines(
    ns: argparse.Namespace, tracking: Tracking, evidence: list[dict[str, Any]], *, verified: bool
) -> list[str]:
    header = tracking.header
    if ns.json:
        return [
            _json_line(
                {
                    "shams": tracking.shams,
                    "shams_checked": format_shams_checked(tracking.shams),
                    "direction": tracking.direction,
                    "from": header.sender.agency,
                    "subject": header.subject,
                    "statuses": tracking.statuses,  # the node's account: not signed
                    "business_statuses": tracking.business_statuses,
                    "body_purged": tracking.body_purged,
                    "evidence": [{**e, "verified": verified} for e in evidence],
                    "status_updates": [
                        {**_status_update(u), "verified": verified} for u in tracking.status_updates
                    ],
                    "verified": verified,
                }
            )
        ]
    suffix = "  verified" if verified else ""
    lines = [
        f"{format_shams_checked(tracking.shams)}  {tracking.direction}  from {header.sender.agency}",
        f"subject: {header.subject}",
    ]
    if tracking.body_purged and not tracking.envelope.body:
        lines.append("body: removed by retention (its digest is signed; the text cannot be shown)")
    lines.append(
        "recipients (delivery states as the node reports them; the evidence is the proof):"
    )
    for agency, state in tracking.statuses.items():
        business = tracking.business_statuses.get(agency)
        lines.append(f"  {agency}  {state}" + (f"  status {business}" if business else ""))
    lines.append("evidence:")
    lines += [f"  {_evidence_line(described)}{suffix}" for described in evidence]
    if tracking.status_updates:
        lines.append("status updates:")
        for update in tracking.status_updates:
            described = _status_update(update)
            parts = [described["status"], described["time"] or "-", f"from {described['from']}"]
            parts += [f"to {','.join(described['to'])}", described["shams_checked"]]
            if described["note"]:
                parts.append(f"| {' '.join(described['note'].split())}")
            lines.append(f"  {'  '.join(parts)}{suffix}")
    return lines


def _status_update(update: StatusUpdate) -> dict[str, Any]:
    return {
        "shams": update.shams,
        "shams_checked": format_shams_checked(update.shams),
        "status": update.status,
        "from": update.agency,
        "to": [r.agency for r in update.header.recipients],
        "time": update.time.isoformat() if update.time else None,
        "note": update.note,
    }


async def _agencies(ns: argparse.Namespace) -> int:
    connection = _connection(ns)
    async with connection.client() as client:
        agencies = await client.agencies()
    rows = [
        {
            "code": a.code,
            "display_name": a.display_name,
            "state": pb.AgencyState.Name(a.state).removeprefix("AGENCY_STATE_"),
        }
        for a in agencies
    ]
    if ns.json:
        lines = [_json_line(rows)]
    else:
        lines = [f"{row['code']}  {row['state']}  {row['display_name']}" for row in rows]
    emit(lines, "the agencies could not be printed")
    return 0
