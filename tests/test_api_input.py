"""Bad input to the public Python API: each is refused on the host, before anything compiles, with one
`InputError` naming the problem and the fix (docs/reliability.md), or, where the input is a plain spelling of a
valid one (an int seed of numpy's, one attack name, one budget), taken as that.

Nothing here compiles: every check runs before the first traced or jitted call. One zero-weight micro CLIP per
model variant (numpy-initialised) and a word-level stand-in tokenizer keep the file at a few seconds.
"""

from __future__ import annotations

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mat_jax import attacks, checks, metrics, models
from mat_jax import evaluate as ev
from mat_jax import zeroshot as zs
from mat_jax.attacks import LexiconSource, multimodal, runner
from mat_jax.attacks import image as image_attacks
from mat_jax.attacks import spec as attack_specs
from mat_jax.data import shapes
from mat_jax.data.classification import ClassificationSet
from mat_jax.errors import InputError
from mat_jax.models import CLIP, clip_config
from mat_jax.models.clip import TextConfig, VisionConfig

import helpers

CAPTIONS = ["a red square", "the blue circle"]
X = np.full((2, 16, 16, 3), 0.5, np.float32)


class Stop(Exception):
  """Raised by a stand-in past an entry point's argument checks: the arguments were accepted."""


@pytest.fixture(scope="module")
def world():
  table = shapes.substitution_table()
  tok = helpers.WordTokenizer([w for c in CAPTIONS for w in c.split()] + [w for subs in table.values() for w in subs])

  def model(**text):
    text = dict(vocab_size=tok.vocab_size, context_length=8, width=16, layers=1, heads=2, mlp_dim=32,
                eos_token_id=3, bos_token_id=2, pad_token_id=0) | text
    cfg = clip_config("tiny", vision=VisionConfig(image_size=16, patch_size=8, width=16, layers=1, heads=2,
                                                  mlp_dim=32),
                      text=TextConfig(**text), projection_dim=8)
    return helpers.numpy_initialised(CLIP, cfg, lambda path, leaf, rng: np.zeros(leaf.shape, leaf.dtype))

  clip = model()
  encoder, params = models.split(clip)
  batch = tok(CAPTIONS)
  return types.SimpleNamespace(tok=tok, source=LexiconSource(table), clip=clip, encoder=encoder, params=params,
                               ids=batch.input_ids, mask=batch.attention_mask,
                               small=model(vocab_size=5),    # the tokenizer's ids lie past its table
                               other_eos=model(eos_token_id=5))  # it pools at another end token


# ----------------------------------------------------------------------------------------------------
# 1. L-inf budgets above 64/255 (eps=1 meant as 1/255).


def test_linf_budgets_above_64_255_are_refused_naming_the_slip():
  with pytest.raises(InputError, match=r"eps=1 would let every pixel take any value; eps is in pixel units: "
                                       r"1/255 ≈ 0.0039"):
    checks.check_eps(1)
  with pytest.raises(InputError, match=r"eps=0.5 would let every pixel move by 128 of its 255 levels; .*"
                                       r"0.5/255 ≈ 0.0020 \(L-inf budgets above 64/255"):
    checks.check_eps(0.5)
  assert checks.check_eps(64 / 255) == 64 / 255
  assert checks.check_eps(1.0, norm="l2") == 1.0  # an L2 radius of 1 is a budget
  with pytest.raises(InputError, match="mat: eps=0.3 would let every pixel move"):
    attack_specs.get("mat").replace(eps=0.3)


def test_one_call_attacks_refuse_eps_1(world):
  w = world
  with pytest.raises(InputError, match="eps=1 would let every pixel take any value"):
    attacks.image_attack(w.clip, X, w.ids, w.mask, eps=1, steps=2, step_size=1 / 255)
  with pytest.raises(InputError, match="eps=1 would let every pixel take any value"):
    attacks.sga_attack(w.clip, w.tok, X, CAPTIONS, w.source, eps=1, steps=2)


def test_budgets_in_1_255_units_above_64_are_refused_under_linf():
  assert ev.check_eps_255([64]) == [64.0]
  with pytest.raises(InputError, match=r"eps_255=100 would let every pixel move by 100 of its 255 levels: L-inf "
                                       "budgets above 64 are refused"):
    ev.check_eps_255([2, 100])
  assert ev.check_eps_255([100], "l2") == [100.0]


