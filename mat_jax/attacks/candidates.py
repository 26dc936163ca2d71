"""Substitution candidates for the word-level text attack, prepared on the host.

A candidate source turns the words of many captions into lists of substitute words, one list per word:
`LexiconSource` (a meaning-preserving synonym table, e.g. the shapes world's), `CharEditSource`
(deterministic typos) and `BertMLMSource` (BERT-Attack's masked-LM candidates). `prepare_candidates`
filters the lists as the BERT-Attack references do (no '##' pieces, no stop words, not the word itself),
tokenises everything with the *target* model's tokenizer and packs it into `TextCandidates`: fixed-shape
integer arrays that the compiled attack (`mat_jax.attacks.text`) consumes without ever returning text to
the host.

Every tokenizer used here splits on whitespace first, so the pieces of a word do not depend on its
neighbours and a caption's ids are start + concat(word pieces) + end + padding. Candidates depend only
on the clean caption, so each source caches its output per caption.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import weakref
import zlib
from typing import Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mat_jax.errors import InputError
from mat_jax.models.tokenizers import Tokenizer

# The mask word of the importance step: the references replace a word by the string "[UNK]".
MASK_WORD = "[UNK]"
# The candidate sources by name (`mat_jax.training.inputs.make_source`, config.text_attack.source).
SOURCES = ("bert", "paraphrase", "charedit")

# Function words that carry little content, plus punctuation: never attacked, never used as a
# substitute (the role of the references' `filter_words`; this list is written for mat_jax). On the shapes
# world's words it agrees with the references' list: "above", "below", "over", "under" are in both, while
# "beneath", "underneath", "near" and the position words (left, right, top, bottom, ...) are in neither, so
# the attack may change them (docs/text_threat.md lists every word).
STOP_WORDS: frozenset[str] = frozenset("""
a an the this that these those some any each every either neither both all no none another other others
such what which whatever whichever who whom whose whoever whomever
i me my mine myself we us our ours ourselves you your yours yourself yourselves he him his himself she
her hers herself it its itself they them their theirs themselves one ones oneself
someone somebody something anyone anybody anything everyone everybody everything nobody noone nothing
am is are was were be been being have has had having do does did doing done
will would shall should can could may might must ought need dare used
isn isn't aren aren't wasn wasn't weren weren't hasn hasn't haven haven't hadn hadn't doesn doesn't
don don't didn didn't won won't wouldn wouldn't shan shan't shouldn shouldn't can't cannot couldn
couldn't mightn mightn't mustn mustn't needn needn't it's that's there's here's what's who's let's
i'm i've i'd i'll you're you've you'd you'll he's he'd he'll she's she'd she'll we're we've we'd we'll
they're they've they'd they'll ain s t d ll m o re ve y
about above across after against along alongside amid among amongst around as at atop before behind
below beside besides between beyond by despite down during except for from in inside into
like of off on onto opposite out outside over past per since than through throughout thru till
to toward towards under unlike until unto up upon via with within without
and but or nor so yet if then else because although though while whereas whether unless once lest
how when where why whence whither wherever whenever however whereby wherein hereby herein thereby
therefore thus hence also too very just only even still already again ever never always often
sometimes here there now almost quite rather somewhat perhaps maybe indeed namely etc
not more most less least much many few several enough own same else instead anyway anyhow
""".split()) | frozenset(".,;:!?'\"`-–—_/\\|()[]{}<>@#$%^&*+=~·…")


class CandidateSource(Protocol):
  """Words of many captions in, substitute words out (one list per word, best first). The sources here
  also say the most substitutes they give one word (`max_substitutes`), which fixed-shape training
  arrays hold."""

  def __call__(self, captions: Sequence[Sequence[str]]) -> list[list[list[str]]]: ...


class _CachedSource:
  """Caches a source's output per caption (candidates depend only on the clean text)."""

  def __init__(self, cache_size: int = 100_000):
    self._cache: collections.OrderedDict[tuple[str, ...], list[list[str]]] = collections.OrderedDict()
    self.cache_size = int(cache_size)

  def __call__(self, captions: Sequence[Sequence[str]]) -> list[list[list[str]]]:
    keys = [tuple(words) for words in captions]
    missing = list(dict.fromkeys(k for k in keys if k not in self._cache))
    if missing:
      for key, subs in zip(missing, self._generate(missing), strict=True):
        if len(subs) != len(key):
          raise RuntimeError(f"{type(self).__name__} returned {len(subs)} lists for {len(key)} words")
        self._cache[key] = [list(s) for s in subs]
    out = []
    for key in keys:
      self._cache.move_to_end(key)
      out.append(self._cache[key])
    while len(self._cache) > self.cache_size:
      self._cache.popitem(last=False)
    return out

  def _generate(self, captions: Sequence[tuple[str, ...]]) -> list[list[list[str]]]:
    raise NotImplementedError


