"""The NQM back end of the sweep runner: exact steps-to-target for blocks of cells.

Cells are deterministic: the NQM's expected risk is computed exactly (no sampling), so a
cell's seed changes nothing; every cell still gets its own record. Blocks of one optimizer
entry (same kind and schedule) are evaluated together: the distinct (LR, hyperparameter)
configurations x the distinct batch sizes in one compiled program.

Schedule kind ``optimized_pwc``: each cell's LR is the *cap* of its num_pieces optimized
piecewise-constant LRs (the reference uses 2 / (lambda_max + lambda_min), see
:func:`cbs.nqm.pwc_lr_cap`); the cell's steps are those of its optimized schedule, and
tables["tuned"] holds the best cell of the block with its schedule (column ``pwc_lrs``).
Its steps are exact (any horizon T, split into num_pieces pieces of as equal as possible
length), and the search starts from the best constant LR <= the cap (column
``pwc_constant_steps``), a feasible schedule, so it never needs more steps than that.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import pandas as pd

from cbs.nqm._grid import evaluate_grid, expected_risk
from cbs.nqm._problem import NQMProblem, bin_problem, custom_problem
from cbs.nqm._schedules import schedule_phases
from cbs.nqm._tuning import best_on_grid, optimize_pwc, refine_lr
from cbs.ramps import is_ramped, ramp_plan
from cbs.sweep.backend import Backend, BlockResult, CellResult, HParamSpec, OptimizerSpec
from cbs.sweep.schema import ConfigError, spec

__all__ = ["NQMSection", "NQMBackend", "problem_from_section"]


@dataclasses.dataclass(frozen=True)
class NQMSection:
    """The ``nqm:`` section: the problem and how the exact engine evaluates it."""

    spectrum: Literal["harmonic", "power", "custom"] = spec(
        "harmonic", doc="Hessian eigenvalues: h_i = 1/i, h_i = i^-power, or `eigenvalues`"
    )
    dim: int = spec(10_000, doc="number of eigenvalues d (harmonic / power)", ge=1)
    power: float = spec(1.0, doc="power-law exponent a of h_i = i^-a", gt=0)
    eigenvalues: list[float] = spec([], doc="custom spectrum h (spectrum: custom)", gt=0)
    noise: Literal["hessian", "identity", "custom"] = spec(
        "hessian", doc="per-example gradient-noise variances c: C = H, C = I, or `noise_values`"
    )
    noise_scale: float = spec(1.0, doc="multiplies c", gt=0)
    noise_values: list[float] = spec([], doc="custom c, one per eigenvalue (noise: custom)", ge=0)
    init: float = spec(1.0, doc="initial second moment E[theta_i(0)^2] of every coordinate", ge=0)
    init_values: list[float] = spec(
        [], doc="custom initial second moments, one per eigenvalue", ge=0
    )
    binned: bool = spec(
        False, doc="quantize the spectrum into the reference's log bins (docs/nqm.md section 1)"
    )
    num_bins: int = spec(100, doc="number of log-spaced bins when binned", ge=2)
    refine: bool = spec(
        True, doc="refine the grid-optimal LR per hyperparameter by golden-section search"
    )
    refine_iters: int = spec(
        25, doc="golden-section iterations (each shrinks the bracket by 0.618)", ge=1
    )
    scan_window: int = spec(
        16, doc="exact steps scanned after the bisection's crossing (settle step)", ge=1
    )
    certify: bool = spec(
        True,
        doc="certify each first crossing with interval lower bounds (column "
        "crossing_certified); false is ~3x faster for momentum and reports the "
        "bisection's crossing, assuming the risk is monotone before it",
    )
    certify_iters: int | None = spec(
        None,
        doc="iteration budget of the certified scan per configuration and "
        "phase (default 4 K + 2 scan_window, K = bits of max_steps; more "
        "certifies more slowly-oscillating cells)",
        ge=1,
    )
    max_phases: int = spec(256, doc="phases used for a per-step-varying schedule stretch", ge=1)
    pwc_opt_steps: int = spec(150, doc="Adam steps per optimized piecewise-constant schedule", ge=1)
    curves: Literal["auto", "all", "best", "none"] = spec(
        "auto",
        doc="risk curves for all cells, the best cell per hyperparameter, or none (auto: all up to 4096 cells)",
    )
    curve_points: int = spec(24, doc="log-spaced steps per curve", ge=2)
    chunk: int | None = spec(
        None,
        doc="configurations vmapped together (default: 4 on CPU, where small "
        "chunks stay in cache; 64 on GPU/TPU)",
        ge=1,
    )


def problem_from_section(s: NQMSection) -> NQMProblem:
    """The NQMProblem an ``nqm:`` section describes."""
    if s.spectrum == "custom":
        h = np.asarray(s.eigenvalues, np.float64)
    else:
        h = np.arange(1, s.dim + 1, dtype=np.float64) ** (
            -(1.0 if s.spectrum == "harmonic" else s.power)
        )
    if s.noise == "hessian":
        c = h.copy()
    elif s.noise == "identity":
        c = np.ones_like(h)
    else:
        c = np.asarray(s.noise_values, np.float64)
    m0 = np.asarray(s.init_values, np.float64) if s.init_values else s.init
    problem = custom_problem(h, s.noise_scale * c, m0)
    return bin_problem(problem, s.num_bins) if s.binned else problem


_PRECOND = HParamSpec(
    0.0, "preconditioner power p: P = H^p (0 = plain, 1 = Newton-like)", ge=0.0, le=1.0
)
_EMA = HParamSpec(
    0.0, "EMA decay gamma of the iterates the loss is read at (0 = no EMA)", ge=0.0, lt=1.0
)
_MOMENTUM = HParamSpec(0.9, "momentum coefficient beta", ge=0.0, lt=1.0)
_HPARAMS = {
    "sgd": ("precond_power", "ema_decay"),
    "momentum": ("momentum", "precond_power", "ema_decay"),
    "nesterov": ("momentum", "precond_power", "ema_decay"),
}


_MAX_SMOOTH_STEPS = 10_000_000


class NQMBackend(Backend):
    """Exact noisy-quadratic-model engine (Zhang et al. 2019), float64, closed form per phase."""

    name = "nqm"
    Section = NQMSection
    optimizers = {
        "sgd": OptimizerSpec(
            "SGD with preconditioner H^p and optional EMA of iterates",
            {"precond_power": _PRECOND, "ema_decay": _EMA},
        ),
        "momentum": OptimizerSpec(
            "heavy-ball momentum (v <- beta v - alpha P^-1 g) with H^p and optional EMA",
            {"momentum": _MOMENTUM, "precond_power": _PRECOND, "ema_decay": _EMA},
        ),
        "nesterov": OptimizerSpec(
            "Nesterov momentum (optax/PyTorch form) with H^p and optional EMA",
            {"momentum": _MOMENTUM, "precond_power": _PRECOND, "ema_decay": _EMA},
        ),
    }
    metrics = {"risk": "exact expected excess risk E[L(theta_t)] = 1/2 sum_i h_i E[theta_i(t)^2]"}
    blocks_per_call = 10_000
    # one call per sweep: configurations of every optimizer entry of one kind and schedule
    # share the compiled programs, and all their LR refinements run as one batch
    calls_span_optimizers = True

    def __init__(self, config):
        super().__init__(config)
        self.section = config.section if config.section is not None else NQMSection()
        self.problem = problem_from_section(self.section)

    @classmethod
    def check(cls, config) -> None:
        s = config.section if config.section is not None else NQMSection()
        if config.target.value is not None and config.target.value <= 0:
            raise ConfigError(
                "target.value",
                config.target.value,
                "allowed: a value > 0 (the NQM risk is >= 0, so no step has risk < 0)",
            )
        if s.spectrum == "custom" and not s.eigenvalues:
            raise ConfigError(
                "nqm.eigenvalues",
                s.eigenvalues,
                "allowed: a non-empty list when spectrum is 'custom'",
            )
        n = len(s.eigenvalues) if s.spectrum == "custom" else s.dim
        if s.noise == "custom" and len(s.noise_values) != n:
            raise ConfigError(
                "nqm.noise_values",
                s.noise_values,
                f"allowed: a list of {n} values (one per eigenvalue)",
            )
        if s.init_values and len(s.init_values) != n:
            raise ConfigError(
                "nqm.init_values",
                s.init_values,
                f"allowed: a list of {n} values (one per eigenvalue)",
            )
        for i, opt in enumerate(config.grid.optimizers):
            sch = opt.schedule
            where = f"grid.optimizers[{i}].schedule"
            # (keys per schedule kind, pieces and boundaries: cbs.sweep.config._check_schedule)
            # warm-ups and cosine / linear decays are discretised step by step before being
            # merged into phases, so their length must fit in memory
            smooth = (
                (sch.horizon or config.budget.max_steps)
                if sch.kind in ("cosine", "linear_decay")
                else 0
            )
            for key, steps in (("warmup_steps", sch.warmup_steps), ("horizon", smooth)):
                if steps > _MAX_SMOOTH_STEPS:
                    raise ConfigError(
                        f"{where}.{key}",
                        steps,
                        f"allowed: at most {_MAX_SMOOTH_STEPS} steps for "
                        "the NQM back end (smooth schedules are tabulated per step; "
                        "set schedule.horizon for a shorter decay than budget.max_steps)",
                    )
            if sch.kind == "optimized_pwc" and config.budget.max_steps < sch.num_pieces:
                raise ConfigError(
                    "budget.max_steps",
                    config.budget.max_steps,
                    f"allowed: at least num_pieces = {sch.num_pieces} steps",
                )

    def manifest(self):
        p = self.problem
        return {
            "nqm_bins": int(len(p.h)),
            "nqm_dim": p.dim,
            "nqm_initial_risk": p.initial_risk,
            "nqm_deterministic": "exact expected risk; seeds do not change results",
        }

    def reference_curves(self, batch_sizes):
        return {
            "lower_bound": self.problem.lower_bound_steps(self.config.target.value, batch_sizes)
        }

    # ------------------------------------------------------------------------------------

    def run_blocks(self, blocks):
        results: list[BlockResult | None] = [None] * len(blocks)
        # Blocks of one kind and schedule (any optimizer entry, e.g. several preconditioner
        # powers) run together: one grid call, one batched refinement, one curves call.
        groups: dict[tuple, list[int]] = {}
        for i, block in enumerate(blocks):
            pwc = block.schedule is not None and block.schedule.kind == "optimized_pwc"
            # EMA entries apart: the EMA flag selects the moment system and the certified
            # scan's iteration budget, so a cell's numbers must not depend on whether an
            # EMA entry shares its call (which sharding and resuming change)
            ema = any(c.hparams.get("ema_decay", 0.0) > 0 for c in block.cells)
            # a batch ramp's phases count samples, so their steps depend on the batch size:
            # one group (one set of phases) per batch size
            ramp_b = block.batch_size if is_ramped(block.schedule) else 0
            groups.setdefault(
                (block.kind, block.optimizer if pwc else "", repr(block.schedule), ema, ramp_b),
                [],
            ).append(i)
        for (kind, *_), idx in groups.items():
            group = [blocks[i] for i in idx]
            sch = group[0].schedule
            if sch is not None and sch.kind == "optimized_pwc":
                out = self._run_pwc(kind, group)
            else:
                out = self._run_group(kind, group)
            for i, r in zip(idx, out):
                results[i] = r
        return results

    def _hp_names(self, kind):
        return _HPARAMS[kind]

    def _hp_arrays(self, kind, cells):
        get = lambda name: np.array(
            [c.hparams.get(name, self.optimizers[kind].hparams[name].default) for c in cells],
            np.float64,
        )
        mom = get("momentum") if kind != "sgd" else np.zeros(len(cells))
        return mom, get("ema_decay"), get("precond_power")

    def _run_group(self, kind, group):
        cfg = self.config
        target, max_steps = cfg.target.value, cfg.budget.max_steps
        sch = group[0].schedule
        ramp = (
            ramp_plan(
                sch,
                group[0].batch_size,
                max_steps,
                kind=kind,
                tokens_per_example=cfg.analysis.tokens_per_example,
            )
            if is_ramped(sch)
            else None
        )
        phases, exact = schedule_phases(
            sch,
            max_steps,
            self.section.max_phases,
            batch_size=group[0].batch_size,
            optimizer_kind=kind,
            tokens_per_example=cfg.analysis.tokens_per_example,
        )
        cells = [c for b in group for c in b.cells]
        lr = np.array([c.lr for c in cells])
        mom, ema, pw = self._hp_arrays(kind, cells)
        keys = np.stack([lr, mom, ema, pw], 1)
        uniq, inv = np.unique(keys, axis=0, return_inverse=True)
        inv = inv.ravel()
        bsz = np.array([c.batch_size for c in cells], np.float64)
        # Always every batch size of the sweep, whichever blocks this call holds: the
        # certified scan is shared by the batch sizes of a configuration (its iteration
        # budget and where it stops depend on them), so a sharded or resumed run that
        # brings a subset would otherwise certify or bound differently.
        # A ramp's group holds one batch size (its phases are that batch size's).
        ub = np.array(sorted(set(cfg.grid.batch_size_values())), np.float64)
        if ramp is not None:
            ub = np.array([float(group[0].batch_size)])
        binv = np.searchsorted(ub, bsz)
        res = evaluate_grid(
            self.problem,
            kind,
            *uniq.T,
            batch_sizes=ub,
            target=target,
            max_steps=max_steps,
            phases=phases,
            window=self.section.scan_window,
            certify=self.section.certify,
            certify_iters=self.section.certify_iters,
            chunk=self.section.chunk,
        )
        pick = lambda name: res[name][inv, binv.ravel()]
        steps, reached, settle, best, final, cert, lower = (
            pick(n)
            for n in (
                "steps",
                "reached",
                "settle_step",
                "best",
                "final",
                "crossing_certified",
                "steps_lower_bound",
            )
        )
        diverged = ~reached & (~np.isfinite(final) | (final > 10 * self.problem.initial_risk))
        # Python scalars via tolist() (one conversion per array, not per element and cell)
        steps_run = np.where(reached, np.nan_to_num(steps), max_steps).astype(np.int64)
        # examples consumed by the crossing step (NaN when not reached)
        samples = ramp.samples_after(steps) if ramp is not None else steps * bsz
        records = [
            CellResult(
                cell_id=c.cell_id,
                reached=r,
                diverged=d,
                steps_to_target=s,
                final_metric=f,
                best_metric=b,
                steps_run=n,
                extra={
                    "settle_step": st,
                    "crossing_certified": ce,
                    "steps_lower_bound": lo,
                    # 0 when a smooth schedule stretch was coarse-grained (max_phases)
                    "schedule_exact": float(exact),
                    "samples_to_target": sa,
                },
            )
            for c, r, d, s, f, b, n, st, ce, lo, sa in zip(
                cells,
                reached.tolist(),
                diverged.tolist(),
                steps.astype(np.float64).tolist(),
                final.astype(np.float64).tolist(),
                best.astype(np.float64).tolist(),
                steps_run.tolist(),
                settle.astype(np.float64).tolist(),
                cert.astype(np.float64).tolist(),
                lower.astype(np.float64).tolist(),
                samples.astype(np.float64).tolist(),
            )
        ]
        # Tuning: the grid optimum per block and per hyperparameter tuple, then refinement.
        offsets = np.cumsum([0] + [len(b.cells) for b in group])
        hp_keys = np.stack([mom, ema, pw], 1)
        rows, ref_rows = [], []
        for bi, block in enumerate(group):
            sl = slice(offsets[bi], offsets[bi + 1])
            s_b, k_b, lr_b = steps[sl], hp_keys[sl], lr[sl]
            ib = best_on_grid(s_b)
            row = dict(
                optimizer=block.optimizer,
                kind=kind,
                batch_size=block.batch_size,
                seed=int(min(c.seed for c in block.cells)),
                grid_steps_to_target=float(s_b[ib]) if ib >= 0 else np.nan,
                grid_lr=float(lr_b[ib]) if ib >= 0 else np.nan,
            )
            row.update(
                steps_to_target=row["grid_steps_to_target"], reached=ib >= 0, lr=row["grid_lr"]
            )
            for n, v in zip(
                ("momentum", "ema_decay", "precond_power"), k_b[ib] if ib >= 0 else [np.nan] * 3
            ):
                if n in self._hp_names(kind):
                    row["hp_" + n] = float(v)
            rows.append(row)
            if not self.section.refine:
                continue
            for hk in np.unique(k_b, axis=0):
                m = np.all(k_b == hk, axis=1)
                j = best_on_grid(s_b[m])
                if j < 0:
                    continue
                lrs_m = np.unique(lr_b[m])
                pos = np.searchsorted(lrs_m, lr_b[m][j])
                nbr = [lrs_m[pos] / lrs_m[pos - 1]] if pos > 0 else []
                nbr += [lrs_m[pos + 1] / lrs_m[pos]] if pos + 1 < len(lrs_m) else []
                ref_rows.append(
                    (bi, lr_b[m][j], *hk, block.batch_size, max(nbr) if nbr else 2.0, s_b[m][j])
                )
        if ref_rows:
            R = np.array(ref_rows, np.float64)
            r_steps, r_lr = refine_lr(
                self.problem,
                kind,
                R[:, 1],
                R[:, 2],
                R[:, 3],
                R[:, 4],
                R[:, 5],
                target=target,
                max_steps=max_steps,
                phases=phases,
                ratio=R[:, 6],
                iters=self.section.refine_iters,
                window=self.section.scan_window,
            )
            for (bi, _lr0, *hk), s_r, lr_r in zip(R[:, :5], r_steps, r_lr):
                row = rows[int(bi)]
                cur = row["steps_to_target"]
                if np.isfinite(s_r) and (not np.isfinite(cur) or s_r < cur):
                    row.update(steps_to_target=float(s_r), reached=True, lr=float(lr_r))
                    for n, v in zip(("momentum", "ema_decay", "precond_power"), hk):
                        if n in self._hp_names(kind):
                            row["hp_" + n] = float(v)
        curves, sel = self._curves(kind, group, cells, lr, mom, ema, pw, bsz, steps, phases)
        if curves is not None:
            # the curves' cells come block after block (sel is grouped by block), each with
            # the same number of rows: each block's rows are one slice
            sel_block = np.searchsorted(offsets, sel, side="right") - 1
            cut = np.searchsorted(sel_block, np.arange(len(group) + 1)) * (len(curves) // len(sel))
        out = []
        for bi in range(len(group)):
            sl = slice(offsets[bi], offsets[bi + 1])
            c_df = None
            if curves is not None:
                c_df = curves.iloc[cut[bi] : cut[bi + 1]].reset_index(drop=True)
            out.append(
                BlockResult(
                    cells=records[sl], curves=c_df, tables={"tuned": pd.DataFrame([rows[bi]])}
                )
            )
        return out

    def _curve_steps(self):
        T = self.config.budget.max_steps
        return np.unique(
            np.concatenate(
                [[0], np.round(np.geomspace(1, T, self.section.curve_points - 1))]
            ).astype(np.int64)
        )

    def _curves(self, kind, group, cells, lr, mom, ema, pw, bsz, steps, phases):
        mode = self.section.curves
        if not self.config.output.curves or mode == "none":
            return None, None
        # auto: every cell of an optimizer entry with at most 4096 cells, else the best cell
        # per block and hyperparameter tuple; counted on the entry's whole grid, not on this
        # call's blocks, so that sharded and resumed runs store the same curves
        n_bs = len(self.config.grid.batch_size_values())
        per_opt = {b.optimizer: len(b.cells) * n_bs for b in group}
        keep = []
        offsets = np.cumsum([0] + [len(b.cells) for b in group])
        for bi, block in enumerate(group):
            idx = np.arange(offsets[bi], offsets[bi + 1])
            if mode == "all" or (mode == "auto" and per_opt[block.optimizer] <= 4096):
                keep.extend(idx)
            else:
                hk = np.stack([mom[idx], ema[idx], pw[idx]], 1)
                for k in np.unique(hk, axis=0):
                    sub = idx[np.all(hk == k, axis=1)]
                    j = best_on_grid(steps[sub])
                    if j >= 0:
                        keep.append(sub[j])
        sel = np.array(keep, np.int64)
        if len(sel) == 0:
            return None, None
        ts = self._curve_steps()
        # L(t; B) = Det(t) + Noise(t) / B: two evaluations per configuration serve every B.
        keys = np.stack([lr[sel], mom[sel], ema[sel], pw[sel]], 1)
        uniq, inv = np.unique(keys, axis=0, return_inverse=True)
        both = expected_risk(
            self.problem,
            kind,
            *uniq.T,
            batch_sizes=np.array([np.inf, 1.0]),
            steps=ts,
            phases=phases,
        )
        with np.errstate(invalid="ignore", over="ignore"):  # diverged configurations: inf - inf
            det, noise = both[:, 0], both[:, 1] - both[:, 0]
            risk = det[inv.ravel()] + noise[inv.ravel()] / bsz[sel][:, None]
        return pd.DataFrame(
            {
                "cell_id": np.repeat([cells[j].cell_id for j in sel], len(ts)),
                "step": np.tile(ts, len(sel)),
                "metric": risk.ravel(),
            }
        ), sel

    def _run_pwc(self, kind, group):
        cfg = self.config
        target, max_steps = cfg.target.value, cfg.budget.max_steps
        sch = group[0].schedule
        cells = [c for b in group for c in b.cells]
        lr = np.array([c.lr for c in cells])
        mom, ema, pw = self._hp_arrays(kind, cells)
        bsz = np.array([c.batch_size for c in cells], np.float64)
        steps = np.full(len(cells), np.nan)
        reached = np.zeros(len(cells), bool)
        lrs = np.full((len(cells), sch.num_pieces), np.nan)
        const = np.full(len(cells), np.nan)  # best constant LR <= the cap: the seed of the search
        hk = np.stack([mom, ema, pw], 1)
        for k in np.unique(hk, axis=0):
            m = np.all(hk == k, axis=1)
            r = optimize_pwc(
                self.problem,
                kind,
                bsz[m],
                target=target,
                max_steps=max_steps,
                num_pieces=sch.num_pieces,
                lr_cap=lr[m],
                momentum=float(k[0]),
                ema_decay=float(k[1]),
                precond_power=float(k[2]),
                opt_steps=self.section.pwc_opt_steps,
            )
            steps[m], reached[m], lrs[m], const[m] = (
                r["steps"],
                r["reached"],
                r["lrs"],
                r["constant_steps"],
            )
        offsets = np.cumsum([0] + [len(b.cells) for b in group])
        out = []
        for bi, block in enumerate(group):
            sl = slice(offsets[bi], offsets[bi + 1])
            recs = [
                CellResult(
                    cell_id=c.cell_id,
                    reached=bool(reached[j]),
                    diverged=False,
                    steps_to_target=float(steps[j]),
                    final_metric=np.nan,
                    best_metric=np.nan,
                    steps_run=int(steps[j]) if reached[j] else int(max_steps),
                    extra={
                        "pwc_piece_steps": float(steps[j] / sch.num_pieces),
                        "pwc_constant_steps": float(const[j]),
                    },
                )
                for j, c in zip(range(sl.start, sl.stop), block.cells)
            ]
            ib = best_on_grid(steps[sl])
            j = sl.start + max(ib, 0)
            row = dict(
                optimizer=block.optimizer,
                kind=kind,
                batch_size=block.batch_size,
                seed=int(min(c.seed for c in block.cells)),
                steps_to_target=float(steps[j]) if ib >= 0 else np.nan,
                reached=ib >= 0,
                lr=float(lr[j]),
                grid_steps_to_target=float(steps[j]) if ib >= 0 else np.nan,
                grid_lr=float(lr[j]),
                pwc_lrs=[float(x) for x in lrs[j]],
            )
            for n, v in zip(("momentum", "ema_decay", "precond_power"), hk[j]):
                if n in self._hp_names(kind):
                    row["hp_" + n] = float(v)
            out.append(BlockResult(cells=recs, curves=None, tables={"tuned": pd.DataFrame([row])}))
        return out