# ----------------------------------------------------------------------------------------------------
# 2. evaluate / evaluate_zeroshot: one attack name, one budget, budgets in pixel units.


def _eval_set():
  return types.SimpleNamespace(images=(X * 255).astype(np.uint8), captions=np.array(CAPTIONS),
                               text_to_image=np.array([0, 1]))


def _evaluate(w, monkeypatch, **kwargs):
  """`evaluate` up to its first model call (the tokenizer's batch, right after the argument checks)."""
  def stop(self, captions):
    raise Stop

  monkeypatch.setattr(ev.Victim, "tokens", stop)
  ev.evaluate(w.clip, tokenizer=w.tok, eval_set=_eval_set(), progress=False, batch_size=2,
              settings=ev.AttackSettings(steps=1), **kwargs)


@pytest.mark.parametrize("kwargs", [dict(attacks="pgd"), dict(attacks=("pgd",), eps_255=2),
                                    dict(attacks="pgd", eps_255=np.float64(2))], ids=["name", "budget", "both"])
def test_evaluate_takes_one_attack_name_and_one_budget(world, monkeypatch, kwargs):
  with pytest.raises(Stop):  # past the argument checks: not ['p', 'g', 'd'], not len() of an int
    _evaluate(world, monkeypatch, **kwargs)


def test_the_models_encode_lists_as_the_checks_accept_them(world):
  tokens = world.tok(list(CAPTIONS))
  np.testing.assert_array_equal(world.clip.encode_image(X.tolist()), world.clip.encode_image(X))
  np.testing.assert_array_equal(
      world.clip.encode_text(tokens.input_ids.tolist(), tokens.attention_mask.tolist()),
      world.clip.encode_text(tokens.input_ids, tokens.attention_mask))


def test_parameters_or_a_tokenizer_the_evaluation_would_ignore_are_refused(world):
  from mat_jax.models import split

  encoder, params = split(world.clip)
  victim = ev.Victim.of(world.clip, tokenizer=world.tok)
  with pytest.raises(InputError, match=r"a CLIP carries its parameters; to evaluate other ones pass its encoder"):
    ev.evaluate(world.clip, params, world.tok, _eval_set(), progress=False)
  with pytest.raises(InputError, match=r"a Victim carries its parameters and tokenizer"):
    ev.evaluate(victim, params, eval_set=_eval_set(), progress=False)
  with pytest.raises(InputError, match=r"a Victim carries its parameters and tokenizer"):
    ev.evaluate(victim, tokenizer=world.tok, eval_set=_eval_set(), progress=False)
  assert ev.Victim.of(encoder, params, world.tok).params is not None


def test_captions_given_as_bytes_are_read_as_their_text(world, monkeypatch):
  """TFDS records hold captions as bytes; str() of them would tokenise "b'a red ...'"."""
  seen = []

  def stop(self, captions):
    seen.append(captions)
    raise Stop

  monkeypatch.setattr(ev.Victim, "tokens", stop)
  as_bytes = types.SimpleNamespace(**{**vars(_eval_set()), "captions": np.array([c.encode() for c in CAPTIONS])})
  with pytest.raises(Stop):
    ev.evaluate(world.clip, tokenizer=world.tok, eval_set=as_bytes, attacks=("pgd",), progress=False, batch_size=2)
  assert seen == [list(CAPTIONS)]


def test_budgets_that_look_like_pixel_units_are_refused(world, monkeypatch):
  with pytest.raises(InputError, match=r"eps_255=0.00784314 is less than half of one pixel level \(budgets are in "
                                       r"1/255 units: 2 means 2/255\); .* pass 2$"):
    _evaluate(world, monkeypatch, attacks=("pgd",), eps_255=(2 / 255,))
  with pytest.raises(InputError, match="must be numbers in 1/255 units"):
    ev.check_eps_255("2")
  assert ev.check_eps_255((0, 0.5)) == [0.0, 0.5]  # no budget, and half a level, are budgets


def _zeroshot_data():
  return ClassificationSet((X * 255).astype(np.uint8), np.array([0, 1]), ("red square", "blue circle"), name="toy")


