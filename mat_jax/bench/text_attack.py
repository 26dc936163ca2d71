"""BERT-Attack throughput: the compiled batched attack vs a per-caption loop in the references' structure.

Both attack the same captions with the same candidates, the same encoder weights and the same
objective, and must produce the same adversarial captions (checked and printed). The reference loop is
what a user of the PyTorch references gets with an efficient (jitted) encoder: per caption, the
importance of every word from one batch of "[UNK]"-masked texts, then word by word in order of
importance, one batch of [current text, substitutions...] scored with the objective, stopping after
`max_changes` changes; texts are strings tokenised on the host at every step. Its jitted encoder
compiles once per distinct batch size, all in the untimed warm-up call (the timed calls attack the same
captions), so no compilation is timed.

    python -m mat_jax.bench attacks               # the attacks suite runs this among others
    python -m mat_jax.bench attacks --parts bert  # this benchmark alone
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mat_jax import errors
from mat_jax.attacks.candidates import MASK_WORD, CharEditSource, LexiconSource, TextCandidates, prepare_candidates
from mat_jax.attacks.text import adversarial_captions, default_chunk_size, text_attack
from mat_jax.bench import common
from mat_jax.data import shapes
from mat_jax.models import CLIP, clip_config, split
from mat_jax.models.clip import PRESETS
from mat_jax.models.dual_encoder import DualEncoder
from mat_jax.models.tokenizers import Tokenizer

# The share of captions on which the batched attack and the per-caption loop must end alike for the timings
# to compare one attack (near-ties aside: `run_bert_attack_benchmark`).
SAME_CAPTIONS_REQUIRED = 0.9

# -------------------------------------------------------------------------------------------------
# The references' sequential structure (also the oracle of tests/test_text_attack.py)
# -------------------------------------------------------------------------------------------------

def _softmax(x: np.ndarray) -> np.ndarray:
  # float64: on random-weight towers the KLs of nearly equal texts are ~1e-8, below float32's resolution
  # of log-probabilities (the references' float32 KLDivLoss orders words by rounding noise there; mat_jax
  # computes the KL without cancellation, see mat_jax.attacks.text.softmax_kl).
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
  """KL(p ‖ q) over the last axis, p broadcast against q."""
  return np.sum(p * (np.log(p) - np.log(q)), axis=-1)


def _normalize(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _reference_scores(features: np.ndarray, guide: np.ndarray, objective: str) -> np.ndarray:
  if objective == "image":  # minus the cosine to the guiding image(s)
    g = _normalize(guide.reshape(-1, guide.shape[-1]))
    return -(_normalize(features) @ g.T).mean(-1)
  return _kl(_softmax(_normalize(guide)), _softmax(_normalize(features)))  # "kl"


def reference_text_attack(encoder: DualEncoder, params, tokenizer: Tokenizer, candidates: TextCandidates,
                          guide: Any = None, *, objective: str = "image", max_changes: int = 1,
                          text_features=None, stats: dict | None = None) -> list[str]:
  """The per-caption loop of Co-Attack / SGA's `TextAttacker`, with the given candidates' substitutes.

  text_features: a jitted `(params, ids, mask) -> features`, shared between calls (default: one is
  made here). stats: a dict that receives counts of encoder calls, texts encoded and words examined.
  """
  if objective not in ("image", "kl"):
    raise ValueError(f"the reference loop knows the objectives 'image' and 'kl', not {objective!r}")
  if not candidates.has_text:
    raise ValueError("pass the TextCandidates that prepare_candidates returned (with its host text)")
  feats = text_features or jax.jit(encoder.text_features)
  words_per_caption = [list(w) for w in candidates.words]  # per slot: "" continues a long word
  subs = candidates.substitutes
  capacity = tokenizer.context_length - int(tokenizer.start_id is not None) - int(tokenizer.end_id is not None)

  counts = collections.Counter()
  front = int(tokenizer.start_id is not None)

  def encode(texts: list[str], kind: str, changed_at: Any = None) -> np.ndarray:
    """Features of `texts`. changed_at (one per text): the content tokens before the word from which a
    text differs from an already encoded one, or -1 for a text whose features are known already or never
    used; only counted (below), this loop encodes every text whole."""
    counts["encoder_calls"] += 1
    counts[f"{kind}_texts"] += len(texts)
    batch = tokenizer(texts)
    # Work: the positions encoded here (padded), and the positions that an encoder continuing encoded
    # texts from their changed word on (`DualEncoder.text_features_continued`) needs.
    tokens = np.asarray(batch.attention_mask).sum(-1)
    counts["positions"] += int(np.asarray(batch.input_ids).size)
    if changed_at is None:
      counts["needed_positions"] += int(tokens.sum())
    else:
      changed_at = np.asarray(changed_at)
      first = np.minimum(front + changed_at, tokens - 1)
      counts["needed_positions"] += int(np.sum(np.where(changed_at >= 0, tokens - first, 0)))
    return np.asarray(feats(params, batch.input_ids, batch.attention_mask))

  clean = encode([" ".join(w) for w in words_per_caption], "clean")
  if guide is None:
    guide = clean
  guide = np.asarray(guide)
  out = []
  for i, words in enumerate(words_per_caption):
    # Word importance: every word masked in turn, KL(p_orig || p_masked) over normalised embeddings.
    masked = [" ".join(words[:j] + [MASK_WORD] + words[j + 1:]) for j in range(len(words))]
    p_clean = _softmax(_normalize(clean[i]))
    starts = np.cumsum([0] + [len(p) for p in tokenizer.encode_words(words)])
    attackable = [bool(subs[i][j]) and starts[j] < capacity for j in range(len(words))]
    changed_at = np.where(attackable, starts[:-1], -1)  # the other words' importance is never used
    importance = _kl(p_clean, _softmax(_normalize(encode(masked, "importance", changed_at))))
    order = sorted(range(len(words)), key=lambda j: importance[j], reverse=True)
    final, final_starts = list(words), starts
    changes = 0
    for j in order:
      if changes >= max_changes:
        break
      if not attackable[j]:  # stop word / no candidate / beyond the context
        continue
      counts["examined_words"] += 1
      options = [words[j]] + list(subs[i][j])
      texts = [" ".join(final[:j] + [s] + final[j + 1:]) for s in options]
      changed_at = [-1] + [int(final_starts[j])] * len(subs[i][j])  # the first text is the current one
      best = int(np.argmax(_reference_scores(encode(texts, "candidate", changed_at), guide[i], objective)))
      final[j] = options[best]
      if best > 0:
        changes += 1
        final_starts = np.cumsum([0] + [len(p) for p in tokenizer.encode_words(final)])
    out.append(" ".join(final))
  if stats is not None:
    stats.update(counts)
  return out


# -------------------------------------------------------------------------------------------------
# Benchmark
# -------------------------------------------------------------------------------------------------

def add_bert_attack_arguments(parser: argparse.ArgumentParser) -> None:
  g = parser.add_argument_group("BERT-Attack (batched text attack vs per-caption loop)")
  g.add_argument("--text-captions", type=errors.positive_int, default=256, help="captions attacked (default 256)")
  g.add_argument("--text-model", default="tiny", choices=sorted(PRESETS),
                 help="CLIP preset whose towers are used (random init, shapes-world vocabulary); default tiny")
  g.add_argument("--text-source", choices=("paraphrase", "charedit"), default="paraphrase",
                 help="candidate source: the shapes-world synonym table (paraphrase) or character edits")
  g.add_argument("--text-objective", choices=("image", "kl"), default="image",
                 help="image: SGA/MAT (guided by the paired image); kl: Co-Attack")
  g.add_argument("--text-max-changes", type=errors.positive_int, default=1,
                 help="words changed at most (references: 1)")
  g.add_argument("--text-chunk-size", type=errors.positive_int, default=None,
                 help="texts per encoder call (default: mat_jax.attacks.text.default_chunk_size)")
  g.add_argument("--text-seed", type=errors.seed, default=0)


def _shapes_setup(n_captions: int, model: str, seed: int, dtype: str):
  from flax import nnx

  tokenizer = shapes.tokenizer()
  rng = np.random.default_rng(seed)
  scenes = [shapes.sample_scene(rng) for _ in range(-(-n_captions // 5))]
  captions = [c for scene in scenes for c in shapes.captions(scene, rng, 5)][:n_captions]
  cfg = clip_config(model, dtype=dtype)
  cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=tokenizer.vocab_size,
                                             context_length=tokenizer.context_length,
                                             eos_token_id=tokenizer.end_id, bos_token_id=tokenizer.start_id,
                                             pad_token_id=tokenizer.pad_id))
  encoder, params = split(CLIP(cfg, rngs=nnx.Rngs(seed)))
  size = cfg.vision.image_size
  images = np.stack([shapes.render(scene, size) for scene in scenes]).astype(np.float32) / 255.0
  text_to_image = np.arange(len(captions)) // 5
  return tokenizer, captions, encoder, params, images, text_to_image, shapes.substitution_table()


def run_bert_attack_benchmark(args: argparse.Namespace) -> dict:
  """Time both implementations on the same captions, candidates and weights; print and return the figures."""
  n = args.text_captions
  tokenizer, captions, encoder, params, images, text_to_image, table = _shapes_setup(
      n, args.text_model, args.text_seed, args.dtype)
  source = LexiconSource(table) if args.text_source == "paraphrase" else CharEditSource(seed=args.text_seed)
  t0 = time.perf_counter()
  candidates = prepare_candidates(captions, tokenizer, source)
  prepare_s = time.perf_counter() - t0
  objective, max_changes = args.text_objective, args.text_max_changes
  guide = None
  if objective == "image":
    guide = jax.jit(encoder.image_features)(params, jnp.asarray(images))[jnp.asarray(text_to_image)]
  device_candidates = jax.device_put(candidates)
  chunk_size = args.text_chunk_size or default_chunk_size(candidates.text_length or candidates.context_length)

  def batched():
    return text_attack(encoder, params, device_candidates, guide, objective=objective, max_changes=max_changes,
                       chunk_size=chunk_size)

  features = jax.jit(encoder.text_features)
  guide_host = None if guide is None else np.asarray(guide)

  def sequential():
    return reference_text_attack(encoder, params, tokenizer, candidates, guide_host, objective=objective,
                                 max_changes=max_changes, text_features=features)

  # Round by round, so that the machine's drift between fast and slow minutes hits both alike.
  median, _ = common.interleaved_medians({"batched": (batched, common.block), "sequential": (sequential, lambda x: x)},
                                         rounds=3, seconds=0.0)
  batched_s, sequential_s = median["batched"], median["sequential"]
  ours = adversarial_captions(candidates, batched())
  stats: dict = {}
  theirs = reference_text_attack(encoder, params, tokenizer, candidates, guide_host, objective=objective,
                                 max_changes=max_changes, text_features=features, stats=stats)
  same = sum(a == b for a, b in zip(ours, theirs, strict=True))
  changed = sum(a != b for a, b in zip(ours, captions, strict=True))
  rows = [["batched, jitted (mat_jax)", n / batched_s, batched_s * 1e3, sequential_s / batched_s],
          ["per-caption loop (references' structure)", n / sequential_s, sequential_s * 1e3, 1.0]]
  common.print_table(
      f"BERT-Attack, {n} captions, {args.text_source} candidates, objective {objective}, max_changes "
      f"{max_changes}, CLIP {args.text_model} {args.dtype} ({common.device_summary()})",
      ["implementation", "captions/s", "ms/batch", "speed-up"], rows)
  # Texts through the encoder: the batched attack masks only attackable words and scores the same
  # candidates as the loop without re-encoding the current text each time; speculative words that fill
  # its chunks come on top (at most a chunk per greedy step, and they make steps fewer).
  reference_texts = stats["clean_texts"] + stats["importance_texts"] + stats["candidate_texts"]
  batched_texts = n + int(np.sum(candidates.target_valid)) + stats["candidate_texts"] - stats["examined_words"]
  print(f"same adversarial captions: {same}/{n} (captions changed by the attack: {changed}/{n})")
  # Both run the same encoder on the same candidates; only near-ties, which float rounding in differently
  # batched encodings can tip, may go the other way (mat_jax.attacks.text). More than a few: another attack.
  if same < SAME_CAPTIONS_REQUIRED * n:
    raise common.Disagreement(
        f"the batched attack and the per-caption loop agree on {same}/{n} adversarial captions, fewer than "
        f"{SAME_CAPTIONS_REQUIRED:.0%}: they do not run the same attack, so their timings would not compare")
  print(f"texts encoded per batch: per-caption loop {reference_texts} in {stats['encoder_calls']} encoder calls; "
        f"batched {batched_texts} needed (+ padding and speculation within chunks of {chunk_size})")
  # Work in token positions: both sides run the same encoder, whose cost is about proportional to them,
  # so speed-up = work ratio x throughput ratio; the work ratio is what the batched attack gets at the
  # loop's throughput per position.
  positions, needed = stats["positions"], stats["needed_positions"]
  print(f"text-encoder token positions: per-caption loop {positions:,} (whole texts, padded to "
        f"{tokenizer.context_length}); needed from each changed word on, as the batched attack encodes them: "
        f"{needed:,} ({positions / needed:.1f}x less work)")
  print(f"positions per second: loop {positions / sequential_s:,.0f}, batched {needed / batched_s:,.0f} "
        f"({needed / batched_s / (positions / sequential_s):.2f}x the loop's; counting the needed ones only: "
        "its padding to length buckets and chunks, speculation and attention over the cached keys come on top)")
  print(f"candidate preparation on the host (outside both timings, cached per caption): {prepare_s * 1e3:.0f} ms")
  return {"captions": n, "batched_captions_per_s": n / batched_s, "sequential_captions_per_s": n / sequential_s,
          "speedup": sequential_s / batched_s, "same_captions": same, "changed_captions": changed,
          "prepare_ms": prepare_s * 1e3, "reference_texts": reference_texts, "batched_texts": batched_texts,
          "reference_encoder_calls": stats["encoder_calls"], "reference_positions": positions,
          "needed_positions": needed, "objective": objective, "source": args.text_source,
          "model": args.text_model}

