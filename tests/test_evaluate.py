"""`python -m mat_jax.evaluate` end to end on a micro CLIP: table, results.json, the plot, errors."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mat_jax import evaluate as ev
from mat_jax import evaluate_cli
from mat_jax.data import shapes

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

  results = json.loads((out / "results.json").read_text())
  assert results["num_images"] == 7 and results["num_texts"] == len(eval_set.captions)
  assert set(results["attacks"]) == {"pgd", "bert"}
  assert set(results["attacks"]["pgd"]) == {"0", "2"} and set(results["attacks"]["bert"]) == {"text"}
  # The candidate source's own settings, not a number the caller was asked for.
  assert results["settings"]["text_source"]["kind"] == "LexiconSource" and "top_k" not in results["settings"]
  for per_eps in results["attacks"].values():
    for r in per_eps.values():
      assert set(r["recall"]) == set(ev.metrics.RECALL_KEYS)
      assert set(r["asr"]) == {"tr@1", "ir@1"}
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
  for flags, message in [(["--limit", "0"], "at least 1 image"), (["--steps", "0"], "at least 1"),
                         (["--eps", "-2"], "argument --eps: budgets are in 1/255 units and must be finite and >= 0"),
                         (["--eps", ","], "argument --eps: no budget given"), (["--eps", "nan"], "finite"),
                         (["--surrogate-tokenizer", str(model_dir)], "--surrogate-tokenizer needs --surrogate")]:
    with pytest.raises(SystemExit):
      evaluate_cli.main(["--model", str(model_dir), *flags])
    assert message in capsys.readouterr().err


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
  monkeypatch.setattr(multimodal, "bert_attack", lambda *a, **kw: calls.append(1) or real(*a, **kw))
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


@pytest.mark.parametrize("attack", ["tecoa", "apgd"])
def test_the_last_batchs_padding_rows_do_not_change_its_real_images_attack(model_dir, attack):
  # The last batch repeats its last image; with its captions counted, they were extra negatives of
  # every real image's loss, so the real images' adversarial versions depended on the padding.
  from mat_jax.attacks.runner import AttackInputs, run_attack

  victim = ev.load_victim(str(model_dir))
  data = _EvalSet(6)
  tokens = victim.tokenizer(list(data.captions))
  last = ev._batches(ev._image_to_texts(data.text_to_image, 6), 4)[-1]
  assert last.count == 2 and not last.weights[last.count:].any()
  spec = ev.attack_spec(attack, ev.AttackSettings(steps=5), 8 / 255)

  def attacked(rows, captions):
    inputs = AttackInputs(jnp.asarray(data.images[rows].astype(np.float32) / 255),
                          jnp.asarray(tokens.input_ids[captions]), jnp.asarray(tokens.attention_mask[captions]),
                          jnp.asarray(last.weights), jnp.asarray(rows))
    return np.asarray(run_attack(spec, victim.encoder, victim.params, inputs, jax.random.key(3)).images)

  as_evaluated = attacked(last.images, last.captions)
  # Other padding: image 0 and its captions in the padding rows.
  rows, captions = last.images.copy(), last.captions.copy()
  rows[last.count:], captions[last.count:] = 0, ev._batches(ev._image_to_texts(data.text_to_image, 6), 4)[0].captions[0]
  np.testing.assert_array_equal(attacked(rows, captions)[:last.count], as_evaluated[:last.count])
