"""BLIP through the generic train step, loop, mesh and checkpoints: a few steps, then an exact resume,
and the adversarial objectives (TeCoA, MAT) on a micro BLIP of the shapes world."""


import jax
import numpy as np
import pytest
from flax import nnx

from mat_jax import checkpoint as checkpoint_lib
from mat_jax import config as config_lib
from mat_jax import runs
from mat_jax.models import BLIP, load_blip
from mat_jax.training import loop

from helpers import MICRO_BLIP as MICRO


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  root = tmp_path_factory.mktemp("blip_train")
  with pytest.MonkeyPatch.context() as patch:  # module-scoped: the function-level fixture cannot serve
    patch.setenv("MAT_JAX_CACHE_DIR", str(root / "cache"))
    yield root


def micro_config(root, **sections):
  raw = {
      "name": "micro_blip",
      "model": {"source": "blip-tiny", "tokenizer": "shapes", "overrides": MICRO},
      "data": {"name": "shapes", "data_dir": str(root / "data"), "build_train": 32, "build_val": 8,
               "build_test": 8, "image_size": 16},
      "train": {"batch_size": 8, "steps": 4, "log_every": 2, "checkpoint_every": 2},
      "optimizer": {"name": "adam", "learning_rate": 1e-3},
      "schedule": {"name": "constant"},
  }
  for section, values in sections.items():
    raw.setdefault(section, {}).update(values)
  return config_lib.build(raw)


def _params(model):
  return {str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_blip_trains_exports_and_resumes_exactly(root):
  quiet = dict(log=lambda _: None, progress=False, evaluate=False)
  straight = root / "straight"
  loop.train(micro_config(root), straight, mesh_spec="1", **quiet)
  resumed = root / "resumed"
  loop.train(micro_config(root, train={"steps": 2}), resumed, mesh_spec="1", **quiet)
  loop.train(micro_config(root), resumed, mesh_spec="1", **quiet)  # steps 3 and 4 from checkpoint 2
  a, _ = runs.restore_model(straight)
  b, tokenizer = runs.restore_model(resumed)
  assert isinstance(a, BLIP) and isinstance(load_blip(straight / checkpoint_lib.MODEL_DIR), BLIP)
  assert tokenizer is not None and a.config.text.context_length == tokenizer.context_length
  pa, pb = _params(a), _params(b)
  assert pa.keys() == pb.keys()
  for name in pa:
    np.testing.assert_array_equal(pa[name], pb[name], err_msg=name)
  fresh = BLIP(a.config, rngs=nnx.Rngs(0))  # training moved the weights
  assert any(np.abs(pa[n] - v).max() > 1e-4 for n, v in _params(fresh).items() if n in pa)


@pytest.mark.parametrize("objective", [
    {"name": "tecoa", "eps": 2 / 255, "steps": 1, "step_size": 1 / 255},
    {"name": "mat", "eps": 2 / 255, "steps": 1, "step_size": 1 / 255, "text_changes": 1},
])
def test_adversarial_objectives_train_blip(root, objective):
  config = micro_config(root, objective=objective, train={"steps": 2, "checkpoint_every": 2},
                        text_attack={"source": "paraphrase", "top_k": 4})
  workdir = root / objective["name"]
  loop.train(config, workdir, mesh_spec="1", log=lambda _: None, progress=False, evaluate=False)
  model, _ = runs.restore_model(workdir)
  assert isinstance(model, BLIP)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(nnx.state(model)))


def test_blips_itm_only_parameters_keep_their_weights(root):
  # No objective gives the ITM head or the cross-attention a gradient; as trainable parameters AdamW's
  # decoupled weight decay alone shrank them, and the ITM re-ranking drifted.
  config = micro_config(root, train={"steps": 2, "checkpoint_every": 2, "towers": "all"},
                        optimizer={"name": "adamw", "learning_rate": 1e-2, "weight_decay": 0.5})
  initial = _params(runs.model_from_config(config)[0])
  workdir = root / "itm_kept"
  loop.train(config, workdir, mesh_spec="1", log=lambda _: None, progress=False, evaluate=False)
  trained = _params(runs.restore_model(workdir)[0])
  itm_only = [n for n in initial if "itm_head" in n or "cross" in n]
  assert any("itm_head" in n for n in itm_only) and any("cross" in n for n in itm_only)
  for name in itm_only:
    np.testing.assert_array_equal(trained[name], initial[name], err_msg=name)
  assert any(np.abs(trained[n] - initial[n]).max() > 1e-4 for n in initial
             if n.startswith("('text'") and n not in itm_only)


def test_weight_decay_takes_the_same_parameters_of_blip_and_clip():
  # Matrices only, whatever their storage: BLIP keeps its class token as (1, 1, W), CLIP as (W,); both are
  # vectors, and both towers' position tables and kernels are matrices.
  from mat_jax.models import CLIP, blip_config, clip_config
  from mat_jax.training import optim

  def decayed(model):
    mask = optim._decay_mask(nnx.state(nnx.eval_shape(model), nnx.Param))
    def name(path):
      return ".".join(n for n in (str(getattr(k, "key", "")) for k in path) if n not in ("", "value"))
    return {name(path): bool(flag) for path, flag in jax.tree_util.tree_leaves_with_path(mask)}

  blip = decayed(lambda: BLIP(blip_config("blip-tiny"), rngs=nnx.Rngs(0)))
  clip = decayed(lambda: CLIP(clip_config("tiny"), rngs=nnx.Rngs(0)))
  for flags in (blip, clip):
    cls = [k for k in flags if k.startswith("vision.") and "class_embedding" in k]
    position = [k for k in flags if k.startswith("vision.") and "position" in k]
    assert cls and position, sorted(flags)[:20]
    assert not any(flags[k] for k in cls) and all(flags[k] for k in position)
    assert not any(v for k, v in flags.items() if k.endswith(("bias", "scale")))



def test_a_blip_takes_any_context_length_its_positions_hold(tmp_path):
  """A BLIP's 35 tokens per caption are a tokenisation choice: model.context_length may go up to the text
  model's positions (it was refused above 35, naming 35 as the positions)."""
  import dataclasses

  from mat_jax.data import shapes
  from mat_jax.models import blip_config, save_blip

  tiny = blip_config("blip-tiny")
  cfg = tiny.replace(text=dataclasses.replace(tiny.text, max_position_embeddings=64, context_length=20))
  directory = tmp_path / "blip64"
  shapes.build_tokenizer(directory)
  save_blip(BLIP(cfg, rngs=nnx.Rngs(0)), directory)
  for length in (24, 40):
    config = config_lib.build({"name": "x", "model": {"source": str(directory), "context_length": length},
                               "data": {"name": "shapes", "image_size": cfg.vision.image_size}})
    model, tokenizer = runs.model_from_config(config)
    assert tokenizer.context_length == length and model.config.text.positions == 64
    # The model takes the tokenizer's captions (BLIP checks ids against its positions only).
    tokens = tokenizer(["a red square"])
    assert model.encode_text(tokens.input_ids, tokens.attention_mask).shape == (1, cfg.embed_dim)
  config = config_lib.build({"name": "x", "model": {"source": str(directory), "context_length": 80},
                             "data": {"name": "shapes", "image_size": cfg.vision.image_size}})
  with pytest.raises(config_lib.ConfigError, match="model.context_length=80 but the text model of .* has 64 "
                                                   "positions; set model.context_length=64 or less"):
    runs.model_from_config(config)
