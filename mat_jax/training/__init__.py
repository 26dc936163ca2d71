"""The trainer behind `python -m mat_jax.train`: run setup, the jitted train step, the loop, the demo.

- `setup`: model / tokenizer / data from an experiment config;
- `optim`: the Optax optimizer and schedule named in the config;
- `step`: the train state and the one jitted step shared by every objective;
- `inputs`: host-side batch additions (text-attack candidates);
- `loop`: `train(config, workdir, mesh_spec=...)` with checkpoints, metrics, evaluation, export;
- `demo`: the shapes-world demo run by `python -m mat_jax.train` without flags.
"""