class LexiconSource(_CachedSource):
  """Substitutes from a table word -> synonyms (context-free), e.g. `mat_jax.data.shapes.substitution_table()`.

  With a meaning-preserving table this is the text analogue of the ε-ball: the attack may only change
  the wording, never what the caption says. top_k: at most the first k substitutes of each word, in the
  table's order (None: all of them), as `--top-k` caps the other sources' candidates per word.
  """

  def __init__(self, table: Mapping[str, Sequence[str]], top_k: int | None = None):
    super().__init__()
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
      raise ValueError(f"top_k must be a whole number >= 1 or None (every substitute), got {top_k!r}")
    if not isinstance(table, Mapping):
      raise TypeError(f"table must map each word to a list of substitutes, got {type(table).__name__}")
    for word, subs in table.items():
      if not isinstance(word, str) or isinstance(subs, str) or not all(isinstance(s, str) for s in subs):
        raise TypeError(f"table entry {word!r}: {subs!r} must be a word mapped to a list of words, "
                        "e.g. {'red': ['crimson', 'scarlet']}")
    self.top_k = top_k
    self.table = {word: list(subs)[:top_k] for word, subs in table.items()}

  @property
  def max_substitutes(self) -> int:
    """The most substitutes this source gives one word (the width of fixed-shape candidate arrays)."""
    return max((len(subs) for subs in self.table.values()), default=0)

  def _generate(self, captions):
    return [[self.table.get(word, []) for word in words] for words in captions]


class _FilteredSource(_CachedSource):
  """Another source's substitutes, kept only where `keep(words, position, substitute)` is True."""

  def __init__(self, base: CandidateSource, keep: Callable[[Sequence[str], int, str], bool]):
    super().__init__()
    self.base = base
    self.keep = keep

  @property
  def max_substitutes(self) -> int:
    return self.base.max_substitutes

  def _generate(self, captions):
    return [[[sub for sub in subs if self.keep(words, position, sub)] for position, subs in enumerate(proposed)]
            for words, proposed in zip(captions, self.base([list(w) for w in captions]), strict=True)]


class MeaningFilteredSource(_FilteredSource):
  """Another source's substitutes, kept only where `keeps_meaning(words, position, substitute)` is True.

  This is the role of the sentence-similarity filter BERT-Attack can apply (the VLP references leave it
  off): the attack then searches only captions that still say what the clean one says, so whatever it
  achieves is a true adversarial caption, not a label flip. In the shapes world the filter is exact
  (`mat_jax.evaluate.shapes_meaning_filter`: the caption is checked against its scene).
  """

  def __init__(self, base: CandidateSource, keeps_meaning: Callable[[Sequence[str], int, str], bool]):
    super().__init__(base, keeps_meaning)


class ExcludedWordsSource(_FilteredSource):
  """Another source's substitutes, less the words in `words`: what a training attack may not write.

  E.g. MAT's training attack kept to the words of its training captions, so that it never shows the model
  a word only the evaluation's attacker uses (the held-out-forms study's exposure control,
  `text_attack.exclude_words`).
  """

  def __init__(self, base: CandidateSource, words: Iterable[str]):
    self.words = frozenset(words)
    super().__init__(base, lambda _words, _position, substitute: substitute not in self.words)


# Neighbouring keys on a QWERTY keyboard, for the typo an attacker (or a human) makes most easily.
_QWERTY_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
_KEY_NEIGHBOURS: dict[str, str] = {}
for _r, _row in enumerate(_QWERTY_ROWS):
  for _c, _ch in enumerate(_row):
    _near = [_row[j] for j in (_c - 1, _c + 1) if 0 <= j < len(_row)]
    for _other in (_r - 1, _r + 1):
      if 0 <= _other < len(_QWERTY_ROWS):
        _near += [_QWERTY_ROWS[_other][j] for j in (_c - 1, _c, _c + 1) if 0 <= j < len(_QWERTY_ROWS[_other])]
    _KEY_NEIGHBOURS[_ch] = "".join(_near)

CHAR_EDITS = ("swap", "delete", "insert", "keyboard")


