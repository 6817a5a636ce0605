"""The errors a user can fix: one family, so a caller (the CLIs, a notebook) catches them all.

Every subclass carries a message that names what was wrong and what is allowed; the CLIs
print it as one line and exit with status 2 (no traceback). Errors that are not a
:class:`CbsError` are bugs and keep their traceback.

* :class:`ConfigError` -- a sweep config key has a value outside what is allowed.
* :class:`AnalysisError` -- a run folder cannot be analyzed, or an analysis option is invalid.
* :class:`RunFolderError` -- the output folder holds a different sweep (rows are never mixed).

Each also derives from the builtin it replaced (ValueError / RuntimeError), so code that
caught those keeps working.

The command lines share :class:`ArgumentParser` (an argument error is one line and exit 2; the
usage block only on ``--help``), :func:`describe_error`, :func:`exit_code` and :func:`one_line`
(how any exception becomes one line and a status) and :func:`record_interrupts` (Ctrl-C is reported as an
interruption even when a library swallowed the ``KeyboardInterrupt`` and raised something else).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

__all__ = [
    "CbsError",
    "ConfigError",
    "AnalysisError",
    "RunFolderError",
    "ArgumentParser",
    "describe_error",
    "exit_code",
    "one_line",
    "record_interrupts",
    "was_interrupted",
]


class CbsError(Exception):
    """Base of every error caused by the user's input (config, options, run folder)."""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class ConfigError(CbsError, ValueError):
    """A config problem, phrased for the user: key path, value, what is allowed."""

    def __init__(self, path: str, value: Any, allowed: str, hint: str = ""):
        self.path, self.value, self.allowed, self.hint = path, value, allowed, hint
        msg = f"config error at '{path or '<root>'}': got {_show(value)}; {allowed}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)


class AnalysisError(CbsError, ValueError):
    """A problem the user can fix (a missing or invalid run folder, a bad option)."""


class RunFolderError(CbsError, RuntimeError):
    """The output folder holds a different sweep; we refuse to mix rows."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the command lines' contract: a bad argument prints one line,
    ``<prefix>: error: <what> (see --help)``, and exits 2; the usage block is for ``--help``.
    ``prefix``: the name the command's other errors start with (default: ``prog``)."""

    def __init__(self, *args, prefix: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.prefix = prefix

    def error(self, message: str):
        print(
            f"{self.prefix or self.prog}: error: {one_line(message)} (see --help)",
            file=sys.stderr,
        )
        sys.exit(2)


def one_line(text: Any) -> str:
    return " ".join(str(text).split())


def exit_code(e: BaseException) -> int:
    """2 for what the user can fix (input, file system, missing package, memory), 1 for a bug."""
    return 2 if isinstance(e, (CbsError, OSError, ImportError, MemoryError)) else 1


def describe_error(e: BaseException) -> str:
    """The one-line text a command line prints for ``e``."""
    if isinstance(e, MemoryError):
        return "out of memory (reduce the grid, the model or the batch sizes)"
    if isinstance(e, OSError):
        where = f" {e.filename!r}" if getattr(e, "filename", None) else ""
        return (
            f"file system error at{where}: {e.strerror or e}"
            if where
            else f"file system error: {e}"
        )
    if isinstance(e, ImportError):
        return f"import failed: {e}"
    if isinstance(e, CbsError):
        return str(e)
    return (
        f"internal error ({type(e).__name__}: {e}); please report it, with the traceback from "
        "CBS_TRACEBACK=1"
    )


_interrupted = threading.Event()


def was_interrupted() -> bool:
    """True once SIGINT arrived inside :func:`record_interrupts`."""
    return _interrupted.is_set()


@contextlib.contextmanager
def record_interrupts() -> Iterator[None]:
    """Remember that Ctrl-C arrived, then raise ``KeyboardInterrupt`` as Python would.

    Why: a ``KeyboardInterrupt`` raised while JAX is tracing can be swallowed by a bare
    ``except`` inside JAX, which then raises an unrelated ``Exception``; without the record the
    CLI would call an interruption an internal error (exit 1 instead of 130).
    """
    _interrupted.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        _interrupted.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
