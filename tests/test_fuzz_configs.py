"""Fuzz harness: every shipped config, mutated (types, ranges, keys, file-system cases), must
be refused by the CLI with exit status 2, one line on stderr, no traceback, nothing on
stdout, and the output folder exactly as it was (absent, or its files unchanged).

The mutations run through ``cbs.sweep.__main__.main`` in-process (the same code path as
the command line, without paying a JAX import per case); a handful run as real
subprocesses. A mutation that were accepted would reach the back end, which is patched to
fail loudly, so an accepted mutation is a test failure, never a long computation.
"""

from __future__ import annotations

import copy
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cbs.nqm.backend import NQMBackend
from cbs.sweep.__main__ import main
from cbs.train.backend import TrainBackend

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
UNKNOWN = "zz_unknown_key"
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

# Strings are free text only here; anywhere else "no such value!" is invalid (not a name,
# kind, metric or dataset: it has a space and a '!').
FREE_TEXT = {("output", "dir")}


def _leaves(node, path=()):
    """(path, value) of every leaf and every mapping/list of a raw YAML tree."""
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, path + (i,))


def _set(raw, path, value):
    raw = copy.deepcopy(raw)
    node = raw
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return raw


def _mutations(raw):
    """(description, mutated raw config) pairs; each one is invalid by construction."""
    for path, value in _leaves(raw):
        where = ".".join(map(str, path)) or "<root>"
        if isinstance(value, dict):
            m = copy.deepcopy(value)
            m[UNKNOWN] = 1
            yield f"{where}: unknown key", _set(raw, path, m) if path else m
            if path:
                yield f"{where}: number for a mapping", _set(raw, path, 5)
        elif isinstance(value, list):
            yield f"{where}: string for a list", _set(raw, path, "not a list")
        elif isinstance(value, bool):
            yield f"{where}: string for a bool", _set(raw, path, "maybe")
            yield f"{where}: number for a bool", _set(raw, path, 2)
        elif isinstance(value, (int, float)):
            if isinstance(value, int) and path[-1] not in FLOAT_KEYS and path[-2] not in FLOAT_KEYS:
                yield f"{where}: integer past 2^64", _set(raw, path, 2**70)
            yield f"{where}: string for a number", _set(raw, path, "abc")
            yield f"{where}: NaN", _set(raw, path, math.nan)
            yield f"{where}: infinity", _set(raw, path, math.inf)
            yield f"{where}: bool for a number", _set(raw, path, True)
            yield f"{where}: mapping for a number", _set(raw, path, {UNKNOWN: 1})
        elif isinstance(value, str):
            if path[-2:] not in FREE_TEXT and path[-1:] not in FREE_TEXT:
                yield f"{where}: invalid string", _set(raw, path, "no such value!")
            yield f"{where}: number for a string", _set(raw, path, 7)
        elif value is None and path:
            yield f"{where}: list for a null", _set(raw, path, [[]])
    # keys every config has
    for key in ("name", "backend", "grid", "target", "budget"):
        m = copy.deepcopy(raw)
        del m[key]
        yield f"required key {key} missing", m


# Number keys a config may give as a whole number (lr: 1): 2^70 is a valid float there.
FLOAT_KEYS = {"value", "learning_rates", "lr", "momentum", "scale"}

