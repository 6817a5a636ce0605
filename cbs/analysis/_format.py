"""Numbers as text and as JSON: the one formatter every table, report, plot label and
terminal line of the analysis uses, and the JSON encoding of the written files."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "format_number",
    "format_value",
    "outside_range",
    "bound_text",
    "ci_text",
    "row_cells",
    "text_table",
    "md_table",
    "jsonable",
    "jsonable_deep",
]


def format_number(x, digits: int = 4, missing: str = "-") -> str:
    """Compact text for a number: ``digits`` significant digits (scientific below 1e-3 and
    from 1e6 up; between, whole numbers are never cut to scientific notation), 'inf' /
    '-inf', or ``missing`` for NaN / None.

    >>> format_number(1234.5678), format_number(16384), format_number(2.5e-5)
    ('1235', '16384', '2.500e-05')
    >>> format_number(float("nan")), format_number(123456.7, 3)
    ('-', '123457')
    """
    if x is None:
        return missing
    try:
        x = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(x):
        return missing
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x != 0 and (abs(x) >= 1e6 or abs(x) < 1e-3):
        return f"{x:.{digits - 1}e}"
    text = f"{x:.{digits}g}"
    if "e" in text:  # more integer digits than significant ones (below 1e6): write them all
        return f"{x:.0f}"
    return text


def format_value(x, unit: str = "") -> str:
    """A number with its unit, 'n/a' when missing (the fits' own text).

    >>> format_value(64.0, "examples"), format_value(None)
    ('64 examples', 'n/a')
    """
    return f"{format_number(x, missing='n/a')} {unit}".rstrip()


def outside_range(x, lo, hi) -> str:
    """'above' / 'below' when ``x`` lies outside [lo, hi] (a CBS extrapolated beyond the swept
    batch sizes), '' inside or when any is missing.

    >>> outside_range(726436, 4, 16384), outside_range(800, 4, 16384), outside_range(2, 4, 64)
    ('above', '', 'below')
    """
    try:
        x, lo, hi = float(x), float(lo), float(hi)
    except (TypeError, ValueError):
        return ""
    if math.isnan(x) or math.isnan(lo) or math.isnan(hi):
        return ""
    return "above" if x > hi else "below" if x < lo else ""


def bound_text(x, lo, hi) -> str:
    """A CBS for tables and the terminal: the number inside the swept range [lo, hi], the
    bound it implies outside it (the one rule every output uses for extrapolated values).

    >>> bound_text(726436, 4, 16384), bound_text(816.4, 4, 16384), bound_text(1.5, 4, 64)
    ('> 16384', '816.4', '< 4')
    """
    side = outside_range(x, lo, hi)
    if side == "above":
        return f"> {format_number(hi)}"
    if side == "below":
        return f"< {format_number(lo)}"
    return format_number(x)


def ci_text(lo, hi) -> str:
    """An interval as '[lo, hi]', '-' when missing."""
    if lo is None or hi is None or (isinstance(lo, float) and math.isnan(lo)):
        return "-"
    return f"[{format_number(lo)}, {format_number(hi)}]"


def row_cells(row, columns: Sequence[str]) -> list[str]:
    """Text cells of a summary-table row (a namedtuple): ``X_ci`` as the interval
    ``[X_ci_low, X_ci_high]``, ``n_*`` counts as integers, other columns by
    :func:`format_number` (every summary table renders its columns this way)."""
    out = []
    for c in columns:
        if c.endswith("_ci"):
            out.append(ci_text(getattr(row, c + "_low"), getattr(row, c + "_high")))
        elif c.startswith("n_"):
            out.append(str(getattr(row, c)))
        else:
            out.append(format_number(getattr(row, c)))
    return out


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A right-aligned plain-text table."""
    widths = [
        max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
        for i, h in enumerate(header)
    ]
    line = "  ".join(str(h).rjust(w) for h, w in zip(header, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(c).rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table."""
    out = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def jsonable(x):
    """Plain JSON numbers: arrays as lists, NaN as None, infinities as 'inf' / '-inf'."""
    if isinstance(x, np.ndarray):
        return [jsonable(v) for v in x.tolist()]
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        if math.isnan(x):
            return None
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return x
    return x


def jsonable_deep(x):
    """:func:`jsonable` through dicts, lists, paths and timestamps."""
    if isinstance(x, dict):
        return {str(k): jsonable_deep(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [jsonable_deep(v) for v in (x.tolist() if isinstance(x, np.ndarray) else x)]
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, (pd.Timestamp,)):
        return x.isoformat()
    return jsonable(x)
