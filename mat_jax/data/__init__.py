"""Data: the shapes world, local caption corpora (tensorflow-datasets, array_record) and Grain pipelines.

    from mat_jax.data import corpora, pipeline, shapes
    builder = corpora.build_shapes()                       # builds once, then reuses
    tok = shapes.tokenizer()                               # word-level, context length 24
    train = pipeline.training_pipeline(corpora.data_source(builder, "train"), tok, batch_size=64)
    batch = next(iter(train))                              # images, input_ids, attention_mask, ...
    test = pipeline.load_eval_set(corpora.data_source(builder, "test"), tok)

The command line builds datasets: `python -m mat_jax.data build shapes` / `build karpathy ...`.

The package imports none of its modules: `mat_jax.data.shapes` is numpy only, and importing it must not
load tensorflow-datasets (which `corpora` needs) or Grain (`pipeline`). Import the module you use.
"""
