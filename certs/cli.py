"""The ``chapar pki`` command: argument parsing and output for the PKI tooling.

This module owns only the command-line surface; the work is done by :mod:`certs.pki`.
``node/cli.py`` builds the ``chapar`` parser and calls :func:`register`; :func:`main` runs
the same commands stand-alone (``python -m certs.cli pki init ...``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import get_args

from certs.pki import KeyAlgorithm, PkiError, PkiLayout, init_pki

__all__ = ["main", "register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds the ``pki`` command (with its ``init`` subcommand) to a ``chapar`` parser."""
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
    init.add_argument(
        "--signing-algorithm",
        choices=get_args(KeyAlgorithm),
        default="ed25519",
        help="signing key algorithm (default: %(default)s); TLS keys are always ECDSA P-256",
    )
    init.add_argument(
        "--auditor",
        dest="auditors",
        action="append",
        default=[],
        metavar="NAME",
        help="auditor name; repeat for each auditor",
    )
    init.add_argument(
        "--validity-days",
        type=int,
        default=365,
        metavar="DAYS",
        help="lifetime of leaf certificates (default: %(default)s)",
    )
    init.add_argument("--force", action="store_true", help="replace an existing PKI in DIR")
    init.set_defaults(func=_cmd_init)


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
    print("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``pki`` commands without the rest of ``chapar`` (tests, bootstrapping)."""
    parser = argparse.ArgumentParser(prog="chapar")
    register(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
