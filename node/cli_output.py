"""What the ``chapar`` commands print on standard output, and how a failure to print it ends.

A command writes its lines with ``emit``: whole, then flushed, so that once it returns they
are out of the process. A failure to write them is an ``OutputFailed``, never the OSError
the command would take for one of its files (``FILE_UNREADABLE``), nor the ValueError it
would take for a bad argument: the reader of the pipe went (``STDOUT_CLOSED``: ``| head``,
a pager quit), the disk is full (``STDOUT_FAILED``), or the output's encoding cannot show
the text (``STDOUT_ENCODING``: a Persian subject with ``PYTHONIOENCODING=ascii`` or a
Latin-1 locale). Such text is not escaped or replaced: what a command prints of a letter is
the letter's, and ``inbox --ack`` hands over only a letter it printed as it is.

``failed`` ends such a command (the client commands' handler and ``main`` call it): one
line on stderr, ``error: OUTPUT_FAILED <REASON>: <what was left undone> (<why>)``, exit 1,
and nothing more at exit. That line is ``fail``'s, the one form of every client command's
error (``error: <CODE> <REASON>: <message>``). ``main`` calls ``finish`` after every
command, which flushes what it printed with ``print`` as the interpreter would at exit, but
with that ending. Every command's own lines, ``pki``'s, ``demo``'s and ``loadtest``'s too,
go out through ``emit``, buffered or not (``PYTHONUNBUFFERED``).
"""

from __future__ import annotations

import contextlib
import os
import sys

__all__ = ["OutputFailed", "emit", "fail", "failed", "finish"]


class OutputFailed(Exception):
    """Standard output could not be written; the message says what that left undone and
    why, ``reason`` is UPPER_SNAKE."""

    def __init__(self, error: OSError | UnicodeEncodeError, message: str) -> None:
        if isinstance(error, UnicodeEncodeError):
            reason = "STDOUT_ENCODING"
            why = (
                f"the output's encoding, {error.encoding}, cannot show its text: set"
                " PYTHONIOENCODING=utf-8 or a UTF-8 locale"
            )
        else:
            reason = "STDOUT_CLOSED" if isinstance(error, BrokenPipeError) else "STDOUT_FAILED"
            why = error.strerror or str(error)
        super().__init__(f"{message} ({why})")
        self.reason = reason
        self.closed = not isinstance(error, UnicodeEncodeError)  # the stream itself failed


def emit(lines: list[str], undone: str) -> None:
    """Writes ``lines`` to standard output and flushes them: once this returns they are out
    of this process. ``undone`` says what a failure leaves undone (``OutputFailed``)."""
    try:
        sys.stdout.write("".join(f"{line}\n" for line in lines))
        sys.stdout.flush()
    except (OSError, UnicodeEncodeError) as exc:
        raise OutputFailed(exc, undone) from exc


def finish() -> None:
    """Flushes what the command left in standard output's buffer (``print``)."""
    try:
        sys.stdout.flush()
    except OSError as exc:
        raise OutputFailed(exc, "the command's output could not be written out") from exc


def failed(exc: OutputFailed) -> int:
    """Ends a command whose output failed: its one line on stderr; returns the exit code."""
    if exc.closed:
        _stdout_gone()
    return fail("OUTPUT_FAILED", exc.reason, str(exc))


def fail(code: str, reason: str, message: str) -> int:
    """A command's error: one line on stderr, ``error: <CODE> <REASON>: <message>`` (the
    message's line breaks and runs of spaces made one space); returns the exit code, 1."""
    label = f"{code} {reason}" if reason else code
    print(f"error: {label}: {' '.join(message.split())}", file=sys.stderr)
    return 1


def _stdout_gone() -> None:
    """After a failed write to standard output: points it at the null device, so that what
    Python may still hold for it is not written again at exit (a second error message, and
    exit 120 instead of the command's). Only the process's own standard output: one that was
    replaced (a test capturing it) is not a descriptor of ours to move."""
    stdout = sys.__stdout__
    if stdout is None or sys.stdout is not stdout:
        return
    with contextlib.suppress(OSError, ValueError):
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, stdout.fileno())
        finally:
            os.close(null)