def _zeroshot(w, monkeypatch, **kwargs):
  """`evaluate_zeroshot` up to its classes' check (after its argument checks)."""
  def stop(*args):
    raise Stop

  monkeypatch.setattr(zs, "check_classes", stop)
  zs.evaluate_zeroshot(w.encoder, w.params, w.tok, _zeroshot_data(), batch_size=2, **kwargs)


def test_zeroshot_takes_one_attack_name_and_one_budget(world, monkeypatch):
  with pytest.raises(Stop):
    _zeroshot(world, monkeypatch, attacks="pgd", eps_255=1)


# ----------------------------------------------------------------------------------------------------
# 3. attack_text: pixels, text_to_image, source.


@pytest.mark.parametrize("images, message", [
    ((X * 255).astype(np.uint8), "got dtype uint8; convert uint8 images with x.astype"),
    (X * 255, "they look like 0-255 pixel values: divide by 255"),
    (np.where(np.arange(2)[:, None, None, None] == 0, np.nan, X).astype(np.float32), "hold 768 NaN value"),
], ids=["uint8", "0-255", "nan"])
def test_attack_text_checks_the_guiding_images(world, images, message):
  with pytest.raises(InputError, match=message):
    attacks.attack_text(world.clip, world.tok, CAPTIONS, world.source, images=images)


@pytest.mark.parametrize("text_to_image, message", [
    ([0, 7], r"text_to_image\[1\] = 7 is not an image index: there are 2 images"),
    ([0, -1], r"text_to_image\[1\] = -1 is not an image index"),
    ([0], r"one entry per text, shape \(2,\)"),
])
def test_attack_text_checks_text_to_image(world, text_to_image, message):
  with pytest.raises(InputError, match=message):
    attacks.attack_text(world.clip, world.tok, CAPTIONS, world.source, images=X, text_to_image=text_to_image)


def test_attack_text_wants_a_candidate_source_not_its_table(world):
  with pytest.raises(InputError, match=r"wrap it in LexiconSource\(table\)"):
    attacks.attack_text(world.clip, world.tok, CAPTIONS, shapes.substitution_table(), images=X)


# ----------------------------------------------------------------------------------------------------
# 4. Keys: numpy seeds, typed and raw keys; anything else refused at every attack entry point.


def test_as_key_takes_seeds_and_keys_and_refuses_the_rest():
  def same(a, b):
    return np.array_equal(jax.random.key_data(a), jax.random.key_data(b))

  for seed in (3, np.int64(3), np.arange(5)[3], np.array(3), jnp.array(3), jax.random.PRNGKey(3),
               jax.random.key(3)):
    assert same(checks.as_key(seed), jax.random.key(3)), seed
  for bad, message in [("abc", "int seed or a jax.random.key"), (1.5, "int seed or a jax.random.key"),
                       (None, "int seed or a jax.random.key"), (True, "int seed"),
                       (jax.random.split(jax.random.key(0), 3), "one key, got a batch of keys of shape"),
                       (2 ** 70, "too large for a seed")]:
    with pytest.raises(InputError, match=message):
      checks.as_key(bad)


def test_traced_keys_pass_through():
  def loss(x, key):
    return jnp.sum(x, axis=(1, 2, 3))

  def attack(key):
    return image_attacks.pgd(loss, jnp.asarray(X), key, eps=2 / 255, step_size=1 / 255, steps=1)

  for key in (jax.random.key(0), jax.random.PRNGKey(0)):  # traced (abstract) keys: a typed one and a raw one
    assert jax.eval_shape(attack, key).shape == X.shape
  assert jax.eval_shape(lambda: attack(3)).shape == X.shape  # a plain seed, which the composable pgd refused


def test_one_call_attacks_take_a_numpy_seed(world, monkeypatch):
  seen = {}

  def pgd_attack(*args, **kwargs):
    seen["key"], seen["step_size"] = args[5], kwargs["step_size"]
    raise Stop

  monkeypatch.setattr(image_attacks, "pgd_attack", pgd_attack)
  with pytest.raises(Stop):
    attacks.image_attack(world.clip, X, world.ids, world.mask, eps=2 / 255, steps=4, key=np.int64(3))
  assert np.array_equal(jax.random.key_data(seen["key"]), jax.random.key_data(jax.random.key(3)))
  # 6. step_size None: the `pgd` spec's rule, 2.5 eps / steps, as sep/co/sga_attack take it.
  assert seen["step_size"] == pytest.approx(2.5 * (2 / 255) / 4)


