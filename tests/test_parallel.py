"""Sharding the cell axis over several (simulated) devices gives the single-device numbers."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np


def test_sharded_cells_match_single_device():
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from cbs.parallel import shard_cells, unpad
        assert jax.local_device_count() == 4
        lrs = np.linspace(0.1, 1.0, 7)
        f = jax.jit(jax.vmap(lambda lr, x: jnp.sum(jnp.sin(lr * x) ** 2)))
        x = np.random.default_rng(0).normal(size=(7, 33))
        lr_s, x_s = shard_cells((lrs, x), 7)
        # padded to 8 lanes, 2 per device (not replicated: each device holds its own lanes)
        assert lr_s.shape == (8,) and len(lr_s.sharding.device_set) == 4
        assert lr_s.sharding.shard_shape(lr_s.shape) == (2,), lr_s.sharding
        assert x_s.sharding.shard_shape(x_s.shape) == (2, 33), x_s.sharding
        got = unpad(f(lr_s, x_s), 7)
        want = np.array([np.sum(np.sin(l * xi) ** 2) for l, xi in zip(lrs, x)])
        np.testing.assert_allclose(got, want, rtol=1e-6)
        print("ok")
    """)
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
    }
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_train_block_sharded_over_devices_matches_one_device():
    """A training block whose cells are spread over 4 (simulated) devices, with padding
    (6 cells -> 8 lanes), records the same curves as on one device."""
    code = textwrap.dedent("""
        import sys, json, jax, numpy as np
        import cbs.train.loop as loop
        from cbs.train.backend import TrainBackend
        from cbs.train.direct import make_block, make_config
        # record, for each array the block hands to its compiled program, how many devices
        # it spans and what fraction of its lanes each device holds (1 = replicated)
        placed, shard = [], loop.shard_cells
        def recording(tree, n):
            out = shard(tree, n)
            placed.extend(
                (len(x.sharding.device_set), x.sharding.shard_shape(x.shape)[0] / x.shape[0])
                for x in jax.tree.leaves(out)
            )
            return out
        loop.shard_cells = recording
        cfg = make_config(dict(dataset="digits", model="mlp", width=16, depth=1), value=1e-3,
                          max_steps=30, eval_every=10)
        block = make_block("momentum", 16, [0.03, 0.1, 0.3], hparams=dict(momentum=[0.5, 0.9]))
        res = TrainBackend(cfg).run_blocks([block])[0]
        c = res.curves.sort_values(["cell_id", "step"])
        print(json.dumps(dict(val_loss=c.val_loss.tolist(), devices=sorted(set(placed)))))
    """)
    outs = []
    for n in (1, 4):
        env = {
            **os.environ,
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}",
            "JAX_PLATFORMS": "cpu",
        }
        proc = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    # the block really was split: every per-cell array it placed spans all 4 devices, each
    # holding a quarter of the lanes (on one device nothing needs placing, or it lands whole
    # on the one device)
    assert outs[0]["devices"] in ([], [[1, 1.0]]) and outs[1]["devices"] == [[4, 0.25]], [
        o["devices"] for o in outs
    ]
    assert len(outs[0]["val_loss"]) == 6 * 4
    np.testing.assert_allclose(outs[0]["val_loss"], outs[1]["val_loss"], rtol=1e-5)
