"""The shapes world's BERT masked LM: the text threat BERT-Attack uses, trained on the world's captions.

BERT-Attack on vision-language models (Co-Attack, SGA, MMCoA) takes bert-base-uncased's top-k masked-LM
proposals for a word, with no meaning filter: a real MLM proposes what fits the *context* (other colours
before "square", other shapes after "red", "left" for "right"), so most proposals change what a caption
says. The shapes world's synonym lexicon is the opposite (every substitute is a paraphrase); it stays as
the "paraphrase" control. This module trains a small BERT MLM (`mat_jax.models.BertForMaskedLM`) on the
world's *train-split* captions with BERT's recipe (15% of the words chosen; of those 80% [MASK], 10% a
random word, 10% kept), saves it in the transformers layout (config.json + model.safetensors + a BERT
word-level tokenizer over the world's vocabulary) and caches it under $MAT_JAX_CACHE_DIR/mlm, keyed by
its settings and the data version, like the clean CLIP (`mat_jax.training.loop.ensure_cached_run`).

    python -m mat_jax.data mlm            # build (or reuse) it, print masked accuracy and meaning-change shares

Configs and the evaluator name it `text_attack.bert = "shapes-mlm"` (`resolve_bert`): the cached
directory, trained on first use.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mat_jax import config as config_lib
from mat_jax import paths
from mat_jax.attacks.candidates import STOP_WORDS, BertMLMSource, filter_substitutes
from mat_jax.data import corpora, shapes
from mat_jax.errors import ConfigError
from mat_jax.models import BertForMaskedLM, bert_config, save_bert_mlm
from mat_jax.models.tokenizers import import_transformers, load_tokenizer
from mat_jax.workdir import WorkdirLock

MLM_NAME = "shapes-mlm"
# Bump when the training recipe changes in a way the settings do not show (part of the cache key).
MLM_VERSION = 1
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
INFO_FILE = "shapes_mlm.json"  # written last: its presence marks a finished directory


@dataclasses.dataclass(frozen=True)
class MLMSettings:
  """Everything the cached MLM depends on (with the data version): its cache key."""
  hidden_size: int = 64
  layers: int = 2
  heads: int = 4
  intermediate_size: int = 256
  steps: int = 600
  batch_size: int = 128
  learning_rate: float = 2e-3
  warmup_steps: int = 100
  weight_decay: float = 0.01
  mask_prob: float = 0.15        # words chosen per caption (BERT: 15%)
  train_images: int = 4_000      # the first images of the world's train split (20,000 captions)
  captions_per_image: int = 5
  world_seed: int = 0
  seed: int = 0                  # initialisation and masking
  eval_images: int = 200         # test images for the reported accuracy and meaning-change shares
  top_k: int = 10                # proposals per word in the meaning-change report (BERT-Attack's k)


def mlm_vocabulary() -> list[str]:
  """Token strings by id: BERT's special tokens, then every word of the shapes world."""
  return [*SPECIAL_TOKENS, *shapes.vocabulary()]


def save_tokenizer(directory: str | os.PathLike, context_length: int = shapes.DEFAULT_CONTEXT_LENGTH) -> Path:
  """Write a BERT tokenizer (lower-casing, [CLS] text [SEP], whole words) over `mlm_vocabulary()`.

  Its ids differ from the CLIP tokenizer's (`shapes.build_tokenizer`, which has no [MASK]); the MLM
  keeps its own tokenizer as bert-base-uncased does, and the attack re-tokenises the chosen words with
  the target model's tokenizer.
  """

  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  vocab = mlm_vocabulary()
  hf = import_transformers().BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True,
                                           model_max_length=context_length)
  hf.save_pretrained(str(directory))
  # bert-base-uncased's layout also has vocab.txt (one token per line, by id), read by older loaders.
  (directory / "vocab.txt").write_text("".join(f"{w}\n" for w in vocab))
  return directory


# ----------------------------------------------------------------------------------------------------
# Training.


