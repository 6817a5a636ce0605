"""From the store's tables to steps-to-target tables (the front end of docs/cbs.md section 1).

S(B) for one seed is Shallue's and Zhang's rule: the minimum over hyperparameter configs
(LR and every ``hp_*``) of the first step at which the metric is strictly below the target.
Diverged cells are excluded (and counted); a (batch size, seed) with no cell reaching the
target stays censored, never becomes a number. When the NQM back end wrote
``tuned.parquet`` (an optimum refined continuously between grid points), that optimum
counts as one more config by default, so its steps and LR are used wherever they are faster.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from cbs.errors import AnalysisError

__all__ = [
    "AnalysisError",
    "read_run_table",
    "read_run_config",
    "read_run_manifest",
    "check_run_dir",
    "steps_table",
    "per_batch_table",
]


def check_run_dir(run_dir) -> Path:
    """The run folder as a Path; raises AnalysisError unless it holds a results table."""
    path = Path(run_dir)
    if not path.exists():
        raise AnalysisError(f"run folder {str(path)!r} does not exist")
    if not path.is_dir():
        raise AnalysisError(
            f"{str(path)!r} is not a folder (expected a run folder with results.parquet)"
        )
    if not (path / "results.parquet").exists() and not any(
        (path / "parts" / "results").glob("*.parquet")
    ):
        raise AnalysisError(
            f"{str(path)!r} is not a run folder: it has neither results.parquet "
            f"nor parts/results/*.parquet"
        )
    return path


def read_run_table(run_dir, name: str) -> pd.DataFrame | None:
    """Table ``name`` of a run (merged file, or the parts of an unfinished run); None if absent.

    The store's reader decides the on-disk layout, so analysis and store cannot disagree.
    """
    from cbs.store import read_table

    return read_table(Path(run_dir), name)


def _read_mapping(run_dir, read, filename: str, errors, language: str) -> dict:
    """``read(run_dir)`` as a mapping ({} when absent); a file that does not parse is an
    AnalysisError naming it."""
    try:
        data = read(run_dir)
    except errors as e:
        raise AnalysisError(
            f"{str(Path(run_dir) / filename)!r} is not valid {language}: {str(e).splitlines()[0]}"
        ) from None
    return data if isinstance(data, dict) else {}


def read_run_config(run_dir) -> dict:
    """The resolved config.yaml as a plain mapping ({} when absent)."""
    from cbs.store import read_config

    return _read_mapping(
        run_dir, read_config, "config.yaml", (yaml.YAMLError, UnicodeDecodeError), "YAML"
    )


def read_run_manifest(run_dir) -> dict:
    """manifest.json as a mapping ({} when absent)."""
    from cbs.store import read_manifest

    return _read_mapping(
        run_dir, read_manifest, "manifest.json", (json.JSONDecodeError, UnicodeDecodeError), "JSON"
    )


_REQUIRED = ("optimizer", "batch_size", "lr", "seed", "reached", "diverged", "steps_to_target")


def _hp_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith("hp_")]


def _effective_lr(lr, momentum):
    """lr / (1 - momentum), Shallue et al.'s effective LR (the LR itself without momentum)."""
    if momentum is None or (isinstance(momentum, float) and math.isnan(momentum)):
        return lr
    return lr / (1.0 - momentum) if momentum < 1.0 else np.inf