# Bad overrides on any config: the cases of issue 15 and their neighbours.
OVERRIDES = [
    # integers past what the engine holds (issue 25), the limit named in the message
    ["grid.batch_sizes=[1180591620717411303424]"],  # 2^70
    ["grid.seeds=[18446744073709551616]"],  # 2^64
    ["budget.max_steps=1000000000000000000000000000000"],  # 10^30
    ["grid.batch_sizes={log2_min: 0, log2_max: 40}"],
    ["grid.learning_rates={log10_min: -3, log10_max: 0, num: 100000000}"],  # grid-size cap
    ["grid.learning_rates={log10_min: 300, log10_max: 400, num: 3}"],  # infinite LRs
    ["grid.learning_rates={log10_min: 0, log10_max: -3, num: 3}"],  # reversed range
    ["grid.learning_rates=[0.1, .nan]"],
    ["budget.eval_every=1000000000000"],  # eval_every > budget
    [
        "grid.optimizers.0.schedule={kind: constant, warmup_steps: 1000000000000}"
    ],  # warm-up > budget
    ["grid.optimizers.0.schedule={kind: step, boundaries: [300, 100]}"],  # unsorted boundaries
    ["grid.optimizers.0.schedule={kind: piecewise, pieces: [[1]]}"],  # malformed pieces
    ["grid.optimizers.0.schedule={kind: piecewise, pieces: [[0.5, 1.0]]}"],
    ["grid.optimizers.0.schedule={kind: piecewise, pieces: []}"],
    ["grid.optimizers.0.hparams={momentum: {log10_min: -3, log10_max: 0, num: 1000000000}}"],
    ["grid.optimizers.99.kind=sgd"],  # index out of range
    ["grid..batch_sizes=[4]"],  # malformed override
    ["grid.batch_sizes=[4, 4]"],
    ["grid.seeds=[-1]"],
    ["target=[1, 2]"],
    ["backend=os:getcwd"],  # not a back end
    ["backend=no_such_module_zz:Backend"],
    ["backend=cbs.sweep.backend:Backend"],  # abstract class
    ["name=a b"],
    ["budget.max_steps=0"],
]


@pytest.fixture
def no_compute(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise AssertionError("an invalid config was accepted and reached the back end")

    for cls in (TrainBackend, NQMBackend):
        monkeypatch.setattr(cls, "run_blocks", refuse)
        monkeypatch.setattr(cls, "manifest", refuse)


def _snapshot(folder: Path):
    if not folder.exists():
        return None
    if folder.is_file():
        return ("file", folder.read_bytes(), folder.stat().st_mode)
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None, p.stat().st_mode)
        for p in sorted(folder.rglob("*"))
    }


def _check(capsys, argv, folder: Path, what: str) -> str:
    before = _snapshot(folder)
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, f"{what}: exit {rc}; stderr: {err[-500:]}"
    assert len(lines) == 1 and "Traceback" not in err, f"{what}: {err[-800:]}"
    assert lines[0].startswith("cbs.sweep: "), f"{what}: {lines[0]}"
    assert out == "", f"{what}: printed {out[:300]!r}"
    assert _snapshot(folder) == before, f"{what}: the output folder changed"
    return lines[0]


def test_mutated_shipped_configs_are_refused_in_one_line(tmp_path, capsys, no_compute):
    out = tmp_path / "out"
    cases = 0
    for config in CONFIGS:
        raw = yaml.safe_load(config.read_text())
        raw.setdefault("output", {})["dir"] = str(out)
        for what, mutated in _mutations(raw):
            path = tmp_path / "mutated.yaml"
            path.write_text(yaml.dump(mutated, Dumper=_DUMPER, sort_keys=False))
            _check(capsys, [str(path), "--no-progress"], out, f"{config.name}: {what}")
            cases += 1
        for overrides in OVERRIDES:
            _check(
                capsys,
                [str(config), f"output.dir={out}", *overrides, "--no-progress"],
                out,
                f"{config.name}: {overrides}",
            )
            cases += 1
    print(f"fuzz: {cases} mutated configs refused")
    assert cases > 1000


def test_issue_cases_name_the_real_cause(tmp_path, capsys, no_compute):
    cfg, out = str(ROOT / "configs/train_digits_cpu.yaml"), f"output.dir={tmp_path / 'o'}"
    cases = {
        "grid.learning_rates={log10_min: -3, log10_max: 0, num: 100000000}": "grid.max_cells",
        "grid.learning_rates={log10_min: 300, log10_max: 400, num: 3}": "not a finite",
        "grid.learning_rates={log10_min: 0, log10_max: -3, num: 3}": "log10_max >= log10_min",
        "budget.eval_every=50000": "at most budget.max_steps =",
        "grid.optimizers.0.schedule={kind: cosine, warmup_steps: 50000}": "warm-up must end",
        "grid.optimizers.0.schedule={kind: step, boundaries: [300, 100]}": "strictly increasing",
        "grid.optimizers.0.schedule={kind: piecewise, pieces: [[1]]}": "pieces[0]",
        "backend=os:getcwd": "subclass of cbs.sweep.backend.Backend",
    }
    for override, fragment in cases.items():
        line = _check(capsys, [cfg, override, out], tmp_path / "o", override)
        assert fragment in line, line
    line = _check(
        capsys,
        [str(ROOT / "configs/train_tiny_lm_cpu.yaml"), "train.seq_len=1000000", out],
        tmp_path / "o",
        "seq_len",
    )
    assert "train.seq_len" in line and "-1" not in line, line