def test_every_attack_entry_point_refuses_a_key_that_is_not_one(world):
  w = world
  images, ids, mask = jnp.asarray(X), jnp.asarray(w.ids), jnp.asarray(w.mask)
  cands = multimodal.bucketed_candidates(CAPTIONS, w.tok, w.source)
  budget = dict(eps=2 / 255, step_size=1 / 255, steps=1)
  calls = {
      "image_attack": lambda key: attacks.image_attack(w.clip, X, w.ids, w.mask, **budget, key=key),
      "sga_attack": lambda key: attacks.sga_attack(w.clip, w.tok, X, CAPTIONS, w.source, key=key),
      "pgd": lambda key: image_attacks.pgd(lambda x, k: x.sum((1, 2, 3)), images, key, **budget),
      "apgd": lambda key: image_attacks.apgd(lambda x, k: x.sum((1, 2, 3)), images, key, eps=2 / 255, steps=1),
      "pgd_attack": lambda key: image_attacks.pgd_attack(w.encoder, w.params, images, ids, mask, key, **budget),
      "apgd_attack": lambda key: image_attacks.apgd_attack(w.encoder, w.params, images, jnp.zeros((2, 8)),
                                               jnp.eye(2, dtype=bool), key, eps=2 / 255, steps=1),
      "separate_attack": lambda key: multimodal.separate_attack(w.encoder, w.params, images, cands, key, **budget),
      "run_attack": lambda key: runner.run_attack(attack_specs.get("pgd"), w.encoder, w.params,
                                                  runner.AttackInputs(images, ids, mask), key),
      "attack_correct": lambda key: zs.attack_correct(w.encoder, w.params, jnp.zeros((2, 8)), images,
                                                      np.array([0, 1]), key, attack="pgd", eps=2 / 255),
  }
  for name, call in calls.items():
    with pytest.raises(InputError, match="key must be an int seed or a jax.random.key"):
      call("seed")  # before: a TypeError from inside JAX's PRNG, or none (a string as the key's data)
    assert name


# ----------------------------------------------------------------------------------------------------
# 5. The tokenizer against the model in the text and multimodal attacks and run_attack.


def test_text_and_multimodal_attacks_check_the_tokenizer_against_the_model(world):
  w = world
  past_table = r"token ids must lie in \[0, 5\) \(the model's table size\).*the tokenizer does not match the model"
  for call in (lambda m: attacks.attack_text(m, w.tok, CAPTIONS, w.source, objective="kl"),
               lambda m: attacks.attack_text(m, w.tok, CAPTIONS, w.source, images=X),
               lambda m: attacks.sga_attack(m, w.tok, X, CAPTIONS, w.source, steps=1),
               lambda m: attacks.co_attack(m, w.tok, X, CAPTIONS, w.source, steps=1),
               lambda m: attacks.sep_attack(m, w.tok, X, CAPTIONS, w.source, steps=1)):
    with pytest.raises(InputError, match=past_table):
      call(w.small)
    with pytest.raises(InputError, match="end token id is 3 but the text tower pools at its eos_token_id 5"):
      call(w.other_eos)


def test_run_attack_checks_host_captions_against_the_model(world):
  w = world
  small_encoder, small_params = models.split(w.small)
  inputs = runner.AttackInputs(X, w.ids[:, None], w.mask[:, None])
  with pytest.raises(InputError, match=r"token ids must lie in \[0, 5\)"):  # unchecked: all-NaN images
    runner.run_attack(attack_specs.get("pgd"), small_encoder, small_params, inputs, 0)
  eos_encoder, eos_params = models.split(w.other_eos)
  cands = multimodal.bucketed_candidates(CAPTIONS, w.tok, w.source)
  with pytest.raises(InputError, match="candidates' tokenizer's end token id is 3 but the text tower pools at its "
                                       "eos_token_id 5"):
    runner.run_attack(attack_specs.get("sga"), eos_encoder, eos_params, dataclasses.replace(inputs, candidates=cands),
                      0)