def train_captions(settings: MLMSettings, split: str = "train", count: int | None = None) -> list[str]:
  """The captions a built shapes world stores for `split` (no rendering needed)."""

  count = settings.train_images if count is None else count
  out: list[str] = []
  for index in range(count):
    out.extend(shapes.record_text(settings.world_seed, split, index, settings.captions_per_image)[1])
  return out


def _mask_tokens(key, ids, mask, mask_prob: float, mask_id: int, first_word_id: int, vocab_size: int):
  """BERT's corruption: each real word chosen with `mask_prob` (at least one per caption); a chosen word
  becomes [MASK] (80%), a random word (10%) or stays (10%). Returns (inputs, chosen as float weights)."""
  k_choose, k_kind, k_word = jax.random.split(key, 3)
  words = mask.astype(bool) & (ids >= first_word_id)
  scores = jax.random.uniform(k_choose, ids.shape)
  chosen = words & (scores < mask_prob)
  # Always one word per caption: the lowest score among its words (a caption is ~10 words long).
  lowest = jnp.argmin(jnp.where(words, scores, 2.0), axis=-1)
  chosen = chosen | (jax.nn.one_hot(lowest, ids.shape[1], dtype=bool) & words)
  kind = jax.random.uniform(k_kind, ids.shape)
  random_words = jax.random.randint(k_word, ids.shape, first_word_id, vocab_size)
  inputs = jnp.where(chosen & (kind < 0.8), mask_id, ids)
  inputs = jnp.where(chosen & (kind >= 0.8) & (kind < 0.9), random_words, inputs)
  return inputs, chosen.astype(jnp.float32)


