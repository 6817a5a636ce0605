"""The documentation that is generated or executed: it must match the code."""

from __future__ import annotations

from pathlib import Path

from cbs.sweep.reference import config_markdown, config_reference

ROOT = Path(__file__).resolve().parents[1]


def test_config_reference_is_generated_from_the_schema():
    committed = (ROOT / "docs" / "config.md").read_text()
    assert committed == config_markdown(), (
        "docs/config.md is stale: run `python -m cbs.sweep.reference > docs/config.md`"
    )


def test_help_prints_the_same_reference(capsys):
    from cbs.sweep.__main__ import main

    try:
        main(["--help"])
    except SystemExit as e:
        assert e.code == 0
    assert config_reference() in capsys.readouterr().out


def test_code_cites_only_docs_that_exist():
    import re

    cited = set()
    for path in (ROOT / "cbs").rglob("*.py"):
        cited |= set(re.findall(r"docs/([a-z_]+\.md)", path.read_text()))
    assert cited, "the code cites no docs page (the pattern is stale)"
    missing = sorted(c for c in cited if not (ROOT / "docs" / c).exists())
    assert not missing, f"cited but missing: {missing}"
