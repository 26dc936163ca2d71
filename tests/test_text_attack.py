"""The compiled text attack (BERT-Attack) and its candidate sources, on a tiny CLIP and tiny vocabularies."""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mat_jax.attacks.candidates import (STOP_WORDS, BertMLMSource, CharEditSource, LexiconSource,
                                        prepare_candidates)
from mat_jax.attacks import text as text_module
from mat_jax.attacks.text import (_changed_span, _compiled_text_attack, _map_valid, _pools_last_token,
                                  adversarial_captions, assemble, attack_text, image_objective, kl_objective,
                                  length_buckets, softmax_kl, text_attack)
from mat_jax.bench.text_attack import reference_text_attack
from mat_jax.models import CLIP, BertForMaskedLM, DualEncoder, bert_config, clip_config
from mat_jax.models.tokenizers import load_tokenizer

CONTEXT = 12
# Words of the test world; "reddish" and "squarish" split into several pieces.
WORDS = ["a", "the", "is", "above", "of", "and", "red", "blue", "green", "square", "circle", "big", "small",
         "crimson", "scarlet", "navy", "azure", "box", "block", "ball", "orb", "large", "huge", "tiny",
         "little", "over", "emerald", "re", "##d", "##dish", "sq", "##uar", "##ish", "picture", "photo"]
TABLE = {
    "red": ["crimson", "scarlet", "reddish", "red"], "crimson": ["red", "scarlet"],
    "blue": ["navy", "azure"], "green": ["emerald"], "square": ["box", "block", "squarish", "sq"],
    "circle": ["ball", "orb"], "big": ["large", "huge", "the"], "small": ["tiny", "little"],
    "above": ["over"], "picture": ["photo"],
}
CAPTIONS = [
    "a red square above the big blue circle",
    "a small green circle",
    "the picture of a big crimson box and a tiny ball",
    "red circle",
    "a blue square and a small red circle above a green square",   # longer than the context
    "the big zzz is red",                                            # an unknown word
]


def _save_tokenizer(directory, vocab, specials, template):
  from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast

  ids = {t: i for i, t in enumerate(vocab)}
  raw = RawTokenizer(models.WordPiece(ids, unk_token="[UNK]", max_input_chars_per_word=100))
  raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  raw.post_processor = processors.TemplateProcessing(single=template,
                                                     special_tokens=[(t, ids[t]) for t in template.split() if t in ids])
  raw.decoder = decoders.WordPiece()
  PreTrainedTokenizerFast(tokenizer_object=raw, **specials).save_pretrained(str(directory))
  return directory


def _random_init(make_module, seed=0, std=0.2):
  """graphdef and float32 params of a module, drawn with numpy (random normal, LayerNorm scale 1, biases 0),
  without compiling nnx's initialisers (seconds on this CPU). A large std makes one word matter to the
  features, so importance orders and candidate scores are far from ties."""
  graphdef, state = nnx.split(nnx.eval_shape(make_module))
  rng = np.random.default_rng(seed)

  def draw(path, x):
    name = str(path[-1])
    if "scale" in name:
      return np.ones(x.shape, x.dtype)
    if "bias" in name:
      return np.zeros(x.shape, x.dtype)
    return (std * rng.standard_normal(x.shape)).astype(x.dtype)
  return graphdef, jax.tree_util.tree_map_with_path(draw, state)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  directory = _save_tokenizer(tmp_path_factory.mktemp("clip_tok"), ["[PAD]", "[START]", "[END]", "[UNK]", *WORDS],
                              dict(bos_token="[START]", eos_token="[END]", pad_token="[PAD]", unk_token="[UNK]"),
                              "[START] $A [END]")
  return load_tokenizer(directory, context_length=CONTEXT)


def model_config(tok, pooling="eos"):
  cfg = clip_config("tiny")
  small = dict(layers=1, width=32, heads=2, mlp_dim=64)
  return cfg.replace(
      text=dataclasses.replace(cfg.text, vocab_size=tok.vocab_size, context_length=CONTEXT, eos_token_id=tok.end_id,
                               bos_token_id=tok.start_id, pad_token_id=tok.pad_id, pooling=pooling, **small),
      vision=dataclasses.replace(cfg.vision, image_size=16, patch_size=8, **small), projection_dim=16)


@pytest.fixture(scope="module")
def model(tok):
  cfg = model_config(tok)
  graphdef, params = _random_init(lambda: CLIP(cfg, rngs=nnx.Rngs(0)))
  return DualEncoder(graphdef, cfg), params


@pytest.fixture(scope="module")
def cands(tok):
  return prepare_candidates(CAPTIONS, tok, LexiconSource(TABLE))


@pytest.fixture(scope="module")
def guide(model):
  return jax.random.normal(jax.random.key(1), (len(CAPTIONS), model[0].config.projection_dim))


ROWS = 12  # every oracle encoder call padded to this many rows: one compilation for all of them