def steps_table(
    results: pd.DataFrame,
    tuned: pd.DataFrame | None = None,
    *,
    use_tuned: bool = True,
    steps_column: str = "steps_to_target",
) -> pd.DataFrame:
    """Per (optimizer, batch size, seed): best steps to target over hyperparameter configs.

    Args:
        results: results.parquet (one row per cell).
        tuned: tuned.parquet, or None.
        use_tuned: count ``tuned``'s refined optimum as one more config: its steps and LR
            replace the grid's best where they are faster (always, unless refinement failed).
        steps_column: "steps_to_target" (first evaluated crossing) or "steps_interpolated".

    Returns:
        One row per (optimizer, batch_size, seed) with columns: steps (NaN = censored),
        censored, source ("results" or "tuned"), n_cells, n_diverged, n_censored_cells,
        max_steps, best_lr (refined when tuned), grid_best_lr, best_effective_lr,
        best_hp_<name>..., lr_grid_min, lr_grid_max, n_lr (the LRs tried with the best
        config's other hyperparameters: adaptive grids differ per group), lr_at_edge ("low"
        or "high" when the grid's best LR is that grid's smallest or largest; "" otherwise),
        and exact: True when the steps are a proven first crossing -- the best cell's
        ``crossing_exact`` (train) or ``crossing_certified`` (NQM) is 1 and no uncertified
        cell could be faster (its ``steps_lower_bound``, where known, is not below the best);
        True for censored points and for results without such columns (``proof`` names the
        column used, "" when there is none). ``n_uncertified`` counts reached cells whose
        crossing is not proven.
    """
    missing = [c for c in _REQUIRED if c not in results.columns]
    if missing:
        raise AnalysisError("results table lacks column(s) " + ", ".join(missing))
    if steps_column not in results.columns:
        raise AnalysisError(f"results table has no column {steps_column!r}")
    hps = _hp_columns(results)
    rows = []
    for (opt, bs, seed), cells in results.groupby(["optimizer", "batch_size", "seed"], sort=True):
        diverged = cells["diverged"].astype(bool).to_numpy()
        reached = cells["reached"].astype(bool).to_numpy() & ~diverged
        steps = cells[steps_column].to_numpy(dtype=np.float64)
        reached &= np.isfinite(steps)
        ok = cells[~diverged]
        flag_col = next((c for c in ("crossing_exact", "crossing_certified") if c in cells), None)
        proven = (
            (cells[flag_col].to_numpy(np.float64) == 1) if flag_col else np.ones(len(cells), bool)
        )
        lower = (
            cells["steps_lower_bound"].to_numpy(np.float64)
            if "steps_lower_bound" in cells
            else np.full(len(cells), -np.inf)
        )
        row = dict(
            optimizer=opt,
            batch_size=int(bs),
            seed=int(seed),
            n_cells=len(cells),
            n_diverged=int(diverged.sum()),
            n_censored_cells=int((~reached & ~diverged).sum()),
            max_steps=float(cells["max_steps"].max()) if "max_steps" in cells else np.nan,
            kind=str(cells["kind"].iloc[0]) if "kind" in cells else opt,
            n_uncertified=int((reached & ~proven).sum()),
            exact=True,
            proof=flag_col or "",
            source="results",
        )
        if reached.any():
            sub = cells[reached].assign(_s=steps[reached])
            order = ["_s"] + (["final_metric"] if "final_metric" in sub else [])
            best = sub.sort_values(order, kind="stable").iloc[0]
            row.update(steps=float(best["_s"]), censored=False)
            pos = int(np.flatnonzero(cells.index == best.name)[0])
            others = reached & ~proven
            others[pos] = False
            row["exact"] = bool(proven[pos]) and bool(
                np.all(np.nan_to_num(lower[others], nan=-np.inf) >= best["_s"])
            )
        else:
            # No config reached the target: censored. The "best" config is then the one that
            # got closest (lowest best metric), so its LR still says where the optimum sits.
            row.update(steps=np.nan, censored=True)
            best = None
            if len(ok):
                key = (
                    "best_metric"
                    if "best_metric" in ok
                    else "final_metric"
                    if "final_metric" in ok
                    else None
                )
                best = ok.sort_values(key, kind="stable").iloc[0] if key else ok.iloc[0]
        # The LR grid of the best config's hyperparameter group (adaptive rounds extend
        # each group's grid separately); the whole block's grid when there is no best.
        same = np.ones(len(cells), bool)
        if best is not None:
            for hp in hps:
                same &= np.isclose(
                    cells[hp].to_numpy(np.float64), float(best[hp]), rtol=1e-12, equal_nan=True
                )
        lr_grid = np.sort(cells.loc[same, "lr"].unique())
        row.update(lr_grid_min=float(lr_grid[0]), lr_grid_max=float(lr_grid[-1]), n_lr=len(lr_grid))
        if best is not None:
            row["best_lr"] = float(best["lr"])
            for hp in hps:
                row["best_" + hp] = float(best[hp])
        else:
            row["best_lr"] = np.nan
            for hp in hps:
                row["best_" + hp] = np.nan
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table

    # The edge check looks at the grid's optimum: a continuously refined LR (tuned.parquet)
    # sits strictly inside the grid even when the grid's best point is at its edge.
    table["grid_best_lr"] = table["best_lr"]
    table["grid_steps"] = table["steps"]  # the best swept cell, before any tuned optimum
    if use_tuned and tuned is not None and len(tuned) and "steps_to_target" in tuned:
        t_hps = _hp_columns(tuned)
        key = ["optimizer", "batch_size", "seed"]
        tuned = tuned.drop_duplicates(key, keep="last").set_index(key)
        for i, row in table.iterrows():
            k = (row["optimizer"], row["batch_size"], row["seed"])
            if k not in tuned.index:
                continue
            t = tuned.loc[k]
            t_steps = float(t["steps_to_target"])
            reached = (bool(t["reached"]) if "reached" in t else True) and np.isfinite(t_steps)
            # The refined optimum is one more config in the min over configs: it replaces the
            # grid's best unless the grid's best is faster (it should never be).
            if not reached or (not row["censored"] and row["steps"] <= t_steps):
                continue
            table.at[i, "source"] = "tuned"
            table.at[i, "steps"] = t_steps
            table.at[i, "censored"] = False
            if "lr" in t and np.isfinite(t["lr"]):
                table.at[i, "best_lr"] = float(t["lr"])
            for hp in t_hps:
                table.at[i, "best_" + hp] = float(t[hp])

    mom = (
        table["best_hp_momentum"]
        if "best_hp_momentum" in table
        else pd.Series(np.nan, index=table.index)
    )
    table["best_effective_lr"] = [_effective_lr(lr, m) for lr, m in zip(table["best_lr"], mom)]
    rel = 1e-9

    def edge(r):
        lr = r["grid_best_lr"]
        if r["n_lr"] < 2 or not np.isfinite(lr):
            return ""
        if lr <= r["lr_grid_min"] * (1 + rel):
            return "low"
        if lr >= r["lr_grid_max"] * (1 - rel):
            return "high"
        return ""

    table["lr_at_edge"] = table.apply(edge, axis=1)
    table["censored"] = table["censored"].astype(bool)
    if "train_examples" in results:
        # epochs to target beside steps: how often the data repeated before the target
        n_train = results.groupby(["optimizer", "batch_size"])["train_examples"].first()
        n = [n_train.get((o, b), np.nan) for o, b in zip(table["optimizer"], table["batch_size"])]
        table["train_examples"] = np.asarray(n, np.float64)
        table["epochs"] = table["steps"] * table["batch_size"] / table["train_examples"]
    return table


