"""The ``chapar`` command: PKI, servers, client commands and the demo."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import sqlite3
import sys
from pathlib import Path

from node.cli_output import OutputFailed, emit, failed, finish
from node.config import ConfigError, load_hub_config, load_node_config

__all__ = ["main"]

_GC_YOUNG = 20_000
_EXIT_DAMAGED = 3  # chapar backup: done, but damaged documents found (left out, set aside)


def _serve(ns: argparse.Namespace) -> int:
    from node.server import configure_logging, serve_hub, serve_node

    configure_logging(ns.log_level)
    # A server makes many short-lived containers (protobuf wrappers, tuples, rows): a
    # young collection every 700 of them, the default, took 3 to 4 % of its CPU flat out.
    # What start-up made (modules, descriptors) is frozen, so full collections skip it.
    gc.freeze()
    gc.set_threshold(_GC_YOUNG, 20, 20)
    try:
        if ns.role == "hub":
            asyncio.run(serve_hub(load_hub_config(ns.config), ns.config))
        else:
            asyncio.run(serve_node(load_node_config(ns.config), ns.config))
    except ConfigError as exc:
        print(f"error: configuration {ns.config}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception:
        # One JSON log line with the cause, not a bare traceback on the terminal.
        logging.getLogger("chapar.server").exception("stopped by an unexpected error")
        return 1
    return 0


def _demo(ns: argparse.Namespace) -> int:
    from node.demo import run_demo

    try:
        return asyncio.run(run_demo(ns.serve))
    except KeyboardInterrupt:
        return 130


def _backup(ns: argparse.Namespace) -> int:
    from node.backup import BackupError, backup, describe

    try:
        manifest, damaged = backup(ns.config, ns.to)
    except ConfigError as exc:
        print(f"error: configuration {ns.config}: {exc}", file=sys.stderr)
        return 2
    except (BackupError, OSError, sqlite3.Error) as exc:
        print(f"error: backup refused: {exc}", file=sys.stderr)
        return 1
    for line in damaged:
        print(f"warning: {line}", file=sys.stderr)
    emit(
        [f"backed up into {ns.to}", *(f"  {line}" for line in describe(manifest))],
        f"the backup in {ns.to} is made; its account could not be printed",
    )
    return _EXIT_DAMAGED if damaged else 0


def _restore(ns: argparse.Namespace) -> int:
    from node.backup import BackupError, RestoreFailed, describe, restore

    try:
        manifest, aside = restore(
            ns.config,
            ns.source,
            skip_numbers=ns.skip_numbers,
            warn=lambda line: print(f"warning: {line}", file=sys.stderr),
        )
    except ConfigError as exc:
        print(f"error: configuration {ns.config}: {exc}", file=sys.stderr)
        return 2
    except RestoreFailed as exc:
        print(f"error: restore failed: {exc}", file=sys.stderr)
        return 1
    except (BackupError, OSError, sqlite3.Error) as exc:
        print(f"error: restore refused: {exc}", file=sys.stderr)
        return 1
    lines = [f"restored from {ns.source}", *(f"  {line}" for line in describe(manifest))]
    if aside.exists():
        lines.append(f"  the replaced database files are kept in {aside}")
    emit(lines, f"the restore from {ns.source} is done; its account could not be printed")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chapar", description="Chapar: signed inter-agency correspondence over mutual TLS."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for role, text in (("hub", "the national exchange hub"), ("node", "an agency's node")):
        p = sub.add_parser(role, help=f"run {text}")
        rsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
        serve = rsub.add_parser("serve", help=f"serve as {text} until SIGTERM")
        serve.add_argument("--config", type=Path, required=True, help="TOML configuration file")
        serve.add_argument(
            "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
        )
        serve.set_defaults(func=_serve, role=role)
    demo = sub.add_parser(
        "demo", help="run a hub and two nodes on loopback and exchange signed letters"
    )
    demo.add_argument(
        "--serve",
        type=Path,
        metavar="DIR",
        default=None,
        help="keep the servers running with their PKI and configuration in DIR until interrupted",
    )
    demo.set_defaults(func=_demo)
    backup = sub.add_parser(
        "backup",
        help="copy a server's database (one consistent snapshot) and documents",
        epilog="exit status: 0 the backup is made; 3 the backup is made, but documents found"
        " damaged in the server's store were left out of it and set aside there (one"
        " 'warning:' line each on stderr); 1 the backup was refused or failed (one 'error:' line); 2 the configuration is"
        " wrong",
    )
    backup.add_argument("--config", type=Path, required=True, help="the server's TOML file")
    backup.add_argument("--to", type=Path, required=True, metavar="DIR", help="backup directory")
    backup.set_defaults(func=_backup)
    restore = sub.add_parser("restore", help="put a backup in place of a stopped server's database")
    restore.add_argument("--config", type=Path, required=True, help="the server's TOML file")
    restore.add_argument(
        "--from", dest="source", type=Path, required=True, metavar="DIR", help="backup directory"
    )
    restore.add_argument(
        "--skip-numbers",
        type=int,
        default=0,
        metavar="N",
        help="a node: leave N SHAMS numbers unused after the highest the hub holds, so that"
        " letters it numbered after the backup and never relayed keep numbers no other"
        " letter gets (a gap instead of a number on two letters)",
    )
    restore.set_defaults(func=_restore)

    from certs.cli import register as register_pki
    from node.cli_client import register as register_client
    from node.status import register as register_status

    register_pki(sub)
    register_client(sub)
    register_status(sub)
    # The harness drives the system through the SDK; only the command lives here.
    from loadtest.harness import register as register_loadtest

    register_loadtest(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from node.memory import flat_malloc

    flat_malloc()  # before any gRPC thread exists: see node/memory.py
    try:
        ns = build_parser().parse_args(argv)
    except SystemExit:  # argparse printed the help, or a usage error on stderr
        try:
            finish()
        except OutputFailed as exc:
            return failed(exc)
        raise
    try:
        code: int = ns.func(ns)
        # What a command printed and Python still holds goes out now, not at exit, where a
        # failure is a second message ("Exception ignored ...") and exit 120.
        finish()
    except OutputFailed as exc:  # standard output closed or failing, in any command
        return failed(exc)
    except KeyboardInterrupt:  # Ctrl-C in any command: quiet, as the client commands are
        print("interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    raise SystemExit(main())