def _padded_rows(jitted, params, ids, mask):
  """Text features of ids (n <= ROWS, L) through one jitted shape."""
  pad = ((0, ROWS - len(ids)), (0, 0))
  return np.asarray(jitted(params, np.pad(np.asarray(ids), pad), np.pad(np.asarray(mask), pad)))[:len(ids)]


@pytest.fixture(scope="module")
def features(model):
  return functools.partial(_padded_rows, jax.jit(model[0].text_features))


def _oracle(model, tok, cands, guide, features, **kw):
  encoder, params = model
  return reference_text_attack(encoder, params, tok, cands, None if guide is None else np.asarray(guide),
                               text_features=features, **kw)


# ------------------------------------------------------------------------------------------------
# Candidates and assembly
# ------------------------------------------------------------------------------------------------

def test_candidates_follow_the_references_filter(cands, tok):
  capacity = CONTEXT - 2
  for n, words in enumerate(cands.words):
    offsets = np.cumsum([0] + [len(p) for p in tok.encode_words(list(words))])
    targets = set(cands.target_words[n][cands.target_valid[n]].tolist())
    for w, word in enumerate(words):
      subs = cands.substitutes[n][w]
      assert set(subs) <= set(TABLE.get(word, []))
      assert word not in subs and not STOP_WORDS & set(subs) and not any("##" in s for s in subs)
      # Attackable = not a stop word, first piece inside the context, some candidate.
      assert (w in targets) == bool(subs)
      if word in STOP_WORDS or offsets[w] >= capacity or word not in TABLE:
        assert not subs
  # "the" is a stop word: never a substitute; "red" is not its own candidate.
  assert cands.substitutes[0][1] == ("crimson", "scarlet", "reddish")
  assert cands.substitutes[0][5] == ("large", "huge")
  # "sq" and "square" are both single pieces here; "squarish" has three.
  assert tok.encode_words(["squarish"]) == [[tok.hf.convert_tokens_to_ids(t) for t in ("sq", "##uar", "##ish")]]
  assert cands.mask_pieces[:int(cands.mask_length)].tolist() == [tok.hf.unk_token_id]


def test_stop_words_are_never_attacked_and_a_substitute_with_the_words_own_pieces_is_none(tok):
  """A stop word is not attacked even where the source proposes content words for it (TABLE's stop words only
  get stop words, which the filter drops anyway); and a substitute that tokenises to the word's own pieces
  (here one unknown word for another: both [UNK]) is the same text, not a candidate."""
  table = {"the": ["picture"], "above": ["photo"], "red": ["crimson"], "zzz": ["qqq", "box"]}
  got = prepare_candidates(["the red zzz above"], tok, LexiconSource(table))
  assert tok.encode_words(["zzz", "qqq"]) == [[tok.hf.unk_token_id]] * 2
  assert got.substitutes[0] == ((), ("crimson",), ("box",), ())
  assert got.target_words[0][got.target_valid[0]].tolist() == [1, 2]


def test_bucketed_sizes_only_grow_and_keep_the_callers_limits(tok, cands):
  from mat_jax.attacks.multimodal import bucketed_candidates
  rounded = bucketed_candidates(CAPTIONS, tok, LexiconSource(TABLE))
  assert rounded.sub_lengths.shape[2] == 4  # the most substitutes of a word, a power of two
  assert rounded.word_pieces.shape[1] >= cands.word_pieces.shape[1]
  assert rounded.substitutes == cands.substitutes
  # top_k is also a limit on the substitutes kept: a caller's value is not rounded up to a bucket.
  limited = bucketed_candidates(CAPTIONS, tok, LexiconSource(TABLE), top_k=3)
  assert limited.sub_lengths.shape[2] == 3
  assert all(len(s) <= 3 for words in limited.substitutes for s in words)


def test_fixed_shapes_and_size_errors(tok):
  source = LexiconSource(TABLE)
  c = prepare_candidates(CAPTIONS[:2], tok, source, max_words=10, max_pieces=4, top_k=5, max_targets=6)
  assert c.word_pieces.shape == (2, 10, 4) and c.sub_pieces.shape == (2, 6, 5, 4)
  with pytest.raises(ValueError, match="max_words"):
    prepare_candidates(CAPTIONS[:1], tok, source, max_words=3)
  with pytest.raises(ValueError, match="max_words"):  # a long word's slots count towards max_words
    prepare_candidates(["a squarish box"], tok, source, max_pieces=2, max_words=3)
  assert prepare_candidates(["a squarish box"], tok, source, max_pieces=2).word_pieces.shape[1:] == (4, 2)
  with pytest.raises(ValueError, match="flatten"):
    prepare_candidates(np.array([CAPTIONS[:2]]), tok, source)
  for size in ("max_words", "max_pieces", "top_k", "max_targets", "text_length"):
    with pytest.raises(ValueError, match=rf"{size}=0: an array size is at least 1"):
      prepare_candidates(CAPTIONS[:1], tok, source, **{size: 0})
  with pytest.raises(TypeError, match="list of words"):
    LexiconSource({"red": "crimson"})


