"""The trainer behind `python -m mat_jax.train`: run setup, the jitted train step, the loop, the demo.

- `setup`: the data of a run from an experiment config (its model comes from `mat_jax.runs`);
- `optim`: the Optax optimizer and schedule named in the config;
- `step`: the train state and the jitted step shared by every objective (an inner attack's programs, the
  gradient's, the optimizer's);
- `inputs`: host-side batch additions (text-attack candidates);
- `loop`: `train(config, workdir, mesh_spec=...)` with checkpoints, metrics, evaluation, export, and
  `ensure_cached_run`, the step that trains a cached model;
- `demo`: the shapes-world demo run by `python -m mat_jax.train` without flags.

The package imports none of its modules: they sit in different layers (docs/architecture.md).
"""
