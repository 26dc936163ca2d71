"""Fixed-length tokenisation on tiny tokenizer files written by the test: CLIP's BPE and BERT's WordPiece."""

from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from mat_jax.errors import ConfigError
from mat_jax.models import load_tokenizer
from mat_jax.models.hub import ModelSourceError

LETTERS = "abcdefghijklmnopqrstuvwxyz"
# BPE merges for a few whole words; anything else falls apart into letters.
MERGES = ["c a", "ca t</w>", "d o", "do g</w>", "r e", "re d</w>", "o n</w>"]
BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "cat", "dog", "on", "big", "##gest",
              "mat", "##s"]


def _clip_files(directory):
  """vocab.json + merges.txt in CLIP's layout: byte symbols, word-final symbols, merges, then specials."""
  tokens = list(LETTERS) + [c + "</w>" for c in LETTERS]
  tokens += [m.replace(" ", "") for m in MERGES if m.replace(" ", "") not in tokens]
  tokens += ["<|startoftext|>", "<|endoftext|>"]
  (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
  (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
  return directory


@pytest.fixture(scope="module")
def clip_tok(tmp_path_factory):
  return load_tokenizer(_clip_files(tmp_path_factory.mktemp("clip_tok")), context_length=8)


@pytest.fixture(scope="module")
def bert_tok(tmp_path_factory):
  directory = tmp_path_factory.mktemp("bert_tok")
  (directory / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n")
  return load_tokenizer(directory, context_length=8)


def _reassembled(tok, caption: str) -> list[int]:
  """start + concatenated word pieces + end, padded: what the text attacks build on the device."""
  pieces = [p for word in tok.encode_words(caption.split()) for p in word]
  ids = [tok.start_id, *pieces, tok.end_id]
  return ids + [tok.pad_id] * (tok.context_length - len(ids))


def test_clip_special_ids_and_padding(clip_tok):
  assert (clip_tok.start_id, clip_tok.end_id) == (clip_tok.vocab_size - 2, clip_tok.vocab_size - 1)
  assert clip_tok.pad_id == clip_tok.end_id  # CLIP's files set no pad token: pad with end-of-text
  batch = clip_tok(["a red cat", "Dog  on\tRED"])
  assert batch.input_ids.shape == batch.attention_mask.shape == (2, 8)
  assert batch.input_ids.dtype == batch.attention_mask.dtype == np.int32
  assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]]
  # Lower-cased, whitespace-normalised, whole-word merges; the same word gives the same id.
  assert batch.input_ids[0, 2] == batch.input_ids[1, 3]
  assert clip_tok.decode(batch.input_ids[0]) == "a red cat"


def test_clip_truncation_keeps_the_end_token(clip_tok):
  ids = clip_tok(["a red cat on a red dog on a mat"]).input_ids[0]
  assert len(ids) == 8 and ids[0] == clip_tok.start_id and ids[-1] == clip_tok.end_id
  assert (clip_tok(["a red cat on a red dog on a mat"]).attention_mask == 1).all()


@pytest.mark.parametrize("caption", ["a red cat", "dog on red", "zebra", "a cat"])
def test_clip_words_reassemble_to_the_full_tokenisation(clip_tok, caption):
  assert clip_tok([caption]).input_ids[0].tolist() == _reassembled(clip_tok, caption)


def test_bert_wordpiece(bert_tok):
  assert (bert_tok.start_id, bert_tok.end_id, bert_tok.pad_id) == (2, 3, 0)
  batch = bert_tok(["A biggest cat", "red mats on a big dog on a mat"])
  assert batch.input_ids.tolist() == [[2, 5, 10, 11, 7, 3, 0, 0], [2, 6, 12, 13, 9, 5, 10, 3]]
  assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1, 0, 0], [1] * 8]
  assert bert_tok.encode_words(["biggest", "zebra"]) == [[10, 11], [1]]


@pytest.mark.parametrize("caption", ["a biggest cat", "red mats", "zebra on a mat"])
def test_bert_words_reassemble_to_the_full_tokenisation(bert_tok, caption):
  assert bert_tok([caption]).input_ids[0].tolist() == _reassembled(bert_tok, caption)


def test_context_length_from_config_json(tmp_path):
  _clip_files(tmp_path)
  config = {"model_type": "clip", "text_config": {"max_position_embeddings": 6}}
  (tmp_path / "config.json").write_text(json.dumps(config))
  tok = load_tokenizer(tmp_path)
  assert tok.context_length == 6 and tok(["a"]).input_ids.shape == (1, 6)


