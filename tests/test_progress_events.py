"""Live progress (in-block bar, lines, ETA with adaptive rounds) and TensorBoard event files."""

from __future__ import annotations

import io

import numpy as np
import pytest

from cbs.sweep.backend import Block
from cbs.sweep.progress import SweepProgress, duration, progress_mode


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _block(bid, n, b=4):
    return Block(bid, "sgd", "sgd", b, tuple(range(n)))


def test_lines_mode_one_line_per_block_and_per_planned_round():
    lines, clock = [], _Clock()
    p = SweepProgress(
        "s", total=10, initial=0, blocks=2, mode="lines", write=lines.append, clock=clock, may_add=8
    )
    assert (
        lines.pop(0) == "s: 10 cells to run in 2 block(s); adaptive LR rounds may add up to 8 more"
    )
    clock.t = 5.0
    p.block_done(_block("a", 5), 5.0)
    assert len(lines) == 1 and "block 1/2 a (5 cells, B=4)" in lines[0]
    # 5 cells in 5 s, 5 left: ETA 5 s
    assert "5/10 cells" in lines[0] and "ETA 5 s" in lines[0]
    p.grow(6, 3, "adaptive round (zoom)")
    assert "+6 cells in 3 block(s); total now 16 cells" in lines[1]
    # the ETA counts the planned round: 11 cells left at 1 cell/s
    assert p.eta_seconds() == pytest.approx(11.0) and p.may_add == 2
    clock.t = 10.0
    p.block_done(_block("b", 5), 5.0)
    assert "block 2/5 b" in lines[2] and "10/16 cells" in lines[2]


def test_in_block_reports_move_the_position_and_the_block_end_settles_it():
    p = SweepProgress("s", total=10, initial=0, blocks=2, mode="off")
    p.in_block("a", 1.5, "step 100/400")
    assert p.position == 1.5
    p.in_block("a~0", 0.5)  # a sub-block of a split block
    p.in_block("a1~0", 0.25)  # another block whose id starts with "a": not a's
    assert p.position == 2.25
    p.block_done(_block("a", 8), 1.0)
    assert p.position == 8.25 and set(p.partial) == {"a1~0"}


def test_bar_mode_shows_fractional_progress_and_the_detail():
    out = io.StringIO()
    p = SweepProgress("s", total=4, initial=0, blocks=1, mode="bar", may_add=6)
    p.bar.fp = out  # write into the buffer instead of stderr
    p.in_block("a", 1.0, "B=4 step 50/100, 2/4 cells running")
    assert p.bar.n == 1.0 and "step 50/100" in str(p.bar) and "up to +6" in str(p.bar)
    p.grow(4, 1, "round")
    assert p.bar.total == 8 and "up to +2" in str(p.bar)
    p.close()


def test_progress_mode():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert progress_mode(True, Tty()) == "bar"
    assert progress_mode(True, io.StringIO()) == "lines"
    assert progress_mode(False) == "off" and progress_mode("lines") == "lines"
    with pytest.raises(ValueError, match="progress"):
        progress_mode("loud")
    assert duration(59.6) == "1m00s"


def _tiny_train_sweep(tmp_path, **extra):
    from cbs.sweep.config import load_config

    over = [
        "grid.batch_sizes=[8,32]",
        "grid.learning_rates=[0.1,0.3]",
        "grid.optimizers=[{kind: sgd}]",
        "grid.seeds=[0]",
        "grid.adaptive.enabled=false",
        "budget.max_steps=40",
        "budget.eval_every=10",
        "train.steps_per_call=10",
        "target.value=2.0",
        "train.width=8",
        f"output.dir={tmp_path / 'run'}",
        "output.tensorboard=true",
        *[f"{k}={v}" for k, v in extra.items()],
    ]
    return load_config("configs/train_digits_cpu.yaml", over)


def test_train_sweep_reports_in_block_progress_and_writes_readable_event_files(
    tmp_path, monkeypatch, capsys
):
    # tensorboard's own reader (the `test` extra installs it); tensorboardX writes
    pytest.importorskip("tensorboardX")
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    from cbs.store import read_table
    from cbs.sweep import progress as progress_mod
    from cbs.sweep.runner import run_sweep

    seen = []
    original = progress_mod.SweepProgress.in_block

    def spy(self, block_id, done, detail=""):
        seen.append((block_id, done, detail))
        original(self, block_id, done, detail)

    monkeypatch.setattr(progress_mod.SweepProgress, "in_block", spy)
    cfg = _tiny_train_sweep(tmp_path)
    run_sweep(cfg, progress="lines", log=lambda s: None)
    # the train loop reports after every call (10 steps of a 40-step budget), in cell
    # equivalents: non-decreasing within a block, both cells done (or out of budget) at the end
    for bid in ("sgd__B8", "sgd__B32"):
        done = [d for b, d, _ in seen if b.split("~")[0] == bid]
        assert len(done) == 4 and done == sorted(done) and done[-1] == 2.0, (bid, done)
        assert 0 < done[0] < 2
    assert any("step 20/40" in t and "cells running" in t for _, _, t in seen)
    err = capsys.readouterr().err
    assert "block 1/2 sgd__B8 (2 cells, B=8)" in err and "block 2/2" in err, err
    folder = tmp_path / "run" / "tensorboard"
    acc = ea_mod.EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = set(tags["scalars"])
    assert {"timing/block_seconds", "timing/cells_done", "best_steps/sgd"} <= scalars
    assert [e.value for e in acc.Scalars("timing/cells_done")] == [2.0, 4.0]
    # every cell's curve, value for value the stored curves table
    curves = read_table(tmp_path / "run", "curves")
    results = read_table(tmp_path / "run", "results")
    for r in results.itertuples():
        tag = f"curve/sgd/B{r.batch_size}/lr{r.lr:.3g}_seed0"
        assert tag in scalars, (tag, sorted(scalars))
        want = curves[curves.cell_id == r.cell_id].sort_values("step")
        got = acc.Scalars(tag)
        assert [e.step for e in got] == want.step.tolist()
        np.testing.assert_allclose([e.value for e in got], want.metric, rtol=1e-6)
    # the running best-steps table: the grid minimum per batch size
    best = results[results.reached].groupby("batch_size").steps_to_target.min()
    got = {e.step: e.value for e in acc.Scalars("best_steps/sgd")}
    assert got == {int(b): float(s) for b, s in best.items()}
    # text summaries are string tensors to the loader: the last one is the full table
    text = acc.Tensors("best_steps/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "| batch size | sgd |" in text and "grid" in text


def test_tensorboard_off_by_default_writes_nothing(tmp_path, fake_backend):
    from conftest import fake_config

    from cbs.sweep.config import load_config
    from cbs.sweep.runner import run_sweep

    cfg = load_config(fake_config(tmp_path))
    assert cfg.output.tensorboard is False
    run_sweep(cfg, progress=False, log=lambda s: None)
    assert (tmp_path / "run" / "results.parquet").exists()
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_tensorboard_without_the_writer_is_a_config_error(tmp_path, monkeypatch):
    import sys

    from cbs.errors import ConfigError
    from cbs.sweep.runner import run_sweep

    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails
    cfg = _tiny_train_sweep(tmp_path)
    with pytest.raises(ConfigError, match="output.tensorboard"):
        run_sweep(cfg, progress=False, log=lambda s: None)
    assert not (tmp_path / "run").exists()  # before anything is written