def test_a_device_caption_batch_is_checked_by_its_shape_without_a_program(world, monkeypatch):
  # The composable attacks take (B, K, L) device captions once per evaluation batch; their values were
  # checked where they came from, so checking them must dispatch nothing (a reshape was a program per
  # batch). Host captions are still read, and a device batch's shape still checked.
  w = world
  ids, mask = np.asarray(w.ids)[:, None], np.asarray(w.mask)[:, None]
  device_ids, device_mask = jnp.asarray(ids), jnp.asarray(mask)
  reshaped = []
  real_reshape = type(device_ids).reshape
  monkeypatch.setattr(type(device_ids), "reshape",
                      lambda self, *a, **k: reshaped.append(a) or real_reshape(self, *a, **k))
  image_attacks.check_batch(w.encoder, X, device_ids, device_mask)
  assert reshaped == []
  with pytest.raises(InputError, match=r"token ids must lie in \[0, 5\)"):
    image_attacks.check_batch(models.split(w.small)[0], X, ids, mask)
  with pytest.raises(InputError, match="attention_mask shape .* differs from input_ids shape"):
    image_attacks.check_batch(w.encoder, X, device_ids, device_mask[:, :, :-1])
  image_attacks.check_batch(models.split(w.small)[0], X, device_ids, device_mask)  # values unread: passes


# ----------------------------------------------------------------------------------------------------
# 7. The composable attacks: host numbers and static shapes.


@pytest.mark.parametrize("budget, message", [
    (dict(eps=2.0), r"eps=2 is outside \[0, 1\]"), (dict(eps=-0.01), "eps=-0.01 must be >= 0"),
    (dict(steps=-1), "steps=-1 must be at least 0"), (dict(steps=2.5), "steps must be an integer, got 2.5"),
    (dict(step_size=-1 / 255), "step_size=.* must be a finite number >= 0"),
], ids=["eps 2", "eps<0", "steps -1", "steps 2.5", "step<0"])
def test_composable_attacks_check_their_host_numbers(world, budget, message):
  w = world
  images, ids, mask = jnp.asarray(X), jnp.asarray(w.ids), jnp.asarray(w.mask)
  kw = dict(eps=2 / 255, step_size=1 / 255, steps=1) | budget
  with pytest.raises(InputError, match=message):
    image_attacks.pgd(lambda x, k: x.sum((1, 2, 3)), images, jax.random.key(0), **kw)
  with pytest.raises(InputError, match=message):
    image_attacks.pgd_attack(w.encoder, w.params, images, ids, mask, jax.random.key(0), **kw)
  if "step_size" not in budget:
    del kw["step_size"]
    with pytest.raises(InputError, match=message):
      image_attacks.apgd_attack(w.encoder, w.params, images, jnp.zeros((2, 8)), jnp.eye(2, dtype=bool),
                                jax.random.key(0), **kw)
  if "eps" in budget:
    with pytest.raises(InputError, match=message):
      zs.attack_correct(w.encoder, w.params, jnp.zeros((2, 8)), images, np.array([0, 1]), 0, attack="pgd",
                        eps=budget["eps"])


def test_apgd_attack_refuses_positives_that_would_broadcast(world):
  w = world
  with pytest.raises(InputError, match=r"positives must be \(images, texts\) = \(2, 3\).*got shape \(2, 1\)"):
    image_attacks.apgd_attack(w.encoder, w.params, jnp.asarray(X), jnp.zeros((3, 8)), jnp.ones((2, 1), bool), 0,
                              eps=2 / 255, steps=1)


# ----------------------------------------------------------------------------------------------------
# 8. Metrics: images without a caption, ranks that are not ranks.


def test_retrieval_recall_refuses_an_image_without_a_caption():
  text_to_image = np.array([0, 0, 1, 1])
  perfect = np.full((3, 4), -1.0, np.float32)
  perfect[text_to_image, np.arange(4)] = 1.0
  with pytest.raises(InputError, match="image 2 has no caption"):  # unchecked: TR@1 66.7 on perfect scores
    metrics.retrieval_recall(perfect, text_to_image)


