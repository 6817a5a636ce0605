"""Sharding the cell axis over several (simulated) devices gives the single-device numbers."""

import os
import subprocess
import sys
import textwrap


def test_sharded_cells_match_single_device():
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from cbs.parallel import shard_cells, unpad
        assert jax.local_device_count() == 4
        lrs = np.linspace(0.1, 1.0, 7)
        f = jax.jit(jax.vmap(lambda lr, x: jnp.sum(jnp.sin(lr * x) ** 2)))
        x = np.random.default_rng(0).normal(size=(7, 33))
        lr_s, x_s = shard_cells((lrs, x), 7)
        assert lr_s.shape == (8,) and len(lr_s.sharding.device_set) == 4
        got = unpad(f(lr_s, x_s), 7)
        want = np.array([np.sum(np.sin(l * xi) ** 2) for l, xi in zip(lrs, x)])
        np.testing.assert_allclose(got, want, rtol=1e-6)
        print("ok")
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr
