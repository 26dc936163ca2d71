"""What guides each stage of the multimodal attacks: Co-Attack, SGA and MAT's inner attack.

The attacks are short chains of compiled stages (`mat_jax.attacks.multimodal`, `mat_jax.attacks.runner`), and
what makes each one itself is which output of one stage feeds the next: MAT's and Co-Attack's image PGD ascends
against the adversarial captions, not the clean ones; SGA's image PGD against step 1's adversarial captions, at
every scale, and its final text attack away from the adversarial image. A wrong input gives an attack of the
same shapes and budget that merely does something else, so each test recomputes a stage from the inputs it
should have (equal) and from the plausible wrong ones (different).

A stand-in dual encoder (an MLP for images, a bag of word embeddings for texts) keeps the compiled programs
small; the stages run as they do on CLIP, on short captions of the shapes vocabulary and its synonym table.
"""

from __future__ import annotations

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mat_jax.attacks import LexiconSource, losses, multimodal, runner
from mat_jax.attacks import image as image_attacks
from mat_jax.attacks import spec as attack_specs
from mat_jax.attacks.text import assemble, text_attack
from mat_jax.data import shapes
from mat_jax.errors import InputError
from mat_jax.models import CLIPConfig, l2_normalize
from mat_jax.objectives.mat import MAT

import helpers

B, K, SIZE, WIDTH, D = 2, 3, 8, 32, 16
# Short captions (one length bucket in the text attack), image-major, whose colour and shape words have two
# synonyms each in the shapes world's table.
CAPTIONS = ["a red square and a circle", "the orange ring above a yellow diamond", "a scarlet box",
            "a golden hoop and an amber block", "the yellow circle", "a crimson diamond and a ring"]
# A budget far beyond any real attack's, the largest L-inf one the attacks take (`checks.MAX_LINF_EPS`): SGA's
# adversarial images' features end far from the clean ones' (cosine 0.4-0.5), so that what guides a stage shows in
# its result, the text attack's discrete choices included (SGA's final captions differ from its first ones in 3 of
# 6 captions here).
EPS, STEPS = 64 / 255, 3
STEP = EPS / 2


@dataclasses.dataclass(frozen=True)
class BagEncoder:
  """images -> tanh(x W1) W2, texts -> tanh(sum of the real tokens' embeddings) W3: the `DualEncoder` interface
  the attacks use, the text attack's cache protocol included. Its tower pools no end token (`config`), so the
  text attack scores every text whole: the "cache" is empty and a continued text starts at token 0."""
  pad_id: int
  config = types.SimpleNamespace(text=types.SimpleNamespace(text_pooling="cls"))

  def temperature(self, params):
    return jnp.exp(jnp.clip(params["logit_scale"], *CLIPConfig.logit_scale_range))

  def image_features(self, params, images):
    return jnp.tanh(images.reshape(images.shape[0], -1) @ params["w1"]) @ params["w2"]

  def image_embeddings(self, params, images):
    return l2_normalize(self.image_features(params, images))

  def text_features(self, params, input_ids, attention_mask):
    bag = jnp.einsum("...l,...ld->...d", attention_mask.astype(jnp.float32), params["words"][input_ids])
    return jnp.tanh(bag) @ params["w3"]

  def text_embeddings(self, params, input_ids, attention_mask):
    return l2_normalize(self.text_features(params, input_ids, attention_mask))

  def text_features_and_cache(self, params, input_ids, attention_mask):
    return self.text_features(params, input_ids, attention_mask), ()

  def text_features_continued(self, params, cache, start, input_ids):
    del cache, start  # always 0: the texts are scored whole
    return self.text_features(params, input_ids, input_ids != self.pad_id)


