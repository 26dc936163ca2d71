"""BLIP under attack: ITM re-ranking against brute force, `evaluate` with PGD, BERT-Attack, Co-Attack and SGA
on a micro BLIP with re-ranking, and transfer from a CLIP surrogate."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mat_jax import evaluate as ev
from mat_jax import metrics
from mat_jax import evaluate_cli
from mat_jax import rerank
from mat_jax.data import shapes
from mat_jax.errors import InputError
from mat_jax.models import BLIP, CLIP, save_blip, save_clip, split
from mat_jax.models.blip import BlipConfig, BlipTextConfig, BlipVisionConfig
from mat_jax.models.clip import CLIPConfig, TextConfig, VisionConfig

import helpers

SIZE = 16


class _EvalSet:
  def __init__(self, n: int):
    rng = np.random.default_rng(0)
    scenes = [shapes.sample_scene(rng) for _ in range(n)]
    self.images = np.stack([shapes.render(s, SIZE, supersample=1) for s in scenes])
    caps = [shapes.captions(s, rng, 1 + i % 2) for i, s in enumerate(scenes)]
    self.captions = np.asarray([c for cs in caps for c in cs])
    self.text_to_image = np.repeat(np.arange(n), [len(c) for c in caps]).astype(np.int32)


def _init(cls, cfg, seed: int = 0):
  """Random parameters with biases and LayerNorms off their init, so every part of the model matters."""

  def draw(path, leaf, rng):
    if "logit_scale" in str(path):
      return jnp.asarray(np.log(1 / 0.07), leaf.dtype)
    name = str(getattr(path[-1], "key", path[-1]))
    base = 1.0 if name == "scale" else 0.0
    std = 0.05 if name in ("scale", "bias") else 0.2
    return jnp.asarray(base + rng.normal(0.0, std, leaf.shape), leaf.dtype)

  return helpers.numpy_initialised(cls, cfg, draw, seed)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  """A random micro BLIP and a micro CLIP saved in the transformers layout, with the shapes tokenizer."""
  blip_dir, clip_dir = tmp_path_factory.mktemp("micro_blip"), tmp_path_factory.mktemp("micro_clip")
  vocab = 0
  for d in (blip_dir, clip_dir):
    tok_dir = shapes.build_tokenizer(d)
    vocab = len(json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"])
  length = shapes.DEFAULT_CONTEXT_LENGTH
  blip = BlipConfig(
      vision=BlipVisionConfig(image_size=SIZE, patch_size=8, width=24, layers=1, heads=2, mlp_dim=40),
      text=BlipTextConfig(vocab_size=vocab, max_position_embeddings=length, context_length=length, width=32,
                          layers=1, heads=2, mlp_dim=48, bos_token_id=2, eos_token_id=3, pad_token_id=0,
                          sep_token_id=3),
      embed_dim=16)
  save_blip(_init(BLIP, blip), blip_dir)
  clip = CLIPConfig(
      vision=VisionConfig(image_size=SIZE, patch_size=8, width=32, layers=1, heads=2, mlp_dim=64),
      text=TextConfig(vocab_size=vocab, context_length=length, width=32, layers=1, heads=2, mlp_dim=64,
                      eos_token_id=3, bos_token_id=2, pad_token_id=0),
      projection_dim=16)
  save_clip(_init(CLIP, clip, 1), clip_dir)
  return {"blip": blip_dir, "clip": clip_dir}


def test_rerank_scores_the_top_k_by_itm_plus_itc(dirs):
  victim = ev.load_victim(str(dirs["blip"]))
  assert isinstance(victim.encoder.merge(victim.params), BLIP)
  data = _EvalSet(5)
  images = data.images.astype(np.float32) / 255
  tokens = victim.tokens([str(c) for c in data.captions])
  ids, mask = np.asarray(tokens.input_ids), np.asarray(tokens.attention_mask)
  encoder, params = victim.encoder, victim.params
  sim = np.asarray(encoder.image_embeddings(params, images) @ encoder.text_embeddings(params, ids, mask).T)
  n, t = sim.shape
  model = encoder.merge(params)
  brute = np.stack([np.asarray(model.itm_logits(np.repeat(images[i:i + 1], t, 0), ids, mask))[:, 1]
                    for i in range(n)]) + sim
  i2t, t2i = rerank.itm_rerank(encoder, params, images, ids, mask, sim, k=max(n, t), chunk=4)
  np.testing.assert_allclose(i2t, brute, atol=1e-5, rtol=0)
  np.testing.assert_allclose(t2i, brute, atol=1e-5, rtol=0)
  assert np.abs(np.argsort(-brute, 1) - np.argsort(-sim, 1)).max() > 0  # ITM changes the order
  # k = 2: each image's 2 most similar texts (each text's 2 most similar images) hold their ITM + ITC
  # score, everything else ranks below them.
  i2t, t2i = rerank.itm_rerank(encoder, params, images, ids, mask, sim, k=2, chunk=4)
  for scores, top, axis in ((i2t, np.argsort(-sim, 1, kind="stable")[:, :2], 1),
                            (t2i.T, np.argsort(-sim.T, 1, kind="stable")[:, :2], 1)):
    ref = brute if scores is i2t else brute.T
    kept = np.take_along_axis(scores, top, axis)
    np.testing.assert_allclose(kept, np.take_along_axis(ref, top, axis), atol=1e-5, rtol=0)
    others = np.ones_like(scores, bool)
    np.put_along_axis(others, top, False, axis)
    assert scores[others].max() < kept.min()
    # ... and among themselves in their ITC order, not their indices' (R@5 and R@10 when k < 10).
    itc = sim if scores is i2t else sim.T
    for row in range(len(scores)):
      rest = np.flatnonzero(others[row])
      assert (np.argsort(-scores[row, rest], kind="stable") == np.argsort(-itc[row, rest], kind="stable")).all()
  ranks = rerank.reranked_ranks(i2t, t2i, data.text_to_image)
  assert ranks[0].shape == (n,) and ranks[1].shape == (t,)
  # k = 1 re-scores only each query's first candidate, which stays first: every rank is ITC's.
  itc_ranks = metrics.retrieval_ranks(sim, data.text_to_image)
  ranks = rerank.reranked_ranks(*rerank.itm_rerank(encoder, params, images, ids, mask, sim, k=1, chunk=4),
                                data.text_to_image)
  np.testing.assert_array_equal(ranks[0], np.asarray(itc_ranks[0]))
  np.testing.assert_array_equal(ranks[1], np.asarray(itc_ranks[1]))
  # Beyond the top k, similarities closer than float32's spacing at the ITM scores' magnitude keep their
  # order: shifted below a score of -6 they became ties (0.3 and 0.3000001 both -7.6), broken by index.
  close = np.zeros((2, 7), np.float32)
  close[0] = [0.9, 0.5, 0.49, 0.48, 0.3, 0.3000001, 0.1]
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(rerank, "itm_scores", lambda *args, **kwargs: np.full(len(args[5]), -6.0, np.float32))
    tokens_of_2 = rerank.image_tokens(encoder, params, images[:2])
    i2t, t2i = rerank.itm_rerank(encoder, params, None, ids[:7], mask[:7], close, k=1, tokens=tokens_of_2)
  assert i2t[0, 5] > i2t[0, 4] > i2t[0, 6]
  text_to_image = np.array([1, 1, 1, 1, 1, 0, 1])
  assert rerank.reranked_ranks(i2t, t2i, text_to_image)[0][0] == metrics.retrieval_ranks(close, text_to_image)[0][0]
  # Tokens of fewer images than the similarity's rows would be gathered clamped (the last image's).
  tokens_of_4 = rerank.image_tokens(encoder, params, images[:4])
  with pytest.raises(ValueError, match=r"there are 4 images \(tokens\)"):
    rerank.itm_rerank(encoder, params, None, ids, mask, sim, k=2, tokens=tokens_of_4)
  # Evaluation sets store uint8; the ITM head takes pixels in [0, 1] (its own check sees traced arrays only).
  with pytest.raises(InputError, match="uint8"):
    rerank.itm_rerank(encoder, params, data.images, ids, mask, sim, k=2)


def test_evaluate_attacks_blip_with_itm_reranking(dirs, tmp_path, monkeypatch):
  eval_set = _EvalSet(6)
  monkeypatch.setattr(ev, "load_dataset", lambda *a, **k: eval_set)
  out = tmp_path / "out"
  # The paraphrase source: the default (the shapes MLM, trained on first use) is resolved and tested in
  # test_text_threat; BLIP's side of the text attack is the same for every source.
  assert evaluate_cli.main(["--model", str(dirs["blip"]), "--attacks", "pgd,bert,co,sga", "--eps", "0,2",
                            "--steps", "2", "--itm-k", "4", "--batch-size", "3", "--text-source", "paraphrase",
                            "--out", str(out), "--no-progress"]) == 0
  results = json.loads((out / "results.json").read_text())
  assert results["settings"]["itm_k"] == 4
  assert set(results["attacks"]) == {"pgd", "bert", "co", "sga"}
  # eps 0 leaves the images as they are: the re-ranked recall is the clean one.
  assert results["attacks"]["pgd"]["0"]["recall"] == results["clean"]
  for per_eps in results["attacks"].values():
    for r in per_eps.values():
      assert all(0.0 <= v <= 100.0 for v in r["recall"].values())


def test_text_attack_scores_blip_captions_whole(dirs):
  """The bidirectional tower has no cached-prefix continuation: every candidate text is encoded whole, so
  the attack's objective is that of its adversarial ids encoded from scratch."""
  from mat_jax.attacks import multimodal, text

  victim = ev.load_victim(str(dirs["blip"]))
  captions = [str(c) for c in _EvalSet(4).captions]
  cands = multimodal.bucketed_candidates(captions, victim.tokenizer, _lexicon())
  encoder, params = victim.encoder, victim.params
  assert not text._pools_last_token(encoder, cands)
  result = multimodal.bert_attack(encoder, params, cands)
  ids, mask = np.asarray(result.input_ids), np.asarray(result.attention_mask)
  clean = victim.tokens(captions)
  changed = (ids != np.asarray(clean.input_ids)).any(-1)
  assert changed.any()
  clean_features = encoder.text_features(params, np.asarray(clean.input_ids), np.asarray(clean.attention_mask))
  adv_features = encoder.text_features(params, ids, mask)
  recomputed = text._objective_fn("kl")(adv_features[:, None], clean_features)[:, 0]
  np.testing.assert_allclose(np.asarray(result.objective), np.asarray(recomputed), atol=1e-5, rtol=1e-4)
  assert (np.asarray(result.objective)[changed] > np.asarray(result.clean_objective)[changed]).all()


