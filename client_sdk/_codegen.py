"""Regenerates the protobuf and gRPC stubs in ``client_sdk/_pb`` from ``proto/``.

Run as ``python -m client_sdk._codegen [--out DIR]`` (``make proto`` does). protoc emits
imports rooted at the proto package (``from chapar.exchange.v1 import ...``); the stubs
live inside ``client_sdk``, so those imports are rewritten to ``client_sdk._pb.chapar...``.
This module needs the development tools (grpcio-tools, mypy-protobuf).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

__all__ = ["generate"]

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
DEFAULT_OUT = ROOT / "client_sdk" / "_pb"
_PKG_PREFIX = "client_sdk._pb."
_IMPORT_RE = re.compile(r"^(from|import) (chapar\.exchange\.)", re.MULTILINE)


def _plugin(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found: install the dev extras (mypy-protobuf)")
    return found


def generate(out: Path = DEFAULT_OUT) -> list[Path]:
    """Generates the stubs into ``out`` (replacing it) and returns the files written."""
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_DIR}",
            f"-I{include}",
            f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
            f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--mypy_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            *protos,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        if out.exists():
            shutil.rmtree(out)
        written: list[Path] = []
        for src in sorted(Path(tmp).rglob("*")):
            if src.is_dir():
                continue
            dst = out / src.relative_to(tmp)
            dst.parent.mkdir(parents=True, exist_ok=True)
            text = _IMPORT_RE.sub(
                lambda m: f"{m.group(1)} {_PKG_PREFIX}{m.group(2)}", src.read_text()
            )
            dst.write_text(text)
            written.append(dst)
    for directory in [out, *[p for p in out.rglob("*") if p.is_dir()]]:
        init = directory / "__init__.py"
        if not init.exists():
            init.write_text("")
            written.append(init)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ns = parser.parse_args()
    files = generate(ns.out)
    print(f"wrote {len(files)} files under {ns.out}")


if __name__ == "__main__":
    main()