def train_mlm(settings: MLMSettings = MLMSettings(), *, captions: Sequence[str] | None = None,
              log: Callable[[str], None] = print):
  """Train the MLM; returns (model, tokenizer, {"seconds", "final_loss", "train_captions"}).

  captions: the training text (default: the shapes world's train split, `train_captions(settings)`).
  """

  start, cpu_start = time.perf_counter(), time.process_time()
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer = load_tokenizer(save_tokenizer(tmp), context_length=shapes.DEFAULT_CONTEXT_LENGTH)
  captions = list(train_captions(settings) if captions is None else captions)
  if not captions:
    raise ValueError("no training captions for the masked LM")
  batch = tokenizer(captions)
  ids, attention = batch.input_ids, batch.attention_mask
  # The longest caption decides the padded length (all captions fit the world's context length).
  length = int(attention.sum(-1).max())
  ids, attention = ids[:, :length], attention[:, :length]
  vocab = mlm_vocabulary()
  cfg = bert_config("tiny", vocab_size=len(vocab), hidden_size=settings.hidden_size,
                    num_hidden_layers=settings.layers, num_attention_heads=settings.heads,
                    intermediate_size=settings.intermediate_size,
                    max_position_embeddings=shapes.DEFAULT_CONTEXT_LENGTH, pad_token_id=tokenizer.pad_id)
  model = BertForMaskedLM(cfg, rngs=nnx.Rngs(settings.seed))
  graphdef, params = nnx.split(model, nnx.Param)
  schedule = optax.warmup_cosine_decay_schedule(0.0, settings.learning_rate, settings.warmup_steps,
                                                max(settings.steps, settings.warmup_steps + 1),
                                                settings.learning_rate * 0.05)
  optimizer = optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=settings.weight_decay)
  opt_state = optimizer.init(params)
  mask_id, first_word = vocab.index("[MASK]"), len(SPECIAL_TOKENS)

  @jax.jit
  def step(params, opt_state, ids, attention, key):
    inputs, weights = _mask_tokens(key, ids, attention, settings.mask_prob, mask_id, first_word, len(vocab))

    def loss_fn(p):
      logits = nnx.merge(graphdef, p)(inputs, attention)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, ids)
      return (ce * weights).sum() / weights.sum()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(settings.seed)
  key = jax.random.key(settings.seed)
  order, cursor = rng.permutation(len(ids)), 0
  loss = jnp.zeros(())
  every = max(settings.steps // 5, 1)
  for i in range(settings.steps):
    if cursor + settings.batch_size > len(order):
      order, cursor = rng.permutation(len(ids)), 0
    rows = order[cursor:cursor + settings.batch_size]
    cursor += settings.batch_size
    params, opt_state, loss = step(params, opt_state, ids[rows], attention[rows], jax.random.fold_in(key, i))
    if (i + 1) % every == 0 or i + 1 == settings.steps:
      value = float(loss)
      if not np.isfinite(value):
        raise FloatingPointError(f"masked-LM loss is {value} at step {i + 1}; lower the learning rate")
      log(f"  mlm step {i + 1}/{settings.steps}: loss {value:.3f}")
  nnx.update(model, params)
  # CPU seconds beside wall seconds: on a shared machine the wall time says more about the neighbours.
  stats = {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu_start,
           "final_loss": float(loss), "train_captions": len(captions)}
  return model, tokenizer, stats


# ----------------------------------------------------------------------------------------------------
# What it learned: masked-word accuracy, and how often its proposals change a caption's meaning.


def masked_accuracy(model, tokenizer, captions: Sequence[str], batch_size: int = 256) -> dict[str, float]:
  """Every word of every caption masked in turn ([MASK], one word at a time): the share of words the MLM
  predicts exactly ("word") and the share it predicts within the word's category ("category": e.g. any
  colour for a colour word, `shapes.word_category`). Exact accuracy is bounded below 1: without the image
  the MLM cannot know which colour or shape a caption names."""
  mask_id = tokenizer.hf.mask_token_id
  graphdef, params = nnx.split(model)
  forward = jax.jit(lambda p, i, m: jnp.argmax(nnx.merge(graphdef, p)(i, m), axis=-1))
  batch = tokenizer(list(captions))
  rows, positions, targets, categories = [], [], [], []
  for n, caption in enumerate(captions):
    words = caption.split()
    for w in range(min(len(words), tokenizer.context_length - 2)):
      rows.append(n)
      positions.append(w + 1)  # [CLS] first
      targets.append(words[w])
      categories.append(shapes.word_category(words, w))
  vocab = tokenizer.hf.convert_ids_to_tokens(list(range(len(tokenizer.hf))))
  exact = same_category = 0
  for lo in range(0, len(rows), batch_size):
    chunk = slice(lo, lo + batch_size)
    r = np.asarray(rows[chunk])
    p = np.asarray(positions[chunk])
    ids = np.array(batch.input_ids[r])
    ids[np.arange(len(r)), p] = mask_id
    pad = batch_size - len(r)  # one compiled shape: pad the last chunk
    ids_full = np.pad(ids, ((0, pad), (0, 0)))
    mask_full = np.pad(batch.attention_mask[r], ((0, pad), (0, 0)))
    predicted = np.asarray(forward(params, ids_full, mask_full))[np.arange(len(r)), p]
    for j, token in enumerate(predicted):
      word, category = targets[lo + j], categories[lo + j]
      guess = vocab[int(token)]
      exact += guess == word
      words = captions[rows[lo + j]].split()
      words[positions[lo + j] - 1] = guess
      same_category += shapes.word_category(words, positions[lo + j] - 1) == category
  total = max(len(rows), 1)
  return {"word": exact / total, "category": same_category / total, "words": float(len(rows))}


def meaning_change_report(source, scenes: Sequence[shapes.Scene], caption_lists: Sequence[Sequence[str]], *,
                          top_k: int = 10, stop_words=None) -> dict[str, dict[str, float]]:
  """How often a candidate source's proposals change what a caption says about its scene.

  For every caption of every scene and every word the text attack may target (not a stop word), the
  source's first `top_k` substitutes after the references' filter (`filter_substitutes`: no stop words,
  no sub-word pieces, not the word itself) are put in place one at a time; a proposal *changes meaning*
  when the new caption no longer parses to something `shapes.consistent` with the scene. Returns, per
  word category (`shapes.WORD_CATEGORIES`) and "all": {"proposals", "changed", "share"} (share = changed /
  proposals; NaN without proposals) and "words" (targetable words with at least one proposal).
  """

  stop_words = STOP_WORDS if stop_words is None else frozenset(stop_words)
  flat = [(scene, caption) for scene, caps in zip(scenes, caption_lists, strict=True) for caption in caps]
  proposals = source([caption.split() for _, caption in flat])
  counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  for (scene, caption), per_word in zip(flat, proposals, strict=True):
    words = caption.split()
    for w, word in enumerate(words):
      if word in stop_words:
        continue
      subs = filter_substitutes(word, per_word[w], stop_words)[:top_k]
      if not subs:
        continue
      category = shapes.word_category(words, w)
      for c in (category, "all"):
        counts[c]["words"] += 1
      for s in subs:
        changed = not shapes.describes(" ".join(words[:w] + [s] + words[w + 1:]), scene, original=caption)
        for c in (category, "all"):
          counts[c]["proposals"] += 1
          counts[c]["changed"] += int(changed)
  out = {}
  for c in (*shapes.WORD_CATEGORIES, "all"):
    n = counts[c]["proposals"]
    out[c] = {"proposals": float(n), "changed": float(counts[c]["changed"]), "words": float(counts[c]["words"]),
              "share": counts[c]["changed"] / n if n else float("nan")}
  return out


def format_meaning_report(report: dict[str, dict[str, float]]) -> str:
  lines = [f"  {'category':<10} {'words':>7} {'proposals':>10} {'meaning changed':>16}"]
  for c, r in report.items():
    share = "-" if not r["proposals"] else f"{100 * r['share']:.1f}%"
    lines.append(f"  {c:<10} {int(r['words']):>7} {int(r['proposals']):>10} {share:>16}")
  return "\n".join(lines)


def test_scenes(settings: MLMSettings, count: int | None = None, split: str = "test"):
  """(scenes, caption lists) of the first `count` images of a split, as the built dataset stores them."""

  records = [shapes.record_text(settings.world_seed, split, i, settings.captions_per_image)
             for i in range(settings.eval_images if count is None else count)]
  return [r[0] for r in records], [r[1] for r in records]


# ----------------------------------------------------------------------------------------------------
# The cache.


def cache_key(settings: MLMSettings) -> str:

  return config_lib.digest({"settings": dataclasses.asdict(settings), "version": MLM_VERSION,
                            "data_version": str(corpora.ShapesWorld.VERSION), "vocab": mlm_vocabulary()})


def cached_dir(settings: MLMSettings = MLMSettings()) -> Path:
  return paths.cache_root() / "mlm" / f"{MLM_NAME}-{cache_key(settings)}"


def resolved_name(text_attack: Mapping[str, Any]) -> str | None:
  """The cache directory a text threat (`text_attack`: source, bert) draws from when it is the shapes
  world's MLM (its name holds the MLM's settings, recipe version and data version), without building it;
  None for any other threat. Records of what a run trained against, or a study evaluated with, name it:
  "shapes-mlm" alone does not change with the recipe."""
  if text_attack["source"] != "bert" or text_attack.get("bert") != MLM_NAME:
    return None
  return cached_dir().name


def is_built(directory: Path) -> bool:
  return (directory / INFO_FILE).exists() and (directory / "model.safetensors").exists()


def build(settings: MLMSettings = MLMSettings(), directory: str | os.PathLike | None = None, *,
          overwrite: bool = False, log: Callable[[str], None] = print) -> Path:
  """Train, evaluate and save the MLM into `directory` (default: its cache directory); a finished
  directory is reused unless `overwrite`. The directory appears complete or not at all.

  One builder at a time: a study's shards, or every host of a pod on a shared cache, find the MLM
  missing at once; the others wait for the first, then reuse its copy (the same settings train the
  same model), so no finished copy is replaced under a process reading it."""

  directory = Path(directory) if directory is not None else cached_dir(settings)
  if is_built(directory) and not overwrite:
    return directory
  directory.parent.mkdir(parents=True, exist_ok=True)
  with WorkdirLock(directory.parent, wait=True, flag="the masked LM's cache directory", on_wait=log):
    if is_built(directory) and not overwrite:
      log(f"reusing the masked LM another process built at {directory}")
      return directory
    return _build(settings, directory, log)


def _build(settings: MLMSettings, directory: Path, log: Callable[[str], None]) -> Path:
  model, tokenizer, stats = train_mlm(settings, log=log)
  log(f"  trained in {stats['seconds']:.1f} s on {stats['train_captions']} captions")
  scenes, caption_lists = test_scenes(settings)
  accuracy = masked_accuracy(model, tokenizer, [c for caps in caption_lists for c in caps])
  # The attack's own candidate path (BertMLMSource, BERT-Attack's settings) decides what is reported.
  source = BertMLMSource(model, tokenizer, top_k=settings.top_k)
  report = meaning_change_report(source, scenes, caption_lists, top_k=settings.top_k)
  info = {"name": MLM_NAME, "version": MLM_VERSION, "settings": dataclasses.asdict(settings),
          "train": stats, "masked_accuracy": accuracy, "meaning_change": report}
  staging = Path(tempfile.mkdtemp(prefix=directory.name + ".", dir=directory.parent))
  replaced = directory.with_name(directory.name + ".replaced")
  try:
    save_bert_mlm(model, staging, tokenizer=tokenizer)
    (staging / "vocab.txt").write_text("".join(f"{w}\n" for w in mlm_vocabulary()))
    (staging / INFO_FILE).write_text(json.dumps(_no_nan(info), indent=1, allow_nan=False))
    # What is there (an overwritten copy, or what a killed build left) is moved aside, then the new copy
    # renamed into place: the path holds a whole copy or, for an instant, none; never a mix of two.
    if directory.exists():
      shutil.rmtree(replaced, ignore_errors=True)
      os.replace(directory, replaced)
    try:
      staging.rename(directory)
    except OSError:
      if replaced.exists():  # the copy that was there stays
        os.replace(replaced, directory)
      raise
  finally:
    for leftover in (staging, replaced):
      shutil.rmtree(leftover, ignore_errors=True)
  return directory


def _no_nan(value):
  """NaN (a share without proposals) as null: strict JSON."""
  if isinstance(value, dict):
    return {k: _no_nan(v) for k, v in value.items()}
  if isinstance(value, float) and math.isnan(value):
    return None
  return value


def load_info(directory: str | os.PathLike) -> dict:
  return json.loads((Path(directory) / INFO_FILE).read_text())


def ensure_built(settings: MLMSettings = MLMSettings(), *, log: Callable[[str], None] = print) -> Path:
  """The cached MLM's directory, trained now (about a minute on a CPU) if it is not there yet."""
  directory = cached_dir(settings)
  if not is_built(directory):
    log(f"{MLM_NAME} is not in the cache yet: training the shapes-world masked LM into {directory}")
    build(settings, directory, log=log)
  return directory


def resolve_bert(name: str, *, log: Callable[[str], None] = print) -> str:
  """`text_attack.bert` / `--bert` as a directory: "shapes-mlm" is the cached shapes-world MLM (built
  on first use); anything else (a transformers-layout directory or hub id) is returned unchanged."""
  if name == MLM_NAME:
    return str(ensure_built(log=log))
  if not name:
    raise ConfigError(f"no BERT masked LM named: set text_attack.bert (or --bert) to {MLM_NAME!r} for the "
                    "shapes world, or to a transformers-layout directory / hub id such as bert-base-uncased")
  return name
