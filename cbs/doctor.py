"""``python -m cbs.doctor``: is this machine ready for sweeps, and how fast is it?

Prints versions, the JAX platform and devices with their memory, whether float64 works
(the NQM needs it), the compilation-cache location, the platform defaults in force
(:mod:`cbs.devices`), and two timed smoke tests of about a second each: a float32 matmul
(throughput in TFLOP/s) and an NQM grid (configurations per second), the latter checked
against an independent float64 NumPy recurrence. Exit status 1 when a check fails.
"""

from __future__ import annotations

import sys
import time
from importlib import metadata

__all__ = ["main", "report"]

PACKAGES = (
    "cbs",
    "jax",
    "jaxlib",
    "jax-cuda12-plugin",
    "jax-cuda12-pjrt",
    "flax",
    "optax",
    "kfac-jax",
    "numpy",
    "submitit",
)


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "-"


def _bytes(n: float | None) -> str:
    if not n:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _timed(fn, seconds: float) -> tuple[int, float]:
    """Calls ``fn`` (already compiled) repeatedly for about ``seconds``; (calls, elapsed)."""
    fn()
    t0, n = time.perf_counter(), 0
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return n, elapsed


def matmul_check(seconds: float = 1.0) -> dict:
    import jax
    import jax.numpy as jnp

    n = 1024 if jax.default_backend() == "cpu" else 8192
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: (x @ x) * (1.0 / n))
    calls, elapsed = _timed(lambda: f(a).block_until_ready(), seconds)
    ref = (a[:4].astype(jnp.float32) @ a) * (1.0 / n)
    err = float(jnp.max(jnp.abs(f(a)[:4] - ref)))
    return {
        "size": n,
        "tflops": 2 * n**3 * calls / elapsed / 1e12,
        "seconds": elapsed,
        "ok": err < 1e-2,
        "max_abs_err": err,
    }


def x64_check() -> dict:
    import jax
    import jax.numpy as jnp

    with jax.enable_x64(True):
        x = jnp.asarray(1.0, jnp.float64) + jnp.asarray(2.0**-40, jnp.float64)
        ok = x.dtype == jnp.float64 and float(x) != 1.0
    return {"ok": bool(ok), "dtype": str(x.dtype)}


def nqm_check(seconds: float = 1.0) -> dict:
    """Steps to target of an NQM grid, timed, and one configuration recomputed by a plain
    float64 NumPy recurrence of the second moments (an independent computation)."""
    import numpy as np

    from cbs.nqm._grid import evaluate_grid
    from cbs.nqm._problem import custom_problem

    h = 1.0 / np.arange(1, 51)
    problem = custom_problem(h, h.copy(), 1.0)
    lrs = np.geomspace(0.05, 1.5, 32)
    zeros = np.zeros_like(lrs)
    batch, target, max_steps = np.array([4.0, 64.0, 1024.0]), 0.05, 20_000

    def run():
        return evaluate_grid(
            problem,
            "sgd",
            lrs,
            zeros,
            zeros,
            zeros,
            batch_sizes=batch,
            target=target,
            max_steps=max_steps,
        )

    calls, elapsed = _timed(run, seconds)
    res = run()
    # Independent: E[theta_i^2] <- (1 - a h_i)^2 m_i + a^2 c_i / B; risk = 1/2 sum h_i m_i.
    a, b = lrs[10], batch[1]
    m, step = np.ones_like(h), 0
    while 0.5 * np.sum(h * m) >= target and step < max_steps:
        m = (1 - a * h) ** 2 * m + a * a * h / b  # c_i = h_i
        step += 1
    ok = bool(res["reached"][10, 1]) and float(res["steps"][10, 1]) == step
    return {
        "configs_per_s": len(lrs) * len(batch) * calls / elapsed,
        "seconds": elapsed,
        "ok": ok,
        "steps": float(res["steps"][10, 1]),
        "reference_steps": step,
    }


def report(seconds: float = 1.0) -> tuple[list[str], bool]:
    """The doctor's lines and whether every check passed."""
    import jax

    from cbs import devices

    lines = [
        "versions: "
        + ", ".join(f"{p} {_version(p)}" for p in PACKAGES)
        + f", python {sys.version.split()[0]}"
    ]
    devs = jax.devices()
    lines.append(
        f"platform: {jax.default_backend()}; {len(devs)} device(s), {jax.local_device_count()} local; "
        f"process {jax.process_index()} of {jax.process_count()}"
    )
    for d in jax.local_devices():
        try:
            stats = d.memory_stats() or {}
        except Exception:  # noqa: BLE001 - a plugin without memory statistics
            stats = {}
        mem = stats.get("bytes_limit")
        if mem is None and d.platform == "cpu":
            import os

            mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            where = "host RAM (shared by the CPU devices)"
        else:
            where = "device memory limit"
        lines.append(f"  device {d.id}: {d.platform}:{d.device_kind}, {_bytes(mem)} {where}")
    x64 = x64_check()
    lines.append(
        f"float64 (x64): {'works' if x64['ok'] else 'FAILS'} ({x64['dtype']}); the NQM back end needs it"
    )
    from cbs.compile_cache import enable_compilation_cache

    enable_compilation_cache()
    cache = jax.config.jax_compilation_cache_dir
    lines.append(
        f"compile cache: {cache or 'off'} (CBS_JAX_CACHE=PATH to set, CBS_JAX_CACHE=off to disable)"
    )
    lines.append("defaults: " + ", ".join(f"{k}={v}" for k, v in devices.defaults().items()))
    mm = matmul_check(seconds)
    lines.append(
        f"matmul {mm['size']}x{mm['size']} float32: {mm['tflops']:.3g} TFLOP/s over {mm['seconds']:.1f} s "
        f"({'ok' if mm['ok'] else 'WRONG: max error ' + format(mm['max_abs_err'], '.3g')})"
    )
    nq = nqm_check(seconds)
    lines.append(
        f"NQM grid (96 configurations x batch sizes): {nq['configs_per_s']:.3g} configurations/s over "
        f"{nq['seconds']:.1f} s; steps {nq['steps']:.0f} vs NumPy recurrence {nq['reference_steps']} "
        f"({'ok' if nq['ok'] else 'MISMATCH'})"
    )
    ok = x64["ok"] and mm["ok"] and nq["ok"]
    lines.append("all checks passed" if ok else "SOME CHECKS FAILED")
    return lines, ok


def main(argv: list[str] | None = None) -> int:
    from cbs.errors import ArgumentParser

    p = ArgumentParser(
        prog="python -m cbs.doctor", prefix="cbs.doctor", description=__doc__.split("\n\n")[1]
    )
    p.add_argument("--seconds", type=float, default=1.0, help="time per smoke test (default 1)")
    args = p.parse_args(argv)
    if not args.seconds > 0:
        print(f"cbs.doctor: --seconds: got {args.seconds}; allowed: a number > 0", file=sys.stderr)
        return 2
    lines, ok = report(args.seconds)
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
