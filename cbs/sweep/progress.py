"""What a running sweep shows: a tqdm bar that moves within blocks, or one line per block.

The runner owns one :class:`SweepProgress`. Back ends report a running block through the
callable the runner hands them (``Backend.progress``, see :mod:`cbs.sweep.backend`), in
cell equivalents: a finished cell counts 1, a running one the share of the step budget it
has used. So the bar advances every ``steps_per_call`` steps inside a block, and its ETA
(tqdm's, from the rate so far) counts the cells of adaptive rounds as soon as the runner
plans them (:meth:`SweepProgress.grow`).

Modes:
  * ``bar``: a tqdm bar on stderr (the default on a terminal).
  * ``lines``: one line per finished block on stderr, with cells done, elapsed time and an
    ETA, and one line per planned adaptive round (the default when stderr is not a
    terminal: a batch job's log gets readable lines instead of carriage returns).
  * ``off``: nothing (``--no-progress``, ``cbs.run``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

__all__ = ["SweepProgress", "progress_mode", "duration"]

MODES = ("auto", "bar", "lines", "off")


def progress_mode(progress: bool | str, stream=None) -> str:
    """The concrete mode for ``run_sweep(progress=...)``: True means ``auto``, False ``off``;
    ``auto`` is ``bar`` on a terminal and ``lines`` otherwise."""
    mode = {True: "auto", False: "off"}.get(progress, progress)
    if mode not in MODES:
        raise ValueError(f"progress: got {progress!r}; allowed: one of {', '.join(MODES)}")
    if mode == "auto":
        stream = stream if stream is not None else sys.stderr
        isatty = getattr(stream, "isatty", None)
        mode = "bar" if isatty is not None and isatty() else "lines"
    return mode


def duration(seconds: float) -> str:
    """Seconds as '42 s', '3m07s' or '2h05m'.

    >>> duration(42.4), duration(187), duration(7512)
    ('42 s', '3m07s', '2h05m')
    """
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class SweepProgress:
    """Cells done (fractional within running blocks) against a total that grows as adaptive
    rounds are planned, shown as a bar or as lines."""

    def __init__(
        self,
        name: str,
        total: int,
        initial: int,
        blocks: int,
        mode: str,
        write: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        may_add: int = 0,
    ):
        self.name, self.mode, self.clock = name, mode, clock
        self.total, self.done, self.blocks, self.blocks_done = total, initial, blocks, 0
        self.initial = initial
        self.partial: dict[str, float] = {}  # block id -> cell equivalents done so far
        self.detail = ""
        self.t0 = clock()
        self._write = write or (lambda s: print(s, file=sys.stderr, flush=True))
        self.may_add = int(
            may_add
        )  # the most the adaptive rounds can still add (--dry-run's bound)
        self.bar = None
        if mode == "lines":
            self._write(
                f"{name}: {total - initial} cells to run in {blocks} block(s)"
                + (f" ({initial} done before)" if initial else "")
                + (f"; adaptive LR rounds may add up to {may_add} more" if may_add else "")
            )
        if mode == "bar":
            from tqdm.auto import tqdm

            # n is fractional inside a block; show it rounded
            self.bar = tqdm(
                total=total,
                initial=initial,
                unit="cell",
                desc=name + (f" (adaptive: up to +{may_add})" if may_add else ""),
                dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} cells [{elapsed}<{remaining}{postfix}]",
            )

    # -- what the runner and the back ends report -------------------------------------
    def in_block(self, block_id: str, cells_done: float, detail: str = "") -> None:
        """A back end's report from inside a running block (the ``Backend.progress`` hook)."""
        self.partial[block_id] = float(cells_done)
        self.detail = detail
        self._refresh()

    def block_done(self, block, seconds: float) -> None:
        """A block's rows are on disk."""
        # sub-blocks of a split block report as "<block id>~<key>"; the block's end clears them
        for k in [k for k in self.partial if k.split("~", 1)[0] == block.block_id]:
            self.partial.pop(k)
        self.done += len(block.cells)
        self.blocks_done += 1
        self.detail = ""
        if self.mode == "lines":
            self._write(
                f"{self.name}: block {self.blocks_done}/{self.blocks} {block.block_id} "
                f"({len(block.cells)} cells, B={block.batch_size}) {seconds:.1f} s; "
                f"{self.done}/{self.total} cells, {self._times()}"
            )
        self._refresh()

    def grow(self, cells: int, blocks: int, note: str = "") -> None:
        """More work was planned (an adaptive round): the total and the ETA include it."""
        self.total += cells
        self.blocks += blocks
        self.may_add = max(0, self.may_add - cells)
        if self.bar is not None:
            self.bar.set_description_str(
                self.name + (f" (adaptive: up to +{self.may_add})" if self.may_add else ""),
                refresh=False,
            )
        if self.bar is not None:
            self.bar.total = self.total
        if self.mode == "lines":
            self._write(
                f"{self.name}: {note or 'planned'} +{cells} cells in {blocks} block(s); "
                f"total now {self.total} cells"
            )
        self._refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    # -- derived ----------------------------------------------------------------------
    @property
    def position(self) -> float:
        return min(float(self.total), self.done + sum(self.partial.values()))

    def eta_seconds(self) -> float | None:
        """Remaining seconds at this session's rate so far (None before any progress)."""
        got = self.position - self.initial
        if got <= 0:
            return None
        rate = got / max(self.clock() - self.t0, 1e-9)
        return (self.total - self.position) / rate

    def _times(self) -> str:
        eta = self.eta_seconds()
        elapsed = duration(self.clock() - self.t0)
        return f"elapsed {elapsed}, ETA {duration(eta) if eta is not None else '?'}"

    def _refresh(self) -> None:
        if self.bar is None:
            return
        self.bar.n = self.position
        if self.detail:
            self.bar.set_postfix_str(self.detail, refresh=False)
        else:
            self.bar.set_postfix_str("", refresh=False)
        self.bar.refresh()