def test_a_tables_top_k_keeps_each_words_first_substitutes():
  """`--top-k` caps the substitutes per word for every source, the synonym table's (`paraphrase`) too: it
  used to be dropped there, and the attack searched all of them."""
  from mat_jax.data import shapes
  from mat_jax.training import inputs
  two = LexiconSource(TABLE, top_k=2)
  assert two([["red", "square", "green"]]) == [[["crimson", "scarlet"], ["box", "block"], ["emerald"]]]
  assert two.max_substitutes == 2 and LexiconSource(TABLE).max_substitutes == 4
  for bad in (0, 1.5, True):
    with pytest.raises(ValueError, match="top_k must be a whole number >= 1"):
      LexiconSource(TABLE, top_k=bad)
  one = inputs.make_source("paraphrase", top_k=1)
  assert one.max_substitutes == 1
  assert inputs.make_source("paraphrase").table == LexiconSource(shapes.substitution_table()).table


def test_assemble_reproduces_the_tokenizer(cands, tok):
  ids, mask = assemble(cands)
  expected = tok(CAPTIONS)
  np.testing.assert_array_equal(ids, expected.input_ids)
  np.testing.assert_array_equal(mask, expected.attention_mask)
  # Any choice of substitutions (several per caption, multi-piece ones, truncated ones) rebuilds
  # exactly the tokenizer's ids of the substituted caption.
  rng = np.random.default_rng(0)
  for _ in range(3):
    n_subs = (cands.sub_lengths > 0).sum(-1)
    choice = np.where(cands.target_valid & (rng.random(n_subs.shape) < 0.7),
                      rng.integers(0, np.maximum(n_subs, 1)), -1)
    texts = []
    for n, words in enumerate(cands.words):
      words = list(words)
      for a, k in enumerate(choice[n]):
        if k >= 0:
          w = cands.target_words[n, a]
          words[w] = cands.substitutes[n][w][k]
      texts.append(" ".join(words))
    ids, mask = assemble(cands, choice)
    expected = tok(texts)
    np.testing.assert_array_equal(ids, expected.input_ids)
    np.testing.assert_array_equal(mask, expected.attention_mask)


def test_a_word_longer_than_a_fixed_max_pieces_is_kept_whole_and_not_attacked(tok, model, guide):
  # A training run fixes max_pieces; a caption word with more pieces (here "squarish": sq ##uar ##ish) must
  # neither stop the run nor change the caption: it fills consecutive slots and is not a target.
  captions = ["a squarish box above a red circle", "the big squarish ball", "a small squarish square"]
  c = prepare_candidates(captions, tok, LexiconSource(TABLE), max_words=10, max_pieces=2, top_k=4, max_targets=4)
  assert c.word_pieces.shape == (3, 10, 2)
  np.testing.assert_array_equal(assemble(c)[0], tok(captions).input_ids)
  assert c.words[0][:3] == ("a", "squarish", "") and c.words[2] == ("a", "small", "squarish", "", "square")
  targets = [[c.words[n][w] for w, valid in zip(c.target_words[n], c.target_valid[n], strict=True) if valid]
             for n in range(3)]
  assert targets == [["red", "circle"], ["big"], ["small", "square"]]
  result = text_attack(*model, c, guide[:3], objective="image", max_changes=2)
  adversarial = adversarial_captions(c, result)
  assert adversarial != captions and all("squarish" in a for a in adversarial)
  expected = tok(adversarial)
  np.testing.assert_array_equal(result.input_ids, expected.input_ids)
  np.testing.assert_array_equal(result.attention_mask, expected.attention_mask)


# ------------------------------------------------------------------------------------------------
# The attack
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def image_attack_1(model, cands, guide):
  return text_attack(*model, cands, guide, objective="image", max_changes=1)


@pytest.fixture(scope="module")
def kl_attack_2(model, cands):
  # Chunks of 3 texts: steps span several chunks and speculate on later words only partly.
  return text_attack(*model, cands, objective="kl", max_changes=2, chunk_size=3)


@pytest.mark.parametrize("which", ["image_attack_1", "kl_attack_2"])
def test_batched_attack_equals_sequential_reference(which, request, model, tok, cands, guide, features):
  result = request.getfixturevalue(which)
  objective, max_changes = ("image", 1) if which == "image_attack_1" else ("kl", 2)
  ours = adversarial_captions(cands, result)
  theirs = _oracle(model, tok, cands, guide if objective == "image" else None, features, objective=objective,
                   max_changes=max_changes)
  assert ours == theirs
  assert sum(a != b for a, b in zip(ours, CAPTIONS, strict=True)) >= 3  # the comparison is not vacuous
  # The ids built on device are the target tokenizer's ids of the adversarial strings.
  np.testing.assert_array_equal(result.input_ids, tok(ours).input_ids)
  np.testing.assert_array_equal(result.attention_mask, tok(ours).attention_mask)


