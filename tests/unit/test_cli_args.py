"""The ``chapar`` command's handling of bad arguments and files, without servers."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest import harness
from node import cli


def test_loadtest_with_a_json_path_it_cannot_write_fails_before_the_run_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--json`` names a directory that does not exist (a typo): the run (minutes of
    servers and letters) goes ahead, and only then does writing the report raise, a
    traceback out of ``chapar``, the report lost. A bad path should be refused before the
    run, in one line, as --linger-ms or --nodes are."""
    runs: list[object] = []

    async def fake_run(*args: object) -> dict[str, object]:
        runs.append(args)
        return {"lost": 0, "duplicates": 0, "misrouted": 0, "verify_failures": 0,
                "handed_over": 1, "delivered": 1}  # fmt: skip

    monkeypatch.setattr(harness, "run", fake_run)
    monkeypatch.setattr(harness, "_summary", lambda report: "summary")
    report = tmp_path / "no-such-dir" / "report.json"
    try:
        code = cli.main(["loadtest", "--letters", "1", "--json", str(report)])
    except OSError as exc:  # what main does now: out of the command as a traceback
        pytest.fail(f"chapar loadtest raised {exc!r} after the run; the report is lost")
    assert code != 0
    assert runs == [], "the run went ahead with a report path it could not write"
    err = capsys.readouterr().err
    assert err.startswith("error: "), err


# The design's example, 000.00.00.G22/O/2026/0000042:3, with its last two digits swapped.
_MISTYPED = "000.00.00.G22/O/2026/0000024:3"


@pytest.mark.parametrize(
    "command",
    [
        ["track", _MISTYPED],
        ["track", _MISTYPED, "--tree"],
        ["send", "--status", "accepted", "--in-reply-to", _MISTYPED],
    ],
    ids=["track", "track-tree", "send-in-reply-to"],
)
def test_a_mistyped_checked_number_is_refused_in_one_line_before_anything_else(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    """A number typed with its check character (``chapar send`` prints it so) whose check
    does not match is refused as mistyped, in one line, exit 1: before the credentials are
    read or a node is asked, so the clerk is told the number is wrong, not something else."""
    missing = tmp_path / "no-such-file.pem"
    connection = ["--ca", str(missing), "--cert", str(missing), "--key", str(missing)]
    code = cli.main([*command, *connection, "--node", "127.0.0.1:9"])
    err = capsys.readouterr().err
    assert code == 1, err
    (line,) = err.splitlines()
    assert line.startswith("error: INVALID_ARGUMENT INVALID_SHAMS: "), line
    assert _MISTYPED in line, line
    assert "probably mistyped" in line, line
