"""JAX's persistent compilation cache, safe to share between machines (CPU included).

XLA:CPU executables are compiled for the exact instruction-set extensions of the host; one
loaded on a CPU that lacks them fails (the "AOT mismatch" errors) or crashes. JAX's own
cache key names the backend but not those features, so every entry here lives in a folder
named by a hash of the jax / jaxlib versions, the backend and the host CPU's feature flags:
a run on another CPU model (a heterogeneous cluster with a shared home) gets its own folder
and never loads an entry compiled elsewhere.

On by default on GPU/TPU (``~/.cache/cbs/jax/<key>``); ``CBS_JAX_CACHE=PATH`` moves the base
folder (and turns the cache on for CPU runs too), ``CBS_JAX_CACHE=off`` (or ``0``, ``none``,
empty) disables it. On CPU it is opt-in: XLA:CPU's loader logs two "AOT mismatch" errors per
loaded program even on the CPU that compiled it (it compares tuning pseudo-features such as
``+prefer-no-gather`` with the host's instruction flags), which floods stderr and breaks the
CLI's one-line error contract; with a per-CPU folder the entries are still safe to load.
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

__all__ = ["cpu_features", "cache_key", "cache_dir", "enable_compilation_cache"]

_OFF = ("", "0", "off", "none", "false", "no")


def cpu_features() -> str:
    """The host CPU's model and feature flags as one string (Linux: /proc/cpuinfo; elsewhere
    the platform's processor description)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        # x86: "flags" / "model name"; ARM: "Features" / "CPU part"
        if (
            key in ("flags", "features", "model name", "cpu part", "cpu implementer")
            and key not in fields
        ):
            fields[key] = " ".join(sorted(value.split()))
    if not fields:
        fields["processor"] = platform.processor()
    return f"{platform.machine()}|" + "|".join(f"{k}={v}" for k, v in sorted(fields.items()))


def cache_key(backend: str | None = None) -> str:
    """Folder name for the current jax / jaxlib versions, backend and host CPU."""
    import jax
    import jaxlib

    backend = backend or jax.default_backend()
    text = f"jax={jax.__version__}|jaxlib={jaxlib.__version__}|backend={backend}|{cpu_features()}"
    return f"{backend}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def cache_dir(env: dict | None = None, backend: str | None = None) -> Path | None:
    """The cache folder this process uses, or None when disabled by ``CBS_JAX_CACHE`` (or on
    CPU when ``CBS_JAX_CACHE`` is unset, see the module docstring)."""
    env = os.environ if env is None else env
    base = env.get("CBS_JAX_CACHE")
    if base is not None and base.strip().lower() in _OFF:
        return None
    if base is None:
        if backend is None:
            import jax

            backend = jax.default_backend()
        if backend == "cpu":
            return None
    base = Path(base).expanduser() if base else Path.home() / ".cache" / "cbs" / "jax"
    return base / cache_key(backend)


def enable_compilation_cache() -> Path | None:
    """Points JAX's persistent compilation cache at :func:`cache_dir`; returns it (None: off).

    Programs that compile in under 0.2 s are not stored (reading them back costs about as
    much). A folder that cannot be created leaves the cache off rather than failing a run.
    """
    import jax

    path = cache_dir()
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