def test_reference_loop_counts_its_work(model, tok, features):
  # The benchmark's work ratio: the loop encodes whole padded texts; a continuing encoder needs the
  # clean text whole, then each text from its changed word on, and neither the current text again nor
  # the masked texts of words that cannot be attacked ("a" is a stop word).
  one = prepare_candidates(["a red"], tok, LexiconSource(TABLE))
  substitutes = one.substitutes[0][1]
  assert len(substitutes) >= 2
  stats = {}
  _oracle(model, tok, one, None, features, objective="kl", stats=stats)
  def pieces(word):
    return len(tok.encode_words([word])[0])
  # "[START] a red [END]" whole; then from position 2 (after "[START] a") to the end token.
  assert stats["needed_positions"] == 4 + (pieces("[UNK]") + 1) + sum(pieces(s) + 1 for s in substitutes)
  assert stats["positions"] == (1 + 2 + 1 + len(substitutes)) * CONTEXT  # clean, masked, current + substitutes


@pytest.mark.parametrize("which,max_changes", [("image_attack_1", 1), ("kl_attack_2", 2)])
def test_changes_are_few_attackable_and_from_the_source(which, max_changes, request, cands):
  result = request.getfixturevalue(which)
  adversarial = adversarial_captions(cands, result)
  changed_words = np.asarray(result.changed_words)
  for n, (clean, adv) in enumerate(zip(CAPTIONS, adversarial, strict=True)):
    before, after = clean.split(), adv.split()
    assert len(before) == len(after)
    diff = [w for w, (x, y) in enumerate(zip(before, after, strict=False)) if x != y]
    assert len(diff) <= max_changes
    assert sorted(diff) == sorted(w for w in changed_words[n] if w >= 0)
    for w in diff:
      assert before[w] not in STOP_WORDS and after[w] in TABLE[before[w]]
  assert (changed_words >= 0).sum(-1).max() == max_changes


def test_attack_never_picks_worse_than_keeping(model, tok, cands, guide, features, image_attack_1):
  encoder, params = model
  result = image_attack_1
  adversarial = adversarial_captions(cands, result)
  def score(texts, n):
    return np.asarray(image_objective(
        features(params, *dataclasses.astuple(tok(texts)))[None], guide[n:n + 1]))[0]
  assert np.all(np.asarray(result.objective) >= np.asarray(result.clean_objective))
  for n, (clean, adv) in enumerate(zip(CAPTIONS, adversarial, strict=True)):
    np.testing.assert_allclose(score([adv], n)[0], result.objective[n], rtol=1e-4, atol=1e-5)
    w = int(result.changed_words[n, 0])
    if w < 0:
      continue
    words = clean.split()
    options = [" ".join(words[:w] + [s] + words[w + 1:]) for s in cands.substitutes[n][w]]
    scores = score(options + [clean], n)
    # The chosen substitute is the word's best, and strictly better than the clean caption.
    assert options.index(adv) == int(np.argmax(scores[:-1]))
    assert scores[:-1].max() > scores[-1]


def test_objectives(kl_attack_2):
  # Guided by the clean text features by default: the clean caption is at KL 0.
  np.testing.assert_allclose(kl_attack_2.clean_objective, 0.0, atol=1e-6)
  assert np.all(np.asarray(kl_attack_2.objective) >= 0)
  rng = np.random.default_rng(2)
  guides, feats = rng.normal(size=(3, 2, 16)).astype(np.float32), rng.normal(size=(3, 4, 16)).astype(np.float32)
  several, one, kl = jax.jit(lambda f, g: (image_objective(f, g), image_objective(f, g[:, 0]),
                                           kl_objective(f, g[:, 0])))(feats, guides)
  def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)
  cos = np.einsum("ncd,ngd->ncg", unit(feats), unit(guides))
  np.testing.assert_allclose(several, -cos.mean(-1), rtol=1e-5, atol=1e-6)  # several guides: mean cosine
  np.testing.assert_allclose(one, -cos[..., 0], rtol=1e-5, atol=1e-6)
  def softmax(x):
    return np.exp(x) / np.exp(x).sum(-1, keepdims=True)
  # Co-Attack's KL is over L2-normalised embeddings, like the word importance.
  p, q = softmax(unit(guides[:, :1, :].astype(np.float64))), softmax(unit(feats.astype(np.float64)))
  np.testing.assert_allclose(kl, (p * (np.log(p) - np.log(q))).sum(-1), rtol=1e-4, atol=1e-9)
  assert np.all(np.asarray(kl) > 1e-6)  # not vacuous at that tolerance
  # Nearly equal unit embeddings (a one-word change): KL ~1e-9, still accurate in float32.
  x = unit(rng.normal(size=(4, 512)))
  y = unit(x + 3e-4 * rng.normal(size=(4, 512)))
  p, q = softmax(x), softmax(y)
  exact = (p * (np.log(p) - np.log(q))).sum(-1)
  np.testing.assert_allclose(jax.jit(softmax_kl)(x.astype(np.float32), y.astype(np.float32)), exact, rtol=2e-2)


