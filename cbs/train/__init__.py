"""Real-network training back end (``backend: train``).

Modules:
  backend     TrainBackend (the cbs.sweep.backend.Backend), TrainSection (YAML ``train:``).
  data        offline data sets: mnist1d, digits, linreg, text (each hashed).
  models      Flax MLP, CNN, decoder-only Transformer; losses.
  optimizers  OPTIMIZERS registry (OptimizerSpec per kind), Optax builders, schedule_fn.
  engine      pure per-cell train step / evaluation, vmapped BlockRun, noise-scale estimator.
  loop        host-side stopping rule, steps-to-target (Shallue), curves, noise_scale table.
  kfac        K-FAC cells via kfac-jax, one after another.
  direct      make_block / make_config: build blocks and configs by hand, to drive the back
              end without the sweep runner (benchmarks, notebooks, tests).
"""
