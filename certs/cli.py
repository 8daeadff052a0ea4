"""The ``chapar pki`` command: argument parsing and output for the PKI tooling.

This module owns only the command-line surface; the work is done by :mod:`certs.pki`.
``node/cli.py`` builds the ``chapar`` parser and calls :func:`register`; :func:`main` runs
the same commands stand-alone (``python -m certs.cli pki init ...``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import grp
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import get_args

from certs.pki import (
    KeyAlgorithm,
    PkiError,
    PkiLayout,
    init_pki,
    issue_party,
    load_certs,
    renew_certificate,
    revoke_certificate,
    rfc3339_time,
)
from client_sdk.identity import Identity
from node.cli_output import OutputFailed, emit, failed

__all__ = ["main", "register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds the ``pki`` command (``init``, ``issue``, ``renew``, ``revoke``) to a parser."""
    pki = subparsers.add_parser(
        "pki",
        help="development PKI: CA, TLS, signing and client certificates",
        description="Manage the development PKI (see certs/README.md).",
    )
    commands = pki.add_subparsers(dest="pki_command", metavar="COMMAND", required=True)

    init = commands.add_parser(
        "init",
        help="create a root CA, an intermediate CA and every certificate in one go",
        description=(
            "Create a development PKI: root and intermediate CA, hub TLS and signing "
            "certificates, per agency TLS, signing and back-end client certificates, and "
            "auditor client certificates. Private keys are written mode 0600; never commit them."
        ),
    )
    init.add_argument(
        "--dir", dest="directory", type=Path, required=True, metavar="DIR", help="output directory"
    )
    init.add_argument("--hub", required=True, metavar="NAME", help="hub name, e.g. national-hub")
    init.add_argument(
        "--agency",
        dest="agencies",
        action="append",
        required=True,
        metavar="CODE",
        help="agency code (A-Z 0-9 . -); repeat for each agency",
    )
    _signing_algorithm(init)
    init.add_argument(
        "--auditor",
        dest="auditors",
        action="append",
        default=[],
        metavar="NAME",
        help="auditor name; repeat for each auditor",
    )
    _validity(init)
    init.add_argument("--force", action="store_true", help="replace an existing PKI in DIR")
    init.set_defaults(func=_cmd_init)

    issue = commands.add_parser(
        "issue",
        help="issue a new agency's, client's, auditor's or hub's certificates from DIR's CA",
        description=(
            "Issue certificates for one new party from an existing PKI's intermediate CA: an "
            "agency (TLS, signing, back-end client), another back-end client of an agency "
            "(CODE:NAME, for a [[clients]] entry of its node), an auditor, or a hub. Existing "
            "files are never replaced (see renew)."
        ),
    )
    issue.add_argument(
        "--dir", dest="directory", type=Path, required=True, metavar="DIR", help="the PKI"
    )
    party = issue.add_mutually_exclusive_group(required=True)
    party.add_argument("--agency", metavar="CODE", help="a new agency")
    party.add_argument("--client", metavar="CODE:NAME", help="another back-end client")
    party.add_argument("--auditor", metavar="NAME", help="an auditor")
    party.add_argument("--hub", metavar="NAME", help="a hub")
    _signing_algorithm(issue)
    _validity(issue)
    issue.set_defaults(func=_cmd_issue)

    renew = commands.add_parser(
        "renew",
        help="re-issue a certificate with a new key, keeping the old pair beside it",
        description=(
            "Re-issue a TLS, client or signing certificate of DIR's PKI with a new key and the "
            "same identity; the new pair takes the old file names (configurations stay as "
            "they are), the old certificate is kept as <name>.<serial>.crt (its key is not). "
            "Restart the server "
            "that uses it. A renewed signing certificate must also be listed, beside the old "
            "one, in the hub's [[agencies]] signing_certificates."
        ),
    )
    renew.add_argument(
        "--dir", dest="directory", type=Path, required=True, metavar="DIR", help="the PKI"
    )
    renew.add_argument("cert", type=Path, metavar="CERT", help="the .crt file to renew")
    _validity(renew)
    renew.set_defaults(func=_cmd_renew)

    revoke = commands.add_parser(
        "revoke",
        help="list a certificate's serial in the hub's revocation file",
        description=(
            "Append the certificate's serial to the hub's revocation_file (the file is "
            "replaced whole, keeping its mode and, where allowed, its group, else a warning "
            "names the group it lost; a new file is 0644 less the umask and said on stderr; "
            "its directory must exist). The hub publishes "
            "it within reload_interval_s; from then on "
            "the certificate is refused everywhere, and what its key signed fails "
            "verification."
        ),
    )
    revoke.add_argument(
        "--file", type=Path, required=True, metavar="PATH", help="the hub's revocation_file"
    )
    revoke.add_argument("cert", type=Path, metavar="CERT", help="the .crt file to revoke")
    revoke.add_argument("--note", default="", help="a comment kept on the line (e.g. why)")
    revoke.add_argument(
        "--since",
        type=_since,
        metavar="TIME",
        help="revoked from TIME on (RFC 3339 with its offset, or now), for a key retired, not"
        " stolen: what it signed before still verifies (default: for all time)",
    )
    revoke.set_defaults(func=_cmd_revoke)


