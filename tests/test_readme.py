"""The README's notebook example runs as written (from a scratch folder holding configs/)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _examples() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [b for b in blocks if "cbs.run(" in b]


def test_readme_notebook_example_runs(tmp_path, monkeypatch, capsys):
    examples = _examples()
    assert examples, "README has no cbs.run example"
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    for code in examples:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "b_crit" in out and "config error at 'target.value'" in out
    assert (tmp_path / "runs" / "quickstart_small" / "cbs.parquet").exists()
