"""Data: the shapes world, local caption corpora (tensorflow-datasets, array_record) and Grain pipelines.

    from mat_jax.data import corpora, pipeline, shapes
    builder = corpora.build_shapes()                       # builds once, then reuses
    tok = shapes.tokenizer()                               # word-level, context length 24
    train = pipeline.training_pipeline(corpora.data_source(builder, "train"), tok, batch_size=64)
    batch = next(iter(train))                              # images, input_ids, attention_mask, ...
    test = pipeline.load_eval_set(corpora.data_source(builder, "test"), tok)

The command line builds datasets: `python -m mat_jax.data build shapes` / `build karpathy ...`.
"""

from mat_jax.data import corpora, pipeline, shapes
from mat_jax.data.corpora import (CaptionCleaning, CorpusError, build_corpus, build_shapes, corpus_builder,
                                  data_source, default_data_dir)
from mat_jax.data.pipeline import EvalSet, load_eval_set, training_pipeline