def _signing_algorithm(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--signing-algorithm",
        choices=get_args(KeyAlgorithm),
        default="ed25519",
        help="signing key algorithm (default: %(default)s); TLS keys are always ECDSA P-256",
    )


def _validity(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--validity-days",
        type=int,
        default=365,
        metavar="DAYS",
        help="lifetime of leaf certificates (default: %(default)s)",
    )


def _party(args: argparse.Namespace) -> Identity:
    try:
        if args.agency is not None:
            return Identity.for_agency(args.agency)
        if args.client is not None:
            agency, sep, name = args.client.partition(":")
            if not sep:
                raise PkiError(f"--client {args.client!r}: expected CODE:NAME")
            return Identity.for_client(agency, name)
        if args.auditor is not None:
            return Identity.for_auditor(args.auditor)
        return Identity.for_hub(args.hub)
    except ValueError as exc:  # PkiError is one too
        raise PkiError(str(exc)) from exc


def _cmd_issue(args: argparse.Namespace) -> int:
    def run() -> None:
        identity = _party(args)
        paths = issue_party(
            args.directory,
            identity,
            signing_algorithm=args.signing_algorithm,
            validity_days=args.validity_days,
        )
        lines = [f"issued for {identity.uri}:", *(f"  {path}" for path in paths)]
        if identity.kind == "agency":
            lines.append(
                "add it to the hub's configuration ([[agencies]] code, signing_certificates) "
                "and give its node tls.crt/key and signing.crt/key"
            )
        emit(
            lines,
            f"the certificates of {identity.uri} are issued; their files could not be printed",
        )

    return _guarded("issue", run)


def _cmd_renew(args: argparse.Namespace) -> int:
    def run() -> None:
        done = renew_certificate(args.directory, args.cert, validity_days=args.validity_days)
        lines = [
            f"renewed {done.kind} certificate of {done.identity.uri}: {done.cert} "
            f"(old serial {done.old_serial:x}; its certificate kept as {done.old_cert}, "
            "its key not kept)"
        ]
        until = f"valid until {done.not_after:%Y-%m-%d %H:%M} UTC"
        if done.capped:
            until += (
                f", shorter than the {args.validity_days} days asked: no certificate outlives "
                "the intermediate CA that issues it; renew the CA (`chapar pki init --force` "
                "for a development PKI) before then"
            )
        lines.append(until)
        if done.kept_names:
            lines.append(f"kept the old certificate's other names: {', '.join(done.kept_names)}")
        if done.kind == "signing" and done.identity.kind == "hub":
            lines.append(
                "restart the hub: its directory then lists the new certificate and, after "
                "it, those the hub signed with before, so the old evidence verifies"
            )
        elif done.kind == "signing":
            lines.append(
                "now list both in the hub's [[agencies]] signing_certificates (the new one, "
                f"and {done.old_cert} for what the old key signed), then restart the node"
            )
        else:
            lines.append("restart the server or client that uses it")
        emit(
            lines,
            f"{done.cert} is renewed (the old certificate kept as {done.old_cert}); what was"
            " done and what to do next could not be printed",
        )

    return _guarded("renew", run)