def test_deterministic_compiles_once_and_differentiable_context(model, tok, cands, guide, image_attack_1):
  encoder, params = model
  again = text_attack(encoder, params, cands, guide, objective="image", max_changes=1)
  assert jax.tree.structure(again) == jax.tree.structure(image_attack_1)
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(image_attack_1), strict=True):
    np.testing.assert_array_equal(a, b)
  before = _compiled_text_attack._cache_size()
  # Other captions with the same fixed shapes: no new compilation.
  shaped = dict(max_words=cands.word_pieces.shape[1], max_pieces=cands.word_pieces.shape[2],
                top_k=cands.sub_pieces.shape[2], max_targets=cands.sub_pieces.shape[1],
                text_length=cands.text_length)
  other = prepare_candidates(CAPTIONS[::-1], tok, LexiconSource(TABLE), **shaped)
  flipped = text_attack(encoder, params, other, guide[::-1], objective="image", max_changes=1)
  assert _compiled_text_attack._cache_size() == before
  assert adversarial_captions(other, flipped) == adversarial_captions(cands, image_attack_1)[::-1]
  # Inside a differentiated loss (a training step), the attack is a constant: no reverse-mode error.
  def loss(p):
    adv = text_attack(encoder, p, cands, guide, objective="image")
    return encoder.text_features(p, adv.input_ids, adv.attention_mask).sum()
  jax.eval_shape(jax.grad(loss), params)


def test_bad_inputs_raise_clear_errors(model, cands, guide):
  encoder, params = model
  with pytest.raises(ValueError, match="needs a guide"):
    text_attack(encoder, params, cands, objective="image")
  with pytest.raises(ValueError, match="one row per caption"):
    text_attack(encoder, params, cands, guide[:2], objective="image")
  with pytest.raises(ValueError, match="unknown text-attack objective"):
    text_attack(encoder, params, cands, guide, objective="cosine")
  with pytest.raises(ValueError, match="went through jit"):
    adversarial_captions(jax.tree.map(lambda x: x, cands), None)


def test_attack_text_one_call(model, tok, image_attack_1, cands, guide):
  encoder, params = model
  images = jax.random.uniform(jax.random.key(4), (2, 16, 16, 3))
  text_to_image = np.array([0, 1, 0, 1, 0, 1])
  out = attack_text((encoder, params), tok, CAPTIONS, LexiconSource(TABLE), images=images,
                    text_to_image=text_to_image)
  assert len(out.captions) == len(CAPTIONS)
  np.testing.assert_array_equal(out.input_ids, tok(out.captions).input_ids)
  # A second call compiles nothing new: the guide's image features included.
  compiled = text_module._image_features._cache_size()
  assert attack_text((encoder, params), tok, CAPTIONS, LexiconSource(TABLE), images=images,
                     text_to_image=text_to_image).captions == out.captions
  assert text_module._image_features._cache_size() == compiled
  # The same as the jitted attack guided by the same image features.
  guide = jax.jit(encoder.image_features)(params, images)[text_to_image]
  direct = text_attack(encoder, params, out.candidates, guide, objective="image")
  assert adversarial_captions(out.candidates, direct) == out.captions
  with pytest.raises(ValueError, match="needs images"):
    attack_text((encoder, params), tok, CAPTIONS, LexiconSource(TABLE))
  # Co-Attack's KL is taken from the clean caption: images would silently become its reference.
  with pytest.raises(ValueError, match="objective='kl' .* takes no images"):
    attack_text((encoder, params), tok, CAPTIONS, LexiconSource(TABLE), images=images, text_to_image=text_to_image,
                objective="kl")


def test_multimodal_attacks_run_inside_an_outer_jit_with_traced_budgets(model, tok):
  # Both one-call multimodal attacks are traceable (e.g. inside a train step): eps and steps may be tracers,
  # Co-Attack's default step (1.25 eps / steps) included.
  from mat_jax.attacks import multimodal

  encoder, params = model
  candidates = multimodal.bucketed_candidates(CAPTIONS[:2], tok, LexiconSource(TABLE))
  images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))
  key = jax.random.key(1)
  for attack in (multimodal.collaborative_attack, functools.partial(multimodal.set_guidance_attack,
                                                                    step_size=0.5 / 255)):
    traced = jax.jit(lambda eps, steps, attack=attack: attack(encoder, params, images, candidates, key, eps=eps,
                                                               steps=steps).images)(2 / 255, 3)
    eager = attack(encoder, params, images, candidates, key, eps=2 / 255, steps=3).images
    np.testing.assert_allclose(np.asarray(traced), np.asarray(eager), atol=1e-6)
    assert float(jnp.max(jnp.abs(traced - images))) <= 2 / 255 + 1e-6


# ------------------------------------------------------------------------------------------------
# Candidate sources
# ------------------------------------------------------------------------------------------------

