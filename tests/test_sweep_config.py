"""Config loading: valid configs parse, every kind of bad input is one clean ConfigError."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
from cbs_test_backends import FakeBackend
from conftest import fake_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cbs.sweep.config import config_dict, config_hash, load_config
from cbs.sweep.grid import expand_blocks
from cbs.sweep.schema import ConfigError


def test_valid_config_parses_and_expands(fake_backend, tmp_path):
    cfg = load_config(fake_config(tmp_path))
    blocks = expand_blocks(cfg, FakeBackend)
    assert [b.block_id for b in blocks] == [
        f"{o}__B{b}" for o in ("plain", "heavy") for b in (1, 4, 16)
    ]
    assert [len(b.cells) for b in blocks] == [6, 6, 6, 12, 12, 12]
    ids = [c.cell_id for b in blocks for c in b.cells]
    assert len(set(ids)) == len(ids)
    assert blocks[3].cells[0].hparams == {"momentum": 0.0}


def test_ranges_expand(fake_backend, tmp_path):
    raw = fake_config(tmp_path)
    raw["grid"]["batch_sizes"] = {"log2_min": 2, "log2_max": 8, "step": 2}
    raw["grid"]["learning_rates"] = {"log10_min": -2, "log10_max": 0, "num": 3}
    raw["grid"]["optimizers"][1]["hparams"] = {
        "momentum": {"log10_min": -2, "log10_max": 0, "num": 3, "one_minus": True}
    }
    cfg = load_config(raw)
    assert cfg.grid.batch_size_values() == [4, 16, 64, 256]
    assert cfg.grid.learning_rates.values() == pytest.approx([0.01, 0.1, 1.0])
    assert cfg.grid.optimizers[1].hparams["momentum"].values() == pytest.approx([0.99, 0.9, 0.0])


def test_overrides(fake_backend, tmp_path):
    cfg = load_config(
        fake_config(tmp_path),
        [
            "grid.batch_sizes=[8,16,32]",
            "target.value=0.02",
            "grid.optimizers.1.hparams.momentum=0.9",
            "fake.scale=2",
        ],
    )
    assert cfg.grid.batch_sizes == [8, 16, 32] and cfg.target.value == 0.02
    assert cfg.grid.optimizers[1].hparams["momentum"] == 0.9 and cfg.section.scale == 2.0


def test_hash_ignores_output_but_not_grid(fake_backend, tmp_path):
    a = load_config(fake_config(tmp_path))
    b = load_config(fake_config(tmp_path), ["output.dir=/elsewhere"])
    c = load_config(fake_config(tmp_path), ["target.value=0.2"])
    assert config_hash(a) == config_hash(b) != config_hash(c)


def test_lr_scaling_follows_the_batch_size(fake_backend, tmp_path):
    """grid.lr_scaling multiplies the listed LRs by (B / reference_batch) ** power at batch
    size B (default reference: the smallest swept); an optimizer entry's own rule wins."""
    plain = expand_blocks(load_config(fake_config(tmp_path)), FakeBackend)
    cfg = load_config(
        fake_config(tmp_path),
        [
            "grid.lr_scaling.power=0.5",
            "grid.optimizers.1.lr_scaling={power: 1, reference_batch: 4}",
        ],
    )
    scaled = expand_blocks(cfg, FakeBackend)
    listed = [0.1, 1.0, 100.0]
    for a, b in zip(plain, scaled):
        lrs = sorted({c.lr for c in b.cells})
        if b.optimizer == "plain":  # square-root rule from B = 1
            assert lrs == pytest.approx([x * b.batch_size**0.5 for x in listed], rel=1e-12)
        else:  # linear rule, listed LRs at B = 4
            assert lrs == pytest.approx([x * b.batch_size / 4 for x in listed], rel=1e-12)
        # same cells otherwise: seeds, hyperparameters and their order
        assert [(c.seed, c.hparams) for c in a.cells] == [(c.seed, c.hparams) for c in b.cells]
    # at the reference batch size the LRs are the listed ones, bit for bit, so the cells
    # (and their ids) are the unscaled grid's
    assert scaled[0].cells == plain[0].cells and scaled[4].cells == plain[4].cells
    assert scaled[1].cells != plain[1].cells


def test_lr_scaling_off_keeps_the_config_hash(fake_backend, tmp_path):
    """lr_scaling at its default is not part of the resolved config, so configs that do not
    scale their LRs keep the hash (and resumable folders) they had before the key existed;
    any scaling changes the hash."""
    base = load_config(fake_config(tmp_path))
    off = load_config(fake_config(tmp_path), ["grid.lr_scaling={power: 0}"])
    assert "lr_scaling" not in config_dict(base)["grid"]
    assert all("lr_scaling" not in o for o in config_dict(base)["grid"]["optimizers"])
    assert config_hash(base) == config_hash(off)
    on = load_config(fake_config(tmp_path), ["grid.lr_scaling.power=0.5"])
    own = load_config(fake_config(tmp_path), ["grid.optimizers.0.lr_scaling.power=0.5"])
    assert len({config_hash(base), config_hash(on), config_hash(own)}) == 3


