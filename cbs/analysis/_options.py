"""Analysis options: the call's arguments over config.yaml's ``analysis:`` section, checked."""

from __future__ import annotations

import pandas as pd

from cbs.errors import AnalysisError

__all__ = ["UNITS", "resolve_options"]

UNITS = ("auto", "examples", "tokens")


def resolve_options(
    cfg: dict, results: pd.DataFrame, *, delta, b0, n_boot, tokens_per_example, unit
):
    """(delta, b0, n_boot, tokens_per_example, unit): arguments left as None come from the
    config's ``analysis:`` section (tokens_per_example from the results' column when there
    is one value); every value checked. Raises AnalysisError naming the bad one."""
    section = cfg.get("analysis") or {}
    if not isinstance(section, dict):
        raise AnalysisError(f"config.yaml 'analysis' must be a mapping; got {section!r}")
    try:
        delta = float(section.get("delta", 0.2) if delta is None else delta)
        b0 = section.get("b0") if b0 is None else b0
        b0 = None if b0 is None else float(b0)
        n_boot = int(section.get("bootstrap", 1000) if n_boot is None else n_boot)
        if tokens_per_example is None:
            col = (
                results["tokens_per_example"].dropna().unique()
                if "tokens_per_example" in results
                else []
            )
            if len(col) > 1:
                raise AnalysisError(
                    f"results mix tokens_per_example values {sorted(col)}; pass one explicitly"
                )
            tokens_per_example = (
                int(col[0]) if len(col) else int(section.get("tokens_per_example", 1) or 1)
            )
        tokens_per_example = int(tokens_per_example)
    except (TypeError, ValueError) as e:
        if isinstance(e, AnalysisError):
            raise
        raise AnalysisError(f"invalid analysis option in config.yaml or arguments: {e}") from None
    if unit not in UNITS:
        raise AnalysisError(f"unit must be one of {', '.join(UNITS)}; got {unit!r}")
    if unit == "auto":
        unit = "tokens" if tokens_per_example > 1 else "examples"
    if delta <= 0:
        raise AnalysisError(f"delta must be positive; got {delta}")
    if b0 is not None and not float(b0) > 0:
        raise AnalysisError(f"b0 must be a positive batch size (in examples); got {b0}")
    if n_boot < 0:
        raise AnalysisError(f"bootstrap must be >= 0; got {n_boot}")
    if tokens_per_example < 1:
        raise AnalysisError(f"tokens_per_example must be >= 1; got {tokens_per_example}")
    return delta, (None if b0 is None else float(b0)), n_boot, tokens_per_example, unit