def test_char_edit_source_is_deterministic_typos():
  source = CharEditSource(max_candidates=6, seed=3)
  words = [["a", "square", "circle"], ["circle", "zebra"]]
  first = source(words)
  assert first[0][2] == first[1][0]                      # a word gets the same edits in any caption
  assert first == CharEditSource(max_candidates=6, seed=3)(words[::-1])[::-1]
  assert first != CharEditSource(max_candidates=6, seed=4)(words)
  assert first[0][0] == []                               # shorter than min_length
  for caption, edits in zip(words, first, strict=True):
    for word, subs in zip(caption, edits, strict=True):
      for s in subs:
        assert s != word and abs(len(s) - len(word)) <= 1
        if len(s) == len(word):  # a swap or a substitution: one or two positions differ
          assert 1 <= sum(x != y for x, y in zip(s, word, strict=False)) <= 2
  assert max(len(e) for caption in first for e in caption) == 6


BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]


@pytest.fixture(scope="module")
def bert_tok(tmp_path_factory):
  directory = _save_tokenizer(tmp_path_factory.mktemp("bert_tok"), BERT_VOCAB,
                              dict(cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]",
                                   mask_token="[MASK]"), "[CLS] $A [SEP]")
  return load_tokenizer(directory, context_length=16)


def test_bert_source_reads_each_word_at_its_own_position(bert_tok):
  """An MLM whose logits at position i name a fixed 'synonym' of the token at i: the correct offset
  gives each word its own synonyms; the references' offset would give the previous token's."""
  index = {t: i for i, t in enumerate(BERT_VOCAB)}
  synonym = {"[CLS]": "azure", "red": "crimson", "square": "box", "big": "huge", "above": "over", "a": "the"}
  table = np.zeros((len(BERT_VOCAB), len(BERT_VOCAB)), np.float32)
  for t, i in index.items():
    table[i, i] = 5.0
    if t in synonym:
      table[i, index[synonym[t]]] = 9.0

  def mlm(ids, mask):
    return jnp.asarray(table)[ids]

  source = BertMLMSource(mlm, bert_tok, top_k=2, min_logit=None)
  subs = source([["red", "square", "above", "a", "big", "red"]])[0]
  assert subs[0] == ["crimson", "red"] and subs[1] == ["box", "square"] and subs[4] == ["huge", "big"]
  assert subs[5] == ["crimson", "red"]  # off by one, the last "red" would get big's "huge"
  # The reference threshold stops at the first logit under min_logit.
  assert BertMLMSource(mlm, bert_tok, top_k=2, min_logit=6.0)([["red"]])[0][0] == ["crimson"]
  # Through prepare_candidates, the word itself and stop words are filtered out.
  c = prepare_candidates(["red square above a big red"], bert_tok, source)
  assert c.substitutes[0][:3] == (("crimson",), ("box",), ())


def test_bert_source_skips_special_and_unknown_tokens(bert_tok):
  """A one-piece word's list leaves out special tokens and ids beyond the tokenizer's vocabulary (an MLM
  with a padded output layer) without ending there; the logit threshold still ends it."""
  index = {t: i for i, t in enumerate(BERT_VOCAB)}
  width = len(BERT_VOCAB) + 3  # ids the tokenizer does not have
  table = np.zeros((len(BERT_VOCAB), width), np.float32)
  table[index["red"], [index["[SEP]"], width - 1, index["crimson"], index["[MASK]"], index["red"]]] = [
      9.5, 9.2, 9.0, 8.0, 5.0]

  def mlm(ids, mask):
    return jnp.asarray(table)[ids]

  assert BertMLMSource(mlm, bert_tok, top_k=5, min_logit=None)([["red"]])[0][0] == ["crimson", "red"]
  assert BertMLMSource(mlm, bert_tok, top_k=5, min_logit=6.0)([["red"]])[0][0] == ["crimson"]
  assert BertMLMSource(mlm, bert_tok, top_k=2, min_logit=None)([["red"]])[0][0] == []


def test_bert_source_matches_a_direct_computation(bert_tok):
  """Batched, bucketed BERT forwards == one caption at a time, straight from the MLM; multi-piece words
  rank combinations of their pieces' top-4 tokens by perplexity."""
  cfg = bert_config("tiny", vocab_size=len(BERT_VOCAB), num_hidden_layers=1)
  bert = nnx.merge(*_random_init(lambda: BertForMaskedLM(cfg, rngs=nnx.Rngs(0)), seed=1, std=0.02))
  mlm = jax.jit(lambda ids: bert(ids, jnp.ones_like(ids)))  # one caption / one word's combinations at a time
  captions = [["a", "reddish", "square"], ["the", "big", "squarish", "circle", "above", "a", "box"]]
  source = BertMLMSource(bert, bert_tok, top_k=5, min_logit=None, batch_size=4)
  got = source(captions)
  hf = bert_tok.hf
  for words, subs in zip(captions, got, strict=True):
    pieces = bert_tok.encode_words(words)
    ids = np.array([[bert_tok.start_id, *itertools.chain(*pieces), bert_tok.end_id]], np.int32)
    logits = np.asarray(mlm(ids))[0]
    at = 1
    for word, p, s in zip(words, pieces, subs, strict=True):
      top = np.argsort(-logits[at:at + len(p)], axis=-1, kind="stable")
      if len(p) == 1:
        expected = [t for t in hf.convert_ids_to_tokens(top[0, :5].tolist()) if t not in hf.all_special_tokens]
      else:
        combos = list(itertools.product(*top[:, :4].tolist()))[:24]
        x = np.array(combos, np.int32)  # BERT-Attack scores the combinations on their own
        logp = np.asarray(jax.nn.log_softmax(mlm(x), -1))
        ppl = np.exp(-np.take_along_axis(logp, x[..., None], -1)[..., 0].mean(-1))
        expected = [hf.convert_tokens_to_string(hf.convert_ids_to_tokens(list(combos[j])))
                    for j in np.argsort(ppl, kind="stable")
                    if not set(hf.convert_ids_to_tokens(list(combos[j]))) & set(hf.all_special_tokens)]
        assert len(combos) == (16 if len(p) == 2 else 24)
      assert s == expected, word
      at += len(p)
  assert source(captions) is not got and source(captions) == got  # cached, same answer