def test_bad_sources(tmp_path):
  with pytest.raises(ModelSourceError, match="no tokenizer files"):
    load_tokenizer(tmp_path)
  (tmp_path / "vocab.json").write_text(json.dumps({"a": 0}))
  (tmp_path / "merges.txt").write_text("#version: 0.2\n")
  with pytest.raises(ModelSourceError, match="tokenizer_config.json"):
    load_tokenizer(tmp_path, context_length=8)


def test_tokenizer_config_cannot_pad_or_truncate_on_the_left(tmp_path, clip_tok):
  # CLIP pools at the first end token (the pad token here) and truncation must keep the start token.
  _clip_files(tmp_path)
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "CLIPTokenizer", "padding_side": "left", "truncation_side": "left"}))
  tok = load_tokenizer(tmp_path, context_length=8)
  captions = ["a cat", "a red cat on a red dog on a mat"]
  batch, expected = tok(captions), clip_tok(captions)
  np.testing.assert_array_equal(batch.input_ids, expected.input_ids)
  np.testing.assert_array_equal(batch.attention_mask, expected.attention_mask)
  assert batch.input_ids[0, 0] == tok.start_id and batch.attention_mask[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]


def test_empty_batch_gives_empty_arrays(clip_tok):
  batch = clip_tok([])
  assert batch.input_ids.shape == batch.attention_mask.shape == (0, 8)
  assert batch.input_ids.dtype == batch.attention_mask.dtype == np.int32


def test_config_json_that_is_not_an_object(tmp_path):
  _clip_files(tmp_path)
  for text in ("[]", "{oops"):
    (tmp_path / "config.json").write_text(text)
    named = r"config.json is (not valid JSON|valid JSON but not an object).*save_pretrained"
    with pytest.raises(ConfigError, match=named):
      load_tokenizer(tmp_path, context_length=8)


def test_single_string_is_refused(clip_tok):
  with pytest.raises(TypeError, match="list of strings"):
    clip_tok("a red cat")


_WITHOUT_TORCH = "import sys; sys.modules['torch'] = None  # find_spec('torch') is None: as if not installed\n"


@pytest.mark.parametrize("through_mat_jax", [False, True])
def test_transformers_without_torch_gives_no_models_advice_through_mat_jax(tmp_path, through_mat_jax):
  # The default install has no PyTorch; transformers then advises on import that its models are
  # unavailable, which mat_jax (tokenizers only) mutes. The bare import shows that the advice exists.
  load = ("from mat_jax.models.tokenizers import import_transformers; import_transformers(); "
          "import os; assert 'TRANSFORMERS_NO_ADVISORY_WARNINGS' not in os.environ"
          if through_mat_jax else "import transformers")
  env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
  run = subprocess.run([sys.executable, "-c", _WITHOUT_TORCH + load], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=300)
  assert run.returncode == 0, run.stderr
  assert ("PyTorch was not found" in run.stderr + run.stdout) != through_mat_jax, run.stderr


class _OverlapProbe:
  """Stands in for transformers' tokenizer and records whether two calls were ever inside it at once
  (transformers sets padding on shared state before encoding, so overlapping calls corrupt batches)."""

  def __init__(self, hf):
    self.hf, self.inside, self.overlaps, self.lock = hf, 0, 0, threading.Lock()

  def __call__(self, *args, **kwargs):
    with self.lock:
      self.inside += 1
      self.overlaps += self.inside > 1
    time.sleep(0.001)  # widen the window a race needs
    try:
      return self.hf(*args, **kwargs)
    finally:
      with self.lock:
        self.inside -= 1

  def __getattr__(self, name):
    return getattr(self.hf, name)