def test_meaning_preserving_scores_are_reranked_like_the_rest(dirs):
  """With every changed caption judged a label flip, the restored set of a text-only attack is the clean
  set: its recall is the clean recall and its ASR zero, under ITM re-ranking as under ITC alone."""
  victim = ev.load_victim(str(dirs["blip"]))
  for itm_k in (None, 4):
    results = ev.evaluate(victim, eval_set=_EvalSet(12), attacks=("bert",), text_source=_lexicon(),
                          batch_size=4, progress=False, itm_k=itm_k, judge=lambda caption, text: False)
    entry = results["attacks"]["bert"]["text"]
    assert entry["captions_changed"] > 0 and entry["label_flip_share"] == 1.0
    assert entry["recall_meaning_preserving"] == results["clean"]
    assert all(v == 0.0 for v in entry["asr_meaning_preserving"].values() if v is not None)


def test_transfer_between_clip_and_blip(dirs):
  eval_set = _EvalSet(4)
  blip, clip = ev.load_victim(str(dirs["blip"])), ev.load_victim(str(dirs["clip"]))
  # CLIP's adversarial images against BLIP (re-ranked); BLIP's adversarial captions, as strings, against CLIP.
  for target, surrogate, attack, itm_k in ((blip, clip, "pgd", 3), (clip, blip, "bert", None)):
    results = ev.evaluate(target, eval_set=eval_set, attacks=(attack,), eps_255=(4.0,), text_source=_lexicon(),
                          surrogate=surrogate, settings=ev.AttackSettings(steps=2), batch_size=4, progress=False,
                          itm_k=itm_k)
    assert results["surrogate"] == surrogate.name and set(results["attacks"]) == {attack}
    assert results["settings"]["itm_k"] == itm_k