def test_length_buckets():
  assert length_buckets(24) == (8, 16, 24)
  assert length_buckets(77) == (8, 16, 32, 77)
  assert length_buckets(32) == (8, 16, 32)
  assert length_buckets(20) == (8, 16, 20)
  assert length_buckets(6) == (6,)


def test_chunks_run_at_the_shortest_bucket_holding_their_longest_text():
  rng = np.random.default_rng(0)
  sizes = rng.integers(3, 25, 50)
  valid = rng.random(50) < 0.7
  buckets, chunk = (8, 16, 24), 4
  # Each result says which index and which padded length the encoder saw.
  out = jax.jit(lambda v, s: _map_valid(lambda flat, length: (flat, jnp.full(flat.shape, length, jnp.int32)), v,
                                        chunk, s, buckets, (jnp.int32, jnp.int32)))(jnp.asarray(valid),
                                                                                   jnp.asarray(sizes))
  index, length = map(np.asarray, out)
  np.testing.assert_array_equal(index[valid], np.flatnonzero(valid))   # every valid index, in place
  assert (index[~valid] == 0).all() and (length[~valid] == 0).all()
  assert (length[valid] >= sizes[valid]).all()                          # nothing truncated
  # Shortest first, in chunks of 4: each chunk's length is the smallest bucket >= its longest text.
  packed = np.sort(sizes[valid], kind="stable")
  expected = [min(b for b in buckets if b >= packed[i:i + chunk].max()) for i in range(0, len(packed), chunk)]
  seen = np.sort(length[valid], kind="stable")
  np.testing.assert_array_equal(seen, np.repeat(expected, chunk)[:len(packed)])


def test_an_accelerators_chunks_are_a_multiple_of_8_texts():
  # So that a chunk's tokens are a multiple of 8 at every length bucket, 77 tokens included: XLA:GPU pads
  # a bfloat16 matmul's rows to one for cuBLAS, with a copy around every matmul. The most that fit 32k tokens.
  from mat_jax import runtime

  for backend in ("gpu", "tpu"):
    with runtime.building_for(backend):
      for length in (24, 35, 64, 77):
        chunk = text_module.default_chunk_size(length)
        assert chunk % 8 == 0 and 32768 - 8 * length < chunk * length <= 32768, (backend, length, chunk)
  assert text_module.default_chunk_size(77) == 13  # the CPU's: about 1k tokens, as many texts as fit


def test_changed_texts_are_encoded_from_the_changed_word(model, cands):
  # The test tower pools at the end token, the last: a changed text's tokens before its changed word
  # come from the cached text, and scoring covers the changed word to the end token.
  assert _pools_last_token(model[0], cands)
  capacity = CONTEXT - 2
  before = jnp.array([0, 1, 4, 3, 12])          # content tokens before the changed word
  total = jnp.array([8, 8, 8, 14, 14])          # content tokens of the changed text (14: cut to 10)
  start, size = map(np.asarray, _changed_span(cands, before, total, True))
  np.testing.assert_array_equal(start, [1, 2, 5, 4, capacity + 1])  # a change cut away: the end token only
  np.testing.assert_array_equal(start + size, [10, 10, 10, capacity + 2, capacity + 2])  # through [END]
  start, size = map(np.asarray, _changed_span(cands, before, total, False))
  np.testing.assert_array_equal(start, 0)
  np.testing.assert_array_equal(size, [10, 10, 10, capacity + 2, capacity + 2])


def test_texts_are_encoded_whole_when_the_tower_pools_elsewhere(monkeypatch, model, tok, cands, guide, features):
  encoder, params = model
  text = encoder.config.text
  def with_text(**changes):
    return DualEncoder(encoder.graphdef,
                                              encoder.config.replace(text=dataclasses.replace(text, **changes)))
  # Pooled at the largest id: a word here, so a changed word may come after the pooled token.
  assert not _pools_last_token(with_text(pooling="argmax"), cands)
  # ... unless the end token is the largest id (OpenAI's vocabulary).
  assert _pools_last_token(with_text(pooling="argmax", vocab_size=tok.end_id + 1), cands)
  assert not _pools_last_token(with_text(eos_token_id=tok.start_id), cands)
  # Encoded whole (from position 0, nothing taken from the cache), the attack is still the references'.
  monkeypatch.setattr(text_module, "_pools_last_token", lambda *args: False)
  result = text_attack(encoder, params, cands, guide, objective="image", max_changes=1, chunk_size=5)
  assert adversarial_captions(cands, result) == _oracle(model, tok, cands, guide, features, objective="image",
                                                        max_changes=1)