def test_calls_from_several_threads_never_overlap(clip_tok):
  tok = copy.copy(clip_tok)
  tok.hf = probe = _OverlapProbe(clip_tok.hf)
  captions = ["a photo of a red square", "two dogs"] * 8

  def batches():
    for _ in range(40):
      assert tok(captions).input_ids.shape == (16, tok.context_length)  # padded every time

  def words():
    for _ in range(40):
      tok.encode_words(["a", "photo", "of", "dogs"])

  errors = []

  def recording(fn):
    def run():
      try:
        fn()
      except Exception as e:  # a thread's exception would not fail the test by itself
        errors.append(e)
    return run

  threads = [threading.Thread(target=recording(f)) for f in (batches, words, batches)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors and probe.overlaps == 0
  # Pickled into worker processes: the copy works and has its own lock.
  again = pickle.loads(pickle.dumps(clip_tok))
  np.testing.assert_array_equal(again(captions).input_ids, clip_tok(captions).input_ids)


def _word_level_files(directory, **specials):
  """A word-level tokenizer.json whose tokenizer_config.json names only the given special tokens."""
  from tokenizers import Tokenizer as RustTokenizer
  from tokenizers import models, pre_tokenizers

  rust = RustTokenizer(models.WordLevel({w: i for i, w in enumerate(["[PAD]", "[UNK]", "a", "red", "cat"])},
                                        unk_token="[UNK]"))
  rust.pre_tokenizer = pre_tokenizers.Whitespace()
  rust.save(str(directory / "tokenizer.json"))
  (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                               **specials}))
  return directory


def test_damaged_or_incomplete_tokenizer_files_name_the_file_and_the_fix(tmp_path):
  (tmp_path / "bpe").mkdir()
  bpe = _clip_files(tmp_path / "bpe")
  (bpe / "merges.txt").unlink()
  (bpe / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer"}))
  with pytest.raises(ModelSourceError, match="vocab.json.*without its merges.txt"):
    load_tokenizer(bpe, context_length=8)
  for damaged in ("tokenizer.json", "tokenizer_config.json"):
    directory = tmp_path / damaged
    directory.mkdir()
    _word_level_files(directory, pad_token="[PAD]")
    text = (directory / damaged).read_text()
    (directory / damaged).write_text(text[:len(text) // 2])  # a truncated download
    with pytest.raises(ConfigError, match=f"{damaged} is not valid JSON.*save_pretrained"):
      load_tokenizer(directory, context_length=8)
  empty = tmp_path / "empty_vocab"
  empty.mkdir()
  (empty / "vocab.txt").write_text("")
  with pytest.raises(ModelSourceError, match=r"no vocabulary besides its 5 special token\(s\): its vocabulary "
                                             r"file is empty.*save_pretrained"):
    load_tokenizer(empty, context_length=8)
  # A class named by tokenizer_config.json whose files are not there (a CLIP tokenizer over BERT's vocab.txt):
  # transformers builds it with its special tokens only, and every caption would tokenise to them.
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n")
  (foreign / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer"}))
  with pytest.raises(ModelSourceError, match=r"\(CLIPTokenizer, from tokenizer_config.json, vocab.txt\) has no "
                                             r"vocabulary besides its 2 special token\(s\)"):
    load_tokenizer(foreign, context_length=8)
  # Bare vocabulary files beside a model's config.json: the files name the class, not the model type
  # (a CLIP config.json made a CLIPTokenizer with an empty vocabulary of BERT's vocab.txt).
  (foreign / "tokenizer_config.json").unlink()
  clip_config = {"model_type": "clip", "text_config": {"max_position_embeddings": 8}}
  (foreign / "config.json").write_text(json.dumps(clip_config))
  assert type(load_tokenizer(foreign).hf).__name__ == "BertTokenizer"


def test_a_tokenizer_without_pad_eos_or_sep_is_refused(tmp_path):
  with pytest.raises(ConfigError, match="no pad, eos or sep token"):
    load_tokenizer(_word_level_files(tmp_path, unk_token="[UNK]"), context_length=8)


def test_the_vocabulary_digest_names_the_word_to_id_map(bert_tok, tmp_path):
  """What a checkpoint's fingerprint records of its tokenizer: the same map gives the same digest at any
  context length and after a save and load; two ids swapped give another."""
  digest = bert_tok.vocabulary_digest()
  assert bert_tok.with_context_length(5).vocabulary_digest() == digest
  bert_tok.save_pretrained(tmp_path / "saved")
  assert load_tokenizer(tmp_path / "saved", context_length=8).vocabulary_digest() == digest
  swapped = list(BERT_VOCAB)
  swapped[6], swapped[7] = swapped[7], swapped[6]  # "red" and "cat"
  (tmp_path / "swapped").mkdir()
  (tmp_path / "swapped" / "vocab.txt").write_text("\n".join(swapped) + "\n")
  assert load_tokenizer(tmp_path / "swapped", context_length=8).vocabulary_digest() != digest