def _lexicon():
  from mat_jax.attacks.candidates import LexiconSource
  return LexiconSource(shapes.substitution_table())


def test_itm_k_needs_an_itm_head(dirs, capsys, tmp_path):
  clip = ev.load_victim(str(dirs["clip"]))
  with pytest.raises(ValueError, match="ITM head"):
    ev.evaluate(clip, eval_set=_EvalSet(3), attacks=("pgd",), itm_k=4)
  with pytest.raises(SystemExit):
    evaluate_cli.main(["--model", str(dirs["clip"]), "--itm-k", "4", "--out", str(tmp_path)])
  assert "ITM head" in capsys.readouterr().err
  encoder, params = split(clip.encoder.merge(clip.params))
  with pytest.raises(ValueError, match="image-text matching head"):
    rerank.itm_rerank(encoder, params, np.zeros((1, SIZE, SIZE, 3), np.float32), np.zeros((1, 4), np.int32),
                      np.ones((1, 4), np.int32), np.zeros((1, 1)))


def test_a_blip_trained_from_random_weights_is_ranked_by_itc_by_default(tmp_path):
  """No objective trains BLIP's ITM head: a model whose runs start from a random preset re-ranks by a random
  head, so the evaluation defaults to ITC alone (and warns when --itm-k asks for it anyway)."""
  import json

  from mat_jax import checkpoint, runs

  def run_dir(name, source):
    (tmp_path / name / "checkpoints").mkdir(parents=True)
    (tmp_path / name / checkpoint.CONFIG_FILE).write_text(json.dumps({"model": {"source": source}}))
    return str(tmp_path / name)

  clean = run_dir("clean", "blip-tiny")
  defended = run_dir("defended", clean)
  assert runs.root_source(defended) == "blip-tiny" and runs.root_source("cache:shapes_blip") == "blip-tiny"
  assert runs.root_source("Salesforce/blip-itm-base-coco") == "Salesforce/blip-itm-base-coco"
  (tmp_path / "clean" / checkpoint.MODEL_DIR).mkdir()  # a run's exported model: the run it comes from
  assert runs.root_source(str(tmp_path / "clean" / checkpoint.MODEL_DIR)) == "blip-tiny"
  itm_k, note = evaluate_cli.itm_k_for(defended, None, True)
  assert itm_k is None and note.startswith("ranking by ITC alone") and "'blip-tiny'" in note
  itm_k, note = evaluate_cli.itm_k_for(defended, 16, True)
  assert itm_k == 16 and note.startswith("warning: --itm-k 16 re-ranks by the ITM head")
  assert evaluate_cli.itm_k_for(defended, 0, True) == (None, None)
  assert evaluate_cli.itm_k_for("Salesforce/blip-itm-base-coco", None, True) == (rerank.DEFAULT_K, None)
  assert evaluate_cli.itm_k_for(defended, None, False) == (None, None)


