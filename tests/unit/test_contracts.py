"""The contracts: committed stubs match the protos, and the protos pass buf STANDARD lint."""

from __future__ import annotations

import subprocess
from pathlib import Path

from client_sdk._codegen import DEFAULT_OUT, ROOT, generate


def test_committed_stubs_are_what_make_proto_generates(tmp_path: Path) -> None:
    fresh = tmp_path / "_pb"
    generate(fresh)
    committed = {
        p.relative_to(DEFAULT_OUT): p.read_bytes()
        for p in DEFAULT_OUT.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    regenerated = {p.relative_to(fresh): p.read_bytes() for p in fresh.rglob("*") if p.is_file()}
    assert sorted(map(str, committed)) == sorted(map(str, regenerated)), "run `make proto`"
    stale = [str(name) for name, data in regenerated.items() if committed[name] != data]
    assert not stale, f"stale stubs, run `make proto`: {stale}"


def test_protos_pass_buf_standard_lint() -> None:
    buf = ROOT / "node_modules" / ".bin" / "buf"
    assert buf.exists(), "buf is installed by `make test` (npm install of @bufbuild/buf)"
    result = subprocess.run(
        [str(buf), "lint"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