def test_ranks_must_be_1d_integer_arrays_of_the_same_queries():
  text_to_image = np.array([0, 0, 1, 1])
  scores = np.eye(2, 4, dtype=np.float32)
  with pytest.raises(InputError, match=r"tr_ranks must be a 1-D array of integer ranks, got shape \(2, 4\)"):
    metrics.recall_from_ranks(scores, text_to_image)
  ranks = metrics.retrieval_ranks(scores, text_to_image)
  one = (ranks[0][:1], ranks[1][:1])  # would broadcast against every query
  with pytest.raises(InputError, match="adversarial TR ranks holds 1 ranks where 2 are expected"):
    metrics.attack_success_rate(ranks, one)
  with pytest.raises(InputError, match=r"must be a \(TR ranks, IR ranks\) pair"):
    metrics.attack_success_rate(ranks, metrics.recall_from_ranks(*ranks))
  # Unchecked: no query gave NaN recalls, a negative rank a hit at every K.
  none = np.array([], np.int64)
  with pytest.raises(InputError, match="tr_ranks holds no rank: a recall needs at least one query"):
    metrics.recall_from_ranks(none, none)
  with pytest.raises(InputError, match="the clean TR ranks holds no rank"):
    metrics.attack_success_rate((none, none), (none, none))
  with pytest.raises(InputError, match="ir_ranks holds the negative rank -1: ranks count the items scored above"):
    metrics.recall_from_ranks(np.array([0]), np.array([-1]))


# ----------------------------------------------------------------------------------------------------
# 9. The minor ones.


@pytest.mark.parametrize("change, message", [
    (dict(step_scale=-1.0), "step_scale=-1.0 must be a finite number >= 0"),
    (dict(alpha=float("nan")), "alpha=nan must be a finite number >= 0"),
    (dict(beta=-0.5), "beta=-0.5 must be a finite number >= 0"),
])
def test_attack_spec_refuses_negative_scales_and_nan_weights(change, message):
  with pytest.raises(InputError, match=message):
    attack_specs.get("mava").replace(**change)


def test_evaluate_checks_every_runs_spec_before_any_work(world, monkeypatch):
  # A negative step scale descends the loss: the "attack" would help the model. Refused with the arguments,
  # not after the clean pass.
  def stop(self, captions):
    raise Stop

  monkeypatch.setattr(ev.Victim, "tokens", stop)
  with pytest.raises(InputError, match="pgd: step_scale=-1.0 must be a finite number >= 0"):
    ev.evaluate(world.clip, tokenizer=world.tok, eval_set=_eval_set(), attacks=("pgd",), progress=False,
                batch_size=2, settings=ev.AttackSettings(steps=1, step_scale=-1.0))


@pytest.mark.parametrize("settings, message", [
    (zs.Settings(pgd_step_scale=-1.0), "pgd_step_scale=-1.0 must be a finite number >= 0"),
    (zs.Settings(apgd_steps=2.5), r"Settings.apgd_steps must be an integer, got 2.5"),
], ids=["step_scale", "apgd_steps"])
def test_zeroshot_settings_are_checked(world, monkeypatch, settings, message):
  with pytest.raises(InputError, match=message):
    _zeroshot(world, monkeypatch, attacks=["pgd"], settings=settings)


def test_co_attack_refuses_a_nan_alpha(world):
  with pytest.raises(InputError, match="alpha=nan must be a finite number >= 0"):
    attacks.co_attack(world.clip, world.tok, X, CAPTIONS, world.source, steps=1, alpha=float("nan"))


def test_split_and_save_clip_name_what_they_take(world, tmp_path):
  with pytest.raises(InputError, match="split takes a mat_jax CLIP or BLIP .*got str"):
    models.split("x")
  with pytest.raises(InputError, match="an \\(encoder, params\\) pair is split already"):
    models.split((world.encoder, world.params))
  with pytest.raises(InputError, match="expected a mat_jax model"):
    models.save_clip("x", tmp_path / "out")
  file = tmp_path / "model.txt"
  file.write_text("")
  with pytest.raises(FileExistsError, match="is a file or lies under one"):  # a MatJaxError too
    models.save_clip(world.clip, file)
  with pytest.raises(FileExistsError, match="is a file or lies under one"):
    models.save_clip(world.clip, file / "inside")
