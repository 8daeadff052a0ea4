"""The contracts: committed stubs match the protos, the protos pass buf STANDARD lint, and
they break nothing a client built on their first published version relies on."""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from client_sdk._codegen import DEFAULT_OUT, ROOT, generate

BUF = ROOT / "node_modules" / ".bin" / "buf"
# The commit that first published chapar.exchange.v1. Integrators generate clients from the
# protos; v1 may only grow (buf's FILE rules: no field renumbered, retyped or removed, no
# RPC or message gone...). A change that must break goes into a v2 package.
FIRST_V1 = "1a3627917c7b1fe3e163ad4c4ce57d7477ebafbd"


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
    assert BUF.exists(), "buf is installed by `make test` (npm install of @bufbuild/buf)"
    result = subprocess.run(
        [str(BUF), "lint"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _breaking(module: Path, against: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BUF), "breaking", "--against", str(against)],
        cwd=module,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_contracts_only_grew_since_v1_was_first_published(tmp_path: Path) -> None:
    assert BUF.exists(), "buf is installed by `make test` (npm install of @bufbuild/buf)"
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", FIRST_V1, "proto", "buf.yaml"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    if archive.returncode != 0:  # a shallow clone, or no git: nothing to compare with
        pytest.skip(f"no commit {FIRST_V1[:12]} here: {archive.stderr.decode().strip()}")
    first = tmp_path / "first"
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(first, filter="data")
    result = _breaking(ROOT, first)
    assert result.returncode == 0, result.stdout + result.stderr
    # The check bites: the same protos with one field renumbered break a v1 client.
    changed = tmp_path / "changed"
    shutil.copytree(ROOT / "proto", changed / "proto")
    shutil.copy(ROOT / "buf.yaml", changed / "buf.yaml")
    envelope = changed / "proto" / "chapar" / "exchange" / "v1" / "envelope.proto"
    text = envelope.read_text()
    assert "  string subject = 6;\n" in text
    envelope.write_text(text.replace("  string subject = 6;\n", "  string subject = 60;\n"))
    broken = _breaking(changed, first)
    assert broken.returncode != 0
    assert "subject" in broken.stdout + broken.stderr
