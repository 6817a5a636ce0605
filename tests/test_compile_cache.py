"""The persistent compilation cache: one folder per (jax, jaxlib, backend, host CPU)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cbs import compile_cache


def test_cpu_features_name_this_host():
    feats = compile_cache.cpu_features()
    assert feats and "|" in feats


def test_key_changes_with_cpu_features(monkeypatch):
    monkeypatch.setattr(compile_cache, "cpu_features", lambda: "x86_64|flags=avx avx2 avx512f")
    a = compile_cache.cache_key("cpu")
    monkeypatch.setattr(compile_cache, "cpu_features", lambda: "x86_64|flags=avx avx2")
    b = compile_cache.cache_key("cpu")
    assert a != b and a.startswith("cpu-") and b.startswith("cpu-")
    assert compile_cache.cache_key("cpu") == b  # deterministic


def test_key_changes_with_versions(monkeypatch):
    import jax

    a = compile_cache.cache_key("cpu")
    monkeypatch.setattr(jax, "__version__", "0.0.0-other")
    assert compile_cache.cache_key("cpu") != a


@pytest.mark.parametrize("value", ["off", "OFF", "0", "none", ""])
def test_off(value):
    assert compile_cache.cache_dir({"CBS_JAX_CACHE": value}) is None


def test_default_and_explicit_base(tmp_path):
    default = compile_cache.cache_dir({}, backend="gpu")
    assert default.parent == Path.home() / ".cache" / "cbs" / "jax"
    explicit = compile_cache.cache_dir({"CBS_JAX_CACHE": str(tmp_path)}, backend="gpu")
    assert explicit.parent == tmp_path and explicit.name == default.name


def test_cpu_is_on_by_default(tmp_path):
    assert (
        compile_cache.cache_dir({}, backend="cpu").parent == Path.home() / ".cache" / "cbs" / "jax"
    )
    assert (
        compile_cache.cache_dir({"CBS_JAX_CACHE": str(tmp_path)}, backend="cpu").parent == tmp_path
    )


_PROGRAM = """
import jax, jax.numpy as jnp
from cbs.compile_cache import enable_compilation_cache
hits = []
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(1) if event == "/jax/compilation_cache/cache_hits" else None
)
path = enable_compilation_cache()
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
print(path, float(jax.jit(lambda x: jnp.tanh(x @ x).sum())(jnp.ones((8, 8)))), len(hits))
"""


def test_cpu_cache_hits_without_loader_noise(tmp_path):
    # XLA:CPU logs spurious "AOT mismatch" errors when it reads a cached program back
    # (jax-ml/jax#38445); the second run must hit the cache and print none of them.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TF_CPP_MIN_LOG_LEVEL", "JAX_LOGGING_LEVEL")
    }
    env.update(JAX_PLATFORMS="cpu", CBS_JAX_CACHE=str(tmp_path))
    cold, warm = (
        subprocess.run(
            [sys.executable, "-c", _PROGRAM], env=env, capture_output=True, text=True, check=True
        )
        for _ in range(2)
    )
    path, value, hits = warm.stdout.split()
    assert Path(path).parent == tmp_path and cold.stdout.split()[1] == value
    assert int(cold.stdout.split()[2]) == 0 and int(hits) >= 1
    assert "cpu_aot_loader" not in warm.stderr and "AOT" not in warm.stderr, warm.stderr
