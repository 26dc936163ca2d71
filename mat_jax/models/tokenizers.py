"""Fixed-length tokenisation on the host, through transformers' tokenizer files.

`load_tokenizer(source)` reads tokenizer.json / vocab files from a transformers-layout directory (CLIP's
BPE, BERT's WordPiece, or the shapes world's word-level vocabulary) and returns a `Tokenizer`: a
callable from a list of strings to numpy `input_ids` and `attention_mask` of shape (N, context_length),
padded or truncated, with the end-of-text token kept on truncation.

The text attacks also need the pieces of single words (`encode_words`): every tokenizer used here splits
on whitespace first, so the pieces of a word do not depend on its neighbours and a caption's ids are the
concatenation of its words' pieces between the special tokens.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import sys
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from mat_jax.errors import ConfigError
from mat_jax.models import hub

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "vocab.txt", "merges.txt", "config.json")

# Tokenizers report this when they have no limit of their own.
_NO_LIMIT = 10**6


@dataclasses.dataclass(frozen=True)
class TokenBatch:
  input_ids: np.ndarray       # int32 (N, L)
  attention_mask: np.ndarray  # int32 (N, L), 1 on real tokens


class Tokenizer:
  """A transformers fast tokenizer with a fixed context length; safe to call from several threads.

  transformers sets padding and truncation on its Rust tokenizer before each call, as shared state: a
  call without padding (`encode_words`) in one thread between another thread's setting and encoding
  left that thread's batch unpadded (seen in a training pipeline: batches are tokenised in Grain's
  prefetch thread while the text-attack candidates tokenise words in the consumer's). Calls take a lock.
  """

  def __init__(self, hf_tokenizer, context_length: int):
    self.hf = hf_tokenizer
    self._lock = threading.Lock()
    self.context_length = int(context_length)
    if self.context_length < 3:
      raise ValueError(f"context_length must be at least 3 (start, one word, end), got {context_length}")
    # A tokenizer whose pad token is unset (CLIP's original files) pads with end-of-text, as OpenAI did.
    if self.hf.pad_token is None:
      self.hf.pad_token = self.hf.eos_token or self.hf.sep_token
    if self.hf.pad_token is None:
      raise ConfigError(f"the tokenizer ({type(self.hf).__name__}) defines no pad, eos or sep token, so its "
                        "batches cannot be padded to a fixed length; load a tokenizer that defines them (the one "
                        "saved with the model's weights), or set one in its tokenizer_config.json")
    # Whatever tokenizer_config.json says: CLIP pools at the first end token (OpenAI-style files pad with
    # it, so a left pad would be pooled), truncation must keep the start token, and the text attacks and
    # the cached text continuation build captions as start, words, end, then padding.
    self.hf.padding_side = "right"
    self.hf.truncation_side = "right"
    try:
      start, end = self._special_ids()
    except Exception as err:  # e.g. a WordPiece vocabulary without its [UNK] token: raised at the first text
      raise ConfigError(f"the tokenizer ({type(self.hf).__name__}) cannot encode a word ({type(err).__name__}: "
                        f"{err}); its files are incomplete: save the tokenizer again with "
                        "tokenizer.save_pretrained(directory)") from err
    self.start_id, self.end_id = start, end
    self.pad_id = int(self.hf.pad_token_id)

  def with_context_length(self, context_length: int) -> Tokenizer:
    """The same tokenizer at another context length (over its own copy, so each keeps its own lock)."""
    return Tokenizer(copy.deepcopy(self.hf), context_length)

  def _special_ids(self) -> tuple[int | None, int | None]:
    """The ids the tokenizer puts before and after a text (CLS/SEP for BERT, BOS/EOS for CLIP)."""
    with self._lock:
      framed = self.hf("a", add_special_tokens=True)["input_ids"]
      bare = self.hf("a", add_special_tokens=False)["input_ids"]
    at = next(i for i in range(len(framed)) if framed[i:i + len(bare)] == bare)
    head, tail = framed[:at], framed[at + len(bare):]
    return (head[0] if head else None), (tail[0] if tail else None)

  @property
  def vocab_size(self) -> int:
    return len(self.hf)

  def vocabulary_digest(self) -> str:
    """A short digest of what maps words to ids: every token's id, and the start, end and pad ids. Two
    tokenizers with the same vocabulary size but other ids give a model other inputs."""
    with self._lock:
      vocabulary = sorted(self.hf.get_vocab().items())
    text = json.dumps([vocabulary, [self.start_id, self.end_id, self.pad_id]], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]

  def __call__(self, texts: Sequence[str]) -> TokenBatch:
    if isinstance(texts, str):
      raise TypeError("pass a list of strings, not a single string")
    texts = list(texts)
    if not texts:  # transformers fails on an empty batch; an empty batch has empty arrays
      empty = np.zeros((0, self.context_length), np.int32)
      return TokenBatch(empty, empty.copy())
    with self._lock:
      enc = self.hf(texts, padding="max_length", truncation=True, max_length=self.context_length,
                    return_attention_mask=True)
    return TokenBatch(np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32))

  def encode_words(self, words: Sequence[str]) -> list[list[int]]:
    """The pieces of each word on its own, without special tokens."""
    if not words:
      return []
    with self._lock:
      pieces = self.hf(list(words), add_special_tokens=False)["input_ids"]
    return [list(ids) for ids in pieces]

  def decode(self, input_ids: Sequence[int]) -> str:
    with self._lock:
      return self.hf.decode([int(i) for i in input_ids], skip_special_tokens=True)

  def save_pretrained(self, directory: str | os.PathLike) -> None:
    """Write the tokenizer files (transformers layout) into `directory`."""
    with self._lock:  # the files include the padding state a concurrent call may be changing
      self.hf.save_pretrained(str(directory))

  def __getstate__(self) -> dict:
    # Pickled into Grain's worker processes with the pipeline; a lock does not pickle.
    return {k: v for k, v in self.__dict__.items() if k != "_lock"}

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()


def _check_tokenizer_files(directory: Path) -> None:
  """The files one of the supported layouts needs, and its JSON files readable, before transformers reads them."""
  has = {f: (directory / f).exists() for f in TOKENIZER_FILES}
  if not (has["tokenizer.json"] or has["vocab.json"] or has["vocab.txt"]):
    raise hub.ModelSourceError(
        f"{directory} has no tokenizer files (tokenizer.json, or vocab.json + merges.txt, or vocab.txt); "
        + hub.missing_files_fix(directory, "save the tokenizer with tokenizer.save_pretrained(directory) beside "
                                           "the weights."))
  if not has["tokenizer.json"] and has["vocab.json"] and not has["merges.txt"]:
    raise hub.ModelSourceError(
        f"{directory} has a BPE vocabulary (vocab.json) without its merges.txt (and no tokenizer.json); copy "
        "merges.txt with it, or save the tokenizer with tokenizer.save_pretrained(directory).")
  for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json"):
    if has[name]:
      hub.read_json_object(directory / name)


def _context_length_from_config(directory: Path) -> int | None:
  config = directory / "config.json"
  if not config.exists():
    return None
  data = hub.read_json_object(config)
  text = data.get("text_config") or data
  value = text.get("max_position_embeddings")
  return int(value) if value else None


def _tokenizer_class_hint(directory: Path) -> dict[str, str]:
  """Bare vocabulary files (no tokenizer.json or tokenizer_config.json) name no class; their contents do:
  vocab.txt is WordPiece (BERT), a BPE vocab.json holding CLIP's start token is CLIP's. Left to a
  config.json's model type instead, transformers builds that model's tokenizer class, which finds none of
  its own files and comes out with an empty vocabulary, raising nothing."""
  if any((directory / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
    return {}
  if (directory / "vocab.txt").exists():
    return {"tokenizer_type": "bert"}
  vocab = directory / "vocab.json"
  has_merges = (directory / "merges.txt").exists()
  if vocab.exists() and has_merges and "<|startoftext|>" in hub.read_json_object(vocab):
    return {"tokenizer_type": "clip"}
  if (directory / "config.json").exists():
    return {}
  raise hub.ModelSourceError(
      f"{directory} has vocabulary files but nothing that names the tokenizer class; add a "
      'tokenizer_config.json such as {"tokenizer_class": "CLIPTokenizer"} (or save the tokenizer with '
      "tokenizer.save_pretrained(directory)).")


# Set while transformers is imported: it then keeps its "PyTorch was not found" advice to itself.
_NO_ADVICE = "TRANSFORMERS_NO_ADVISORY_WARNINGS"


def import_transformers():
  """The transformers package, imported on first use (importing it costs seconds).

  mat_jax uses transformers for tokenizers and file layouts only. Without PyTorch installed (the
  default install) transformers advises on import that its models are unavailable, which does not
  concern mat_jax, so that advice is muted for the import; other warnings pass.
  """
  if "transformers" not in sys.modules:
    previous = os.environ.get(_NO_ADVICE)
    os.environ[_NO_ADVICE] = "1"
    try:
      import transformers  # noqa: F401
    finally:
      if previous is None:
        del os.environ[_NO_ADVICE]
      else:
        os.environ[_NO_ADVICE] = previous
  # Not sys.modules' entry: while another thread is still importing transformers, that entry is the
  # partly initialised module (no AutoTokenizer yet); the import statement waits for it to finish.
  import transformers
  return transformers


def load_tokenizer(source: str | os.PathLike, context_length: int | None = None) -> Tokenizer:
  """A `Tokenizer` from a transformers-layout directory or hub id.

  The context length is, in order: the argument, the model's `max_position_embeddings` in a
  config.json beside the tokenizer files, the tokenizer's own `model_max_length`.
  """
  directory = hub.resolve(source, TOKENIZER_FILES)
  _check_tokenizer_files(directory)
  # Read first: transformers reads config.json too, and reports a damaged one without naming the file.
  from_config = _context_length_from_config(directory)
  auto = import_transformers().AutoTokenizer
  hint = _tokenizer_class_hint(directory)
  try:
    hf = auto.from_pretrained(str(directory), **hint)
  except Exception as err:  # transformers' and the Rust tokenizers' errors name no file and no fix
    raise hub.ModelSourceError(
        f"the tokenizer files in {directory} cannot be read ({type(err).__name__}: {err}); save the tokenizer "
        "again with tokenizer.save_pretrained(directory).") from err
  words = len(hf) - len(set(hf.all_special_ids))
  if words <= 0:  # every text would tokenise to special and unknown tokens only, and evaluate "fine"
    files = ", ".join(sorted(f for f in TOKENIZER_FILES if (directory / f).exists()))
    raise hub.ModelSourceError(
        f"the tokenizer in {directory} ({type(hf).__name__}, from {files}) has no vocabulary besides its "
        f"{len(hf)} special token(s): its vocabulary file is empty, or its files are not that class's (another "
        "model's tokenizer?). Give the directory of the tokenizer these weights were trained with (--tokenizer "
        "/ model.tokenizer), or save that tokenizer with tokenizer.save_pretrained(directory)")
  if context_length is None:
    context_length = from_config
  if context_length is None and hf.model_max_length < _NO_LIMIT:
    context_length = hf.model_max_length
  if context_length is None:
    raise ValueError(f"the tokenizer in {directory} sets no length limit and there is no config.json "
                     "with max_position_embeddings beside it; pass context_length=...")
  return Tokenizer(hf, context_length)
