"""What a researcher reads: one headline CBS with extrapolations shown as bounds in every
output, the terminal and report.md agreeing cell for cell (grid / tuned labelled),
comparisons labelled by folder without touching their inputs, the measured noise scale,
--dry-run's bound on adaptive rounds, the quoting hint and the few-steps warning."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import yaml
from synthetic_runs import PLANTED, write_synthetic_run

from cbs.analysis import analyze_run, compare_runs, short_summary
from cbs.analysis._format import format_number
from cbs.analysis._noise import noise_per_batch
from cbs.analysis._render import best_steps_text

SMALL = tuple(2**k for k in range(3, 10))  # 8 .. 512: adam's planted B_crit 1024 lies above


@pytest.fixture(scope="module")
def extrapolated(tmp_path_factory):
    """sgd's B_crit (256) inside the swept 8..512, adam's (1024) above it; analysed with plots."""
    run = write_synthetic_run(tmp_path_factory.mktemp("x") / "run", batch_sizes=SMALL, noise=0.0)
    return run, analyze_run(run, n_boot=50)


def test_extrapolated_b_crit_is_a_bound_in_every_text_output(extrapolated):
    run, a = extrapolated
    s = a.summary.set_index("optimizer")
    assert s.loc["sgd", "b_crit_outside"] == "" and s.loc["sgd", "b_crit_text"] == format_number(
        s.loc["sgd", "b_crit"]
    )
    assert s.loc["adam", "b_crit"] > 512  # the fit's number, kept for who wants it
    assert (s.loc["adam", "b_crit_outside"], s.loc["adam", "b_crit_text"]) == ("above", "> 512")
    # cbs.json (and with it cbs.run's results.cbs): the headline and the bound
    payload = json.loads((run / "cbs.json").read_text())
    adam = next(r for r in payload["summary"] if r["optimizer"] == "adam")
    assert (adam["headline"], adam["b_crit_text"], adam["b_crit_outside"]) == (
        "b_crit",
        "> 512",
        "above",
    )
    # the terminal's summary line, the terminal report and report.md
    line = next(x for x in short_summary(a).splitlines() if x.strip().startswith("adam:"))
    assert "B_crit > 512 (extrapolated above the swept batch sizes" in line
    assert "headline: B_crit" in short_summary(a)
    for text in (a.text, (run / "report.md").read_text()):
        assert "B_crit (headline)" in text and "B* (secondary)" in text
        assert "> 512 *" in text
        assert re.search(r"adam: B_crit > 512 is extrapolated above the swept batch sizes", text)
    # the fit's own text says it too
    assert "extrapolated above the swept batch sizes" in str(a.fits["adam"])
    assert "extrapolated" not in str(a.fits["sgd"]).split("B*")[0]


def test_extrapolated_b_crit_is_dashed_in_the_plots(extrapolated, monkeypatch):
    from cbs.analysis import _plots

    _, a = extrapolated
    figures = []
    monkeypatch.setattr(_plots.plt, "close", lambda fig: figures.append(fig))
    _plots.plot_all_optimizers(a.run_dir / "all.png", a.fits, "examples")
    _plots.plot_steps_vs_batch(a.run_dir / "svb.png", a.fits, a.steps, "examples", 1)
    _plots.plot_compare(a.run_dir / "cmp.png", {"r": a.fits}, "examples")

    def crit_lines(fig, b):
        return [
            ln
            for ax in fig.axes
            for ln in ax.get_lines()
            if np.allclose(np.asarray(ln.get_xdata(), float)[-1:], b)
        ]

    for fig in figures:
        sgd = crit_lines(fig, a.fits["sgd"].b_crit)
        adam = crit_lines(fig, a.fits["adam"].b_crit)
        assert sgd and adam
        assert all(ln.get_linestyle() != "--" for ln in sgd)
        # the extrapolated one: a dashed line (B_crit's vertical or the fit's continuation),
        # and wherever a marker shows it, a hollow one
        assert any(ln.get_linestyle() == "--" for ln in adam), [ln.get_linestyle() for ln in adam]
        for ln in adam:
            if ln.get_marker() not in ("None", "", None):
                assert ln.get_markerfacecolor() == "none"
        labels = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().texts]
        assert any("> 512 (extrapolated" in t for t in labels), labels


def _with_tuned(run):
    """A tuned.parquet faster than the grid at half the batch sizes (as the NQM writes)."""
    results = pd.read_parquet(run / "results.parquet")
    best = results[results.reached].groupby(["optimizer", "batch_size", "seed"]).steps_to_target
    grid = best.min().reset_index()
    rows = grid.iloc[::2].copy()
    rows["steps_to_target"] = np.floor(rows["steps_to_target"] * 0.97)
    rows["lr"], rows["reached"], rows["kind"] = 0.0123, True, rows["optimizer"]
    rows["hp_momentum"] = np.where(rows["optimizer"] == "sgd", 0.9, 0.0)
    rows.to_parquet(run / "tuned.parquet", index=False)
    return rows


def test_terminal_table_and_report_show_the_same_numbers_labelled(tmp_path):
    run = write_synthetic_run(tmp_path / "run", batch_sizes=SMALL, seeds=(0,), noise=0.0)
    tuned = _with_tuned(run)
    a = analyze_run(run, n_boot=20, plots=True)
    terminal = best_steps_text(a)
    report = (run / "report.md").read_text()
    assert "tuned = the NQM back end's optimum" in terminal and "grid = the best swept" in report
    for r in a.per_batch.itertuples(index=False):
        cell = f"{format_number(r.steps)} @ {format_number(r.best_lr)}"
        is_tuned = ((tuned.optimizer == r.optimizer) & (tuned.batch_size == r.batch_size)).any()
        assert (r.source == "tuned") == is_tuned
        assert (cell + (" tuned" if is_tuned else "")) in terminal, cell
        # report.md's row for this batch size: the same steps and LR
        row = next(
            line
            for line in report.split(f"## {r.optimizer}\n", 1)[1].splitlines()
            if line.startswith(f"| {format_number(r.batch_size)} |")
        )
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == format_number(r.steps) and cells[3] == format_number(r.best_lr)
        # the grid's own optimum beside it (what the sweep printed without analysis)
        assert cells[5] == f"{format_number(r.grid_steps)} @ {format_number(r.grid_best_lr)}"
        if is_tuned:
            assert r.grid_steps > r.steps and "tuned" in row


def test_comparison_labels_runs_by_folder_and_leaves_inputs_alone(tmp_path):
    a = write_synthetic_run(tmp_path / "big", planted={"sgd": PLANTED["sgd"]}, seeds=(0,))
    b = write_synthetic_run(
        tmp_path / "small", planted={"sgd": PLANTED["sgd"]}, seeds=(0,), batch_sizes=SMALL
    )
    before = {p: p.stat().st_mtime_ns for d in (a, b) for p in d.iterdir()}
    comp = compare_runs([a, b], out=tmp_path / "cmp", plots=False, n_boot=20)
    assert list(dict.fromkeys(comp.table["run"])) == ["big", "small"]
    assert "#2" not in comp.text
    assert {p: p.stat().st_mtime_ns for d in (a, b) for p in d.iterdir()} == before
    assert "big = `" in (tmp_path / "cmp" / "compare.md").read_text()


def test_too_few_steps_to_separate_batch_sizes_warns(tmp_path):
    run = write_synthetic_run(
        tmp_path / "run", planted={"sgd": (3.0, 3.0 * 64)}, seeds=(0,), noise=0.0
    )
    a = analyze_run(run, plots=False, n_boot=0)
    w = [x for x in a.fits["sgd"].warnings if "too few steps" in x]
    assert len(w) == 1 and "below 10 at B = " in w[0]
    clean = analyze_run(
        write_synthetic_run(tmp_path / "ok", planted={"sgd": PLANTED["sgd"]}, seeds=(0,)),
        plots=False,
        n_boot=0,
    )
    assert not any("too few steps" in x for x in clean.fits["sgd"].warnings)


def test_noise_scale_per_batch_size_against_a_hand_count(tmp_path):
    results = pd.DataFrame(
        dict(
            cell_id=["a", "b", "c", "d"],
            optimizer="sgd",
            batch_size=[8, 8, 8, 32],
            reached=[True, True, False, False],
            diverged=[False, False, False, False],
        )
    )
    noise = pd.DataFrame(
        dict(
            cell_id=["a", "a", "b", "b", "c", "d", "d"],
            step=[10, 20, 10, 30, 40, 10, 20],
            b_simple=[1.0, 5.0, 2.0, 9.0, 100.0, 3.0, 4.0],
        )
    )
    got = noise_per_batch(results, noise).set_index("batch_size")
    # B = 8: the last evaluations of the cells that reached the target (5 and 9; c did not)
    assert got.loc[8, "b_simple"] == 7.0 and got.loc[8, "at"] == "target"
    # B = 32: no cell reached it: its non-diverged cells' last evaluation, marked as such
    assert got.loc[32, "b_simple"] == 4.0 and got.loc[32, "at"] == "last evaluation"
    assert noise_per_batch(results, None) is None


def test_noise_scale_lands_in_summary_report_and_plot(tmp_path):
    run = write_synthetic_run(tmp_path / "run", planted={"sgd": PLANTED["sgd"]}, seeds=(0,))
    results = pd.read_parquet(run / "results.parquet")
    noise = results[["cell_id", "batch_size"]].assign(
        step=100, b_simple=lambda d: 200.0 + d["batch_size"]
    )
    noise.drop(columns="batch_size").to_parquet(run / "noise_scale.parquet", index=False)
    a = analyze_run(run, n_boot=0)
    sizes = sorted(results.batch_size.unique())
    assert a.summary["b_simple"].iloc[0] == pytest.approx(200 + np.median(sizes))
    report = (run / "report.md").read_text()
    assert "## Gradient noise scale" in report and "![noise scale](noise_scale.png)" in report
    assert (run / "noise_scale.png").exists() and "B_simple (measured)" in a.text
    assert "measured B_simple ~" in short_summary(a)


def _fake_cfg(tmp_path, **over):
    from conftest import fake_config

    path = tmp_path / "fake.yaml"
    path.write_text(yaml.safe_dump(fake_config(tmp_path, **over)))
    return str(path)


def test_dry_run_bounds_the_adaptive_rounds_and_the_sweep_keeps_to_it(
    tmp_path, fake_backend, capsys
):
    from cbs.sweep.__main__ import main
    from cbs.sweep.config import load_config
    from cbs.sweep.runner import plan, plan_estimate, run_sweep

    cfg_path = _fake_cfg(tmp_path)
    over = ["grid.adaptive.enabled=true"]
    assert main([cfg_path, *over, "--dry-run"]) == 0
    out = capsys.readouterr().out
    cfg = load_config(cfg_path, over)
    est = plan_estimate(cfg, plan(cfg))
    first, bound = est["cells"], est["max_adaptive_cells"]
    assert f"add at most {bound} cells" in out and f"at most {first + bound} cells" in out
    assert "no time model for backend fake" in out
    summary = run_sweep(cfg, progress=False, log=lambda s: None)
    assert first < summary.cells <= first + bound  # rounds ran, within the promise
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_a_shell_split_override_gets_the_quoting_hint(tmp_path, fake_backend, capsys):
    from cbs.sweep.__main__ import main

    cfg_path = _fake_cfg(tmp_path)
    # what bash makes of grid.batch_sizes={log2_min:2,log2_max:10,step:2}
    split = [
        "grid.batch_sizes=log2_min:2",
        "grid.batch_sizes=log2_max:10",
        "grid.batch_sizes=step:2",
    ]
    assert main([cfg_path, *split, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "quote the override" in err[0]
    assert main([cfg_path, "target.value=-1", "--dry-run"]) == 2
    assert "quote" not in capsys.readouterr().err


def test_predict_text_explains_the_p_mapping_and_an_anchor_only_measurement():
    from types import SimpleNamespace

    from cbs.predict._run import PRECOND_NOTE, _text

    table = pd.DataFrame(
        dict(
            optimizer="adam",
            batch_size=[4, 16],
            steps_forecast=[100.0, 30.0],
            steps_measured=[np.nan, 28.0],  # the anchor (16) filled by with_anchor
            lr_forecast=[1e-3, 2e-3],
        )
    )
    summ = pd.DataFrame(
        dict(
            optimizer=["adam"],
            b_crit_forecast=[20.0],
            b_crit_measured=[np.nan],
            b_crit_measured_lo=[np.nan],
            b_crit_measured_hi=[np.nan],
            ratio=[np.nan],
            b_simple=[10.0],
            b_simple_ratio=[np.nan],
            b_noise=[12.0],
            b_noise_ratio=[np.nan],
            mapping=["P = C^p, p = 0.04 measured from sqrt(E g_B^2) on the top eigenvectors"],
        )
    )
    cal = SimpleNamespace(
        num_top=4,
        problem=SimpleNamespace(h=np.ones(10)),
        bulk_count=6.0,
        dropped_flat_mass=0.0,
        kappa=1.0,
        notes=[],
    )
    costs = dict(
        noise_from="x",
        anchor_s=1.0,
        measure_s=1.0,
        forecast_s=1.0,
        sweep_s=np.nan,
        anchor_source="y",
    )
    text = _text(table, summ, None, cal, costs)
    assert PRECOND_NOTE in text and "p near 0" in PRECOND_NOTE
    assert "S measured: where the unfinished sweep has finished blocks" in text
    row16 = next(line for line in text.splitlines() if line.startswith("adam") and " 16 " in line)
    assert "28" in row16


def test_slurm_merge_task_does_not_inherit_the_arrays_gpus_and_memory(tmp_path):
    from cbs.sweep import slurm

    opts = slurm.parse_slurm("array=2,partition=gpu,gpus_per_task=1,mem=32G")
    text = slurm.dry_run(opts, "configs/nqm_quickstart.yaml", [], "q", tmp_path)
    array, merge = text.split("--merge-only", 1)[0], text.split("afterok", 1)[1]
    assert "--mem=32G" in array and "--gpus-per-task=1" in array
    assert "--mem" not in merge and "gpus" not in merge and "--partition=gpu" in merge
    opts = slurm.parse_slurm("array=2,partition=gpu,mem=32G,merge_mem=4G,merge_partition=cpu")
    merge = slurm.dry_run(opts, "configs/nqm_quickstart.yaml", [], "q", tmp_path).split("afterok")[
        1
    ]
    assert "--mem=4G" in merge and "--partition=cpu" in merge
