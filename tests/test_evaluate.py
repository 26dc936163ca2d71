"""`python -m mat_jax.evaluate` end to end on a micro CLIP: table, results.json, the plot, errors."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mat_jax import evaluate as ev
from mat_jax import evaluate_cli
from mat_jax.data import shapes
from mat_jax.training import loop

import helpers

SIZE = 16


class _EvalSet:
  def __init__(self, n: int):
    rng = np.random.default_rng(0)
    scenes = [shapes.sample_scene(rng) for _ in range(n)]
    self.images = np.stack([shapes.render(s, SIZE, supersample=1) for s in scenes])
    caps = [shapes.captions(s, rng, 1 + i % 3) for i, s in enumerate(scenes)]  # 1-3 captions per image
    self.captions = np.asarray([c for cs in caps for c in cs])
    self.text_to_image = np.repeat(np.arange(n), [len(c) for c in caps]).astype(np.int32)


def _concrete(params) -> bool:
  """Whether parameters are arrays, not the tracers of an abstract trace."""
  return not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(params))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  """A random micro CLIP saved in the transformers layout, with the shapes tokenizer beside it."""
  return helpers.save_micro_clip(tmp_path_factory.mktemp("micro_clip"), image_size=SIZE, std=0.02)


def test_command_line_writes_table_json_and_plot(model_dir, tmp_path, monkeypatch, capsys):
  eval_set = _EvalSet(7)
  loaded = {}

  def fake_load_dataset(name, tokenizer, image_size, **kwargs):
    loaded.update(name=name, image_size=image_size, **kwargs)
    return eval_set

  # The TFDS build of the shapes world is the data module's business (and tested there); here the
  # command runs on an in-memory set.
  monkeypatch.setattr(ev, "load_dataset", fake_load_dataset)
  out = tmp_path / "out"
  # The paraphrase source: building the shapes MLM (the default text threat) is tested in test_text_threat.
  assert evaluate_cli.main(["--model", str(model_dir), "--attacks", "pgd,bert", "--eps", "0,2", "--steps", "2",
                  "--batch-size", "4", "--text-source", "paraphrase", "--out", str(out), "--no-progress"]) == 0
  assert loaded["name"] == "shapes" and loaded["image_size"] == SIZE
  printed = capsys.readouterr().out
  assert "clean" in printed and "pgd" in printed and "bert" in printed and "ASR tr@1" in printed
  assert "L-inf eps in 1/255 units, 2 steps, seed 0, batch size 4" in printed and ev.RECALL_FOOTER in printed
  # As docs/evaluation.md shows it: the compilation ahead, then a line per attack and budget as each ends.
  assert re.search(r"the evaluation's programs \(\d+ lowerings\) compiled in [\d.]+ s", printed)
  assert re.search(r"^pgd eps 2/255: TR@1 [\d.]+ IR@1 [\d.]+ \([\d.]+ s\)$", printed, re.M)

  results = json.loads((out / "results.json").read_text())
  assert results["num_images"] == 7 and results["num_texts"] == len(eval_set.captions)
  assert set(results["attacks"]) == {"pgd", "bert"}
  assert set(results["attacks"]["pgd"]) == {"0", "2"} and set(results["attacks"]["bert"]) == {"text"}
  # The candidate source's own settings, not a number the caller was asked for.
  assert results["settings"]["text_source"]["kind"] == "LexiconSource" and "top_k" not in results["settings"]
  assert results["settings"]["text_source"]["top_k"] == 10  # --top-k's default, which the table source applies
  for per_eps in results["attacks"].values():
    for r in per_eps.values():
      assert set(r["recall"]) == set(ev.metrics.RECALL_KEYS)
      assert set(r["asr"]) == {f"{d}@{k}" for d in ("tr", "ir") for k in (1, 5, 10)}
      assert set(r["recall_drop"]) == set(ev.metrics.RECALL_KEYS)
  # eps = 0: the images are untouched, so every recall is the clean one.
  assert results["attacks"]["pgd"]["0"]["recall"] == results["clean"]
  # A transfer evaluation says on which model the attacks were made, in the table and in the JSON.
  assert evaluate_cli.main(["--model", str(model_dir), "--surrogate", str(model_dir), "--attacks", "pgd",
                            "--eps", "2", "--steps", "2", "--batch-size", "4", "--out", str(out),
                            "--no-progress"]) == 0
  assert f"; attacks made on {model_dir}" in capsys.readouterr().out
  assert json.loads((out / "results.json").read_text())["surrogate"] == str(model_dir)
  png = (out / "recall_vs_eps.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_errors_name_the_problem(model_dir):
  victim = ev.load_victim(str(model_dir))
  eval_set = _EvalSet(3)
  with pytest.raises(ValueError, match="unknown attacks"):
    ev.evaluate(victim, eval_set=eval_set, attacks=("fgsm",))
  with pytest.raises(ValueError, match="need a text_source"):
    ev.evaluate(victim, eval_set=eval_set, attacks=("sga",))
  with pytest.raises(SystemExit):
    evaluate_cli.build_parser().parse_args(["--model", "x", "--attacks", "pgd,nope"])
  # A repeated budget or attack is run once (it would be attacked twice for one result).
  args = evaluate_cli.build_parser().parse_args(["--model", "x", "--attacks", "co,pgd,co", "--eps", "2,1,2.0"])
  assert (args.attacks, args.eps) == (["co", "pgd"], [2.0, 1.0])


class _ShiftedTokenizer:
  """The model's tokenizer with one id moved past the vocabulary, reporting another end token, or adding
  none (its end tokens padding)."""

  def __init__(self, tokenizer, *, shift_id: int | None = None, end_id: int | None = None, no_end: bool = False):
    self.inner, self.shift_id, self.no_end = tokenizer, shift_id, no_end
    self.end_id = None if no_end else tokenizer.end_id if end_id is None else end_id

  def __call__(self, texts):
    batch = self.inner(texts)
    ids = np.asarray(batch.input_ids).copy()
    if self.shift_id is not None:
      ids[ids == self.shift_id] += 10_000
    if self.no_end:
      ids[ids == self.inner.end_id] = self.inner.pad_id
    return type("Batch", (), {"input_ids": ids, "attention_mask": np.asarray(batch.attention_mask)})()


def test_a_tokenizer_that_does_not_match_the_model_is_refused(model_dir):
  # Without the check, ids past the table are silently clamped or read as NaN under jit, and a wrong
  # end token pools every text at its first token: numbers instead of an error.
  victim = ev.load_victim(str(model_dir))
  eval_set = _EvalSet(3)
  word_id = int(np.asarray(victim.tokenizer([str(eval_set.captions[0])]).input_ids)[0, 1])
  for bad, message in [(_ShiftedTokenizer(victim.tokenizer, shift_id=word_id), "does not match the model"),
                       (_ShiftedTokenizer(victim.tokenizer, end_id=victim.tokenizer.end_id + 1), "pools at its eos"),
                       (_ShiftedTokenizer(victim.tokenizer, no_end=True), "adds no end token")]:
    wrong = ev.Victim(victim.encoder, victim.params, bad, "target")
    with pytest.raises(ValueError, match=message):
      ev.evaluate(wrong, eval_set=eval_set, attacks=("pgd",))
    with pytest.raises(ValueError, match=message):  # as the surrogate of a transfer evaluation
      ev.evaluate(victim, eval_set=eval_set, attacks=("pgd",), surrogate=dataclasses.replace(wrong, name="surrogate"))


def test_budgets_steps_and_limits_are_checked(model_dir, capsys):
  victim = ev.load_victim(str(model_dir))
  eval_set = _EvalSet(3)
  with pytest.raises(ValueError, match="at least 1 image"):
    ev.evaluate(victim, eval_set=eval_set, attacks=("pgd",), limit=0)
  with pytest.raises(ValueError, match="steps must be at least 1"):
    ev.evaluate(victim, eval_set=eval_set, attacks=("pgd",), settings=ev.AttackSettings(steps=0))
  with pytest.raises(ValueError, match="must be >= 0"):
    ev.evaluate(victim, eval_set=eval_set, attacks=("pgd",), eps_255=(2.0, -1.0))
  for flags, message in [(["--limit", "0"], "argument --limit: must be at least 1, got 0"),
                         (["--steps", "0"], "argument --steps: must be at least 1, got 0"),
                         (["--eps", "-2"], "argument --eps: '-2' must be >= 0 and finite (budgets in 1/255 units"),
                         (["--eps", ","], "argument --eps: no budget in ','; give at least one"),
                         (["--eps", "nan"], "finite"),
                         (["--surrogate-tokenizer", str(model_dir)], "--surrogate-tokenizer needs --surrogate"),
                         # Misspelt, though no attack asked for here needs a text source.
                         (["--attacks", "pgd", "--text-source", "bogus"], "bogus")]:
    with pytest.raises(SystemExit):
      evaluate_cli.main(["--model", str(model_dir), *flags])
    assert message in capsys.readouterr().err


def test_host_parameters_are_put_on_the_device_once(model_dir):
  # A host copy (the training loop's gathered state, numpy weights) would be uploaded again by every jitted
  # call of an evaluation, per batch; parameters already on a device are taken as they are.
  victim = ev.load_victim(str(model_dir))
  placed = ev.Victim.of(victim.encoder, jax.device_get(victim.params), victim.tokenizer)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(placed.params))
  kept = ev.Victim.of(victim.encoder, victim.params, victim.tokenizer)
  assert all(a is b for a, b in zip(jax.tree.leaves(kept.params), jax.tree.leaves(victim.params), strict=True))


def test_json_turns_nan_into_null(tmp_path):
  path = ev.write_json({"asr": {"tr@1": math.nan, "ir@1": np.float32(12.5)}, "n": np.int64(3)},
                       tmp_path / "r.json")
  assert json.loads(path.read_text()) == {"asr": {"tr@1": None, "ir@1": 12.5}, "n": 3}


def test_attacks_that_start_with_one_text_attack_run_it_once_per_batch(model_dir, monkeypatch):
  # BERT-, Sep- and Co-Attack all begin with the KL BERT-Attack: one evaluation runs it once per batch
  # and scores each attack exactly as an evaluation of that attack alone does.
  from mat_jax.attacks import candidates as candidates_lib
  from mat_jax.attacks import multimodal

  victim = ev.load_victim(str(model_dir))
  eval_set = _EvalSet(6)
  calls = []
  real = multimodal.bert_attack
  # Counted where it runs: the abstract trace that lowers the evaluation's programs first calls it traced.
  monkeypatch.setattr(multimodal, "bert_attack",
                      lambda *a, **kw: (calls.append(1) if _concrete(a[1]) else None) or real(*a, **kw))
  kw = dict(eval_set=eval_set, eps_255=(2.0,), batch_size=4, progress=False, settings=ev.AttackSettings(steps=2),
            text_source=candidates_lib.LexiconSource(shapes.substitution_table()), keep_ranks=True)
  together = ev.evaluate(victim, attacks=("bert", "sep", "co", "pgd"), **kw)
  assert len(calls) == 2  # two batches, one text attack each
  for attack, entry in together["attacks"].items():
    alone = ev.evaluate(victim, attacks=(attack,), **kw)["attacks"][attack]
    (eps_key, shared), = entry.items()
    assert shared["recall"] == alone[eps_key]["recall"], attack
    assert shared.get("captions_changed") == alone[eps_key].get("captions_changed"), attack
    for ours, theirs in zip(shared["ranks"], alone[eps_key]["ranks"], strict=True):
      np.testing.assert_array_equal(ours, theirs)
  assert together["attacks"]["bert"]["text"]["captions_changed"] > 0  # the shared stage changed captions
  assert len(calls) == 2 + 3 * 2  # alone, each text-changing attack ran its own


def test_a_shared_text_stage_is_refused_where_the_attack_has_none(model_dir):
  from mat_jax.attacks import runner, spec

  victim = ev.load_victim(str(model_dir))
  assert spec.get("sga").text_stage is None and spec.get("pgd").text_stage is None
  assert spec.get("bert").text_stage == spec.get("co").text_stage == spec.get("sep").text_stage == ("kl", 1)
  assert spec.get("mat").text_stage == ("image", 1) and spec.get("mmcoa").text_stage == ("kl", 1)
  images = jnp.zeros((1, SIZE, SIZE, 3))
  ids = jnp.zeros((1, 8), jnp.int32)
  with pytest.raises(ValueError, match="no shareable text stage"):
    runner.run_attack(spec.get("pgd"), victim.encoder, victim.params, runner.AttackInputs(images, ids, ids),
                      jax.random.key(0), text=object())


def test_a_judge_gets_indices_into_the_evaluation_set(model_dir):
  """With a limit, the evaluated captions are a subset; the judge still gets each one's index in the set,
  also where the captions are not stored image by image."""
  from mat_jax.attacks import candidates as candidates_lib

  data = _EvalSet(4)
  order = np.argsort(np.arange(len(data.captions)) % 2, kind="stable")  # even positions first, then odd
  data.captions, data.text_to_image = data.captions[order], data.text_to_image[order]
  seen = []

  def judge(index, caption):
    seen.append(index)
    return True

  results = ev.evaluate(ev.load_victim(str(model_dir)), eval_set=data, attacks=("bert",), limit=2,
                        text_source=candidates_lib.LexiconSource(shapes.substitution_table()), progress=False,
                        judge=judge)
  assert results["attacks"]["bert"]["text"]["captions_changed"] == len(seen) > 0
  assert all(data.text_to_image[i] < 2 for i in seen)


def test_an_image_alone_in_the_last_batch_is_attacked_among_real_batch_mates(model_dir, monkeypatch):
  # TeCoA's contrastive loss takes its negatives from the batch's captions: an image alone in the last
  # batch (N % batch_size == 1) with zero-weight padding has none, a zero gradient, and stays at its
  # random start. Filled with the set's first images, it is attacked like every other image.
  from mat_jax.attacks import image as image_attacks

  victim = ev.load_victim(str(model_dir))
  seen = []
  real = ev._attack_batch

  def spy(attack, v, images, batch, key, *rest):
    out = real(attack, v, images, batch, key, *rest)
    if _concrete(v.params):  # not the abstract trace that lowers the programs
      seen.append((images, batch, key, np.asarray(out[0])))
    return out

  monkeypatch.setattr(ev, "_attack_batch", spy)
  eps = 8 / 255
  ev.evaluate(victim, eval_set=_EvalSet(5), attacks=("tecoa",), eps_255=(8.0,), batch_size=4, progress=False,
              settings=ev.AttackSettings(steps=3))
  images, batch, key, adversarial = seen[-1]
  assert batch.count == 1 and batch.images[0] == 4
  start = np.asarray(image_attacks.random_init(jax.random.split(key)[0], jnp.asarray(images), eps, "linf"))
  assert np.abs(adversarial[0] - start[0]).max() > 1 / 255  # the steps moved it
  assert batch.images.tolist() == [4, 0, 1, 2] and batch.weights[:, 0].all()  # real batch-mates


_filled_batches = ev._batches


def _padded_with_the_last_image(image_to_texts, batch_size):
  """Batches whose last one repeats its last image in zero-weight rows (no batch-mates)."""
  out = []
  for b in _filled_batches(image_to_texts, batch_size):
    images, weights = b.images.copy(), b.weights.copy()
    images[b.count:], weights[b.count:] = images[b.count - 1], 0.0
    captions = np.where(image_to_texts[images] >= 0, image_to_texts[images], image_to_texts[images][:, :1])
    out.append(ev._Batch(images, b.count, captions, weights))
  return out


def test_the_last_batchs_batch_mates_change_no_attack_that_treats_images_alone(model_dir, monkeypatch):
  # Only the contrastive attacks (tecoa, mat, mmcoa) look at the other images of a batch; every other
  # attack gives the same ranks whatever fills the last batch.
  from mat_jax.attacks import candidates as candidates_lib

  victim = ev.load_victim(str(model_dir))
  alone = [a for a in ev.ATTACKS if a not in ev.BATCH_CONTRASTIVE]
  assert set(ev.BATCH_CONTRASTIVE) == {"tecoa", "mat", "mmcoa"}
  kw = dict(eval_set=_EvalSet(6), attacks=alone, eps_255=(8.0,), batch_size=4, progress=False, keep_ranks=True,
            settings=ev.AttackSettings(steps=2, apgd_steps=3),
            text_source=candidates_lib.LexiconSource(shapes.substitution_table()))
  filled = ev.evaluate(victim, **kw)
  monkeypatch.setattr(ev, "_batches", _padded_with_the_last_image)
  padded = ev.evaluate(victim, **kw)
  for attack in alone:
    (key, ours), = filled["attacks"][attack].items()
    for a, b in zip(ours["ranks"], padded["attacks"][attack][key]["ranks"], strict=True):
      np.testing.assert_array_equal(a, b, err_msg=attack)


def test_a_transfer_attack_is_made_on_the_surrogate_and_scored_on_the_target(model_dir, monkeypatch):
  """Transfer: the surrogate makes the adversarial images and captions, and the target ranks them (images
  in batches, captions of uneven counts per image, through strings). Made on the target, or ranked by the
  surrogate, the table would report white-box numbers as transfer ones; the ranks kept, the ASR and the
  recall drop must be those of these ranks."""
  from mat_jax import metrics
  from mat_jax.attacks import candidates as candidates_lib
  from mat_jax.data import pipeline

  target = ev.load_victim(str(model_dir))
  rng = np.random.default_rng(1)
  # Another model of the same shapes (the same compiled programs): the target's weights, perturbed.
  surrogate = ev.Victim(target.encoder, jax.tree.map(lambda p: p + rng.normal(0, 0.02, p.shape).astype(p.dtype),
                                                     target.params), target.tokenizer, "surrogate")
  made = []
  real = ev._attack_batch

  def spy(attack, v, images, batch, *rest):
    out = real(attack, v, images, batch, *rest)
    if _concrete(v.params):  # not the abstract trace that lowers the programs
      made.append((attack, v, batch, out[0]))
    return out

  monkeypatch.setattr(ev, "_attack_batch", spy)
  adversarial = {}

  def judge(index, caption):  # told each changed caption's adversarial text
    adversarial[index] = caption
    return True

  data = _EvalSet(6)
  results = ev.evaluate(target, eval_set=data, attacks=("pgd", "bert"), eps_255=(8.0,), surrogate=surrogate,
                        batch_size=4, progress=False, settings=ev.AttackSettings(steps=2), judge=judge,
                        text_source=candidates_lib.LexiconSource(shapes.substitution_table()), keep_ranks=True)
  assert len(made) == 4 and all(v is surrogate for _, v, _, _ in made)

  def on_target(img, captions):
    tokens = target.tokenizer(list(captions))
    txt = metrics.embed_texts(target.encoder, target.params, tokens.input_ids, tokens.attention_mask)
    return metrics.retrieval_ranks(img @ txt.T, data.text_to_image)

  clean_img = metrics.embed_images(target.encoder, target.params, pipeline.float_pixels(data.images))
  adv_img = np.zeros_like(clean_img)
  for attack, _, batch, images in made:
    if attack == "pgd":
      rows = batch.images[:batch.count]
      adv_img[rows] = metrics.embed_images(target.encoder, target.params, np.asarray(images))[:batch.count]
  assert adversarial  # the surrogate's text attack changed captions
  assert results["attacks"]["pgd"]["8"]["recall_drop"]["ir@1"] > 0  # and its images transfer: a drop to check
  expected = {"pgd": on_target(adv_img, data.captions),
              "bert": on_target(clean_img, [adversarial.get(i, c) for i, c in enumerate(data.captions)])}
  np.testing.assert_array_equal(np.concatenate(results["clean_ranks"]),
                                np.concatenate(on_target(clean_img, data.captions)))
  for attack, ranks in expected.items():
    (entry,) = results["attacks"][attack].values()
    for got, want in zip(entry["ranks"], ranks, strict=True):
      np.testing.assert_array_equal(got, want, err_msg=attack)
    recall = metrics.recall_from_ranks(*ranks)
    assert entry["recall"] == recall
    assert entry["recall_drop"] == metrics.recall_drop(results["clean"], recall)
    assert entry["asr"] == pytest.approx(metrics.attack_success_rate(results["clean_ranks"], ranks), nan_ok=True)


def test_each_batch_image_is_attacked_with_its_own_captions_and_classes(model_dir, monkeypatch):
  """An attack batch holds each image's own captions (1 to 3 here: the padding slots weigh 0) and, for APGD,
  the image's own captions among the set's as its positive classes, found by image index: by position in
  the batch, the second batch's images (4, 5) would ascend against images 0 and 1's captions."""
  seen = []
  real = ev.run_attack
  monkeypatch.setattr(ev, "run_attack", lambda spec, *args, **kw: (seen.append(args[2]) if _concrete(args[1]) else None)
                      or real(spec, *args, **kw))
  data = _EvalSet(6)
  victim = ev.load_victim(str(model_dir))
  ev.evaluate(victim, eval_set=data, attacks=("apgd",), eps_255=(8.0,), batch_size=4, progress=False,
              settings=ev.AttackSettings(steps=2, apgd_steps=3))
  tokens = victim.tokenizer([str(c) for c in data.captions])
  assert [np.asarray(inputs.image_ids).tolist() for inputs in seen] == [[0, 1, 2, 3], [4, 5, 0, 1]]
  for inputs in seen:
    for row, image in enumerate(np.asarray(inputs.image_ids)):
      own = np.flatnonzero(data.text_to_image == image)
      np.testing.assert_array_equal(inputs.class_positives[row], data.text_to_image == image)
      weights = np.asarray(inputs.caption_weights[row])
      assert weights.tolist() == [1.0] * len(own) + [0.0] * (len(weights) - len(own))
      np.testing.assert_array_equal(inputs.input_ids[row, :len(own)], tokens.input_ids[own])


def test_a_batch_contrastive_attack_needs_two_images_per_batch(model_dir, capsys):
  victim = ev.load_victim(str(model_dir))
  with pytest.raises(ValueError, match=r"attacks \['tecoa'\] ascend a contrastive loss .* at least 2"):
    ev.evaluate(victim, eval_set=_EvalSet(3), attacks=("pgd", "tecoa"), batch_size=1, progress=False)
  with pytest.raises(ValueError, match="tecoa.* at least 2"):  # one image: a batch of one whatever is asked
    ev.evaluate(victim, eval_set=_EvalSet(3), attacks=("tecoa",), limit=1, progress=False)
  with pytest.raises(ValueError, match="batch_size=0"):
    ev.evaluate(victim, eval_set=_EvalSet(3), attacks=("pgd",), batch_size=0, progress=False)
  for flags, message in [(["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
                         (["--batch-size", "1", "--attacks", "pgd,tecoa"], "tecoa take their negatives"),
                         (["--top-k", "0"], "argument --top-k: must be at least 1, got 0")]:
    with pytest.raises(SystemExit):
      evaluate_cli.main(["--model", str(model_dir), *flags, "--data", "no-such-corpus"])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--eps", "300"], "--eps=300 is more than the whole pixel range"),
    (["--max-changes", "0"], "argument --max-changes: must be at least 1, got 0"),
    (["--alpha", "nan"], "--alpha nan: Co-Attack's text-term weight must be finite"),
    (["--text-source", "bret"], "unknown text_attack.source 'bret' (--text-source)"),
    (["--text-source", "lexicon"], "text_attack.source='lexicon' was renamed"),
    (["--text-source", "paraphrase", "--data", "flickr30k"], "--text-source paraphrase is the shapes world's"),
])
def test_command_line_errors_come_before_a_cached_model_is_trained(tmp_path, monkeypatch, capsys, flags, message):
  # "shapes" is trained into the cache on first use (minutes): a bad flag must not wait for that.
  monkeypatch.setenv("MAT_JAX_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.setattr(loop, "ensure_cached_source", lambda source, **_: pytest.fail("trained before checking flags"))
  with pytest.raises(SystemExit):
    evaluate_cli.main(["--model", "shapes", "--attacks", "pgd,bert,co", "--out", str(tmp_path / "out"), *flags])
  assert message in capsys.readouterr().err


def test_a_data_dir_under_a_file_is_refused_before_the_work(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(loop, "ensure_cached_source", lambda source, **_: pytest.fail("trained before checking flags"))
  (tmp_path / "afile").write_text("")
  assert evaluate_cli.main(["--model", "shapes", "--data-dir", str(tmp_path / "afile" / "sub"),
                            "--out", str(tmp_path / "out")]) == 2
  assert "is a file, not a directory; pass another --data-dir" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--data", "flikr30k"], "no corpus 'flikr30k' under"),
    (["--split", "tset"], "--split 'tset': the shapes world has train, val, test"),
    (["--mesh", "garbage"], "cannot parse mesh 'garbage'"),
])
def test_data_split_and_mesh_are_checked_before_a_cached_model_is_trained(tmp_path, monkeypatch, capsys, flags,
                                                                          message):
  # A mistyped corpus name used to build the world and train the clean model (minutes) before it was read.
  monkeypatch.setenv("MAT_JAX_DATA_DIR", str(tmp_path / "data"))
  monkeypatch.setattr(loop, "ensure_cached_source", lambda source, **_: pytest.fail("trained before checking flags"))
  try:
    code = evaluate_cli.main(["--model", "shapes", "--out", str(tmp_path / "out"), *flags])
  except SystemExit as exit_:  # argparse's own errors
    code = exit_.code
  assert code == 2 and message in capsys.readouterr().err


def test_budgets_that_share_a_results_key_are_refused(model_dir, capsys):
  # "1" and "1.0000001" both format as "1": one result would overwrite the other.
  with pytest.raises(SystemExit):
    evaluate_cli.main(["--model", str(model_dir), "--eps", "1,1.0000001"])
  assert "both reported as eps '1'" in capsys.readouterr().err
  with pytest.raises(ValueError, match="both reported as eps '1'"):
    ev.evaluate(ev.load_victim(str(model_dir)), eval_set=_EvalSet(3), attacks=("pgd",), eps_255=(1.0, 1.0000001))
  # A meaning filter checks each substitute alone: two changed words could together flip the meaning.
  from mat_jax.attacks.candidates import LexiconSource, MeaningFilteredSource
  filtered = MeaningFilteredSource(LexiconSource({"red": ["crimson"]}), lambda words, position, sub: True)
  with pytest.raises(ev.InputError, match="holds for one changed word"):
    ev.evaluate(ev.load_victim(str(model_dir)), eval_set=_EvalSet(3), attacks=("bert",), text_source=filtered,
                settings=ev.AttackSettings(max_changes=2))


def test_the_table_and_plot_name_the_norm_steps_and_seed(tmp_path, monkeypatch):
  from matplotlib.figure import Figure

  recall = {k: 50.0 for k in ev.metrics.RECALL_KEYS}
  entry = {"recall": recall, "recall_drop": {k: 0.0 for k in recall}, "asr": {"tr@1": 0.0, "ir@1": 0.0}}
  figures = []
  save = Figure.savefig
  monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **kw: figures.append(fig) or save(fig, *a, **kw))
  for norm, budget, axis in [("l2", "L2 radius(/255)", "L2 radius (x 1/255)"),
                             ("linf", "Linf eps(/255)", "L-inf eps (x 1/255)")]:
    results = {"target": "m", "surrogate": None, "clean": recall, "attacks": {"pgd": {"2": entry}},
               "settings": {"norm": norm, "steps": 7, "apgd_steps": 100, "seed": 3, "batch_size": 16}}
    settings = ("L2 radius" if norm == "l2" else "L-inf eps") + " in 1/255 units, 7 steps, seed 3, batch size 16"
    assert ev.settings_line(results) == settings
    lines = ev.format_table(results, "title").splitlines()
    assert lines[:2] == ["title", settings]
    assert lines[2].split()[:2] == ["attack", budget.split()[0]] and budget in lines[2]
    assert lines[-1] == ev.RECALL_FOOTER and "image -> text" in lines[-1] and "text -> image" in lines[-1]
    ev.plot_recall(results, tmp_path / f"{norm}.png")
    assert figures[-1].axes[0].get_xlabel() == axis
    assert figures[-1].get_suptitle() == f"m\n{settings}"
  # Text attacks searched only meaning-preserving substitutes (--meaning-filter): the title says so.
  results["settings"]["text_source"] = {"kind": "BertMLMSource", "top_k": 10, "meaning_filter": True}
  assert ev.settings_line(results).endswith(", batch size 16, text substitutes meaning-filtered (no label flips)")
  results["settings"]["text_source"] = {"kind": "BertMLMSource", "top_k": 10}
  assert ev.settings_line(results).endswith(", batch size 16")
  # A BLIP ranked with ITM re-ranking: the printed table says so, not only results.json.
  results["settings"]["itm_k"] = 128
  assert ev.settings_line(results).endswith(", batch size 16, ITM re-ranking of the top 128")


@pytest.mark.parametrize("task", [[], ["--task", "zeroshot"]])
def test_mesh_is_where_a_missing_cached_model_trains(tmp_path, monkeypatch, task):
  # On 3 or 6 devices the clean model's batch of 128 splits over none of "all devices": --mesh picks fewer
  # (the error's own advice, which these commands could not follow without the flag).
  asked = []

  class Trained(BaseException):
    pass

  def record(source, **kwargs):
    asked.append((source, kwargs.get("mesh_spec")))
    raise Trained

  monkeypatch.setattr(loop, "ensure_cached_source", record)
  with pytest.raises(Trained):
    evaluate_cli.main([*task, "--model", "shapes", "--mesh", "2", "--out", str(tmp_path / "out")])
  assert asked == [("shapes", "2")]


# The programs of the demo's attacks, and of the clean scoring (as JAX's monitoring names them).
_ATTACK_PROGRAMS = {"jit(_pgd_attack)", "jit(_compiled_text_attack)", "jit(caption_guides)", "jit(_sga_images)"}
_CLEAN_SCORING_PROGRAMS = {"jit(image_embeddings)", "jit(text_embeddings)", "jit(_ranks)"}


@pytest.mark.parametrize("setting", ["1", "0"])
def test_an_evaluation_compiles_its_programs_before_its_first_attack(model_dir, monkeypatch, setting):
  """Before its first attack an evaluation lowers every program its runs will call (the attacks' at the batch
  shape, the adversarial images' features, the clean scoring) and compiles them at once
  (MAT_JAX_COMPILE_AHEAD, on by default): its attacks then compile nothing of their own. Off, they do (so
  the check can fail)."""
  from mat_jax import precompile
  from mat_jax.attacks import candidates as candidates_lib

  monkeypatch.setenv("MAT_JAX_COMPILE_AHEAD", setting)
  marks = {}  # where in the compiled programs' list the compilation ahead and the attacks begin
  compile_all = precompile.compile_all

  def recorded_compile_all(lowerings, **kwargs):
    marks["ahead"] = len(compiled)
    compile_all(lowerings, **kwargs)
    marks["attacks"] = len(compiled)

  real = ev._attack_batch

  def attack_batch(*args):
    if "attacks" not in marks and _concrete(args[1].params):  # the first attack, with nothing compiled ahead
      marks["ahead"] = marks["attacks"] = len(compiled)
    return real(*args)

  monkeypatch.setattr(precompile, "compile_all", recorded_compile_all)
  monkeypatch.setattr(ev, "_attack_batch", attack_batch)
  # Set and batch sizes no other test evaluates: programs the session's caches cannot hold yet.
  images, batch_size = (7, 7) if setting == "1" else (9, 9)
  with helpers.compiled_programs() as compiled:
    result = ev.evaluate(ev.load_victim(str(model_dir)), eval_set=_EvalSet(images),
                         attacks=("pgd", "bert", "co", "sga"), eps_255=(2.0,), batch_size=batch_size, progress=False,
                         settings=ev.AttackSettings(steps=2),
                         text_source=candidates_lib.LexiconSource(shapes.substitution_table()))
  assert set(result["attacks"]) == {"pgd", "bert", "co", "sga"}
  ahead, attacking = compiled[marks["ahead"]:marks["attacks"]], compiled[marks["attacks"]:]
  attacks = _ATTACK_PROGRAMS | {"jit(_co_images)"}
  if setting == "1":
    assert attacks <= set(ahead), compiled  # (the clean scoring's, unless a test compiled them)
    assert ahead.count("jit(_compiled_text_attack)") == 2  # BERT-Attack's and SGA's objectives
    assert not (attacks | _CLEAN_SCORING_PROGRAMS) & set(attacking), compiled
  else:
    assert ahead == [] and attacks <= set(attacking), compiled


def test_programs_lowered_for_one_model_serve_the_evaluation_of_another_of_its_architecture(model_dir, monkeypatch):
  """`lowering_only`, as the demo uses it while the models it will evaluate still train: the programs lowered
  for one loaded model and compiled are those an evaluation of another model of the same architecture and
  parameter dtypes calls (here a second load of the checkpoint with other weights), which then compiles no
  program of the attacks or the clean scoring."""
  from mat_jax import precompile
  from mat_jax.attacks import candidates as candidates_lib

  monkeypatch.setenv("MAT_JAX_COMPILE_AHEAD", "0")  # the evaluation below compiles nothing ahead itself
  kw = dict(eval_set=_EvalSet(8), attacks=("pgd", "bert", "sga"), eps_255=(2.0,), batch_size=8, progress=False,
            settings=ev.AttackSettings(steps=2), text_source=candidates_lib.LexiconSource(shapes.substitution_table()))
  lower = ev.evaluate(ev.load_victim(str(model_dir)), lowering_only=True, **kw)
  with helpers.compiled_programs() as compiled:
    lowerings = lower()
    assert compiled == []  # lowered only
    precompile.compile_all(lowerings)
    ahead = list(compiled)
    loaded = ev.load_victim(str(model_dir))
    other = dataclasses.replace(loaded, params=jax.tree.map(lambda p: p * 1.01, loaded.params))
    ev.evaluate(other, **kw)
  assert _ATTACK_PROGRAMS <= set(ahead), ahead  # (the clean scoring's too, unless another test compiled them)
  assert not (_ATTACK_PROGRAMS | _CLEAN_SCORING_PROGRAMS) & set(compiled[len(ahead):]), compiled


def test_every_attack_of_the_registry_compiles_ahead(model_dir, monkeypatch):
  """Each attack's programs lower from the abstract trace (a host-side step that needed concrete values would
  make the evaluation fall back to compiling at the first calls, which it logs) and are the programs its
  batches then call."""
  from mat_jax import metrics, precompile, rerank
  from mat_jax.attacks import candidates as candidates_lib
  from mat_jax.attacks import image, multimodal, runner, text

  monkeypatch.setenv("MAT_JAX_COMPILE_AHEAD", "1")
  lines, attacks_began = [], []  # where in the compiled programs' list the first attack began
  real = ev._attack_batch

  def attack_batch(*args):
    if not attacks_began and _concrete(args[1].params):
      attacks_began.append(len(compiled))
    return real(*args)

  monkeypatch.setattr(ev, "_attack_batch", attack_batch)
  with helpers.compiled_programs() as compiled:
    result = ev.evaluate(ev.load_victim(str(model_dir)), eval_set=_EvalSet(5), attacks=ev.ATTACKS, eps_255=(2.0,),
                         batch_size=5, progress=False, settings=ev.AttackSettings(steps=1, apgd_steps=2),
                         text_source=candidates_lib.LexiconSource(shapes.substitution_table()), log=lines.append)
  assert set(result["attacks"]) == set(ev.ATTACKS)
  assert lines[0].startswith("the evaluation's programs (") and " lowerings) compiled in " in lines[0], lines[0]
  # Once the attacks ran, no program of the attacks, metrics or re-ranking compiled (only JAX's own small ones).
  programs = {f"jit({value.__name__})" for module in (metrics, rerank, image, multimodal, runner, text)
              for value in vars(module).values() if isinstance(value, precompile.Program)}
  assert {"jit(_pgd_attack)", "jit(_apgd_attack)", "jit(_defense_images)", "jit(_sep_images)"} <= programs
  assert not programs & set(compiled[attacks_began[0]:]), compiled


def test_committed_parameters_compile_at_the_first_calls_and_a_failed_lowering_is_said(model_dir, monkeypatch):
  """Parameters committed to a device (restored onto a mesh) would get programs lowered without their placement
  and compile each twice: the evaluation compiles at the first calls instead, and says so. A lowering that fails
  where the calls would not falls back the same way, in the log or, without one, as a warning; the
  evaluation's own checks are raised as they are."""
  from mat_jax import precompile

  monkeypatch.setenv("MAT_JAX_COMPILE_AHEAD", "1")
  victim = ev.load_victim(str(model_dir))
  # A set and batch size no other test evaluates: programs the session's caches cannot hold yet.
  kw = dict(eval_set=_EvalSet(3), attacks=("pgd",), eps_255=(2.0,), batch_size=3, progress=False,
            settings=ev.AttackSettings(steps=1))
  committed = dataclasses.replace(victim, params=jax.device_put(victim.params, jax.devices()[0]))
  lines = []
  with helpers.compiled_programs() as compiled:
    result = ev.evaluate(committed, log=lines.append, **kw)
  assert lines[0] == "parameters committed to devices: each of the evaluation's programs compiles at its first call"
  assert compiled.count("jit(_pgd_attack)") == 1, compiled  # at its call only, not ahead for nothing
  plain = ev.evaluate(victim, **kw)
  assert result["attacks"]["pgd"]["2"]["recall"] == plain["attacks"]["pgd"]["2"]["recall"]

  def failing(lowerings, **kwargs):
    raise RuntimeError("no kernel for this\nsecond line")

  monkeypatch.setattr(precompile, "compile_all", failing)
  lines.clear()
  ev.evaluate(victim, log=lines.append, **kw)
  assert lines[0] == ("compiling the evaluation's programs ahead failed (RuntimeError: no kernel for this); each "
                      "compiles at its first call")
  with pytest.warns(RuntimeWarning, match="compiling the evaluation's programs ahead failed"):
    ev.evaluate(victim, **kw)

  def refused(lowerings, **kwargs):
    raise ev.InputError("a check of the evaluation's inputs")

  monkeypatch.setattr(precompile, "compile_all", refused)
  with pytest.raises(ev.InputError, match="a check of the evaluation's inputs"):
    ev.evaluate(victim, **kw)


def test_a_mistyped_compile_ahead_setting_stops_the_command_before_any_work(model_dir, monkeypatch, capsys):
  monkeypatch.setenv("MAT_JAX_COMPILE_AHEAD", "sometimes")
  loaded = []
  monkeypatch.setattr(ev, "load_victim", lambda *a, **kw: loaded.append(1))
  assert evaluate_cli.main(["--model", str(model_dir), "--attacks", "pgd", "--no-progress"]) != 0
  assert "MAT_JAX_COMPILE_AHEAD='sometimes'" in capsys.readouterr().err and loaded == []
