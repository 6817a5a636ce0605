"""Parts prove what they hold: a damaged, foreign or edited part is quarantined with a
one-line warning and its block recomputed, and the final tables equal a clean run's."""

from __future__ import annotations

import shutil

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import fake_config

from cbs.errors import RunFolderError
from cbs.store import RunStore, read_table
from cbs.sweep.config import load_config
from cbs.sweep.runner import run_sweep

VICTIM, OTHER = "plain__B4", "heavy__B16"


def _truncate(p):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _zero(p):
    p.write_bytes(b"")


def _garbage(p):
    p.write_bytes(b"\x00garbage, not parquet\n" * 40)


def _copy_other(p):
    shutil.copyfile(p.with_name(f"{OTHER}.parquet"), p)


def _edit_keeping_metadata(p):
    # an edit with pyarrow keeps the schema metadata, hence the stored digest
    t = pq.read_table(p)
    i = t.schema.get_field_index("final_metric")
    t = t.set_column(i, "final_metric", pa.array([0.123] * t.num_rows))
    pq.write_table(t, p)


def _edit_with_pandas(p):
    # an edit with pandas writes a fresh file: the integrity record is gone
    df = pd.read_parquet(p)
    df.loc[0, "steps_to_target"] = 1.0
    df.to_parquet(p, index=False)


DAMAGES = {
    "truncated": (_truncate, "unreadable"),
    "zero-byte": (_zero, "unreadable"),
    "garbage": (_garbage, "unreadable"),
    "another block's part": (_copy_other, f"holds block '{OTHER}', not '{VICTIM}'"),
    "edited value": (_edit_keeping_metadata, "does not match its digest"),
    "edited with pandas": (_edit_with_pandas, "carries no integrity record"),
}


@pytest.fixture
def clean(fake_backend, tmp_path):
    cfg = load_config(fake_config(tmp_path))
    run_sweep(cfg, progress=False)
    return cfg, pd.read_parquet(cfg.out_dir / "results.parquet")


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_part_is_quarantined_and_recomputed(clean, fake_backend, capsys, damage):
    cfg, expected = clean
    run = cfg.out_dir
    (run / "results.parquet").unlink()  # an interrupted sweep: not merged, one block missing
    (run / "parts" / "results" / "heavy__B1.parquet").unlink()
    victim = run / "parts" / "results" / f"{VICTIM}.parquet"
    make, why = DAMAGES[damage]
    make(victim)
    capsys.readouterr()
    fake_backend.calls = []

    run_sweep(cfg, progress=False)

    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(victim) in warnings[0] and why in warnings[0], err
    assert "recomputed" in warnings[0]
    quarantined = list((run / "parts" / "quarantine" / "results").iterdir())
    assert len(quarantined) == 1 and quarantined[0].name.startswith(VICTIM)
    assert sorted(b for call in fake_backend.calls for b in call) == ["heavy__B1", VICTIM]
    pd.testing.assert_frame_equal(pd.read_parquet(run / "results.parquet"), expected)


def test_part_of_another_sweep_is_quarantined(clean, fake_backend, tmp_path, capsys):
    cfg, expected = clean
    other = load_config(
        fake_config(tmp_path, budget={"max_steps": 9_999}, output={"dir": str(tmp_path / "o")})
    )
    run_sweep(other, progress=False)
    victim = cfg.out_dir / "parts" / "results" / f"{VICTIM}.parquet"
    shutil.copyfile(other.out_dir / "parts" / "results" / f"{VICTIM}.parquet", victim)
    (cfg.out_dir / "results.parquet").unlink()
    capsys.readouterr()
    # an analysis of the unfinished run already refuses (and moves aside) the foreign part
    partial = read_table(cfg.out_dir, "results")
    assert "was written for config hash" in capsys.readouterr().err
    assert VICTIM not in set(partial["block_id"])
    assert len(partial) == len(expected) - (expected["block_id"] == VICTIM).sum()
    run_sweep(cfg, progress=False)
    pd.testing.assert_frame_equal(pd.read_parquet(cfg.out_dir / "results.parquet"), expected)


