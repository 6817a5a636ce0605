"""End-to-end analysis of synthetic run folders, and the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from synthetic_runs import write_synthetic_run

from cbs.analysis import AnalysisError, analyze_run, compare_runs, print_summary

PLANTED = {"sgd": (800.0, 800.0 * 256), "adam": (400.0, 400.0 * 1024)}  # (S_min, E_min)


def test_analyze_run_writes_every_file_and_recovers_planted_cbs(tmp_path):
    run = write_synthetic_run(tmp_path / "run")
    pd.DataFrame(
        dict(name="lower_bound", batch_size=[8, 64, 512, 4096], steps=[100.0, 50, 20, 10])
    ).to_parquet(run / "reference.parquet")
    analysis = analyze_run(run)
    summary, text = analysis
    for name in (
        "cbs.json",
        "cbs.parquet",
        "steps_vs_batch.png",
        "best_lr.png",
        "data_efficiency.png",
        "report.md",
    ):
        assert (run / name).stat().st_size > 0, name
    assert list(summary["optimizer"]) == ["sgd", "adam"]
    for opt, (s_min, e_min) in PLANTED.items():
        row = summary.set_index("optimizer").loc[opt]
        assert row["b_crit"] == pytest.approx(e_min / s_min, rel=0.25)
        assert row["b_crit_ci_low"] <= row["b_crit"] <= row["b_crit_ci_high"]
        assert row["b_star"] == pytest.approx(1.2 * 8 + 0.2 * row["b_crit"])
    payload = json.loads((run / "cbs.json").read_text())
    assert set(payload["optimizers"]) == {"sgd", "adam"}
    assert "B_crit" in text and "best LR" in text
    report = (run / "report.md").read_text()
    assert "steps_vs_batch.png" in report and "best_lr.png" in report
    # The LR grid's top end diverges and the optimum at the largest B sits at the grid's edge.
    sgd = analysis.per_batch[analysis.per_batch["optimizer"] == "sgd"]
    assert sgd["n_diverged"].sum() > 0
    assert sgd["best_effective_lr"].iloc[0] == pytest.approx(sgd["best_lr"].iloc[0] / 0.1)


def test_tokens_unit_scales_every_batch_size(tmp_path):
    run = write_synthetic_run(tmp_path / "run", tokens_per_example=128, seeds=(0,), noise=0.0)
    summary, _ = analyze_run(run, plots=False, n_boot=50)
    row = summary.set_index("optimizer").loc["sgd"]
    assert row["unit"] == "tokens"
    assert row["b_crit"] == pytest.approx(256 * 128, rel=0.02)
    assert row["b_crit_examples"] == pytest.approx(256, rel=0.02)
    examples, _ = analyze_run(run, plots=False, n_boot=50, unit="examples")
    assert examples.set_index("optimizer").loc["sgd", "b_crit"] == pytest.approx(256, rel=0.02)


def test_unfinished_run_reads_parts_and_tuned_table_is_preferred(tmp_path):
    run = write_synthetic_run(
        tmp_path / "run", final=False, planted={"sgd": PLANTED["sgd"]}, seeds=(0,)
    )
    bs = [2**k for k in range(3, 14)]
    tuned = pd.DataFrame(
        dict(
            optimizer="sgd",
            kind="sgd",
            batch_size=bs,
            seed=0,
            steps_to_target=[500 * (1 + 100 / b) for b in bs],
            reached=True,
            lr=0.05,
            hp_momentum=0.9,
            grid_steps_to_target=np.nan,
            grid_lr=0.05,
        )
    )
    tuned.to_parquet(run / "tuned.parquet")
    a = analyze_run(run, plots=False, n_boot=50)
    assert any("unfinished" in w for w in a.warnings)
    assert a.summary["b_crit"].iloc[0] == pytest.approx(100, rel=1e-3)
    b = analyze_run(run, plots=False, n_boot=50, use_tuned=False)
    assert b.summary["b_crit"].iloc[0] == pytest.approx(256, rel=0.3)


def test_censored_batch_sizes_are_excluded_and_warned(tmp_path):
    # A budget that the smallest batch sizes cannot meet.
    run = write_synthetic_run(
        tmp_path / "run", planted={"sgd": PLANTED["sgd"]}, max_steps=12_000, noise=0.0
    )
    a = analyze_run(run, plots=False, n_boot=50)
    fit = a.fits["sgd"]
    assert fit.censored[:2].all() and not fit.censored[3:].any()
    assert any("most seeds censored" in w for w in fit.warnings)
    assert np.isnan(fit.steps[0])


def test_compare_runs_and_scaling_law(tmp_path):
    runs = []
    for i, n_params in enumerate([1e6, 4e6, 16e6]):
        b_crit = 64 * (n_params / 1e6) ** 0.5
        runs.append(
            write_synthetic_run(
                tmp_path / f"r{i}",
                planted={"adam": (300.0, 300.0 * b_crit)},
                seeds=(0,),
                noise=0.02,
                name=f"model{i}",
                extra_config={"model": {"params": n_params}},
                rng_seed=i,
            )
        )
    out = tmp_path / "cmp"
    comp = compare_runs(runs, out=out, scale_key="model.params", n_boot=100)
    assert comp.scaling["adam"].exponent == pytest.approx(0.5, abs=0.1)
    for name in (
        "compare.md",
        "compare.parquet",
        "compare.json",
        "compare_steps_vs_batch.png",
        "scaling_b_crit.png",
    ):
        assert (out / name).exists(), name
    with pytest.raises(AnalysisError):
        compare_runs(runs, scale_key="model.nonexistent")


def test_print_summary_for_the_runner(tmp_path, capsys):
    run = write_synthetic_run(tmp_path / "run", seeds=(0,))
    print_summary(run, n_boot=20, plots=False)
    out = capsys.readouterr().out
    assert "sgd: B_crit" in out and "adam: B_crit" in out


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "cbs.analyze", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


@pytest.mark.parametrize("make_bad", ["missing", "file", "empty_dir", "bad_parquet"])
def test_cli_bad_run_folder_exits_2_with_one_line(tmp_path, make_bad):
    bad = tmp_path / "bad"
    if make_bad == "file":
        bad.write_text("x")
    elif make_bad == "empty_dir":
        bad.mkdir()
    elif make_bad == "bad_parquet":
        bad.mkdir()
        (bad / "results.parquet").write_text("not parquet")
    proc = _cli(bad)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert str(bad.name) in proc.stderr


def test_cli_analyzes_and_compares(tmp_path):
    r1 = write_synthetic_run(tmp_path / "a", seeds=(0,), name="a")
    r2 = write_synthetic_run(tmp_path / "b", seeds=(0,), name="b", rng_seed=3)
    proc = _cli(r1, r2, "--bootstrap", "30", "--no-plots", "--out", tmp_path / "cmp")
    assert proc.returncode == 0, proc.stderr
    assert "B_crit" in proc.stdout and "comparison" in proc.stdout
    assert (tmp_path / "cmp" / "compare.md").exists()
    help_text = _cli("--help").stdout
    for option in ("--delta", "--b0", "--bootstrap", "--units", "--scale-key", "--out", "--form"):
        assert option in help_text


def test_steps_table_min_over_configs_excludes_diverged_and_keeps_censored():
    from cbs.analysis import per_batch_table, steps_table

    base = dict(
        optimizer="sgd",
        kind="sgd",
        seed=0,
        max_steps=1000,
        final_metric=0.1,
        best_metric=0.1,
        hp_momentum=0.5,
    )
    rows = [
        # B = 8: the fastest config diverged later and must not count; best = lr 0.1 at 300 steps.
        dict(base, batch_size=8, lr=0.01, reached=True, diverged=False, steps_to_target=500.0),
        dict(base, batch_size=8, lr=0.1, reached=True, diverged=False, steps_to_target=300.0),
        dict(base, batch_size=8, lr=1.0, reached=True, diverged=True, steps_to_target=100.0),
        # B = 16: nothing reached -> censored; best LR is the one that got closest.
        dict(
            base,
            batch_size=16,
            lr=0.01,
            reached=False,
            diverged=False,
            steps_to_target=np.nan,
            best_metric=0.5,
        ),
        dict(
            base,
            batch_size=16,
            lr=0.1,
            reached=False,
            diverged=False,
            steps_to_target=np.nan,
            best_metric=0.2,
        ),
        dict(
            base,
            batch_size=16,
            lr=1.0,
            reached=False,
            diverged=True,
            steps_to_target=np.nan,
            best_metric=np.inf,
        ),
    ]
    table = steps_table(pd.DataFrame(rows))
    b8, b16 = table.iloc[0], table.iloc[1]
    assert b8["steps"] == 300 and not b8["censored"] and b8["n_diverged"] == 1
    assert (
        b8["best_lr"] == 0.1
        and b8["best_effective_lr"] == pytest.approx(0.2)
        and b8["lr_at_edge"] == ""
    )
    assert np.isnan(b16["steps"]) and b16["censored"] and b16["n_censored_cells"] == 2
    assert b16["best_lr"] == 0.1
    per_b = per_batch_table(table)
    assert per_b["censored"].tolist() == [False, True]
    assert per_b["n_diverged"].tolist() == [1, 1]


def test_best_lr_at_grid_edge_is_warned(tmp_path):
    # The LR optimum grows as sqrt(B) and leaves a grid that stops at 0.1.
    run = write_synthetic_run(
        tmp_path / "run",
        planted={"sgd": PLANTED["sgd"]},
        lrs=tuple(np.logspace(-3, -1, 5)),
        seeds=(0,),
    )
    a = analyze_run(run, plots=False, n_boot=20)
    assert any("high edge of the LR grid" in w for w in a.fits["sgd"].warnings)
    assert (a.per_batch["lr_at_edge"] == "high").sum() >= 3


def test_coarse_evaluation_and_misfit_are_warned(tmp_path):
    # S_min = 400 steps evaluated every 100 steps: 25% quantization at the largest B.
    run = write_synthetic_run(
        tmp_path / "run",
        planted={"adam": PLANTED["adam"]},
        seeds=(0,),
        extra_config={"budget": {"max_steps": 100_000, "eval_every": 100}},
    )
    a = analyze_run(run, plots=False, n_boot=20)
    assert any("eval_every=100" in w for w in a.fits["adam"].warnings)
    # A curve with a much sharper knee than the McCandlish form (alpha = 3).
    bs = 2.0 ** np.arange(3, 14)
    from cbs.analysis import fit_critical_batch_size

    fit = fit_critical_batch_size(bs, 100 * (1 + (512 / bs) ** 3), n_boot=0)
    assert any("misses the table" in w for w in fit.warnings)
    general = fit_critical_batch_size(bs, 100 * (1 + (512 / bs) ** 3), n_boot=0, form="general")
    assert not any("misses the table" in w for w in general.warnings)
    assert general.alpha == pytest.approx(3.0, abs=0.05)


def test_interpolated_steps_are_used_on_request(tmp_path):
    run = write_synthetic_run(tmp_path / "run", planted={"sgd": PLANTED["sgd"]}, seeds=(0,))
    results = pd.read_parquet(run / "results.parquet")
    results["steps_interpolated"] = results["steps_to_target"] * 0.5
    results.to_parquet(run / "results.parquet")
    first = analyze_run(run, plots=False, n_boot=0).summary["s_min"].iloc[0]
    half = analyze_run(run, plots=False, n_boot=0, interpolated=True).summary["s_min"].iloc[0]
    assert half == pytest.approx(first / 2, rel=1e-6)
    results.drop(columns="steps_interpolated").to_parquet(run / "results.parquet")
    with pytest.raises(AnalysisError, match="steps_interpolated"):
        analyze_run(run, plots=False, interpolated=True)


def test_cli_scale_values_and_quiet(tmp_path):
    runs = [
        write_synthetic_run(
            tmp_path / f"r{i}",
            planted={"adam": (300.0, 300.0 * 64 * 2**i)},
            seeds=(0,),
            name=f"m{i}",
            rng_seed=i,
        )
        for i in range(3)
    ]
    proc = _cli(*runs, "--scale-values", "1,4,16", "--bootstrap", "30", "--no-plots", "--quiet")
    assert proc.returncode == 0, proc.stderr
    import re

    exponent = float(re.search(r"B_crit: y = \S+ \[[^]]*\] \* x\^([0-9.]+)", proc.stdout).group(1))
    assert exponent == pytest.approx(0.5, abs=0.1)
    bad = _cli(*runs, "--scale-values", "1,4", "--no-plots")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
