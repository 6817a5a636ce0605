"""Many processes on one run folder: shards, duplicates, kills, the merge lock, balancing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml
from cbs_test_backends import sweep_command
from conftest import fake_config

from cbs.store import RunStore, read_sessions
from cbs.sweep.config import load_config
from cbs.sweep.runner import run_sweep, shard_blocks
from cbs.sweep.shards import cost_assignment, hash_assignment, imbalance, refine_costs

TESTS = os.path.dirname(__file__)


def _env():
    return {
        **os.environ,
        "PYTHONPATH": TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "CBS_JAX_CACHE": "off",
        "JAX_PLATFORMS": "cpu",
    }


def _slow_config(tmp_path, n_batch=10):
    raw = fake_config(tmp_path, backend="cbs_test_backends:SlowBackend")
    raw["grid"]["batch_sizes"] = [2**k for k in range(n_batch)]  # 2 * n_batch blocks, 0.1 s each
    path = tmp_path / "slow.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


_cmd = sweep_command


def _table(out):
    df = pd.read_parquet(out / "results.parquet")
    return df[[c for c in df.columns if c != "host"]]


def _merges(out):
    return sum(bool(s.get("merged")) for s in read_sessions(out))


def test_two_shards_at_once_one_sigkilled_and_rerun_give_the_single_process_table(tmp_path):
    cfg_path = _slow_config(tmp_path, n_batch=16)  # 32 blocks of 0.1 s, 16 per shard
    env = _env()
    subprocess.run(
        _cmd(cfg_path, tmp_path / "whole"), env=env, check=True, capture_output=True, timeout=300
    )
    manifest = json.loads((tmp_path / "whole" / "manifest.json").read_text())
    costs = {b["block_id"]: b["cost"] for b in manifest["blocks"]}
    cfg = load_config(cfg_path, [f"output.dir={tmp_path / 'x'}"])
    from cbs.sweep.runner import plan

    shard1 = {b.block_id for b in shard_blocks(plan(cfg), (1, 2), costs)}
    out = tmp_path / "sharded"
    procs = [
        subprocess.Popen(
            _cmd(cfg_path, out, "--shard", f"{i}/2"),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    parts = out / "parts" / "results"
    deadline = time.time() + 120
    while time.time() < deadline and len({p.stem for p in parts.glob("*.parquet")} & shard1) < 2:
        time.sleep(0.01)
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait()
    _, err = procs[0].communicate(timeout=300)
    assert procs[0].returncode == 0, err
    killed_early = not shard1 <= {p.stem for p in parts.glob("*.parquet")}
    if killed_early:  # (a starved poller may kill shard 1 only after its last block)
        assert not (out / "results.parquet").exists()  # shard 1 is not done: nothing merged
    rerun = subprocess.run(
        _cmd(cfg_path, out, "--shard", "1/2"), env=env, capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr
    pd.testing.assert_frame_equal(_table(tmp_path / "whole"), _table(out))
    assert _merges(out) == 1
    sessions = read_sessions(out)
    assert (
        len(sessions) == 3 and sum("ended" in s for s in sessions) == 2
    )  # the killed one never ended
    manifest = json.loads((out / "manifest.json").read_text())
    # The merge records the sessions that existed when it ran (all three when shard 1 was
    # killed early, else perhaps before the re-run) and the measured block times (all but at
    # most the one block whose part landed between the kill's last session update and the kill).
    assert len(manifest["sessions"]) == (3 if killed_early else len(manifest["sessions"]))
    assert len(manifest["sessions"]) >= 2 and len(manifest["block_seconds"]) >= 31


def test_two_identical_unsharded_processes_never_duplicate_or_lose_rows(tmp_path):
    cfg_path = _slow_config(tmp_path, n_batch=6)
    env = _env()
    subprocess.run(
        _cmd(cfg_path, tmp_path / "whole"), env=env, check=True, capture_output=True, timeout=300
    )
    out = tmp_path / "twice"
    procs = [
        subprocess.Popen(
            _cmd(cfg_path, out), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    df = _table(out)
    assert df["cell_id"].is_unique
    pd.testing.assert_frame_equal(_table(tmp_path / "whole"), df)
    assert _merges(out) == 1


def test_merge_lock_excludes_and_recovers_from_a_dead_holder(tmp_path):
    store = RunStore(tmp_path)
    tmp_path.mkdir(exist_ok=True)
    with store.lock("merge"):
        from cbs.store import LockBusy

        with pytest.raises(LockBusy):
            with store.lock("merge", wait_s=0.1):
                pass
    assert not (tmp_path / "merge.lock").exists()
    # A holder that was SIGKILLed: its pid is gone, so the lock is broken at once.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    (tmp_path / "merge.lock").write_text(
        json.dumps(
            {"host": socket.gethostname(), "pid": dead.pid, "time": time.time(), "token": "x"}
        )
    )
    with store.lock("merge"):
        assert json.loads((tmp_path / "merge.lock").read_text())["pid"] == os.getpid()
    # A live holder on another host is respected until the lock is older than stale_s.
    (tmp_path / "merge.lock").write_text(
        json.dumps({"host": "elsewhere", "pid": 1, "time": time.time() - 50, "token": "y"})
    )
    from cbs.store import LockBusy

    with pytest.raises(LockBusy):
        with store.lock("merge", stale_s=100):
            pass
    with store.lock("merge", stale_s=10):
        pass
    assert not (tmp_path / "merge.lock").exists()


def test_rerun_of_a_finished_sweep_does_not_merge_again(fake_backend, tmp_path):
    cfg = load_config(fake_config(tmp_path))
    calls = []
    first = run_sweep(cfg, progress=False, finalize=lambda: calls.append(1))
    again = run_sweep(cfg, progress=False, finalize=lambda: calls.append(2))
    assert first.merged and not again.merged and again.complete
    assert calls == [1, 2]  # the re-run still shows the analysis (it computed nothing)


def test_cost_assignment_is_deterministic_balanced_and_covers_every_block():
    rng = __import__("numpy").random.default_rng(0)
    costs = {f"b{i}": float(c) for i, c in enumerate(rng.lognormal(0, 1.5, 60))}
    a = cost_assignment(costs, 4)
    assert a == cost_assignment(
        dict(reversed(list(costs.items()))), 4
    )  # insertion order is irrelevant
    assert set(a) == set(costs) and set(a.values()) == {0, 1, 2, 3}
    assert imbalance(a, costs, 4) < 1.05 < imbalance(hash_assignment(list(costs), 4), costs, 4)
    # LPT on a case with a known optimum: 3,3,2,2,2 on 2 shards -> LPT gives 7 vs optimum 6.
    lpt = cost_assignment({"a": 3, "b": 3, "c": 2, "d": 2, "e": 2}, 2)
    assert imbalance(lpt, {"a": 3, "b": 3, "c": 2, "d": 2, "e": 2}, 2) == pytest.approx(7 / 6)


def test_refined_costs_use_measured_times_and_kind_ratios():
    est = {"a": 10.0, "b": 20.0, "c": 5.0, "k": 1.0}
    cells = {"a": 4, "b": 4, "c": 4, "k": 2}
    kinds = {"a": "sgd", "b": "sgd", "c": "sgd", "k": "kfac"}
    out = refine_costs(est, cells, kinds, {"a": (8.0, 2), "b": (4.0, 4)})
    assert out["a"] == 16.0 and out["b"] == 4.0  # measured, scaled by cells now / then
    ratios = sorted([16.0 / 10.0, 4.0 / 20.0])
    assert out["c"] == pytest.approx(5.0 * (ratios[0] + ratios[1]) / 2)
    assert out["k"] == pytest.approx(
        1.0 * (ratios[0] + ratios[1]) / 2
    )  # unmeasured kind: overall median
    assert refine_costs(est, cells, kinds, {}) == est


def test_shards_follow_the_costs_frozen_in_the_manifest(fake_backend, tmp_path):
    cfg = load_config(fake_config(tmp_path))
    run_sweep(cfg, progress=False, shard=(0, 2))
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    costs = {b["block_id"]: b["cost"] for b in manifest["blocks"]}
    # default estimate: cells x budget x batch size
    assert costs["heavy__B16"] == 12 * 10_000 * 16 and costs["plain__B1"] == 6 * 10_000 * 1
    from cbs.sweep.runner import plan

    mine = {b.block_id for b in shard_blocks(plan(cfg), (0, 2), costs)}
    assert {b.split("|")[0] for b in RunStore(tmp_path / "run").finished_blocks()} == mine
    assert (
        "heavy__B16" in mine and "plain__B16" not in mine
    )  # the two largest go to different shards


def test_train_cost_estimate_counts_the_per_cell_overhead_and_the_compute():
    # Compile-bound CPU blocks take about the same time whatever their batch size; an estimate
    # proportional to FLOPs alone put B = 1024 at ~50x B = 8 and unbalanced 8 shards (1.5-1.7).
    from cbs.sweep.backend import get_backend
    from cbs.sweep.runner import plan

    cfg = load_config(
        {
            "name": "cost",
            "backend": "train",
            "grid": {
                "batch_sizes": [8, 1024],
                "learning_rates": [0.1, 0.3],
                "seeds": [0],
                "optimizers": [{"kind": "sgd"}, {"kind": "kfac"}],
            },
            "target": {"metric": "val_loss", "value": 0.05},
            "budget": {"max_steps": 300, "eval_every": 10},
            "train": {"dataset": "digits", "model": "mlp", "width": 32, "depth": 1},
        }
    )
    backend = get_backend(cfg.backend)(cfg)
    cost = {(b.kind, b.batch_size): backend.block_cost(b) for b in plan(cfg)}
    assert all(c > 0 for c in cost.values())
    assert cost[("sgd", 8)] < cost[("sgd", 1024)] < 10 * cost[("sgd", 8)]
    assert cost[("sgd", 1024)] < cost[("kfac", 1024)]  # K-FAC's curvature work on top
    overhead_s, _ = backend.NOMINAL_COST["cpu"]
    assert cost[("sgd", 8)] > 2 * overhead_s  # two cells, each overhead + compute


def _single_process_table(cfg_path, tmp_path):
    """The reference table, computed in this process (no interpreter start to pay)."""
    run_sweep(load_config(cfg_path, [f"output.dir={tmp_path / 'whole'}"]), progress=False)
    return _table(tmp_path / "whole")


def test_sigint_mid_block_then_resume_gives_the_single_process_table(tmp_path, capsys):
    from cbs.sweep.__main__ import main

    cfg_path = _slow_config(tmp_path, n_batch=8)  # 16 blocks of 0.1 s: a signal lands mid-block
    out = tmp_path / "interrupted"
    proc = subprocess.Popen(
        _cmd(cfg_path, out), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    parts = out / "parts" / "results"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("*.parquet"))) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and len(err.strip().splitlines()) == 1, err
    assert "interrupted" in err and not (out / "results.parquet").exists()
    done = len(list(parts.glob("*.parquet")))
    assert 3 <= done < 16 and not list(parts.glob(".*"))  # no torn part left behind
    capsys.readouterr()
    assert main(_cmd(cfg_path, out)[3:]) == 0  # the same command, resumed
    assert "resumed from disk" in capsys.readouterr().out
    pd.testing.assert_frame_equal(_single_process_table(cfg_path, tmp_path), _table(out))


def test_merge_racing_a_late_shard_merges_once_and_never_early(tmp_path, capsys):
    """Shard 0 is done while shard 1 still computes (another process); --merge-only runs
    again and again meanwhile: each refuses (blocks unfinished) or finds the merge done,
    results.parquet appears only once every block is, and the table is the single-process one."""
    from cbs.sweep.__main__ import main

    cfg_path = _slow_config(tmp_path, n_batch=12)
    out = tmp_path / "race"
    late = subprocess.Popen(
        _cmd(cfg_path, out, "--shard", "1/2"),
        env={**_env(), "CBS_TEST_BLOCK_S": "0.3"},  # 12 blocks, 3.6 s: surely the late one
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # shard 0 here, meanwhile: it computes its half and (shard 1 not done) cannot merge
    assert main(_cmd(cfg_path, out, "--shard", "0/2")[3:]) == 0
    outcomes = []
    while True:
        running = late.poll() is None
        capsys.readouterr()
        code = main(_cmd(cfg_path, out, "--merge-only")[3:])
        lines = capsys.readouterr().err.strip().splitlines()
        if code == 1:
            assert len(lines) == 1 and ("not finished" in lines[0] or "pending" in lines[0]), lines
            assert not (out / "results.parquet").exists()  # nothing merged early
        else:
            assert code == 0, lines
        outcomes.append(code)
        if not running:
            break
        time.sleep(0.05)
    _, err = late.communicate(timeout=300)
    assert late.returncode == 0, err
    assert outcomes[-1] == 0 and 1 in outcomes  # refused while late, merged after
    pd.testing.assert_frame_equal(_single_process_table(cfg_path, tmp_path), _table(out))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["merged"]["parts"] == RunStore(out).parts_signature()
