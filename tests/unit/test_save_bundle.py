"""client_sdk.save_bundle: an evidence bundle saved as `chapar track --save` saves it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from client_sdk import pb, save_bundle


def _bundle() -> pb.EvidenceBundle:
    return pb.EvidenceBundle(
        letter=pb.GetEnvelopeResponse(envelope=pb.Envelope(header=b"h", body=b"the body")),
        revoked_serials=["1f"],
    )


def test_a_bundle_is_saved_whole_owner_only_replacing_what_was_there(tmp_path: Path) -> None:
    target = tmp_path / "letter.bundle"
    target.write_bytes(b"an older file, readable by all")
    target.chmod(0o644)
    saved = save_bundle(target, _bundle())
    assert saved == target
    assert pb.EvidenceBundle.FromString(target.read_bytes()) == _bundle()
    assert stat.S_IMODE(target.stat().st_mode) == 0o600  # it holds the letter's body
    assert [p.name for p in tmp_path.iterdir()] == ["letter.bundle"]  # no partial file left
    save_bundle(str(target), _bundle().SerializeToString())  # a str path and bytes too
    assert pb.EvidenceBundle.FromString(target.read_bytes()) == _bundle()


def test_a_bundle_that_cannot_be_saved_leaves_nothing_and_raises(tmp_path: Path) -> None:
    (tmp_path / "letter.bundle").mkdir()  # a directory in the way: the rename fails
    with pytest.raises(IsADirectoryError):
        save_bundle(tmp_path / "letter.bundle", _bundle())
    assert [p.name for p in tmp_path.iterdir()] == ["letter.bundle"]


def test_a_link_at_the_name_is_replaced_not_written_through(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"not yours to change")
    os.symlink(elsewhere, tmp_path / "letter.bundle")
    save_bundle(tmp_path / "letter.bundle", _bundle())
    assert elsewhere.read_bytes() == b"not yours to change"
    assert not (tmp_path / "letter.bundle").is_symlink()