def test_grid_cap_can_be_raised(tmp_path):
    from cbs.sweep.config import load_config

    args = [
        "grid.learning_rates={log10_min: -3, log10_max: 0, num: 2000}",
        f"output.dir={tmp_path}",
    ]
    with pytest.raises(Exception, match="grid.max_cells"):
        load_config(ROOT / "configs/nqm_quickstart.yaml", args + ["grid.max_cells=100000"])
    cfg = load_config(ROOT / "configs/nqm_quickstart.yaml", args + ["grid.max_cells=1000000"])
    assert cfg.grid.max_cells == 1000000


def test_file_system_and_file_cases(tmp_path, capsys, no_compute):
    cfg = str(ROOT / "configs/nqm_quickstart.yaml")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    (tmp_path / "latin1.yaml").write_bytes(b"name: caf\xe9\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "a_dir").mkdir()
    cases = [
        ([cfg, f"output.dir={a_file}"], a_file),  # output.dir is a file
        ([cfg, f"output.dir={a_file}/sub"], a_file),  # under a file
        ([str(tmp_path / "missing.yaml")], tmp_path / "o"),
        ([str(tmp_path / "a_dir")], tmp_path / "a_dir"),
        ([str(tmp_path / "bad.yaml")], tmp_path / "o"),
        ([str(tmp_path / "latin1.yaml")], tmp_path / "o"),
        ([str(tmp_path / "list.yaml")], tmp_path / "o"),
        ([str(tmp_path / "empty.yaml")], tmp_path / "o"),
        ([cfg, "--shard", "3/2", f"output.dir={tmp_path / 'o'}"], tmp_path / "o"),
    ]
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases.append(([cfg, f"output.dir={locked}/run"], locked))
    for argv, folder in cases:
        _check(capsys, argv, folder, str(argv))


def test_unwritable_output_dir_writes_nothing(tmp_path, capsys, monkeypatch):
    """A folder that passes the up-front checks but cannot be created (here: under /proc,
    refused even to root) fails in one line at the first write."""
    cfg = str(ROOT / "configs/nqm_quickstart.yaml")
    monkeypatch.setattr(NQMBackend, "run_blocks", lambda self, blocks: pytest.fail("computed"))
    line = _check(
        capsys,
        [cfg, "grid.batch_sizes=[4]", "output.dir=/proc/cbs_no_such/run"],
        Path("/proc/cbs_no_such"),
        "/proc",
    )
    assert "/proc/cbs_no_such/run" in line


def test_changed_config_on_existing_folder_names_the_keys(tmp_path, capsys, no_compute):
    from cbs.store import RunStore
    from cbs.sweep.config import config_dict, config_hash, load_config

    out = tmp_path / "run"
    cfg = load_config(ROOT / "configs/train_digits_cpu.yaml", [f"output.dir={out}"])
    RunStore(out).initialise(config_dict(cfg), {"config_hash": config_hash(cfg)})
    steps, width = cfg.budget.max_steps, cfg.section.width
    line = _check(
        capsys,
        [
            str(ROOT / "configs/train_digits_cpu.yaml"),
            f"output.dir={out}",
            f"budget.max_steps={steps + 1000}",
            f"train.width={width + 1}",
        ],
        out,
        "changed config",
    )
    assert (
        f"budget.max_steps: {steps} → {steps + 1000}" in line
        and f"train.width: {width} → {width + 1}" in line
    ), line


def test_option_flags_may_follow_overrides(tmp_path, capsys):
    rc = main(
        [
            str(ROOT / "configs/nqm_quickstart.yaml"),
            "target.value=0.02",
            "--dry-run",
            f"output.dir={tmp_path / 'o'}",
            "grid.batch_sizes=[4,8]",
            "--no-analysis",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "target: risk < 0.02" in out and "batch sizes (2)" in out
    assert not (tmp_path / "o").exists()


def test_interrupt_during_analysis_is_one_line_exit_130(
    tmp_path, capsys, monkeypatch, fake_backend
):
    from conftest import fake_config

    import cbs.analysis

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cbs.analysis, "print_summary", interrupted)
    path = tmp_path / "fake.yaml"
    path.write_text(yaml.safe_dump(fake_config(tmp_path)))
    rc = main([str(path), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 130 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "interrupted" in err


def test_interrupt_swallowed_by_a_library_is_still_exit_130(
    tmp_path, capsys, monkeypatch, fake_backend
):
    # JAX's tracing has a bare `except: pass` that can eat a KeyboardInterrupt and then raise an
    # unrelated Exception; the CLI must still report an interruption, not an internal error.
    from conftest import fake_config

    import cbs.analysis

    def swallowing_library(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.0)
        except:  # noqa: E722 - imitates the library
            pass
        raise Exception("couldn't apply typeof to args")

    monkeypatch.setattr(cbs.analysis, "print_summary", swallowing_library)
    path = tmp_path / "fake.yaml"
    path.write_text(yaml.safe_dump(fake_config(tmp_path)))
    rc = main([str(path), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 130 and len(err.strip().splitlines()) == 1, err
    assert "interrupted" in err and "internal error" not in err


SUBPROCESS = [
    [
        "configs/train_digits_cpu.yaml",
        "grid.optimizers.0.schedule={kind: piecewise, pieces: [[1]]}",
    ],
    [
        "configs/nqm_quickstart.yaml",
        "grid.learning_rates={log10_min: -3, log10_max: 0, num: 100000000}",
    ],
    ["configs/nqm_quickstart.yaml", "backend=os:getcwd"],
    ["configs/train_tiny_lm_cpu.yaml", "train.seq_len=1000000"],
]


@pytest.mark.parametrize("args", SUBPROCESS, ids=lambda a: a[-1][:40])
def test_cli_process_refuses_in_one_line(tmp_path, args):
    out = tmp_path / "o"
    proc = subprocess.run(
        [sys.executable, "-m", "cbs.sweep", *args, f"output.dir={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, (
        proc.stderr
    )
    assert not out.exists()


def test_sigint_mid_sweep_is_one_line_exit_130_and_resumable(tmp_path):
    out = tmp_path / "o"
    cmd = [
        sys.executable,
        "-m",
        "cbs.sweep",
        "configs/train_digits_cpu.yaml",
        f"output.dir={out}",
        "grid.batch_sizes=[8,16,32,64]",
        "grid.optimizers=[{kind: sgd}]",
        "--no-progress",
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    deadline = time.monotonic() + 300
    while (
        proc.poll() is None
        and time.monotonic() < deadline
        and not (out / "parts" / "results").is_dir()
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err[-1000:]
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_issue_25_cases_are_one_line_exit_2_nothing_written(tmp_path, capsys, no_compute):
    """Integer bounds name the limit; duplicate YAML keys name both lines; train.max_train
    past the data is refused; a damaged run folder record names the file."""
    nqm, out = str(ROOT / "configs/nqm_quickstart.yaml"), tmp_path / "o"
    cases = {
        "grid.batch_sizes=[1180591620717411303424]": "2^31 = 2147483648",
        "grid.seeds=[18446744073709551616]": "< 2^32 = 4294967296",
        "budget.max_steps=1000000000000000000000000000000": "2^31 = 2147483648",
        "nqm.dim=3000000000": "nqm.dim",
        "target={metric: risk, value: 0.1, value: 0.2}": "duplicate key 'value'",
    }
    for override, fragment in cases.items():
        line = _check(capsys, [nqm, override, f"output.dir={out}"], out, override)
        assert fragment in line, line
    digits = str(ROOT / "configs/train_digits_cpu.yaml")
    line = _check(capsys, [digits, "train.max_train=100000", f"output.dir={out}"], out, "max")
    assert "train.max_train" in line and "1438 training examples" in line, line

    dup = tmp_path / "dup.yaml"
    text = (ROOT / "configs/nqm_quickstart.yaml").read_text()
    dup.write_text(text + "\ntarget:\n  metric: risk\n  value: 0.5\n")
    first = next(i for i, t in enumerate(text.splitlines(), 1) if t.startswith("target:"))
    line = _check(capsys, [str(dup), f"output.dir={out}"], out, "duplicate file key")
    assert f"duplicate key 'target' at lines {first} and " in line, line

    # a run folder whose record is damaged: refused naming the file, the folder untouched
    for name, junk in (("manifest.json", "{not json"), ("config.yaml", "grid: [unclosed\n")):
        run = tmp_path / f"damaged_{name}"
        run.mkdir()
        (run / "manifest.json").write_text('{"config_hash": "x"}')
        (run / "config.yaml").write_text("name: x\n")
        (run / name).write_text(junk)
        line = _check(capsys, [nqm, "grid.batch_sizes=[4]", f"output.dir={run}"], run, name)
        assert str(run / name) in line, line


def test_every_entry_point_gives_one_line_argument_errors(tmp_path, capsys):
    """argparse's usage block only on --help; overrides may follow option flags everywhere."""
    from cbs.analyze import main as analyze
    from cbs.doctor import main as doctor
    from cbs.predict.__main__ import main as predict

    cases = [
        (main, ["--bogus"]),
        (main, ["--shard"]),
        (analyze, []),
        (analyze, [str(tmp_path), "--ci"]),
        (predict, []),
        (predict, ["configs/train_digits_cpu.yaml", "--anchor", "x"]),
        (doctor, ["--seconds"]),
    ]
    for entry, argv in cases:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            entry(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1, (argv, err)
        assert "usage:" not in err and "error:" in err, err
    with pytest.raises(SystemExit):
        predict(["--help"])
    assert "usage:" in capsys.readouterr().out
    # cbs.predict checks --out before any compute, with an override after the flags
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    rc = predict(
        [
            str(ROOT / "configs/train_digits_cpu.yaml"),
            "--out",
            str(a_file / "sub"),
            f"output.dir={tmp_path / 'sweep'}",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--out" in err, err
    assert not (tmp_path / "sweep").exists() and a_file.read_text() == "keep"


def test_api_run_raises_config_errors_and_takes_numpy_values(tmp_path, fake_backend):
    import numpy as np
    from conftest import fake_config

    import cbs
    from cbs.errors import ConfigError

    raw = fake_config(tmp_path)
    bad = [
        (dict(config=[1, 2]), "config"),
        (dict(config=3.5), "config"),
        (dict(config=raw, overrides="grid.seeds=[1]"), "overrides"),
        (dict(config=raw, overrides={3: 1}), "overrides"),
        (dict(config=raw, overrides={"grid.seeds": [object()]}), "grid.seeds[0]"),
        (dict(config=raw, overrides={"target.value": float("nan")}), "target.value"),
        (dict(config=raw, output_dir=5), "output_dir"),
        (dict(config={**raw, "grid": {**raw["grid"], "seeds": {1, 2}}}), "grid.seeds"),
    ]
    for kwargs, key in bad:
        with pytest.raises(ConfigError) as e:
            cbs.run(**kwargs, analyze=False)
        assert e.value.path == key, (kwargs, str(e.value))
    assert not (tmp_path / "run").exists()
    grid = {**raw["grid"], "batch_sizes": np.array([1, 4, 16]), "seeds": np.arange(2)}
    res = cbs.run(
        {**raw, "grid": grid},
        overrides={"budget.max_steps": np.int64(10_000), "target.value": np.float64(0.1)},
        analyze=False,
    )
    assert len(res.results) == 54
