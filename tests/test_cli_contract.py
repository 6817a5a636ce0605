"""Every option takes effect or is refused; files respect the umask."""

from __future__ import annotations

import json
import os
import stat

import yaml
from conftest import fake_config

from cbs.sweep.__main__ import main


def _write(tmp_path, raw):
    path = tmp_path / "fake.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_analysis_options_on_an_existing_folder_rerun_the_analysis(fake_backend, tmp_path, capsys):
    cfg = _write(tmp_path, fake_config(tmp_path))
    run = tmp_path / "run"
    assert main([cfg, "--no-progress", "output.plots=false"]) == 0
    first = capsys.readouterr().out
    assert "settings: delta = 0.2, B0 = smallest swept B (1)" in first
    assert json.loads((run / "cbs.json").read_text())["options"]["delta"] == 0.2
    calls = len(fake_backend.calls)

    # the same sweep with other analysis options: nothing recomputed, the analysis re-run
    assert (
        main(
            [
                cfg,
                "analysis.delta=0.5",
                "analysis.b0=4",
                "analysis.bootstrap=0",
                "--no-progress",
                "output.plots=false",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert len(fake_backend.calls) == calls
    assert "settings: delta = 0.5, B0 = 4" in out and "no intervals (bootstrap 0)" in out
    options = json.loads((run / "cbs.json").read_text())["options"]
    assert (options["delta"], options["b0_examples"], options["n_boot"]) == (0.5, 4.0, 0)
    stored = yaml.safe_load((run / "config.yaml").read_text())["analysis"]
    assert (stored["delta"], stored["b0"], stored["bootstrap"]) == (0.5, 4, 0)


def test_other_changes_on_an_existing_folder_are_refused_naming_the_keys(
    fake_backend, tmp_path, capsys
):
    cfg = _write(tmp_path, fake_config(tmp_path))
    assert main([cfg, "--no-progress", "--no-analysis"]) == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert main([cfg, "budget.max_steps=4000", "grid.seeds=[0]", "--no-analysis"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "budget.max_steps: 10000 → 4000" in err and "grid.seeds" in err
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before


def _modes(folder):
    return {
        str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode)
        for p in folder.rglob("*")
        if p.is_file()
    }


def test_files_respect_the_umask(fake_backend, tmp_path, capsys):
    cfg = _write(tmp_path, fake_config(tmp_path))
    old = os.umask(0o022)
    try:
        assert main([cfg, "--no-progress", "output.plots=false"]) == 0
        modes = _modes(tmp_path / "run")
        assert {"config.yaml", "manifest.json", "results.parquet", "cbs.json"} <= set(modes)
        assert any(k.startswith("parts/") for k in modes)
        assert set(modes.values()) == {0o644}, modes
        os.umask(0o077)
        assert (
            main([cfg, "--no-progress", "output.plots=false", f"output.dir={tmp_path / 'private'}"])
            == 0
        )
        assert set(_modes(tmp_path / "private").values()) == {0o600}
    finally:
        os.umask(old)
    capsys.readouterr()


def test_analyze_cli_turns_any_error_into_one_line(monkeypatch, capsys, tmp_path):
    import cbs.analysis
    from cbs.analyze import main

    def broken(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "cbs.json"))

    monkeypatch.setattr(cbs.analysis, "analyze_run", broken)
    monkeypatch.delenv("CBS_TRACEBACK", raising=False)
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Permission denied" in err[0] and "cbs.json" in err[0]
