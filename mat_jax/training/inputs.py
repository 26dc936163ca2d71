"""Host-side batch additions: the text-attack candidates that MAT, MAT+ and MMCoA score on device.

Candidates depend only on the clean caption, so they are prepared once per distinct caption
(`mat_jax.attacks.candidates.prepare_candidates`, fixed sizes so that every batch has the same shapes)
and kept in an LRU cache; each batch gathers its captions' rows. They travel in the batch dict like any
other per-example array (split over the mesh with the images):

    cand_word_pieces   int32 (B, [K,] W, P)     cand_word_lengths  int32 (B, [K,] W)
    cand_target_words  int32 (B, [K,] A)        cand_target_valid  bool  (B, [K,] A)
    cand_sub_pieces    int32 (B, [K,] A, T, P)  cand_sub_lengths   int32 (B, [K,] A, T)
    cand_mask_pieces   int32 (B, P)             cand_mask_length   int32 (B,)   (the same row repeated)

and the static part (special ids, lengths) is a `CandidateMeta` the objective holds. Inside the step,
`candidates_from_batch` rebuilds the flat `TextCandidates` of the B·K captions.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Mapping

import jax
import numpy as np

PREFIX = "cand_"
PER_CAPTION = ("word_pieces", "word_lengths", "target_words", "target_valid", "sub_pieces", "sub_lengths")


@dataclasses.dataclass(frozen=True)
class CandidateMeta:
  """The static fields of `TextCandidates` (hashable: part of the compiled step)."""
  start_id: int | None
  end_id: int | None
  pad_id: int
  context_length: int
  text_length: int


def make_source(name: str, *, bert: str = "", top_k: int = 10, log: Callable[[str], None] = print):
  """The candidate source named in `config.text_attack.source` (the same for training and evaluation).

  bert: BERT-Attack's candidates, the top-k proposals of the masked LM `bert` ("shapes-mlm": the shapes
  world's, trained into the cache on first use; or a transformers-layout directory / hub id), with no
  meaning filter. paraphrase: the shapes world's synonym table (meaning-preserving by construction, a
  control). charedit: character edits (typos).
  """
  from mat_jax.attacks import candidates

  if name == "paraphrase":
    from mat_jax.data import shapes
    return candidates.LexiconSource(shapes.substitution_table())
  if name == "charedit":
    return candidates.CharEditSource(max_candidates=top_k)
  if name == "bert":
    from mat_jax.models import load_bert_mlm
    from mat_jax.models.tokenizers import load_tokenizer
    from mat_jax.training import mlm
    directory = mlm.resolve_bert(bert, log=log)
    return candidates.BertMLMSource(load_bert_mlm(directory), load_tokenizer(directory), top_k=top_k)
  if name == "lexicon":
    from mat_jax.config import RENAMED_LEXICON
    raise ValueError(RENAMED_LEXICON)
  raise ValueError(f"unknown text_attack.source {name!r}; choose bert, paraphrase or charedit")


class AttachCandidates:
  """A batch transform adding the `cand_*` arrays of the batch's captions (see the module docstring)."""

  def __init__(self, tokenizer, source, *, max_words: int, max_pieces: int, top_k: int, max_targets: int,
               cache_size: int = 50_000):
    self.tokenizer = tokenizer
    self.source = source
    self.sizes = dict(max_words=max_words, max_pieces=max_pieces, top_k=top_k, max_targets=max_targets,
                      text_length=tokenizer.context_length)
    self.cache_size = cache_size
    self._cache: collections.OrderedDict[str, tuple[np.ndarray, ...]] = collections.OrderedDict()
    self._mask: tuple[np.ndarray, np.ndarray] | None = None
    self.meta = CandidateMeta(tokenizer.start_id, tokenizer.end_id, tokenizer.pad_id,
                              tokenizer.context_length, tokenizer.context_length)

  def _prepare(self, captions: list[str]) -> None:
    from mat_jax.attacks.candidates import prepare_candidates

    prepared = prepare_candidates(captions, self.tokenizer, self.source, **self.sizes)
    arrays = [np.asarray(getattr(prepared, name)) for name in PER_CAPTION]
    for i, caption in enumerate(captions):
      self._cache[caption] = tuple(a[i] for a in arrays)
    self._mask = (np.asarray(prepared.mask_pieces), np.asarray(prepared.mask_length))
    while len(self._cache) > self.cache_size:
      self._cache.popitem(last=False)

  def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    captions = np.asarray(batch["captions"])
    flat = [str(c) for c in captions.reshape(-1)]
    missing = list(dict.fromkeys(c for c in flat if c not in self._cache))
    if missing:
      self._prepare(missing)
    rows = []
    for caption in flat:
      self._cache.move_to_end(caption)
      rows.append(self._cache[caption])
    out = dict(batch)
    for j, name in enumerate(PER_CAPTION):
      stacked = np.stack([r[j] for r in rows])
      out[PREFIX + name] = stacked.reshape(captions.shape + stacked.shape[1:])
    mask_pieces, mask_length = self._mask
    batch_size = captions.shape[0]
    out[PREFIX + "mask_pieces"] = np.broadcast_to(mask_pieces, (batch_size,) + mask_pieces.shape).copy()
    out[PREFIX + "mask_length"] = np.full((batch_size,), int(mask_length), np.int32)
    return out


def candidates_from_batch(batch: Mapping[str, jax.Array], meta: CandidateMeta):
  """The flat `TextCandidates` of the batch's B·K captions (inside jit)."""
  from mat_jax.attacks.candidates import TextCandidates

  lead = batch["input_ids"].ndim - 1  # 1: one caption per image; 2: K captions per image
  missing = [PREFIX + n for n in PER_CAPTION if PREFIX + n not in batch]
  if missing:
    raise ValueError(f"the batch lacks the text-attack candidates {missing}: objectives with a text attack "
                     "need the input pipeline's AttachCandidates transform (mat_jax.training.inputs)")
  flat = {n: batch[PREFIX + n].reshape((-1,) + batch[PREFIX + n].shape[lead:]) for n in PER_CAPTION}
  return TextCandidates(**flat, mask_pieces=batch[PREFIX + "mask_pieces"][0],
                        mask_length=batch[PREFIX + "mask_length"][0], **dataclasses.asdict(meta))