def _since(text: str) -> dt.datetime:
    """``--since``: an RFC 3339 time with its offset, or ``now``; to the second."""
    if text == "now":
        return dt.datetime.now(dt.UTC).replace(microsecond=0)
    try:
        return rfc3339_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cmd_revoke(args: argparse.Namespace) -> int:
    def run() -> None:
        before = _group_of(args.file)
        added = revoke_certificate(args.file, args.cert, note=args.note, since=args.since)
        after = _group_of(args.file)
        if before is not None and after is not None and after != before:
            # The user may not give the file its group (not root, not a member of it): it
            # is written under the user's own, and a hub that reads it through its group
            # no longer can. The revocation is written all the same: a warning, status 0,
            # said before the report (which a closed output would cut short).
            print(
                f"chapar pki revoke: warning: {args.file} could not keep its group"
                f" {_group_name(before)} (it now has group {_group_name(after)}): a hub that"
                f" reads it through that group cannot until it is given back (chgrp"
                f" {_group_name(before)} {args.file}, as root or a member of the group)",
                file=sys.stderr,
            )
        if before is None:  # a typo in the file name makes a file the hub never reads
            print(
                f"chapar pki revoke: warning: {args.file} did not exist: a new revocation file"
                " was created there; the hub reads only the file its revocation_file names",
                file=sys.stderr,
            )
        serial = f"{load_certs(args.cert)[0].serial_number:x}"
        emit(
            [
                f"{serial} {'listed in' if added else 'was already in'} {args.file}"
                + (f" from {args.since:%Y-%m-%dT%H:%M:%SZ} on" if added and args.since else "")
            ],
            f"{serial} is listed in {args.file}; that could not be printed",
        )

    return _guarded("revoke", run)


def _group_of(path: Path) -> int | None:
    try:
        return path.stat().st_gid
    except FileNotFoundError:
        return None


def _group_name(gid: int) -> str:
    """The group's name, or its number when it has none here."""
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _guarded(command: str, run: Callable[[], None]) -> int:
    """Runs a command; a refusal or a file problem is one line on stderr, not a traceback.
    Standard output that cannot be written is not a file of the PKI's: ``OutputFailed``
    goes through to the caller, as from every ``chapar`` command."""
    try:
        run()
    except PkiError as exc:
        print(f"chapar pki {command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"chapar pki {command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_init(args: argparse.Namespace) -> int:
    try:
        layout = init_pki(
            args.directory,
            hub=args.hub,
            agencies=args.agencies,
            signing_algorithm=args.signing_algorithm,
            auditors=args.auditors,
            force=args.force,
            validity_days=args.validity_days,
        )
    except PkiError as exc:
        print(f"chapar pki init: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # Permissions, a full disk, a read-only mount: the operator's problem, not a bug,
        # so one line rather than a traceback.
        print(f"chapar pki init: error: {exc}", file=sys.stderr)
        return 1
    _print_summary(layout, args)
    return 0


def _print_summary(layout: PkiLayout, args: argparse.Namespace) -> None:
    lines = [
        f"development PKI written to {layout.root} (signing keys: {args.signing_algorithm})",
        f"  root CA          {layout.root_cert}",
        f"  intermediate CA  {layout.intermediate_cert}",
        f"  hub {args.hub:<12} {layout.hub_dir(args.hub)}/{{tls,signing}}.crt  "
        f"urn:chapar:hub:{args.hub}",
    ]
    for code in args.agencies:
        lines.append(
            f"  agency {code:<9} {layout.agency_dir(code)}/{{tls,signing,client}}.crt  "
            f"urn:chapar:agency:{code}, urn:chapar:client:{code}:backend"
        )
    for name in args.auditors:
        lines.append(
            f"  auditor {name:<8} {layout.auditor_dir(name)}/client.crt  urn:chapar:auditor:{name}"
        )
    lines.append("private keys (*.key) are mode 0600: keep them out of version control")
    emit(lines, f"the PKI is written in {layout.root}; its account could not be printed")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``pki`` commands without the rest of ``chapar`` (tests, bootstrapping)."""
    parser = argparse.ArgumentParser(prog="chapar")
    register(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
    except OutputFailed as exc:
        return failed(exc)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
