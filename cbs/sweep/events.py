"""Live TensorBoard event files of a running sweep (``--tensorboard``, ``output.tensorboard``).

Written through tensorboardX (the optional ``tensorboard`` extra): a pure-Python writer
whose only dependencies, numpy, packaging and protobuf, the project already has, where
CLU's ``metric_writers`` would pull TensorFlow (or tensorboard and its server) and W&B a
service account. Everything goes under ``OUTPUT/tensorboard/`` and is flushed after every
finished block, so ``tensorboard --logdir OUTPUT/tensorboard`` shows a sweep while it runs:

* ``curve/<optimizer>/B<B>/lr<lr>[_<hparam><value>...]_seed<s>``: each cell's evaluation curve
  (the target metric against the step), from the block's curves table;
* ``timing/block_seconds``, ``timing/seconds_per_cell``, ``timing/cells_done``: one point
  per finished block (x = blocks finished in this session);
* ``best_steps/<optimizer>``: the best (grid) steps to target so far against the batch size
  (x = B), rewritten when an adaptive round finds fewer steps; and the text
  ``best_steps``, the running table (optimizer x batch size, "best steps @ LR").

The event files are a view of the stored tables, never read back by cbs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from cbs.errors import ConfigError

__all__ = ["EventLog", "require_writer"]


def require_writer():
    """tensorboardX's SummaryWriter, or a ConfigError naming the key and the install."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise ConfigError(
            "output.tensorboard",
            True,
            "allowed: false, or true with tensorboardX installed",
            "pip install -e '.[tensorboard]'",
        ) from None
    return SummaryWriter


def _hp_text(row) -> str:
    hps = [(k[3:], v) for k, v in row.items() if k.startswith("hp_")]
    return "".join(f"_{k}{v:.3g}" for k, v in sorted(hps) if not _is_default_zero(k, v))


def _is_default_zero(name: str, value) -> bool:
    # precond_power / ema_decay / weight decay of 0 say nothing; keep the tag short
    return isinstance(value, float) and value == 0.0 and name != "momentum"


class EventLog:
    """One writer for one sweep folder; :meth:`block` after each finished block."""

    def __init__(self, folder: Path, cfg, log: Callable[[str], None] = print):
        from cbs.analysis._format import format_number
        from cbs.store import RESULTS, read_table

        self._fmt = format_number
        writer_cls = require_writer()
        self.folder = Path(folder)
        self.writer = writer_cls(logdir=str(self.folder), flush_secs=10)
        self.cfg = cfg
        self.blocks = 0
        self.cells = 0
        # best (steps, lr) per (optimizer, batch size), seeded from blocks already on disk
        self.best: dict[tuple[str, int], tuple[float, float]] = {}
        stored = read_table(cfg.out_dir, RESULTS, columns=None)
        if stored is not None and len(stored):
            self._update_best(stored)
        self.writer.add_text(
            "sweep",
            f"{cfg.name}: backend {cfg.backend}, target {cfg.target.metric} < {cfg.target.value}, "
            f"budget {cfg.budget.max_steps} steps",
            0,
        )

    def _update_best(self, rows: pd.DataFrame) -> list[tuple[str, int]]:
        changed = []
        ok = rows[rows["reached"].astype(bool)]
        for (opt, b), g in ok.groupby(["optimizer", "batch_size"], sort=False):
            i = g["steps_to_target"].to_numpy(np.float64).argmin()
            s, lr = float(g["steps_to_target"].iloc[i]), float(g["lr"].iloc[i])
            key = (str(opt), int(b))
            if key not in self.best or s < self.best[key][0]:
                self.best[key] = (s, lr)
                changed.append(key)
        return changed

    def block(self, block, tables: dict[str, pd.DataFrame], seconds: float) -> None:
        from cbs.store import RESULTS

        rows = tables[RESULTS]
        self.blocks += 1
        self.cells += len(rows)
        w = self.writer
        curves = tables.get("curves")
        if curves is not None and len(curves):
            metric = self.cfg.target.metric
            value_col = "metric" if "metric" in curves else metric
            for cell, g in curves.groupby("cell_id", sort=False):
                hit = rows[rows["cell_id"] == cell]
                if not len(hit):
                    continue
                r = hit.iloc[0]
                # TensorBoard tags allow [A-Za-z0-9_.-/] only (tensorboardX rewrites the rest)
                tag = (
                    f"curve/{r['optimizer']}/B{int(r['batch_size'])}/"
                    f"lr{float(r['lr']):.3g}{_hp_text(r)}_seed{int(r['seed'])}"
                )
                for step, value in zip(g["step"].to_numpy(), g[value_col].to_numpy()):
                    v = float(value)
                    if math.isfinite(v):
                        w.add_scalar(tag, v, int(step))
        w.add_scalar("timing/block_seconds", float(seconds), self.blocks)
        w.add_scalar("timing/seconds_per_cell", float(seconds) / max(1, len(rows)), self.blocks)
        w.add_scalar("timing/cells_done", float(self.cells), self.blocks)
        for opt, b in self._update_best(rows):
            w.add_scalar(f"best_steps/{opt}", self.best[(opt, b)][0], b)
        w.add_text("best_steps", self.best_table(), self.blocks)
        w.flush()

    def best_table(self) -> str:
        """The running best-steps table as Markdown (what the text panel shows)."""
        opts = list(dict.fromkeys(o for o, _ in self.best))
        sizes = sorted({b for _, b in self.best})
        head = "| batch size | " + " | ".join(opts) + " |\n|" + "---|" * (len(opts) + 1)
        lines = [head]
        for b in sizes:
            cells = []
            for o in opts:
                s = self.best.get((o, b))
                cells.append(f"{self._fmt(s[0])} @ {self._fmt(s[1], 3)}" if s else "-")
            lines.append(f"| {b} | " + " | ".join(cells) + " |")
        return (
            "best steps to target @ learning rate (grid: min over the cells run so far)\n\n"
            + "\n".join(lines)
        )

    def close(self) -> None:
        self.writer.close()
