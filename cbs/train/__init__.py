"""Real-network training back end (``backend: train``).

Modules:
  backend     TrainBackend (the cbs.sweep.backend.Backend), TrainSection (YAML ``train:``).
  data        offline data sets: mnist1d, digits, linreg, text (each hashed).
  sources     the train.dataset registry: built-in names, .npz, .npy folders (memory-mapped),
              Parquet, Hugging Face save_to_disk folders, Python factories; validation.
  user        user Flax models (linen / nnx) and losses named "pkg.module:name".
  streaming   training sets beyond the device budget: host-gathered, prefetched chunks.
  make_example_data  writes the data of configs/examples/.
  models      Flax MLP, CNN, decoder-only Transformer; losses.
  optimizers  OPTIMIZERS registry (OptimizerSpec per kind), Optax builders, schedule_fn,
              evaluation points (schedule-free), which leaves are matrices.
  soap, shampoo, adalayer  the optimizers Optax lacks, as Optax transforms.
  engine      pure per-cell train step / evaluation, vmapped BlockRun, noise-scale estimator.
  loop        host-side stopping rule, steps-to-target (Shallue), curves, noise_scale table.
  kfac        K-FAC cells via kfac-jax, one after another.
  direct      make_block / make_config: build blocks and configs by hand, to drive the back
              end without the sweep runner (benchmarks, notebooks, tests).
"""
