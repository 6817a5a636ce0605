"""Shared test fixtures."""

from __future__ import annotations

import os

import pytest
from cbs_test_backends import FakeBackend
from hypothesis import HealthCheck, Phase, settings

from cbs.sweep import backend as backend_mod

# Command-line runs spawned by tests compile from scratch and leave nothing in ~/.cache:
# tests stay hermetic, and two test workers never read an entry the other is still writing.
# tests/test_compile_cache.py turns the cache on explicitly.
os.environ.setdefault("CBS_JAX_CACHE", "off")

# Property tests. "ci" is deterministic: the same examples on every run (derandomize), no
# example database (a failure found once is not replayed from .hypothesis/ by a later run
# of another checkout), no deadline (a loaded 2-core machine is slow, not wrong) and a fixed
# example count. "random" (the default outside CI) draws new examples, so new cases are
# still found locally; `pytest --hypothesis-profile=ci` runs CI's profile by name.
# A test's own @settings(max_examples=...) still applies under either profile.
_QUIET = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=_QUIET,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
)
settings.register_profile("random", deadline=None, suppress_health_check=_QUIET, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "random")


@pytest.fixture
def fake_backend(monkeypatch):
    monkeypatch.setitem(backend_mod.BACKENDS, "fake", "cbs_test_backends:FakeBackend")
    FakeBackend.calls = []
    return FakeBackend


def fake_config(tmp_path, **over):
    cfg = {
        "name": "fake-sweep",
        "backend": "fake",
        "grid": {
            "batch_sizes": [1, 4, 16],
            "learning_rates": [0.1, 1.0, 100.0],
            "seeds": [0, 1],
            "optimizers": [
                {"kind": "plain"},
                {"kind": "heavy", "hparams": {"momentum": [0.0, 0.5]}},
            ],
        },
        "target": {"metric": "loss", "value": 0.1},
        "budget": {"max_steps": 10_000},
        "output": {"dir": str(tmp_path / "run")},
    }
    cfg.update(over)
    return cfg
