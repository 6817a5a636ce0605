"""JAX's persistent compilation cache, safe to share between machines (CPU included).

XLA:CPU executables are compiled for the exact instruction-set extensions of the host; one
loaded on a CPU that lacks them fails (the "AOT mismatch" errors) or crashes. JAX's own
cache key names the backend but not those features, so every entry here lives in a folder
named by a hash of the jax / jaxlib versions, the backend and the host CPU's feature flags:
a run on another CPU model (a heterogeneous cluster with a shared home) gets its own folder
and never loads an entry compiled elsewhere.

On by default on every backend (``~/.cache/cbs/jax/<key>``); ``CBS_JAX_CACHE=PATH`` moves the
base folder, ``CBS_JAX_CACHE=off`` (or ``0``, ``none``, empty) disables it.

On CPU, XLA's loader logs two "AOT mismatch" errors for every program it reads back, even on
the CPU that compiled it: it compares LLVM tuning pseudo-features (``+prefer-no-gather``,
``+prefer-no-scatter``) with the host's instruction-set flags (jax-ml/jax#38445, open). The
program loads and runs correctly, and with a per-CPU folder a real mismatch cannot happen, so
on CPU the cache raises the threshold of XLA's C++ log to fatal errors (which would flood
stderr and break the CLI's one-line error contract otherwise). A user who sets
``TF_CPP_MIN_LOG_LEVEL`` (other than JAX's default 1, e.g. 0 to see every XLA log) or
``JAX_LOGGING_LEVEL`` keeps their choice; if this jaxlib has no way to set the threshold, the
CPU cache stays off rather than flooding stderr.
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

__all__ = [
    "cpu_features",
    "cache_key",
    "cache_dir",
    "quiet_cpu_loader_logs",
    "enable_compilation_cache",
]

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
    """The cache folder this process uses, or None when ``CBS_JAX_CACHE`` disables it."""
    env = os.environ if env is None else env
    base = env.get("CBS_JAX_CACHE")
    if base is not None and base.strip().lower() in _OFF:
        return None
    base = Path(base).expanduser() if base else Path.home() / ".cache" / "cbs" / "jax"
    return base / cache_key(backend)


def quiet_cpu_loader_logs(env: dict | None = None) -> bool:
    """Raises XLA's C++ log threshold to fatal, unless the user chose one; True when the
    cache's spurious loader errors will not reach stderr (see the module docstring)."""
    env = os.environ if env is None else env
    # `import jax` sets TF_CPP_MIN_LOG_LEVEL=1 when unset, so 1 is not taken as a choice.
    if env.get("TF_CPP_MIN_LOG_LEVEL", "1") != "1" or "JAX_LOGGING_LEVEL" in env:
        return True
    try:
        from jaxlib import utils

        utils.absl_set_min_log_level(3)  # absl: 0 info, 1 warning, 2 error, 3 fatal
    except (ImportError, AttributeError):
        return False
    return True


def enable_compilation_cache() -> Path | None:
    """Points JAX's persistent compilation cache at :func:`cache_dir`; returns it (None: off).

    Programs that compile in under 0.2 s are not stored (reading them back costs about as
    much). A folder that cannot be created leaves the cache off rather than failing a run.
    """
    import jax

    path = cache_dir()
    if path is None:
        return None
    if jax.default_backend() == "cpu" and not quiet_cpu_loader_logs():
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