class CharEditSource(_CachedSource):
  """Deterministic character edits (typos): adjacent swap, deletion, insertion, keyboard-neighbour substitution.

  Each word's edits come from a generator seeded by the word and `seed` alone, so a word gets the same
  candidates in every caption and every batch. Edit types take turns until `max_candidates` distinct
  strings are found.
  """

  def __init__(self, edits: Sequence[str] = CHAR_EDITS, max_candidates: int = 10, seed: int = 0,
               min_length: int = 3):
    super().__init__()
    unknown = set(edits) - set(CHAR_EDITS)
    if unknown or not edits:
      raise ValueError(f"unknown character edits {sorted(unknown)}; choose from {CHAR_EDITS}")
    self.edits = tuple(edits)
    self.max_candidates = int(max_candidates)
    self.max_substitutes = self.max_candidates
    self.seed = int(seed)
    self.min_length = int(min_length)

  def word_edits(self, word: str) -> list[str]:
    if len(word) < self.min_length:
      return []
    rng = np.random.default_rng([zlib.crc32(word.encode("utf-8")), self.seed])
    found: list[str] = []
    # Bounded attempts: short words have few distinct edits.
    for attempt in range(8 * self.max_candidates):
      if len(found) >= self.max_candidates:
        break
      edit = self.edits[attempt % len(self.edits)]
      i = int(rng.integers(len(word)))
      if edit == "swap":
        i = min(i, len(word) - 2)
        new = word[:i] + word[i + 1] + word[i] + word[i + 2:]
      elif edit == "delete":
        new = word[:i] + word[i + 1:]
      elif edit == "insert":
        new = word[:i] + chr(ord("a") + int(rng.integers(26))) + word[i:]
      else:
        near = _KEY_NEIGHBOURS.get(word[i].lower())
        if not near:
          continue
        new = word[:i] + near[int(rng.integers(len(near)))] + word[i + 1:]
      if new != word and new not in found:
        found.append(new)
    return found

  def _generate(self, captions):
    return [[self.word_edits(word) for word in words] for words in captions]