def per_batch_table(steps: pd.DataFrame) -> pd.DataFrame:
    """Per (optimizer, batch size): seeds combined (median of log S, censored = +inf).

    Columns: optimizer, batch_size, steps (NaN = censored), censored, n_seeds,
    n_censored_seeds, n_cells, n_diverged, frac_censored_cells, best_lr and
    best_effective_lr (geometric mean over seeds), lr_at_edge (most common edge flag),
    and per-seed steps as a list (steps_per_seed).
    """
    from cbs.analysis._seeds import aggregate_seeds

    rows = []
    for (opt, bs), g in steps.groupby(["optimizer", "batch_size"], sort=True):
        s = g["steps"].to_numpy(dtype=np.float64)
        cens = g["censored"].to_numpy(dtype=bool)
        log_s = np.log(np.where(cens, 1.0, s))
        y, c = aggregate_seeds(log_s[:, None], cens[:, None], axis=0)
        lrs = g["best_lr"].to_numpy(dtype=np.float64)
        elrs = g["best_effective_lr"].to_numpy(dtype=np.float64)
        # the best swept cell's steps, seeds combined the same way (differs from steps only
        # where a tuned optimum was used)
        gs = g["grid_steps"].to_numpy(np.float64) if "grid_steps" in g else s
        gcens = ~np.isfinite(gs)
        gy, _ = aggregate_seeds(np.log(np.where(gcens, 1.0, gs))[:, None], gcens[:, None], axis=0)

        def gmean(v):
            v = v[np.isfinite(v) & (v > 0)]
            return float(np.exp(np.log(v).mean())) if v.size else np.nan

        edges = [e for e in g["lr_at_edge"] if e]
        n_non_div = int(g["n_cells"].sum() - g["n_diverged"].sum())
        rows.append(
            dict(
                optimizer=opt,
                batch_size=int(bs),
                steps=float(np.exp(y[0])) if np.isfinite(y[0]) else np.nan,
                censored=bool(c[0]),
                n_seeds=len(g),
                n_censored_seeds=int(cens.sum()),
                n_cells=int(g["n_cells"].sum()),
                n_diverged=int(g["n_diverged"].sum()),
                frac_censored_cells=(float(g["n_censored_cells"].sum()) / n_non_div)
                if n_non_div
                else 1.0,
                best_lr=gmean(lrs),
                best_effective_lr=gmean(elrs),
                grid_steps=float(np.exp(gy[0])) if np.isfinite(gy[0]) else np.nan,
                grid_best_lr=gmean(
                    g["grid_best_lr"].to_numpy(np.float64) if "grid_best_lr" in g else lrs
                ),
                lr_at_edge=max(set(edges), key=edges.count) if edges else "",
                source=",".join(sorted(set(g["source"]))),
                n_uncertified=int(g["n_uncertified"].sum()) if "n_uncertified" in g else 0,
                n_inexact_seeds=int((~g["exact"].astype(bool)).sum()) if "exact" in g else 0,
                **{
                    c: float(np.nanmedian(g[c].to_numpy(np.float64)))
                    if g[c].notna().any()
                    else np.nan
                    for c in g.columns
                    if c.startswith("best_hp_")
                },
                steps_per_seed=[None if not np.isfinite(v) else float(v) for v in s],
                **(
                    dict(
                        epochs=float(np.exp(y[0])) * int(bs) / float(g["train_examples"].iloc[0])
                        if np.isfinite(y[0])
                        else np.nan
                    )
                    if "train_examples" in g
                    else {}
                ),
            )
        )
    return pd.DataFrame(rows)