BAD = [
    (["grid.batch_size=[4]"], "grid.batch_size", "did you mean 'batch_sizes'"),
    (["grid.batch_sizes=[-4]"], "grid.batch_sizes[0]", ">= 1"),
    (["grid.batch_sizes=[]"], "grid.batch_sizes", "at least one"),
    (["grid.batch_sizes=four"], "grid.batch_sizes", "list"),
    (["grid.learning_rates=[0.1, 0]"], "grid.learning_rates[1]", "> 0"),
    (["grid.learning_rates=[]"], "grid.learning_rates", "at least one"),
    (["grid.optimizers=[]"], "grid.optimizers", "at least 1"),
    (["grid.optimizers.0.kind=plian"], "grid.optimizers[0].kind", "did you mean 'plain'"),
    (
        ["grid.optimizers.1.hparams.momentm=0.5"],
        "grid.optimizers[1].hparams.momentm",
        "did you mean 'momentum'",
    ),
    (["grid.optimizers.1.hparams.momentum=1.5"], "grid.optimizers[1].hparams.momentum", "< 1"),
    (["target.value=0"], "target.value", "> 0"),
    (["target.metric=los"], "target.metric", "did you mean 'loss'"),
    (["budget.max_steps=0"], "budget.max_steps", ">= 1"),
    (["budget.max_steps=1.5"], "budget.max_steps", "integer"),
    (["backend=nqmm"], "backend", "did you mean 'nqm'"),
    (["fake.scale=-1"], "fake.scale", "> 0"),
    (["nam=x"], "nam", "did you mean 'name'"),
    (["grid.lr_scaling.power=-0.5"], "grid.lr_scaling.power", ">= 0"),
    (["grid.lr_scaling.reference_batch=0"], "grid.lr_scaling.reference_batch", ">= 1"),
    (["grid.lr_scaling.powr=1"], "grid.lr_scaling.powr", "did you mean 'power'"),
    (["grid.optimizers.0.lr_scaling.power=3"], "grid.optimizers[0].lr_scaling.power", "<= 2"),
    (["name=a/b"], "name", "letters"),
]


@pytest.mark.parametrize("overrides,path,fragment", BAD)
def test_bad_values_name_key_value_and_allowed(fake_backend, tmp_path, overrides, path, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(fake_config(tmp_path), overrides)
    assert info.value.path == path
    assert fragment in str(info.value)


def test_missing_file_and_yaml_syntax(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ngrid: [1, 2\n")
    with pytest.raises(ConfigError, match="YAML syntax error at line"):
        load_config(bad)


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["{missing}"], "does not exist"),
        (["configs/nqm_quickstart.yaml", "grid.batch_sizes=[-1]"], "grid.batch_sizes[0]"),
        (["configs/nqm_quickstart.yaml", "target.value=-1"], "target.value"),
        (
            ["configs/nqm_quickstart.yaml", "grid.optimizers.0.kind=adamm"],
            "grid.optimizers[0].kind",
        ),
    ],
)
def test_cli_errors_are_one_line_exit_2_no_traceback(tmp_path, args, fragment):
    args = [a.replace("{missing}", str(tmp_path / "missing.yaml")) for a in args]
    proc = subprocess.run(
        [sys.executable, "-m", "cbs.sweep", *args, f"output.dir={tmp_path}/o"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and fragment in proc.stderr
    assert not (tmp_path / "o").exists()  # nothing ran, nothing written


# -- property-based: random mutations are either valid or one clean ConfigError ------------

_JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.lists(st.integers(-5, 5), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_random_mutations_never_crash(fake_backend, tmp_path, data):
    raw = fake_config(tmp_path)
    paths = [p for p in _paths(raw) if p]
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        node = raw
        try:
            for part in path[:-1]:
                node = node[part]
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed this path
        if not isinstance(node, (dict, list)):
            continue
        action = data.draw(st.sampled_from(["replace", "delete", "add"]))
        last = path[-1]
        if isinstance(node, list) and not (isinstance(last, int) and last < len(node)):
            continue  # an earlier mutation replaced this list
        if action == "replace":
            node[last] = data.draw(_JUNK)
        elif action == "delete" and isinstance(node, dict):
            node.pop(last, None)
        elif action == "add" and isinstance(node, dict):
            node[data.draw(st.text(min_size=1, max_size=6))] = data.draw(_JUNK)
    try:
        cfg = load_config(copy.deepcopy(raw))
    except ConfigError as e:
        assert str(e).startswith("config error at ")
        return
    expand_blocks(cfg, FakeBackend)  # a valid config must also expand