def test_a_failing_side_table_part_sends_its_whole_block_back(tmp_path, capsys):
    """The results part lists the block's other tables: one that fails (or is missing)
    makes the block unfinished, and the merge never sees it."""
    store = RunStore(tmp_path, config_hash="h1")
    for b in ("b0", "b1"):
        store.write_block(
            b,
            {
                "results": pd.DataFrame({"block_id": [b], "x": [1.0]}),
                "curves": pd.DataFrame({"block_id": [b, b], "step": [1, 2]}),
            },
        )
    assert RunStore(tmp_path, config_hash="h1").finished_blocks() == {"b0", "b1"}
    (tmp_path / "parts" / "curves" / "b1.parquet").unlink()
    fresh = RunStore(tmp_path, config_hash="h1")
    assert fresh.finished_blocks() == {"b0"}
    assert "b1.parquet belongs to a block whose curves part failed" in capsys.readouterr().err
    assert not (tmp_path / "parts" / "results" / "b1.parquet").exists()
    with pytest.raises(Exception, match="not finished"):
        fresh.merge(["b0", "b1"])
    assert not (tmp_path / "results.parquet").exists()
    assert fresh.merge(["b0"]) == {"curves": 2, "results": 1}
    merged = pq.read_table(tmp_path / "results.parquet")
    assert b"cbs.block_id" not in (merged.schema.metadata or {})  # not any one block's


@pytest.mark.parametrize(
    "text, why",
    [
        ("{not json", "is not valid JSON"),
        ("", "is not valid JSON"),
        ("[1, 2]", "not a JSON object"),
    ],
)
def test_damaged_manifest_is_one_error_naming_the_file(clean, text, why):
    cfg, _ = clean
    (cfg.out_dir / "manifest.json").write_text(text)
    with pytest.raises(RunFolderError, match=why) as e:
        run_sweep(cfg, progress=False)
    assert str(cfg.out_dir / "manifest.json") in str(e.value) and "\n" not in str(e.value)


def test_damaged_config_yaml_is_one_error_naming_the_file(clean):
    cfg, _ = clean
    (cfg.out_dir / "config.yaml").write_text("grid: [unclosed\n")
    with pytest.raises(RunFolderError, match="is not valid YAML") as e:
        run_sweep(cfg, progress=False)
    assert str(cfg.out_dir / "config.yaml") in str(e.value)


def test_damaged_merged_table_is_read_from_the_parts_and_rewritten(clean, capsys):
    cfg, expected = clean
    merged = cfg.out_dir / "results.parquet"
    _truncate(merged)
    capsys.readouterr()
    table = read_table(cfg.out_dir, "results")
    assert "results.parquet is unreadable" in capsys.readouterr().err
    assert len(table) == len(expected) and set(table["cell_id"]) == set(expected["cell_id"])
    run_sweep(cfg, progress=False)  # nothing to compute; the merge is no longer current
    pd.testing.assert_frame_equal(pd.read_parquet(merged), expected)


def test_folder_of_an_older_cbs_resumes_and_still_refuses_foreign_rows(clean, capsys):
    """Parts without a record in a folder whose manifest predates the records are accepted
    on their rows' block id and config hash (an upgrade does not recompute finished work)."""
    import json

    from cbs.store import PART_INTEGRITY_KEY

    cfg, expected = clean
    run = cfg.out_dir
    manifest = json.loads((run / "manifest.json").read_text())
    del manifest[PART_INTEGRITY_KEY]
    (run / "manifest.json").write_text(json.dumps(manifest))
    for p in (run / "parts" / "results").glob("*.parquet"):
        pd.read_parquet(p).to_parquet(p, index=False)  # as an older cbs wrote them
    (run / "results.parquet").unlink()
    shutil.copyfile(
        run / "parts" / "results" / f"{OTHER}.parquet",
        run / "parts" / "results" / f"{VICTIM}.parquet",
    )
    fake_backend = __import__("cbs_test_backends").FakeBackend
    fake_backend.calls = []
    capsys.readouterr()
    run_sweep(cfg, progress=False)
    assert f"holds rows of block_id '{OTHER}'" in capsys.readouterr().err
    assert [b for call in fake_backend.calls for b in call] == [VICTIM]  # only the foreign one
    pd.testing.assert_frame_equal(pd.read_parquet(run / "results.parquet"), expected)