@pytest.fixture(scope="module")
def world():
  """The encoder and its params, B random images with K captions each, their candidates and clean tokens."""
  table = shapes.substitution_table()
  tok = helpers.WordTokenizer([w for c in CAPTIONS for w in c.split()] + [w for subs in table.values() for w in subs])
  rng = np.random.default_rng(0)
  params = {"w1": jnp.asarray(rng.normal(0, 0.1, (SIZE * SIZE * 3, WIDTH)), jnp.float32),
            "w2": jnp.asarray(rng.normal(0, 1, (WIDTH, D)), jnp.float32),
            "words": jnp.asarray(rng.normal(0, 1, (tok.vocab_size, WIDTH)), jnp.float32),
            "w3": jnp.asarray(rng.normal(0, 1, (WIDTH, D)), jnp.float32),
            "logit_scale": jnp.asarray(np.log(10.0), jnp.float32)}
  images = jnp.asarray(rng.uniform(size=(B, SIZE, SIZE, 3)), jnp.float32)
  cands = multimodal.bucketed_candidates(CAPTIONS, tok, LexiconSource(table))
  clean_ids, clean_mask = jax.jit(assemble)(cands)  # one compilation, not one per operation
  return types.SimpleNamespace(encoder=BagEncoder(tok.pad_id), params=params, images=images, cands=cands,
                               clean_ids=clean_ids, clean_mask=clean_mask, key=jax.random.key(0))


def _image_guided_text(w, images):
  """The text attack away from `images` (each caption guided by its own image), as SGA and MAT run it."""
  guide = multimodal.caption_guides(w.encoder, w.params, images, captions_per_image=K)
  return text_attack(w.encoder, w.params, w.cands, guide, objective="image")


def _changed(a, b) -> np.ndarray:
  """Per row: whether two (N, L) id arrays or two (B, H, W, 3) image batches differ."""
  a, b = np.asarray(a), np.asarray(b)
  return (a != b).reshape(a.shape[0], -1).any(axis=1)


def test_sga_stages_are_guided_by_the_previous_stage(world):
  w = world
  result = multimodal.set_guidance_attack(w.encoder, w.params, w.images, w.cands, w.key, eps=EPS, step_size=STEP,
                                          steps=STEPS)
  # (1) The captions pushed away from the clean image (the attack changes most of them).
  first = _image_guided_text(w, w.images)
  assert _changed(first.input_ids, w.clean_ids).any()

  # (2) The image PGD against step 1's adversarial captions, on the image and its rescaled views. Against the
  # clean captions, or at one scale only, it ends elsewhere.
  def image_stage(ids, mask, scales=losses.SGA_SCALES):
    return multimodal._sga_images(w.encoder, w.params, w.images, ids, mask, jnp.ones((B, K)), w.key, EPS, STEP,
                                  STEPS, 0.05, norm="linf", scales=scales)

  np.testing.assert_array_equal(result.images, image_stage(first.input_ids, first.attention_mask))
  assert _changed(result.images, image_stage(w.clean_ids, w.clean_mask)).all()
  assert _changed(result.images, image_stage(first.input_ids, first.attention_mask, scales=())).all()

  # (3) The text attack again from the clean captions, now away from the adversarial image: some captions
  # change differently than away from the clean image (step 1's).
  final = _image_guided_text(w, result.images)
  for field in ("input_ids", "changed_words", "changed_candidates", "objective"):
    np.testing.assert_array_equal(getattr(result.text, field), getattr(final, field), err_msg=field)
  assert _changed(result.text.input_ids, first.input_ids).any()


@functools.partial(jax.jit, static_argnames="encoder")
def _co_attack_pgd(encoder, params, images, ids, mask, key, step_size, alpha):
  """PGD on Co-Attack's loss (`losses.co_attack`) guided by the captions ids/mask, K per image."""
  texts = encoder.text_features(params, ids, mask).reshape(B, K, -1)
  loss = losses.co_attack(encoder, params, encoder.image_features(params, images), texts, alpha=alpha)
  return image_attacks.pgd(loss, images, key, eps=EPS, step_size=step_size, steps=STEPS)


