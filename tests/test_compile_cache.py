"""The persistent compilation cache: one folder per (jax, jaxlib, backend, host CPU)."""

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


def test_cpu_is_opt_in(tmp_path):
    # XLA:CPU's loader logs AOT-mismatch errors on every cached load, even on the same CPU.
    assert compile_cache.cache_dir({}, backend="cpu") is None
    assert (
        compile_cache.cache_dir({"CBS_JAX_CACHE": str(tmp_path)}, backend="cpu").parent == tmp_path
    )