def test_a_words_candidates_do_not_depend_on_the_captions_scored_with_it(bert_tok):
  """Padding moves an MLM's logits in their last bits: here "scarlet" and "crimson" tie for "red" up to
  1e-6 per padded position. "red" alone is scored at 8 positions; padded to a long batch-mate's 16 it
  would rank "scarlet" first. Each caption is scored at its own length, so both give "crimson"."""
  index = {t: i for i, t in enumerate(BERT_VOCAB)}

  def mlm(ids, mask):
    logits = jnp.zeros((*ids.shape, len(BERT_VOCAB)))
    logits = logits.at[..., index["crimson"]].set(5.0)
    return logits.at[..., index["scarlet"]].set(5.0 + 1e-6 * (ids.shape[1] - 12))

  def fresh():
    return BertMLMSource(mlm, bert_tok, top_k=1, min_logit=None)

  long_caption = ["a", "big", "blue", "ball", "above", "a", "small", "green", "square", "and", "a", "box"]
  alone = fresh()([["red"]])[0][0]
  beside = fresh()([long_caption, ["red"]])[1][0]
  assert alone == beside == ["crimson"]


def test_training_candidates_keep_every_combination_of_a_multi_piece_word(bert_tok, tok, monkeypatch):
  # BERT-Attack gives a word of several pieces up to 24 combinations, more than the one-piece words'
  # top_k (10): the training arrays hold them all, as the evaluation's do, so a defense trains against
  # the attack it is evaluated with.
  from mat_jax import config as config_lib
  from mat_jax.training import inputs, loop

  index = {t: i for i, t in enumerate(BERT_VOCAB)}
  table = np.zeros((len(BERT_VOCAB),) * 2, np.float32)
  for piece in ("sq", "##uar", "##ish"):  # "squarish": 4 x 4 x 4 combinations of the pieces' top-4
    top = ["red", "blue", "green", "navy"] if piece == "sq" else ["##d", "##dish", "##uar", "##ish"]
    table[index[piece], [index[t] for t in top]] = [9.0, 8.0, 7.0, 6.0]
  source = BertMLMSource(lambda ids, mask: jnp.asarray(table)[ids], bert_tok, top_k=10, min_logit=None)
  assert source.max_substitutes == 24
  given = len(source([["a", "squarish", "box"]])[0][1])
  assert given > 10
  monkeypatch.setattr(inputs, "make_source", lambda *args, **kwargs: source)
  config = config_lib.build({"text_attack": {"source": "bert", "top_k": 10, "max_pieces": 16}})
  attach = loop.candidate_transform(config, tok, log=lambda _: None)
  batch = attach({"captions": np.array(["a squarish box"])})
  evaluated = prepare_candidates(["a squarish box"], tok, source)
  assert int((batch["cand_sub_lengths"][0, 0] > 0).sum()) == len(evaluated.substitutes[0][1]) == given


def test_a_training_attack_never_writes_an_excluded_word(tok, monkeypatch):
  # text_attack.exclude_words: the training arrays are those of the source without the excluded words
  # (the held-out-forms study's MAT whose attack writes no held-out form), the same width as without them.
  from mat_jax import config as config_lib
  from mat_jax.training import inputs, loop

  monkeypatch.setattr(inputs, "make_source", lambda *args, **kwargs: LexiconSource(TABLE))
  excluded = ("crimson", "box", "over")
  config = config_lib.build({"text_attack": {"source": "paraphrase", "exclude_words": excluded, "max_pieces": 4}})
  attach = loop.candidate_transform(config, tok, log=lambda _: None)
  plain = loop.candidate_transform(config_lib.build({"text_attack": {"source": "paraphrase", "max_pieces": 4}}),
                                   tok, log=lambda _: None)
  batch, unrestricted = (a({"captions": np.array(CAPTIONS[:3])}) for a in (attach, plain))
  kept = LexiconSource({w: [s for s in subs if s not in excluded] for w, subs in TABLE.items()})
  monkeypatch.setattr(inputs, "make_source", lambda *args, **kwargs: kept)
  expected = loop.candidate_transform(config_lib.build({"text_attack": {"source": "paraphrase", "max_pieces": 4}}),
                                      tok, log=lambda _: None)({"captions": np.array(CAPTIONS[:3])})
  assert batch.keys() == expected.keys()
  for name in batch:
    if name.startswith("cand_"):
      np.testing.assert_array_equal(batch[name], expected[name], err_msg=name)
  assert not np.array_equal(batch["cand_sub_lengths"], unrestricted["cand_sub_lengths"])