def test_co_attack_ascends_its_loss_with_the_text_term_of_its_adversarial_captions(world):
  w = world
  # Any adversarial captions do as the text stage: the image-guided ones, compiled once for this file, save
  # compiling BERT-Attack's KL text attack.
  text = _image_guided_text(w, w.images)
  result = multimodal.collaborative_attack(w.encoder, w.params, w.images, w.cands, w.key, eps=EPS, steps=STEPS,
                                           text=text)
  assert result.text is text
  step = attack_specs.step_size_for(EPS, STEPS, None, attack_specs.CO_STEP_SCALE)

  def direct(ids, mask, alpha):
    return _co_attack_pgd(w.encoder, w.params, w.images, ids, mask, w.key, step, alpha)

  # The default alpha (3) on the adversarial captions. 1e-6: another program's float32 round-off; a
  # different sign anywhere moves a pixel by a step (0.2 here).
  np.testing.assert_allclose(result.images, direct(text.input_ids, text.attention_mask, attack_specs.CO_ALPHA),
                             rtol=0, atol=1e-6)
  for ids, mask, alpha in ((text.input_ids, text.attention_mask, 0.0),  # the image term alone
                           (w.clean_ids, w.clean_mask, attack_specs.CO_ALPHA)):  # the clean captions
    assert np.abs(np.asarray(result.images - direct(ids, mask, alpha))).max() > step / 2


def test_mat_image_attack_ascends_against_the_adversarial_captions(world):
  w = world
  spec = attack_specs.get("mat").replace(eps=EPS, steps=STEPS, step_size=STEP)
  ids, mask = (x.reshape(B, K, -1) for x in (w.clean_ids, w.clean_mask))
  result = runner.run_attack(spec, w.encoder, w.params, runner.AttackInputs(w.images, ids, mask, candidates=w.cands),
                             w.key)
  # Its text stage: the captions pushed away from the clean image.
  np.testing.assert_array_equal(result.text.input_ids, _image_guided_text(w, w.images).input_ids)
  assert _changed(result.text.input_ids, w.clean_ids).any()

  def image_stage(guide_ids, guide_mask):
    """The runner's PGD on the contrastive loss, guided by guide_ids/mask, with the run's key and budget."""
    return runner._defense_images(w.encoder, w.params, w.params, w.images, guide_ids, guide_mask, None, None, w.key,
                                  spec.eps, spec.pgd_step, spec.steps, spec.beta * spec.eps, loss=spec.loss,
                                  norm=spec.norm, neighbours=spec.neighbours)

  # MAT's defining property: the image is attacked against the adversarial captions, not the clean ones.
  np.testing.assert_array_equal(result.images, image_stage(result.text.input_ids, result.text.attention_mask))
  assert _changed(result.images, image_stage(w.clean_ids, w.clean_mask)).all()


def test_mat_unguided_keeps_its_text_attack_and_attacks_the_image_against_the_clean_captions(world):
  """MAT's `guided=False` ablation: the same text stage, and the image PGD of the clean captions (the study's
  question whether MAT's image robustness is what its guidance by the adversarial captions buys)."""
  w = world
  spec = MAT(guided=False, eps=EPS, steps=STEPS, step_size=STEP).inner_attack()
  assert spec == attack_specs.get("mat").replace(eps=EPS, steps=STEPS, step_size=STEP, kind="separate")
  ids, mask = (x.reshape(B, K, -1) for x in (w.clean_ids, w.clean_mask))
  result = runner.run_attack(spec, w.encoder, w.params, runner.AttackInputs(w.images, ids, mask, candidates=w.cands),
                             w.key)
  np.testing.assert_array_equal(result.text.input_ids, _image_guided_text(w, w.images).input_ids)

  def image_stage(guide_ids, guide_mask):
    return runner._defense_images(w.encoder, w.params, w.params, w.images, guide_ids, guide_mask, None, None, w.key,
                                  spec.eps, spec.pgd_step, spec.steps, spec.beta * spec.eps, loss=spec.loss,
                                  norm=spec.norm, neighbours=spec.neighbours)

  np.testing.assert_array_equal(result.images, image_stage(w.clean_ids, w.clean_mask))
  assert _changed(result.images, image_stage(result.text.input_ids, result.text.attention_mask)).all()
  # Only MAT's own kind of attack has a guidance to take away.
  for other in ("co", "sga"):
    with pytest.raises(InputError, match="guided=False .* needs an attack whose contrastive PGD follows"):
      MAT(guided=False, attack=other).inner_attack()
