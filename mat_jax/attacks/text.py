"""BERT-Attack as the VLP references use it, compiled: word importance and greedy substitution on device.

Host prepares, device scores. `mat_jax.attacks.candidates.prepare_candidates` turns N captions into
fixed-shape arrays (word pieces, substitutes' pieces); `text_attack` then runs entirely inside `jit`:

1. Word importance: each attackable word is replaced by the mask word ("[UNK]") and scored by
   KL(p_clean ‖ p_masked), p = softmax over the L2-normalised text embedding (the references' `text_feat`);
   all masked texts of all captions go through the encoder in fixed-size chunks.
2. Greedy substitution in order of importance, exactly the references' sequential loop: for the current
   text, a word's candidates are scored with the objective next to the current text itself, and the
   first word (in importance order) whose best candidate scores strictly higher than keeping the word is
   changed (ties keep the word, as the references' argmax over [current, candidates...]). With
   `max_changes` > 1 the loop goes on from the next word in importance order with the changed text.
   Here each step of a `lax.while_loop` scores the next word(s) of every caption still being attacked
   in batched encoder calls and takes, per caption, the first word that beats keeping; words after it
   are re-scored against the changed text in the next step, so the result is the sequential one. (Up to
   float32 rounding in exact ties after a change: the score to beat is the changed text's as its
   continuation gave it, the candidates' come from the re-encoded text's cache, and the two may differ in
   the last bits, so a candidate that exactly ties may replace the word.)

Both passes are iterations of one `lax.while_loop` (the first is the importance pass), so the program holds
one compiled encoder per length bucket instead of one per bucket and pass: a ViT-B/16 MAT step compiles
in about half the time, and runs no slower (docs/performance.md).

Texts are built on device from word pieces (`assemble_pieces`), truncated as the tokenizer truncates, so
no text returns to the host during the attack. A masked or substituted text equals its base text (the
clean caption, or the current one) up to the changed word, and CLIP's text tower is causal: the base
texts are encoded once, keeping every block's keys and values, and each changed text is encoded from its
changed word on (`DualEncoder.text_features_continued`), which is about half of its tokens.
`adversarial_captions` turns a result back into strings (for transfer to a model with another tokenizer).

Where mat_jax differs from the references (on purpose):
- `BertMLMSource` reads a word's substitutes at the word's own position (the references read one
  position early, see `mat_jax.attacks.candidates`).
- KLs are computed without cancellation (`softmax_kl`): for a one-word change the references' float32
  Σ p (log p − log q) loses digits, down to rounding noise (even negative) on towers that one word barely
  moves (docs/differences.md).
- Importance is computed for attackable words only; the others are skipped by the references' loop
  anyway, so the order among the words that matter is the same.

Objectives (higher = better for the attacker), functions of candidate text features (M, C, D) and a
guide: "image" (SGA, MAT: minus the cosine similarity to guiding image features (M, D), or the mean over
several guiding images (M, G, D)), "kl" (Co-Attack: KL(softmax(n(g)) ‖ softmax(n(f))) from the clean text
features g, which is the default guide; n = L2 normalisation). Objectives receive the encoder's
unnormalised projected features.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mat_jax import checks, precompile, runtime
from mat_jax.attacks.candidates import STOP_WORDS, CandidateSource, TextCandidates, prepare_candidates
from mat_jax.errors import InputError
from mat_jax.models.clip import check_tokens_for, feature_products, l2_normalize
from mat_jax.models.dual_encoder import DualEncoder, split
from mat_jax.models.tokenizers import Tokenizer

Objective = Callable[[jax.Array, jax.Array], jax.Array]


# -------------------------------------------------------------------------------------------------
# Objectives
# -------------------------------------------------------------------------------------------------

def image_objective(features: jax.Array, guide: jax.Array) -> jax.Array:
  """Minus the cosine similarity of texts (M, C, D) to guiding images (M, D) or (M, G, D) (mean over G)."""
  guide = l2_normalize(guide)
  if guide.ndim == 2:
    guide = guide[:, None, :]
  return -feature_products("mcd,mgd->mcg", l2_normalize(features), guide).mean(-1)


def softmax_kl(x: jax.Array, y: jax.Array) -> jax.Array:
  """KL(softmax(x) ‖ softmax(y)) over the last axis, without the cancellation of Σ p (log p − log q).

  Text features differ little between captions that differ in one word, and a softmax over a
  unit-norm embedding is close to uniform: the KL is small (1e-5 to 1e-3 on a trained shapes-world CLIP,
  far less on a near-random tower) while log p and log q are ~ -6, so the textbook formula cancels digits
  in float32, down to rounding noise where the KL is smallest. With
  d = x − y and u = Σ p (e^(−d) − 1), KL = Σ p (d + expm1(−d)) + (log1p(u) − u): every term is computed
  from the small differences themselves.
  """
  p = jax.nn.softmax(x, axis=-1)
  d = x - y
  e = jnp.expm1(-d)
  u = jnp.sum(p * e, axis=-1)
  return jnp.sum(p * (d + e), axis=-1) + (jnp.log1p(u) - u)


def kl_objective(features: jax.Array, guide: jax.Array) -> jax.Array:
  """KL(softmax(n(guide)) ‖ softmax(n(features))) for texts (M, C, D) and clean text features (M, D),
  n = L2 normalisation: the references score candidates on the same normalised embedding as the word
  importance (Co-Attack's CLIP wrapper normalises `text_embed`)."""
  return softmax_kl(l2_normalize(guide)[:, None, :], l2_normalize(features))


OBJECTIVES: dict[str, Objective] = {"image": image_objective, "kl": kl_objective}


def _objective_fn(objective: str | Objective) -> Objective:
  if callable(objective):
    return objective
  if objective not in OBJECTIVES:
    raise ValueError(f"unknown text-attack objective {objective!r}; use one of {sorted(OBJECTIVES)} or a "
                     "function (features (M, C, D), guide) -> scores (M, C), higher = better for the attacker")
  return OBJECTIVES[objective]


# -------------------------------------------------------------------------------------------------
# Building token ids from word pieces
# -------------------------------------------------------------------------------------------------

def assemble_pieces(pieces: jax.Array, lengths: jax.Array, *, start_id: int | None, end_id: int | None,
                    pad_id: int, context_length: int, length: int | None = None) -> tuple[jax.Array, jax.Array]:
  """(..., W, P) word pieces and (..., W) lengths -> ids, mask (..., length), as the tokenizer makes them.

  start + concatenated pieces + end + padding; content beyond `context_length` (minus the special
  tokens) is cut and the end token kept, like the tokenizer's truncation. `length` (default
  `context_length`) may be shorter when the caller knows every text fits (the rest would be padding).
  """
  length = context_length if length is None else length
  W, P = pieces.shape[-2:]
  front, back = int(start_id is not None), int(end_id is not None)
  ends = jnp.cumsum(lengths, axis=-1)
  starts = ends - lengths
  content = jnp.minimum(ends[..., -1:], context_length - front - back)  # (..., 1)
  position = jnp.arange(length)
  index = position - front                                                # content index of each slot
  # Word holding content index i: the number of words that end at or before i (empty words skip).
  word = jnp.minimum(jnp.sum(ends[..., None, :] <= index[:, None], axis=-1), W - 1)
  piece = jnp.clip(index - jnp.take_along_axis(starts, word, axis=-1), 0, P - 1)
  flat = pieces.reshape(*pieces.shape[:-2], W * P)
  ids = jnp.take_along_axis(flat, word * P + piece, axis=-1)
  ids = jnp.where((index >= 0) & (index < content), ids, pad_id)
  if front:
    ids = jnp.where(position == 0, start_id, ids)
  if back:
    ids = jnp.where(index == content, end_id, ids)
  mask = position < content + front + back
  return ids.astype(jnp.int32), mask.astype(jnp.int32)


def _build(candidates: TextCandidates, pieces, lengths, length: int | None = None):
  return assemble_pieces(pieces, lengths, start_id=candidates.start_id, end_id=candidates.end_id,
                         pad_id=candidates.pad_id, context_length=candidates.context_length,
                         length=candidates.text_length if length is None else length)


def _replace_word(pieces, lengths, word, new_pieces, new_length):
  """Rows (B, W, P), (B, W) with word `word` (B,) replaced by `new_pieces` (B, P), `new_length` (B,)."""
  hit = jnp.arange(pieces.shape[-2]) == word[:, None]
  return (jnp.where(hit[..., None], new_pieces[:, None, :], pieces),
          jnp.where(hit, new_length[:, None], lengths))


def _tokens_before(lengths: jax.Array, word: jax.Array) -> jax.Array:
  """Content tokens before word `word` (...,) in texts of word lengths (..., W)."""
  return jnp.sum(jnp.where(jnp.arange(lengths.shape[-1]) < word[..., None], lengths, 0), axis=-1)


def _changed_span(c: TextCandidates, before: jax.Array, total: jax.Array, shares_prefix: bool):
  """Where scoring a changed text starts and how many tokens it covers: from its changed word (`before`
  content tokens precede it) to its last token (`total` content tokens, cut as the tokenizer cuts).
  The tokens before the change are the base text's, already in the cache; with `shares_prefix` False
  (the tower pools elsewhere than at the last token) every text is scored whole."""
  front, back = int(c.start_id is not None), int(c.end_id is not None)
  last = front + jnp.minimum(total, c.context_length - front - back) + back - 1
  start = jnp.minimum(front + before, last) if shares_prefix else jnp.zeros_like(last)
  return start, last + 1 - start


def _pools_last_token(encoder: DualEncoder, c: TextCandidates) -> bool:
  """Whether the text tower pools these texts at their end token, their last: then a text that differs
  from a cached one from some word on is encoded from that word on (`DualEncoder.text_features_continued`)."""
  text = encoder.config.text
  # A bidirectional tower (BLIP's BERT, pooled at [CLS]) changes every state with any token: scored whole.
  if c.end_id is None or text.text_pooling not in ("eos", "argmax"):
    return False
  if text.text_pooling == "eos":
    return c.end_id == text.eos_token_id
  return c.end_id == text.vocab_size - 1  # "argmax": the largest id, OpenAI's end-of-text


@precompile.jit
def assemble(candidates: TextCandidates, choice: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """ids, mask (N, context_length) of the captions with substitutions applied.

  choice: int (N, A), per attackable word the candidate index to use, or -1 to keep the word; None keeps
  every word (the clean captions, identical to `tokenizer(captions)`).
  """
  c = candidates
  pieces, lengths = c.word_pieces, c.word_lengths
  if choice is not None:
    choice = choice.astype(jnp.int32)
    safe = jnp.maximum(choice, 0)
    new_pieces = jnp.take_along_axis(c.sub_pieces, safe[..., None, None], axis=2)[:, :, 0]
    new_lengths = jnp.take_along_axis(c.sub_lengths, safe[..., None], axis=2)[..., 0]
    use = (choice >= 0) & c.target_valid & (new_lengths > 0)
    # One-hot (N, A, W): each word is at most one attackable slot.
    onehot = (c.target_words[..., None] == jnp.arange(pieces.shape[1])) & use[..., None]
    replaced = onehot.any(axis=1)
    pieces = jnp.where(replaced[..., None], jnp.einsum("naw,nap->nwp", onehot.astype(jnp.int32), new_pieces),
                       pieces)
    lengths = jnp.where(replaced, jnp.einsum("naw,na->nw", onehot.astype(jnp.int32), new_lengths), lengths)
  return _build(c, pieces, lengths, length=c.context_length)


# -------------------------------------------------------------------------------------------------
# The attack
# -------------------------------------------------------------------------------------------------

@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["input_ids", "attention_mask", "changed_words", "changed_candidates",
                                "objective", "clean_objective", "importance"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class TextAttackResult:
  """Adversarial texts of N captions (M = max_changes).

  input_ids, attention_mask  int32 (N, L): the adversarial captions, as the target tokenizer makes them
  changed_words              int32 (N, M): index of each changed word (its slot in `candidates.words[n]`),
                             -1 = no change
  changed_candidates         int32 (N, M): index into that word's candidate list (`substitutes[n][word]`)
  objective, clean_objective float (N,): the objective of the adversarial and of the clean caption
  importance                 float (N, A): importance of each attackable word (-inf for padding slots)
  """
  input_ids: jax.Array
  attention_mask: jax.Array
  changed_words: jax.Array
  changed_candidates: jax.Array
  objective: jax.Array
  clean_objective: jax.Array
  importance: jax.Array


def length_buckets(text_length: int) -> tuple[int, ...]:
  """The static lengths texts are padded to while scored: 8, 16 and 32 tokens (those below
  `text_length`) and `text_length` itself, e.g. 8/16/24 for 24, 8/16/32/77 for 77. Short lengths matter
  most: a changed text is scored from its changed word on, typically a handful of tokens."""
  return tuple(sorted({b for b in (8, 16, 32) if b < text_length} | {text_length}))


def _map_valid(fn: Callable[[jax.Array, int], Any], valid: jax.Array, chunk_size: int, sizes: jax.Array,
               buckets: tuple[int, ...], dtypes: Any) -> Any:
  """fn(indices, length) over the flat indices where `valid` (T,) is True, in chunks of `chunk_size`;
  zeros elsewhere. `sizes` (T,) is the number of tokens each text needs encoded; `buckets` the static
  lengths to pad to; `dtypes` the pytree of dtypes of fn's outputs, one value per text each (given, not
  found by tracing fn once more: each trace of fn is a trace of the text encoder).

  The valid indices are packed to the front, shortest text first, and a `while_loop` runs only the
  chunks that hold some, so padding (missing words and candidates, captions already done) costs less than
  one chunk of encoder work per call, and memory stays bounded by one chunk of texts. Each chunk is
  scored at the shortest bucket that holds its longest text (`lax.switch` over one compiled encoder per
  bucket): captions are mostly much shorter than the longest one, and padding costs full price.
  """
  total = valid.shape[0]
  chunk = max(1, min(chunk_size, total))
  n_chunks = -(-total // chunk)
  count = jnp.sum(valid)
  sizes = jnp.minimum(sizes, buckets[-1])
  # Stable sort: the valid indices first, shortest first (cheaper to compile than nonzero + sort).
  order = jnp.argsort(jnp.where(valid, sizes, buckets[-1] + 1), stable=True)
  packed = jnp.pad(order, (0, n_chunks * chunk - total))
  branches = [functools.partial(lambda length, flat: fn(flat, length), b) for b in buckets]
  buffer = jax.tree.map(lambda dtype: jnp.zeros((n_chunks * chunk,), dtype), dtypes)

  def run(state):
    i, buffer = state
    flat = jax.lax.dynamic_slice_in_dim(packed, i * chunk, chunk)
    used = i * chunk + jnp.arange(chunk) < count
    longest = jnp.max(jnp.where(used, sizes[flat], 0))
    out = jax.lax.switch(jnp.sum(jnp.asarray(buckets) < longest), branches, flat)
    return i + 1, jax.tree.map(lambda b, o: jax.lax.dynamic_update_slice_in_dim(b, o, i * chunk, 0), buffer, out)

  _, buffer = jax.lax.while_loop(lambda state: state[0] * chunk < count, run, (0, buffer))
  # Back to the original positions: index order[r] holds the r-th packed result.
  rank = jnp.argsort(order)
  return jax.tree.map(lambda x: jnp.where(valid.reshape(-1, *([1] * (x.ndim - 1))), x[rank], 0), buffer)


def default_chunk_size(text_length: int) -> int:
  """Texts per encoder call when none is given.

  Chunks are fixed-size: the texts that pad a chunk, and the speculative words that fill it, are
  computed and thrown away. A CPU is compute-bound, so that waste is paid in full and its chunks stay
  near 1k tokens (at ViT-B/16's 77-token texts, 13 texts run the 1-word attack of a batch of 8 in 0.4x
  the time of 128); an accelerator is latency-bound at that size and takes ~32k tokens per call, in a
  multiple of 8 texts (docs/benchmarks.md).
  """
  if runtime.program_backend() == "cpu":
    return max(8, 1024 // text_length)
  # A multiple of 8 texts, so that a chunk's tokens are too at every length: XLA:GPU pads a bfloat16 matmul's
  # rows to a multiple of 8 for cuBLAS, copying the activations around every matmul of the chunk otherwise.
  return max(8, 32768 // text_length // 8 * 8)


def text_attack(encoder: DualEncoder, params: nnx.State, candidates: TextCandidates, guide: jax.Array | None = None,
                *, objective: str | Objective = "image", max_changes: int = 1,
                chunk_size: int | None = None) -> TextAttackResult:
  """BERT-Attack on N captions with prepared candidates; one compiled computation, no host round trips.

  guide: "image" objective -> guiding image features (N, D) or (N, G, D), one row per caption; "kl" ->
  clean text features (N, D), default the encoder's features of the clean captions.
  max_changes: words changed at most (1 in the references). chunk_size: texts per encoder call (the
  memory bound; default `default_chunk_size` of the candidates' context length).
  Nothing here is differentiated: params and guide pass through stop_gradient, so the attack can sit
  inside a differentiated training loss. Compiles once per (encoder, shapes, static arguments).
  """
  if chunk_size is None:
    chunk_size = default_chunk_size(candidates.text_length or candidates.context_length)
  if max_changes < 1 or chunk_size < 1:
    raise ValueError(f"max_changes and chunk_size must be >= 1, got {max_changes}, {chunk_size}")
  _objective_fn(objective)  # unknown names fail here, before tracing
  guide = None if guide is None else jnp.asarray(guide)
  if guide is None and objective != "kl":
    raise ValueError(f"objective {objective!r} needs a guide (e.g. image features (N, D), one row per "
                     "caption); only 'kl' defaults to the clean text features")
  if guide is not None and guide.shape[0] != candidates.word_pieces.shape[0]:
    raise ValueError(f"guide has {guide.shape[0]} rows for {candidates.word_pieces.shape[0]} captions; give "
                     "one row per caption (index image features with text_to_image)")
  # Every static argument passed positionally: jit keys its cache on how they are passed.
  return _compiled_text_attack(encoder, params, candidates, guide, objective, max_changes, chunk_size)


@precompile.jit(static_argnums=(0, 4, 5, 6))
def _compiled_text_attack(encoder, params, candidates, guide, objective, max_changes, chunk_size) -> TextAttackResult:
  score_fn = _objective_fn(objective)
  params = jax.lax.stop_gradient(params)
  c = candidates
  N, W, _ = c.word_pieces.shape
  A, K = c.sub_lengths.shape[1:]
  M = max_changes
  buckets = length_buckets(c.text_length or c.context_length)
  shares_prefix = _pools_last_token(encoder, c)

  # The clean captions are encoded whole, keeping every block's keys and values: a masked or substituted
  # text is encoded from its changed word on (a causal tower's tokens before it are the clean ones).
  clean, clean_cache = encoder.text_features_and_cache(params, *_build(c, c.word_pieces, c.word_lengths))
  guide = clean if guide is None else jax.lax.stop_gradient(jnp.asarray(guide))
  clean_score = score_fn(clean[:, None], guide)[:, 0]
  n_targets = c.target_valid.sum(-1)
  upto = jnp.arange(1, A + 1)
  rows = jnp.arange(N)
  # Every text either pass scores is flat index f over (N, A, K); the importance pass uses f < N * A.
  importance_valid = jnp.pad(c.target_valid.reshape(-1), (0, N * A * (K - 1)))
  masked_tokens = (c.word_lengths.sum(-1)[:, None] - jnp.take_along_axis(c.word_lengths, c.target_words, axis=1)
                   + c.mask_length)                                                      # (N, A)
  _, masked_sizes = _changed_span(c, _tokens_before(c.word_lengths[:, None], c.target_words), masked_tokens,
                                  shares_prefix)
  importance_sizes = jnp.pad(masked_sizes.reshape(-1), (0, N * A * (K - 1)))

  # One loop runs both passes, so the encoder is compiled once per length bucket, not once per bucket and
  # pass: its first iteration is the importance pass, the others are the greedy substitution's steps.
  def step(state):
    (ranked, importance, order, before_rank,
     pieces, lengths, next_rank, changes, keep, words_out, cands_out, active) = state
    # Greedy substitution: each active caption's next word must be scored; the chunks that takes are
    # filled with the words after it (speculation: they were scored against the current text, which
    # stays current unless an earlier word changes, and then they are dropped). So a step costs what its
    # first words cost, and captions whose first words fail take fewer steps.
    end = jnp.minimum(next_rank[:, None] + upto, n_targets[:, None])                # (N, A)
    texts = jnp.sum(jnp.where(active[:, None], jnp.take_along_axis(before_rank, end, axis=1)
                              - jnp.take_along_axis(before_rank, next_rank[:, None], axis=1), 0), axis=0)
    budget = -(-texts[0] // chunk_size) * chunk_size
    words = jnp.maximum(jnp.sum(texts <= budget), 1)                                # words per caption now
    ranks = next_rank[:, None] + jnp.arange(A)                                      # (N, A)
    live = (jnp.arange(A) < words) & (ranks < n_targets[:, None]) & active[:, None]
    slots = jnp.take_along_axis(order, jnp.minimum(ranks, A - 1), axis=1)
    current_ids, current_mask = _build(c, pieces, lengths)
    # The current texts are the clean ones until some caption changes (with one change, always: a
    # changed caption is done), so they are re-encoded only after a change.
    cache = clean_cache
    if M > 1:
      cache = jax.lax.cond(jnp.any(changes > 0),
                           lambda: encoder.text_features_and_cache(params, current_ids, current_mask)[1],
                           lambda: clean_cache)

    def scored(flat, length):
      """Per text: in the importance pass, KL(p_clean || p_masked) of word (n, a) replaced by the mask
      word; in a greedy step, the objective of word slots[n, j] replaced by its candidate k, and whether
      that text differs from the current one (a change truncated away rebuilds it: ties keep)."""
      n_masked, a = jnp.minimum(flat // A, N - 1), flat % A
      n_cand, j, k = flat // (A * K), (flat // K) % A, flat % K
      n = jnp.where(ranked, n_cand, n_masked)
      slot = slots[n_cand, j]
      word = jnp.where(ranked, c.target_words[n_cand, slot], c.target_words[n_masked, a])
      new_pieces = jnp.where(ranked, c.sub_pieces[n_cand, slot, k], c.mask_pieces)
      new_length = jnp.where(ranked, c.sub_lengths[n_cand, slot, k], c.mask_length)
      new_pieces, new_lengths = _replace_word(pieces[n], lengths[n], word, new_pieces, new_length)
      ids, _ = _build(c, new_pieces, new_lengths)
      start, _ = _changed_span(c, _tokens_before(new_lengths, word), new_lengths.sum(-1), shares_prefix)
      rest = jnp.take_along_axis(ids, start[:, None] + jnp.arange(length), axis=1, mode="fill",
                                 fill_value=c.pad_id)
      features = encoder.text_features_continued(params, jax.tree.map(lambda t: t[n], cache), start, rest)
      kl = softmax_kl(l2_normalize(clean[n]), l2_normalize(features))
      score = score_fn(features[:, None], guide[n])[:, 0]
      return (jnp.where(ranked, score, kl).astype(jnp.float32), jnp.any(ids != current_ids[n], axis=-1))

    exists = live[..., None] & (jnp.take_along_axis(c.sub_lengths, slots[..., None], axis=1) > 0)
    # Tokens to encode per candidate text: the current caption with word `a` swapped for candidate k,
    # from that word on.
    words_at = jnp.take_along_axis(c.target_words, slots, axis=1)                    # (N, A)
    replaced = jnp.take_along_axis(lengths, words_at, axis=1)
    totals = (lengths.sum(-1)[:, None, None] - replaced[..., None]
              + jnp.take_along_axis(c.sub_lengths, slots[..., None], axis=1))       # (N, A, K)
    _, sizes = _changed_span(c, _tokens_before(lengths[:, None], words_at)[..., None], totals, shares_prefix)
    values, differs = _map_valid(scored, jnp.where(ranked, exists.reshape(-1), importance_valid), chunk_size,
                                 jnp.where(ranked, sizes.reshape(-1), importance_sizes), buckets,
                                 (jnp.float32, jnp.bool_))

    def rank_words(_):
      importance = jnp.where(c.target_valid, values[:N * A].reshape(N, A), -jnp.inf)
      # Stable: equal importance keeps caption order, like Python's sorted(..., reverse=True).
      order = jnp.argsort(-importance, axis=-1, stable=True)
      # Candidates of the words up to each rank, in importance order: (N, A + 1).
      n_candidates = jnp.take_along_axis((c.sub_lengths > 0).sum(-1), order, axis=1)
      before_rank = jnp.concatenate([jnp.zeros((N, 1), jnp.int32), jnp.cumsum(n_candidates, axis=1)], axis=1)
      return (jnp.array(True), importance, order, before_rank,
              pieces, lengths, next_rank, changes, keep, words_out, cands_out, active)

    def substitute(_):
      scores = jnp.where(exists & differs.reshape(N, A, K), values.reshape(N, A, K), -jnp.inf)
      best_k = jnp.argmax(scores, axis=-1)                                # first best: argmax semantics
      best = jnp.max(scores, axis=-1)
      beats = best > keep[:, None]
      changed = beats.any(axis=-1) & active
      j = jnp.argmax(beats, axis=-1)                                      # first word that beats keeping
      a = jnp.take_along_axis(slots, j[:, None], axis=1)[:, 0]
      k = jnp.take_along_axis(best_k, j[:, None], axis=1)[:, 0]
      word = jnp.take_along_axis(c.target_words, a[:, None], axis=1)[:, 0]
      new_pieces, new_lengths = _replace_word(pieces, lengths, word, c.sub_pieces[rows, a, k],
                                              c.sub_lengths[rows, a, k])
      record = changed[:, None] & (jnp.arange(M) == changes[:, None])
      rank = jnp.where(changed, next_rank + j + 1, jnp.where(active, next_rank + words, next_rank))
      made = changes + changed
      return (ranked, importance, order, before_rank,
              jnp.where(changed[:, None, None], new_pieces, pieces), jnp.where(changed[:, None], new_lengths, lengths),
              rank, made, jnp.where(changed, jnp.take_along_axis(best, j[:, None], axis=1)[:, 0], keep),
              jnp.where(record, word[:, None], words_out), jnp.where(record, k[:, None], cands_out),
              (made < M) & (rank < n_targets))

    return jax.lax.cond(ranked, substitute, rank_words, None)

  zeros = jnp.zeros((N,), jnp.int32)
  none = jnp.full((N, M), -1, jnp.int32)
  state = (jnp.array(False), jnp.zeros((N, A), jnp.float32), jnp.zeros((N, A), jnp.int32),
           jnp.zeros((N, A + 1), jnp.int32),
           c.word_pieces, c.word_lengths, zeros, zeros, clean_score.astype(jnp.float32), none, none,
           n_targets > 0)
  (_, importance, _, _, pieces, lengths, _, _, score, words_out, cands_out, _) = jax.lax.while_loop(
      lambda s: ~s[0] | jnp.any(s[-1]), step, state)
  ids, mask = _build(c, pieces, lengths, length=c.context_length)
  return TextAttackResult(ids, mask, words_out, cands_out, score, clean_score, importance)


# -------------------------------------------------------------------------------------------------
# Host helpers
# -------------------------------------------------------------------------------------------------

def adversarial_captions(candidates: TextCandidates, result: TextAttackResult) -> list[str]:
  """The adversarial captions as strings (words joined by single spaces), e.g. for a target model with
  another tokenizer. `candidates` must be the object `prepare_candidates` returned (it holds the text)."""
  if not candidates.has_text:
    raise ValueError("these candidates carry no text: they went through jit or jax.tree.map, which drops "
                     "the host-side strings; pass the object that prepare_candidates returned")
  changed_words = np.asarray(result.changed_words)
  changed_candidates = np.asarray(result.changed_candidates)
  out = []
  for n, words in enumerate(candidates.words):
    words = list(words)
    for w, k in zip(changed_words[n], changed_candidates[n], strict=True):
      if w >= 0:
        words[w] = candidates.substitutes[n][w][k]
    out.append(" ".join(w for w in words if w))  # "" marks a long word's continuation slots
  return out


@precompile.jit(static_argnums=0)
def _image_features(encoder: DualEncoder, params: nnx.State, images: jax.Array) -> jax.Array:
  """Jitted `encoder.image_features`, compiled once per encoder and image shape however often `attack_text`
  runs (a `jax.jit` of the bound method would be a new function, compiled anew, on every call)."""
  return encoder.image_features(params, images)


def check_source(source: Any) -> None:
  """A candidate source as the one-call attacks take it: a `CandidateSource` (a callable), not its table."""
  if isinstance(source, Mapping):
    raise InputError("source is a table of substitutes (a dict); wrap it in LexiconSource(table), e.g. "
                     "LexiconSource(shapes.substitution_table())")
  if not callable(source):
    raise InputError(f"source must be a candidate source (LexiconSource, CharEditSource or BertMLMSource), got "
                     f"{type(source).__name__}")


def check_tokenizer(tokenizer: Tokenizer, captions: Sequence[str], encoder: Any) -> None:
  """On the host, once per call: the tokenizer against the model that the attack scores with, as
  `evaluate.Victim.tokens` checks it (`check_tokens_for`: the captions' ids within the model's table and
  positions, its end token where the text tower pools). A mismatched tokenizer would otherwise give
  captions that no attack changes, or NaN features, without an error. Encoders without a text config
  (stand-ins of the tests) are not checked."""
  text = getattr(getattr(encoder, "config", None), "text", None)
  if not hasattr(text, "vocab_size"):
    return
  batch = tokenizer([str(c) for c in captions])
  check_tokens_for(batch.input_ids, batch.attention_mask, tokenizer.end_id, text)


@dataclasses.dataclass(frozen=True)
class AttackedText:
  """What `attack_text` returns: the adversarial captions, their ids, and the attack's details."""
  captions: list[str]
  input_ids: np.ndarray       # int32 (N, L)
  attention_mask: np.ndarray  # int32 (N, L)
  result: TextAttackResult
  candidates: TextCandidates


def attack_text(model_or_encoder_params, tokenizer: Tokenizer, captions: Sequence[str] | np.ndarray,
                source: CandidateSource, *, images: Any = None, text_to_image: Any = None,
                guide: Any = None, objective: str | Objective = "image", max_changes: int = 1,
                top_k: int | None = None, stop_words=STOP_WORDS, chunk_size: int = 128) -> AttackedText:
  """One call: adversarial captions for a CLIP model (notebook API).

  model_or_encoder_params: an NNX `CLIP`, or `(encoder, params)` from `mat_jax.models.split`.
  captions: N pre-processed captions. source: e.g. `LexiconSource(shapes.substitution_table())` or
  `BertMLMSource(load_bert_mlm(path), load_tokenizer(path))`.
  objective "image" (SGA/MAT): pass `images` (float32 NHWC in [0, 1]; one per caption, or any number
  with `text_to_image` (N,) naming each caption's image) or `guide` features directly.
  objective "kl" (Co-Attack): no guide needed. top_k: candidates kept per word (None: all the source
  gives, e.g. BertMLMSource's 10 for one-piece words and 24 for multi-piece words, as BERT-Attack).
  """
  if isinstance(model_or_encoder_params, tuple):
    encoder, params = model_or_encoder_params
  else:
    encoder, params = split(model_or_encoder_params)
  if objective == "kl" and (images is not None or guide is not None or text_to_image is not None):
    # The KL is taken from the clean caption's own embedding; a guide would silently replace it.
    raise ValueError("objective='kl' (Co-Attack) compares each caption with its clean self and takes no "
                     "images, text_to_image or guide; drop them, or use objective='image' to be guided by images")
  check_source(source)
  if guide is None and images is not None:
    # On the host, before anything compiles (as image_attack): inside jit uint8 or 0-255 pixels, a NaN
    # image or an index past the images would guide the attack without an error.
    vision = getattr(getattr(encoder, "config", None), "vision", None)
    checks.check_images(images, getattr(vision, "image_size", None))
    if text_to_image is not None:
      n_captions = len(captions) if not isinstance(captions, str) else None
      text_to_image = checks.check_text_to_image(text_to_image, np.shape(images)[0], n_captions,
                                                 every_image=False)
  if not isinstance(captions, str):  # a string is prepare_candidates' error
    check_tokenizer(tokenizer, captions, encoder)
  candidates = prepare_candidates(captions, tokenizer, source, top_k=top_k, stop_words=stop_words)
  if guide is None and images is not None:
    guide = _image_features(encoder, params, jnp.asarray(images, jnp.float32))
    if text_to_image is not None:
      guide = guide[jnp.asarray(text_to_image)]
    elif guide.shape[0] != candidates.num_captions:
      raise ValueError(f"{guide.shape[0]} images for {candidates.num_captions} captions; pass one image per "
                       "caption or text_to_image (N,) mapping each caption to its image")
  if guide is None and objective == "image":
    raise ValueError("objective='image' needs images=... (or guide=image features); use objective='kl' "
                     "for an attack that needs no image")
  result = text_attack(encoder, params, candidates, guide, objective=objective, max_changes=max_changes,
                       chunk_size=chunk_size)
  return AttackedText(adversarial_captions(candidates, result), np.asarray(result.input_ids),
                      np.asarray(result.attention_mask), result, candidates)