class BertMLMSource(_CachedSource):
  """BERT-Attack's candidates from a masked language model, in batched jitted forwards.

  For every word, the MLM logits of the clean caption at the word's own pieces give its substitutes:
  one piece -> the `top_k` best tokens; several pieces -> all combinations of the first 12 pieces'
  top-4 tokens, the first `max_combinations` of them (24, as BERT-Attack), ranked by the MLM's
  perplexity of the combination.

  Offset: the MLM input is [CLS] + pieces + [SEP], so the word whose pieces start at piece index s sits
  at sequence position s + 1. The VLP references (Co-Attack, SGA, MMCoA) slice the logits at s, one
  position too early (the logits of the previous piece, or of [CLS] for the first word); the original
  BERT-Attack removes the offset, and so do we.

  `model`: a `BertForMaskedLM`, or any callable `(input_ids, attention_mask) -> logits (B, L, vocab)`.
  `tokenizer`: the MLM's own tokenizer (WordPiece). `min_logit`: the references stop a single-piece
  word's list at the first logit below 0.3 (`threshold_pred_score`); None keeps all `top_k` (use None
  for randomly initialised models, whose logits are all near 0).
  """

  def __init__(self, model, tokenizer: Tokenizer, top_k: int = 10, *, min_logit: float | None = 0.3,
               max_combinations: int = 24, combination_top: int = 4, max_combination_pieces: int = 12,
               batch_size: int = 64, max_length: int | None = None):
    super().__init__()
    if tokenizer.start_id is None or tokenizer.end_id is None:
      raise ValueError("BertMLMSource needs a BERT-style tokenizer that frames text with [CLS] ... [SEP]")
    self.tokenizer = tokenizer
    self.top_k = int(top_k)
    self.min_logit = min_logit
    self.max_combinations = int(max_combinations)
    # One-piece words get top_k substitutes; with a WordPiece vocabulary ("##" continuation pieces) a
    # word of several pieces gets up to max_combinations (24 > 10, as BERT-Attack).
    splits_words = any(token.startswith("##") for token in tokenizer.hf.get_vocab())
    self.max_substitutes = max(self.top_k, self.max_combinations) if splits_words else self.top_k
    self.combination_top = int(combination_top)
    self.max_combination_pieces = int(max_combination_pieces)
    self.batch_size = int(batch_size)
    self.max_length = int(max_length or tokenizer.context_length)
    self._k = max(self.top_k, self.combination_top)
    if isinstance(model, nnx.Module):
      graphdef, params = nnx.split(model)
      def forward(p, ids, mask):
        return nnx.merge(graphdef, p)(ids, mask)
    else:
      params, forward = None, (lambda p, ids, mask: model(ids, mask))
    self._params = params
    k = self._k

    def top_tokens(p, ids, mask):
      values, indices = jax.lax.top_k(forward(p, ids, mask), k)
      return values, indices

    def piece_losses(p, ids, mask):
      # Cross-entropy of each piece under the MLM reading the combination itself (BERT-Attack's
      # perplexity: no [CLS]/[SEP], every piece predicted at its own position).
      logp = jax.nn.log_softmax(forward(p, ids, mask), axis=-1)
      return -jnp.take_along_axis(logp, ids[..., None], axis=-1)[..., 0]

    self._top_tokens = jax.jit(top_tokens)
    self._piece_losses = jax.jit(piece_losses)
    self._tokens_to_string = tokenizer.hf.convert_tokens_to_string
    self._vocabulary: tuple[np.ndarray, np.ndarray] | None = None  # (token of each id, id is not a word)

  def _batches(self, n: int):
    for lo in range(0, n, self.batch_size):
      yield lo, min(lo + self.batch_size, n)

  def _length_groups(self, pieces: list[list[list[int]]], capacity: int) -> Iterator[tuple[int, list[int]]]:
    """(padded length, caption indices) of each MLM call: every caption at its own bucketed length (few
    distinct compiled shapes), in batches of `batch_size` rows. Padding changes BERT's logits in their last
    bits, enough to swap near-tied candidates: padded to its batch-mates' longest, a caption's candidates
    would depend on the captions scored with it, and so on the data order and the cache's history."""
    own = [min(self.max_length, _round_up(min(sum(map(len, caption)), capacity) + 2, 8)) for caption in pieces]
    for length in sorted(set(own)):
      group = [n for n, at in enumerate(own) if at == length]
      for lo, hi in self._batches(len(group)):
        yield length, group[lo:hi]

  def _generate(self, captions):
    tok = self.tokenizer
    capacity = self.max_length - 2
    # Pieces of every word, and where each word starts in [CLS] + pieces + [SEP].
    memo = _pieces_memo(tok, (w for words in captions for w in words))
    pieces = [[memo[w] for w in words] for words in captions]
    results: list[list[list[str]]] = [[[] for _ in words] for words in captions]
    combos: list[tuple[int, int, list[tuple[int, ...]]]] = []
    for length, members in self._length_groups(pieces, capacity):
      ids = np.full((self.batch_size, length), tok.pad_id, np.int32)
      mask = np.zeros((self.batch_size, length), np.int32)
      for row, n in enumerate(members):
        flat = [t for p in pieces[n] for t in p][:capacity]
        ids[row, :len(flat) + 2] = [tok.start_id, *flat, tok.end_id]
        mask[row, :len(flat) + 2] = 1
      values, indices = (np.asarray(a) for a in self._top_tokens(self._params, ids, mask))
      single: list[tuple[int, int, int, int]] = []  # (caption, word, row, position) of one-piece words
      for row, n in enumerate(members):
        caption = pieces[n]
        start = 0
        for w, word_pieces in enumerate(caption):
          first, count = start, len(word_pieces)
          start += count
          if count == 0 or first + count > capacity:
            continue  # beyond BERT's context: no logits for this word
          # +1: position 0 holds [CLS] (the references' off-by-one reads `first` here).
          at = slice(first + 1, first + 1 + count)
          if count == 1:
            single.append((n, w, row, first + 1))
          else:
            top = indices[row, at][:self.max_combination_pieces, :self.combination_top]
            # islice: the product of many pieces' top lists is exponential; only its first ones are kept.
            combos.append((n, w, list(itertools.islice(itertools.product(*top.tolist()), self.max_combinations))))
      if single:
        _, _, rows, positions = zip(*single, strict=True)
        for (n, w, _, _), words in zip(single, self._single_piece_words(values[rows, positions],
                                                                         indices[rows, positions]), strict=True):
          results[n][w] = words
    if combos:
      self._rank_combinations(combos, results)
    return results

  def _single_piece_words(self, values: np.ndarray, indices: np.ndarray) -> list[list[str]]:
    """The substitutes of one-piece words from their MLM top tokens (M, k): each word's `top_k` tokens,
    cut at the first logit under `min_logit` (the references' threshold), without special tokens
    ([SEP], [MASK], ... are not words). One vocabulary lookup for all of them instead of a tokenizer
    call per token: this runs for every caption the training pipeline has not seen yet."""
    values, indices = values[:, :self.top_k], indices[:, :self.top_k]
    tokens, not_words = self._vocabulary_lookup(indices)
    keep = ~not_words
    if self.min_logit is not None:
      keep &= np.cumprod(~(values < self.min_logit), axis=-1, dtype=bool)  # stop at the first one below
    # The kept tokens of all words in one selection (row-major, so each word's stay in order), then cut
    # into words: one list slice per word rather than a Python test per token.
    kept = tokens[keep].tolist()
    ends = np.cumsum(keep.sum(axis=1)).tolist()
    return [kept[start:end] for start, end in zip([0, *ends[:-1]], ends, strict=True)]

  def _vocabulary_lookup(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(token string, not a word) of each id in `indices`: special tokens are not words, nor are ids
    beyond the tokenizer's vocabulary (a model whose output layer is padded), which have no token."""
    if self._vocabulary is None:
      hf = self.tokenizer.hf
      tokens, special = hf.convert_ids_to_tokens(list(range(len(hf)))), frozenset(hf.all_special_tokens)
      self._vocabulary = (np.asarray(tokens + [None], dtype=object),
                          np.asarray([t in special for t in tokens] + [True], bool))
    tokens, not_words = self._vocabulary
    looked_up = np.minimum(indices, len(tokens) - 1)  # the last entry stands for every id beyond
    return tokens[looked_up], not_words[looked_up]

  def _rank_combinations(self, combos, results) -> None:
    """Rank each multi-piece word's combinations by MLM perplexity, all words in padded batches."""
    flat = [c for _, _, cands in combos for c in cands]
    losses = np.zeros(len(flat), np.float64)
    # Each combination unpadded, in a batch of its own length: its score is the same whatever else is ranked.
    for width in sorted({len(c) for c in flat}):
      group = [j for j, c in enumerate(flat) if len(c) == width]
      for lo, hi in self._batches(len(group)):
        members = group[lo:hi]
        ids = np.full((self.batch_size, width), self.tokenizer.pad_id, np.int32)
        ids[:len(members)] = [flat[j] for j in members]
        mask = np.zeros((self.batch_size, width), np.int32)
        mask[:len(members)] = 1
        piece = np.asarray(self._piece_losses(self._params, ids, mask))
        losses[members] = piece[:len(members)].mean(-1)
    start = 0
    for n, w, cands in combos:
      ppl = np.exp(losses[start:start + len(cands)])
      start += len(cands)
      order = np.argsort(ppl, kind="stable")
      words = []
      tokens, not_words = self._vocabulary_lookup(np.asarray(cands, np.intp))
      for j in order:
        if not not_words[j].any():
          words.append(self._tokens_to_string(tokens[j].tolist()))
      results[n][w] = words


# -------------------------------------------------------------------------------------------------
# Fixed-shape candidate arrays
# -------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TextCandidates:
  """Everything the compiled attack needs about N captions, as fixed-shape arrays.

  Shapes: W = max_words (word slots), P = max_pieces, A = max_targets (attackable words), K = top_k.
    word_pieces   int32 (N, W, P)     pieces of each word* (target tokenizer, no special tokens)
    word_lengths  int32 (N, W)        number of pieces; 0 for padding words
    target_words  int32 (N, A)        word index of each attackable word, in caption order
    target_valid  bool  (N, A)        False for padding slots
    sub_pieces    int32 (N, A, K, P)  pieces of each substitute of each attackable word
    sub_lengths   int32 (N, A, K)     0 = no candidate
    mask_pieces   int32 (P,)          pieces of the importance mask word ("[UNK]")
    mask_length   int32 ()
  Static (part of the compiled shape): the tokenizer's start/end/pad ids, `context_length` (L of the
  output ids) and `text_length` (<= L: the padded length used while scoring, long enough for every text
  the attack can build; trailing padding never changes an encoder's features, so it is not computed).

  *A word longer than a fixed max_pieces fills several slots: its first holds the word, the others "".
  The host-side text (`captions`, `words`, `substitutes`) is dropped when the object crosses `jit` or
  `jax.tree.map` (it comes back as None): keep the object `prepare_candidates` returned to turn attack
  results back into strings (`mat_jax.attacks.text.adversarial_captions`).
  """
  word_pieces: jax.Array
  word_lengths: jax.Array
  target_words: jax.Array
  target_valid: jax.Array
  sub_pieces: jax.Array
  sub_lengths: jax.Array
  mask_pieces: jax.Array
  mask_length: jax.Array
  start_id: int | None = None
  end_id: int | None = None
  pad_id: int = 0
  context_length: int = 0
  text_length: int = 0
  captions: tuple[str, ...] | None = None
  words: tuple[tuple[str, ...], ...] | None = None              # all words of each caption, one per slot*
  substitutes: tuple[tuple[tuple[str, ...], ...], ...] | None = None  # per caption, per word

  @property
  def num_captions(self) -> int:
    return self.word_pieces.shape[0]

  @property
  def has_text(self) -> bool:
    return self.words is not None

  def replace(self, **changes) -> "TextCandidates":
    return dataclasses.replace(self, **changes)


jax.tree_util.register_dataclass(
    TextCandidates,
    data_fields=["word_pieces", "word_lengths", "target_words", "target_valid", "sub_pieces", "sub_lengths",
                 "mask_pieces", "mask_length"],
    meta_fields=["start_id", "end_id", "pad_id", "context_length", "text_length"],
    drop_fields=["captions", "words", "substitutes"])


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


# Per-tokenizer memo of word pieces: captions repeat the same few thousand words.
_PIECES_MEMO: weakref.WeakKeyDictionary[Tokenizer, dict[str, tuple[int, ...]]] = weakref.WeakKeyDictionary()


def _pieces_memo(tokenizer: Tokenizer, words: Iterable[str]) -> dict[str, tuple[int, ...]]:
  """The tokenizer's memo of word pieces, holding every word of `words` (the new ones encoded in one call)."""
  memo = _PIECES_MEMO.setdefault(tokenizer, {})
  missing = list(dict.fromkeys(w for w in words if w not in memo))
  if missing:
    for word, pieces in zip(missing, tokenizer.encode_words(missing), strict=True):
      memo[word] = tuple(int(p) for p in pieces)
  return memo


def mask_word_pieces(tokenizer: Tokenizer) -> tuple[int, ...]:
  """The pieces that replace a word when its importance is measured.

  The references substitute the string "[UNK]". A tokenizer with an unknown token distinct from its
  framing/padding tokens (BERT's WordPiece, the shapes world's word-level vocabulary) gets that single
  token, which is what "[UNK]" becomes there. CLIP's BPE has no such token (its unk *is* end-of-text,
  and inserting an end token would cut the text where the pooling reads it), so there the literal
  string "[UNK]" is tokenised, exactly what the references feed CLIP.
  """
  unk = tokenizer.hf.unk_token_id
  framing = {tokenizer.start_id, tokenizer.end_id, tokenizer.pad_id}
  if unk is not None and unk not in framing:
    return (int(unk),)
  pieces = tuple(tokenizer.encode_words([MASK_WORD])[0])
  if not pieces:
    raise ValueError(f"the tokenizer turns the mask word {MASK_WORD!r} into no tokens; the importance "
                     "step cannot mask words with it")
  return pieces


def filter_substitutes(word: str, substitutes: Iterable[str], stop_words: frozenset[str]) -> list[str]:
  """The references' filter: no sub-word ('##') pieces, no stop words, not the word itself; plus no empty
  strings and no repeats (a repeat scores the same, and the attack keeps the first best anyway)."""
  return [s for s in dict.fromkeys(substitutes) if s and s != word and "##" not in s and s not in stop_words]


def prepare_candidates(
    captions: Sequence[str] | np.ndarray, tokenizer: Tokenizer, source: CandidateSource | Callable, *,
    max_words: int | None = None, max_pieces: int | None = None, top_k: int | None = None,
    max_targets: int | None = None, stop_words: Iterable[str] = STOP_WORDS, text_length: int | None = None,
) -> TextCandidates:
  """Candidates of N captions as fixed-shape arrays (host, numpy).

  captions: N pre-processed captions (whitespace-separated words; flatten (B, K) caption arrays first).
  tokenizer: the target model's tokenizer. source: a `CandidateSource` (lists of substitutes per word).
  max_words (W), max_pieces (P), top_k (K), max_targets (A): the array sizes. Fix them for a training
  loop, so that every batch has the same shapes and the attack compiles once; None takes the smallest
  size that fits this batch. A word is attackable when it is not a stop word, its
  first piece lies inside the context, and it has at least one candidate; the first A attackable words
  of a caption (in caption order) are kept. Each word keeps its first K candidates (source order);
  substitutes longer than max_pieces are dropped, and a word longer than max_pieces (rare: a long word
  under a BPE or WordPiece tokenizer) is kept whole in the text, over consecutive word slots, and not
  attacked, so that a fixed size never stops a training run. top_k=None keeps all that the source gives
  (for BertMLMSource: its top_k for one-piece words, 24 for multi-piece words, as BERT-Attack).
  text_length: the padded length of the texts scored inside the attack (default: the smallest multiple
  of 8 that holds any text the attack can build, at most the context length).
  """
  if isinstance(captions, np.ndarray):
    if captions.ndim != 1:
      raise ValueError(f"captions must be 1-D, got shape {captions.shape}; flatten (B, K) caption arrays "
                       "with captions.reshape(-1) (and repeat the guides to match)")
    captions = captions.tolist()
  if isinstance(captions, str):
    raise TypeError("pass a list of captions, not a single string")
  captions = [str(c) for c in captions]
  if not captions:
    raise ValueError("no captions to prepare")
  sizes = dict(max_words=max_words, max_pieces=max_pieces, top_k=top_k, max_targets=max_targets,
               text_length=text_length)
  for name, size in sizes.items():
    if size is not None and size < 1:
      raise ValueError(f"{name}={size}: an array size is at least 1 (None takes the smallest that fits the batch)")
  stop_words = frozenset(stop_words)
  length = tokenizer.context_length
  front = int(tokenizer.start_id is not None)
  capacity = length - front - int(tokenizer.end_id is not None)

  all_words = [tuple(c.split()) for c in captions]
  # Every piece occupies a slot, so word i starts at content index >= i whatever is substituted: words
  # from index `capacity` on can never reach the context and need no arrays.
  kept_words = [words[:capacity] for words in all_words]
  n_words = max(len(words) for words in kept_words)
  if max_words is not None and n_words > max_words:  # before the source's work (the slots below check again)
    worst = max(range(len(captions)), key=lambda i: len(kept_words[i]))
    raise ValueError(f"caption {worst} has {n_words} words within the context but max_words={max_words}: "
                     f"{captions[worst]!r}; raise max_words (at most {capacity} words ever fit)")

  raw = source([list(words) for words in kept_words])
  # A stop word is never attacked, so its substitutes are not even filtered.
  filtered = [[[] if word in stop_words else filter_substitutes(word, subs, stop_words)
               for word, subs in zip(words, raw[n], strict=True)] for n, words in enumerate(kept_words)]
  # Every word and substitute tokenised at once (the memo holds those seen in earlier batches).
  memo = _pieces_memo(tokenizer, itertools.chain((w for words in kept_words for w in words),
                                                 (s for caption in filtered for subs in caption for s in subs)))
  word_pieces = [[memo[w] for w in words] for words in kept_words]
  mask = mask_word_pieces(tokenizer)

  # Tokenised substitutes; locate attackable words.
  per_word: list[list[list[str]]] = []
  per_word_pieces: list[list[list[tuple[int, ...]]]] = []
  targets: list[list[int]] = []
  longest_sub = 1
  most_pieces = math.inf if max_pieces is None else max_pieces
  most_kept = math.inf if top_k is None else top_k
  for n in range(len(kept_words)):
    offset = 0
    caption_subs, caption_pieces, caption_targets = [], [], []
    for w, own in enumerate(word_pieces[n]):
      kept, kept_pieces = [], []
      # Attackable: not a stop word (those have no substitutes here), the first piece inside the
      # context, the word within max_pieces, and at least one substitute.
      if offset < capacity and 0 < len(own) <= most_pieces:
        for sub in filtered[n][w]:
          pieces = memo[sub]
          # Same pieces as the word (a case variant, an unknown word that maps to the same [UNK]...) or as
          # an earlier candidate: the same text, so the same score; keep the first.
          if pieces and len(pieces) <= most_pieces and pieces != own and pieces not in kept_pieces:
            kept.append(sub)
            kept_pieces.append(pieces)
            if len(kept) == most_kept:
              break
      if kept:
        caption_targets.append(w)
        longest_sub = max(longest_sub, *map(len, kept_pieces))
      offset += len(own)
      caption_subs.append(kept)
      caption_pieces.append(kept_pieces)
    per_word.append(caption_subs)
    per_word_pieces.append(caption_pieces)
    targets.append(caption_targets)

  longest_word = max((len(p) for caption in word_pieces for p in caption), default=1)
  if max_pieces is None:
    max_pieces = max(longest_word, longest_sub, len(mask), 1)
  elif len(mask) > max_pieces:
    raise InputError(f"the importance mask word has {len(mask)} pieces but max_pieces={max_pieces}; raise "
                     "max_pieces (text_attack.max_pieces in a training config)")
  if top_k is None:
    top_k = max((len(word) for caption in per_word for word in caption), default=1) or 1
  if max_targets is None:
    max_targets = max(max(len(t) for t in targets), 1)
  for n, caption_targets in enumerate(targets):  # dropped targets keep no candidates
    for w in caption_targets[max_targets:]:
      per_word[n][w], per_word_pieces[n][w] = [], []
  targets = [t[:max_targets] for t in targets]

  # Word slots of at most max_pieces pieces: a longer word (never a target) fills consecutive slots, which
  # concatenate to its pieces, so every text the attack builds is unchanged. Slot s starts at content
  # index >= s, so slots from `capacity` on are dropped as words are above.
  slot_pieces, slot_words, slot_of_word = [], [], []
  for n, words in enumerate(kept_words):
    pieces_n, words_n, first = [], [], []
    for w, pieces in enumerate(word_pieces[n]):
      first.append(len(pieces_n))
      if len(pieces) <= max_pieces:
        pieces_n.append(pieces)
        words_n.append(words[w])
      else:
        chunks = [pieces[i:i + max_pieces] for i in range(0, len(pieces), max_pieces)]
        pieces_n.extend(chunks)
        words_n.extend([words[w]] + [""] * (len(chunks) - 1))
    slot_pieces.append(pieces_n[:capacity])
    slot_words.append(words_n + list(all_words[n][len(words):]))  # the host text keeps every word
    slot_of_word.append(first)
  n_slots = max(len(p) for p in slot_pieces)
  if max_words is None:
    max_words = max(n_slots, 1)
  elif n_slots > max_words:
    worst = max(range(len(captions)), key=lambda i: len(slot_pieces[i]))
    raise ValueError(f"caption {worst} needs {n_slots} word slots (words longer than max_pieces={max_pieces} "
                     f"take several) but max_words={max_words}: {captions[worst]!r}; raise max_words (at "
                     f"most {capacity} slots ever fit)")

  N, W, P, K, A = len(captions), max_words, max_pieces, top_k, max_targets
  pad = tokenizer.pad_id
  # Content of any text the attack builds <= every word replaced by its longest alternative (a target's
  # longest substitute, or the mask word that measures its importance).
  longest_text = 0
  for n in range(N):
    grown = sum(map(len, word_pieces[n]))
    for w in targets[n]:
      grown += max(0, max(len(mask), *map(len, per_word_pieces[n][w])) - len(word_pieces[n][w]))
    longest_text = max(longest_text, grown)
  # The arrays, each filled by one scatter: slot s of caption n, and substitute k of target a of caption n.
  caption_of_slot, slot = _ragged([len(p) for p in slot_pieces])
  wp, wl = _scatter_pieces([p for caption in slot_pieces for p in caption], (caption_of_slot, slot), (N, W), P, pad)
  caption_of_target, target = _ragged([len(t) for t in targets])
  tw = np.zeros((N, A), np.int32)
  tv = np.zeros((N, A), bool)
  tw[caption_of_target, target] = [slot_of_word[n][w] for n in range(N) for w in targets[n]]
  tv[caption_of_target, target] = True
  target_of_sub, sub = _ragged([len(per_word_pieces[n][w]) for n in range(N) for w in targets[n]])
  sp, sl = _scatter_pieces([p for n in range(N) for w in targets[n] for p in per_word_pieces[n][w]],
                           (caption_of_target[target_of_sub], target[target_of_sub], sub), (N, A, K), P, pad)
  mp = np.full((P,), pad, np.int32)
  mp[:len(mask)] = mask
  needed = min(longest_text, capacity) + length - capacity
  if text_length is None:
    text_length = min(length, _round_up(needed, 8))
  elif not needed <= text_length <= length:
    raise ValueError(f"text_length must be in [{needed}, context_length={length}] for these captions (the "
                     f"longest text the attack can build), got {text_length}")

  return TextCandidates(
      word_pieces=wp, word_lengths=wl, target_words=tw, target_valid=tv, sub_pieces=sp, sub_lengths=sl,
      mask_pieces=mp, mask_length=np.asarray(len(mask), np.int32),
      start_id=tokenizer.start_id, end_id=tokenizer.end_id, pad_id=pad, context_length=length,
      text_length=int(text_length), captions=tuple(captions), words=tuple(tuple(w) for w in slot_words),
      substitutes=tuple(_per_slot(per_word[n], slot_of_word[n], len(slot_words[n]))
                        for n in range(N)))


def _ragged(counts: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """Groups of counts[i] items laid end to end: each item's group, and its position within the group."""
  counts = np.asarray(counts, np.intp)
  group = np.repeat(np.arange(counts.size), counts)
  return group, np.arange(group.size) - np.repeat(np.cumsum(counts) - counts, counts)


def _scatter_pieces(pieces: Sequence[tuple[int, ...]], index: tuple[np.ndarray, ...], shape: tuple[int, ...],
                    width: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
  """Arrays (*shape, width) of token pieces (left-aligned, `pad` after) and (*shape) of their counts, with
  pieces[i] at (index[0][i], index[1][i], ...) and nothing elsewhere."""
  out = np.full((*shape, width), pad, np.int32)
  counts = np.zeros(shape, np.int32)
  lengths = [len(p) for p in pieces]
  counts[index] = lengths
  item, column = _ragged(lengths)
  out[(*(i[item] for i in index), column)] = np.fromiter(itertools.chain.from_iterable(pieces), np.int32, item.size)
  return out, counts


def _per_slot(per_word: list[list[str]], slot_of_word: list[int], n_slots: int) -> tuple[tuple[str, ...], ...]:
  """Each word's substitutes at its first slot; () elsewhere (continuation slots, words past the context)."""
  out = [()] * n_slots
  for w, subs in enumerate(per_word):
    if slot_of_word[w] < n_slots:
      out[slot_of_word[w]] = tuple(subs)
  return tuple(out)


# ----------------------------------------------------------------------------------------------------
# Candidates in a batch: the host's `mat_jax.training.inputs.AttachCandidates` adds them as `cand_*`
# arrays per caption; the objectives' text attacks rebuild `TextCandidates` from them inside the step.

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


def candidates_from_batch(batch: Mapping[str, jax.Array], meta: CandidateMeta):
  """The flat `TextCandidates` of the batch's B·K captions (inside jit)."""
  lead = batch["input_ids"].ndim - 1  # 1: one caption per image; 2: K captions per image
  missing = [PREFIX + n for n in PER_CAPTION if PREFIX + n not in batch]
  if missing:
    raise ValueError(f"the batch lacks the text-attack candidates {missing}: objectives with a text attack "
                     "need the input pipeline's AttachCandidates transform (mat_jax.training.inputs.AttachCandidates)")
  flat = {n: batch[PREFIX + n].reshape((-1,) + batch[PREFIX + n].shape[lead:]) for n in PER_CAPTION}
  return TextCandidates(**flat, mask_pieces=batch[PREFIX + "mask_pieces"][0],
                        mask_length=batch[PREFIX + "mask_length"][0], **dataclasses.asdict(meta))
