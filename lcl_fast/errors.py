"""Errors a user can cause and fix, and how the command lines report them: one line, no traceback.

A :class:`UserError` (a ``ValueError``) names the file or flag and what is wrong with it. The command
lines (``lcl_fast.train``, ``lcl_fast.eval``, ``lcl_fast.export``) catch it, and the file-system errors
of :data:`FILE_ERRORS`, and print ``<prog>: error: <message>`` as the last line they write, then exit
with status 2. Anything else is a bug and keeps its traceback. ``--debug`` (or ``LCL_FAST_DEBUG=1``)
re-raises user errors too, traceback and all.

The bottom layer: it imports nothing of lcl_fast and no torch, so every module may raise these.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn, Optional, Sequence

DEBUG_FLAG = "--debug"
DEBUG_HELP = "on bad input, show the full traceback instead of the one-line error (or set LCL_FAST_DEBUG=1)"
# OS errors about a named path that the user gave: a missing file, a folder where a file was expected...
FILE_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError)


class UserError(ValueError):
    """Bad input (a file, a flag, a folder) that the user can fix; the message names it and says what is wrong."""


class CheckpointError(UserError):
    """A checkpoint file that is missing, is not a PyTorch checkpoint, or does not fit the model."""


class CheckpointMismatchError(CheckpointError):
    """A readable checkpoint whose tensors do not fit the model (missing, unexpected or mis-shaped keys)."""


def is_user_error(err: BaseException) -> bool:
    return isinstance(err, (UserError, *FILE_ERRORS))


def debug_requested(argv: Optional[Sequence[str]] = None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return DEBUG_FLAG in argv or os.environ.get("LCL_FAST_DEBUG", "") not in ("", "0")


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (an OS error as ``<file>: <reason>``)."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror.lower()}"
    text = str(err).strip() or type(err).__name__
    if "\nOriginal Traceback" in text:  # re-raised from a DataLoader worker: its last line is the message
        last = text.rstrip().splitlines()[-1]
        text = last.split(": ", 1)[1] if last.startswith(type(err).__name__ + ":") else last
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


# What gloo says on a rank whose peer exited (a failed rank ends the others' collectives this way).
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer")


def peer_failed(err: BaseException) -> bool:
    """Whether ``err`` is a collective broken because another rank of a torchrun job exited."""
    return isinstance(err, RuntimeError) and "RANK" in os.environ and any(p in str(err) for p in _PEER_GONE)


def report(err: BaseException, prog: str, argv: Optional[Sequence[str]] = None) -> int:
    """For a user error: print ``<prog>: error: <message>`` to stderr (flushed, as the last output) and
    return the exit status 2. Re-raise anything else, and user errors too under ``--debug``.

    Under torchrun a rank whose collective broke because another rank failed says so in one line (exit
    status 1) instead of a traceback: the cause is the other rank's error line, above.
    """
    if debug_requested(argv) or not (is_user_error(err) or peer_failed(err)):
        raise err
    sys.stdout.flush()
    if peer_failed(err):
        print(f"{prog}: rank {os.environ['RANK']} stopped: another rank failed (see its error)", file=sys.stderr,
              flush=True)  # fmt: skip
        return 1
    print(f"{prog}: error: {one_line(err)}", file=sys.stderr, flush=True)
    return 2


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` that reports a bad flag in one line with a hint to ``--help``, not the whole usage block."""

    def error(self, message: str) -> NoReturn:
        sys.stdout.flush()
        message = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(DEBUG_FLAG, action="store_true", help=DEBUG_HELP)
