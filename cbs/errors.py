"""The errors a user can fix: one family, so a caller (the CLIs, a notebook) catches them all.

Every subclass carries a message that names what was wrong and what is allowed; the CLIs
print it as one line and exit with status 2 (no traceback). Errors that are not a
:class:`CbsError` are bugs and keep their traceback.

* :class:`ConfigError` -- a sweep config key has a value outside what is allowed.
* :class:`AnalysisError` -- a run folder cannot be analyzed, or an analysis option is invalid.
* :class:`RunFolderError` -- the output folder holds a different sweep (rows are never mixed).

Each also derives from the builtin it replaced (ValueError / RuntimeError), so code that
caught those keeps working.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CbsError", "ConfigError", "AnalysisError", "RunFolderError"]


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
