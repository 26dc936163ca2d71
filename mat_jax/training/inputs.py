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
from typing import Callable, Mapping

import numpy as np

from mat_jax.attacks import candidates
from mat_jax.attacks.candidates import PER_CAPTION, PREFIX, CandidateMeta
from mat_jax.config import RENAMED_LEXICON
from mat_jax.data import shapes
from mat_jax.errors import ConfigError, InputError
from mat_jax.models import load_bert_mlm
from mat_jax.models.tokenizers import load_tokenizer
from mat_jax.training import mlm


def make_source(name: str, *, bert: str = "", top_k: int = 10, log: Callable[[str], None] = print):
  """The candidate source named in `config.text_attack.source` (the same for training and evaluation).

  bert: BERT-Attack's candidates, the top-k proposals of the masked LM `bert` ("shapes-mlm": the shapes
  world's, trained into the cache on first use; or a transformers-layout directory / hub id), with no
  meaning filter. paraphrase: the shapes world's synonym table (meaning-preserving by construction, a
  control), the first top_k synonyms of a word. charedit: top_k character edits (typos) of a word.
  """
  check_source_name(name)
  if name == "paraphrase":
    return candidates.LexiconSource(shapes.substitution_table(), top_k=top_k)
  if name == "charedit":
    return candidates.CharEditSource(max_candidates=top_k)
  directory = mlm.resolve_bert(bert, log=log)  # "bert", the one name left
  model, tokenizer = load_bert_mlm(directory), load_tokenizer(directory)
  check_mlm_pair(model.config.vocab_size, tokenizer.vocab_size, directory)
  return candidates.BertMLMSource(model, tokenizer, top_k=top_k)


def check_source_name(name: str) -> None:
  """An InputError for a name that is not a candidate source (the renamed 'lexicon' gets its new names)."""
  if name == "lexicon":
    raise InputError(RENAMED_LEXICON)
  if name not in candidates.SOURCES:
    raise InputError(f"unknown text_attack.source {name!r} (--text-source); choose {', '.join(candidates.SOURCES)}")


def check_mlm_pair(model_vocab: int, tokenizer_vocab: int, where: str) -> None:
  """The MLM's output vocabulary must be its tokenizer's: else every proposal decodes to a wrong word."""
  if model_vocab != tokenizer_vocab:
    raise ConfigError(f"the masked LM in {where} predicts {model_vocab} tokens but its tokenizer has "
                      f"{tokenizer_vocab}: they are not a pair, and every proposed word would be the wrong one; "
                      "point text_attack.bert (--bert) at a directory holding an MLM and the tokenizer it was "
                      "trained with")


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

  def stand_in(self) -> "AttachCandidates":
    """A transform adding arrays of the same keys, shapes and dtypes from a source with no substitutes:
    what compiling a train step ahead needs of a batch (`training.ahead`), made without the source's work
    (a masked LM's forward passes) and without touching this transform's cache."""
    sizes = {k: v for k, v in self.sizes.items() if k != "text_length"}  # the tokenizer's, as here
    return AttachCandidates(self.tokenizer, candidates.LexiconSource({}), **sizes)

  def _prepare(self, captions: list[str]) -> None:
    prepared = candidates.prepare_candidates(captions, self.tokenizer, self.source, **self.sizes)
    arrays = [np.asarray(getattr(prepared, name)) for name in PER_CAPTION]
    for i, caption in enumerate(captions):
      self._cache[caption] = tuple(a[i] for a in arrays)
    self._mask = (np.asarray(prepared.mask_pieces), np.asarray(prepared.mask_length))

  def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    captions = np.asarray(batch["captions"])
    flat = [str(c) for c in captions.reshape(-1)]
    # The batch's cached captions become the newest first, so that evicting the oldest entries (only once
    # the batch's rows are read) never drops one this batch needs.
    missing = []
    for caption in dict.fromkeys(flat):
      if caption in self._cache:
        self._cache.move_to_end(caption)
      else:
        missing.append(caption)
    if missing:
      self._prepare(missing)
    rows = [self._cache[caption] for caption in flat]
    while len(self._cache) > self.cache_size:
      self._cache.popitem(last=False)
    out = dict(batch)
    for j, name in enumerate(PER_CAPTION):
      stacked = np.stack([r[j] for r in rows])
      out[PREFIX + name] = stacked.reshape(captions.shape + stacked.shape[1:])
    mask_pieces, mask_length = self._mask
    batch_size = captions.shape[0]
    out[PREFIX + "mask_pieces"] = np.broadcast_to(mask_pieces, (batch_size,) + mask_pieces.shape).copy()
    out[PREFIX + "mask_length"] = np.full((batch_size,), int(mask_length), np.int32)
    return out