def test_itm_reranking_encodes_each_image_once_per_run(dirs, monkeypatch):
  """The clean images' ITM tokens once for the whole evaluation (text-only runs and the judge's restored
  set reuse them), an attacked image's once, from the attack's output on the device. Each was encoded
  again per run (and per ranking) through a host copy of every image's pixels."""
  encoded = []
  inner = rerank._image_tokens
  # Counted where it runs: the abstract trace that lowers the evaluation's programs first calls it traced.
  monkeypatch.setattr(rerank, "_image_tokens",
                      lambda enc, params, x: (None if isinstance(x, jax.core.Tracer) else encoded.append(x.shape[0]))
                      or inner(enc, params, x))
  victim = ev.load_victim(str(dirs["blip"]))
  n = 8
  results = ev.evaluate(victim, eval_set=_EvalSet(n), attacks=("bert", "pgd"), eps_255=(2.0,), text_source=_lexicon(),
                        settings=ev.AttackSettings(steps=2), batch_size=4, progress=False, itm_k=4,
                        judge=lambda caption, text: True)
  assert sum(encoded) == 2 * n  # the clean images, then PGD's
  assert set(results["attacks"]) == {"bert", "pgd"}


def test_a_blip_takes_texts_longer_than_its_context_length_up_to_its_positions():
  # A BLIP's context length is the length captions are tokenized to, not a limit of the model: the
  # one-call attack and the batched text embeddings check texts against its position table, as it does.
  from mat_jax import attacks

  cfg = BlipConfig(
      vision=BlipVisionConfig(image_size=SIZE, patch_size=8, width=24, layers=1, heads=2, mlp_dim=40),
      text=BlipTextConfig(vocab_size=20, max_position_embeddings=41, context_length=35, width=32, layers=1,
                          heads=2, mlp_dim=48, bos_token_id=2, eos_token_id=3, pad_token_id=0, sep_token_id=3),
      embed_dim=16)
  model = _init(BLIP, cfg)
  ids = np.full((2, 40), 5, np.int32)
  ids[:, 0], ids[:, 37], ids[:, 38:] = 2, 3, 0
  mask = (np.arange(40) < 38).astype(np.int32)[None].repeat(2, 0)
  images = np.random.default_rng(0).random((2, SIZE, SIZE, 3), dtype=np.float32)
  adversarial = attacks.image_attack(model, images, ids, mask, eps=2 / 255, steps=1, step_size=1 / 255)
  assert adversarial.shape == images.shape
  encoder, params = split(model)
  np.testing.assert_allclose(metrics.embed_texts(encoder, params, ids, mask),
                             np.asarray(model.text_features(jnp.asarray(ids), jnp.asarray(mask))), atol=1e-6)
  with pytest.raises(InputError, match="have length 42 but the text model has 41 positions"):
    metrics.embed_texts(encoder, params, np.pad(ids, ((0, 0), (0, 2))), np.pad(mask, ((0, 0), (0, 2))))
