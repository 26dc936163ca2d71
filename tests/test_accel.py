"""Accelerator paths checked on CPU: fused attention (XLA, and the cuDNN path's padding and masks run
through XLA), layers scanned with `lax.scan`, rematerialised blocks, bf16 compute: each gives the
einsum/unrolled float32 numbers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import helpers

from mat_jax import runtime
from mat_jax.models import CLIP, clip_config, feature_products, layers, split


@pytest.fixture(autouse=True)
def highest_precision():
  with jax.default_matmul_precision("highest"):
    yield


def _config(**changes):
  cfg = clip_config("tiny")
  # Three text and four image blocks: a scan runs over two or three of them.
  return cfg.replace(vision=dataclasses.replace(cfg.vision, layers=4),
                     text=dataclasses.replace(cfg.text, layers=3), **changes)


def _texts():
  ids = np.zeros((3, 11), np.int32)
  mask = np.zeros_like(ids)
  for row, n in enumerate((4, 9, 6)):
    ids[row, :n] = [2, *range(10 + row, 8 + row + n), 3]
    mask[row, :n] = 1
  return jnp.asarray(ids), jnp.asarray(mask)


def _outputs(encoder, params):
  """Image features and their pixel gradient; text features, cache and a cached continuation; the
  gradient of the text features with respect to the parameters. One program per model: its parts share
  their forward passes, which compiles faster than five programs."""
  images = jax.random.uniform(jax.random.key(1), (2, 48, 48, 3))
  ids, mask = _texts()

  @jax.jit
  def outputs(params, images, ids, mask, start):
    feats = encoder.image_features(params, images)
    pixel_grad = jax.grad(lambda x: jnp.sum(encoder.image_features(params, x) ** 2))(images)
    text, cache = encoder.text_features_and_cache(params, ids, mask)
    continued = encoder.text_features_continued(params, cache, start, ids[:, 3:])
    param_grad = jax.grad(lambda p: jnp.sum(encoder.text_features(p, ids, mask) ** 2))(params)
    return feats, pixel_grad, text, cache, continued, param_grad

  return outputs(params, images, ids, mask, jnp.array([1, 3, 2]))


def _max_diff(a, b) -> float:
  # numpy: eager jax ops would compile a kernel per leaf shape.
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _assert_same(got, want) -> None:
  """Features and caches to 1e-5 (the parity bound); parameter gradients, whose entries reach the hundreds,
  to the same 1e-5 relative to each tensor's largest magnitude when that exceeds 1 (float32 round-off of
  differently ordered sums grows with the values)."""
  *values, param_grad = got
  *want_values, want_grad = want
  assert _max_diff(values, want_values) <= 1e-5
  for x, y in zip(jax.tree.leaves(param_grad), jax.tree.leaves(want_grad), strict=True):
    x, y = np.asarray(x), np.asarray(y)
    assert float(np.max(np.abs(x - y))) <= 1e-5 * max(float(np.max(np.abs(y))), 1.0)


@pytest.fixture(scope="module")
def reference():
  # A module fixture is set up before the function-scoped precision fixture: set it here too (on a GPU the
  # default float32 matmul is TF32, 1e-3 off).
  with jax.default_matmul_precision("highest"):
    encoder, params = split(CLIP(_config(attention="einsum"), rngs=nnx.Rngs(0)))
    return params, _outputs(encoder, params)


@pytest.mark.parametrize("changes", [dict(attention="xla"), dict(scan_layers=True),
                                     dict(scan_layers=True, attention="xla"), dict(remat="nothing_saveable"),
                                     dict(scan_layers=True, remat="dots_with_no_batch_dims_saveable")], ids=str)
def test_paths_match_the_einsum_unrolled_model(reference, changes):
  params, expected = reference
  # The path's own parameters only as shapes (no initialisation to run): the reference's are evaluated.
  encoder, own = split(nnx.eval_shape(lambda: CLIP(_config(**changes), rngs=nnx.Rngs(0))))
  assert jax.tree.structure(own) == jax.tree.structure(params)  # same parameter tree: checkpoints load
  _assert_same(_outputs(encoder, params), expected)


def test_continuation_matches_whole_text_with_scan_and_fused_attention():
  encoder, params = split(CLIP(_config(scan_layers=True, attention="xla"), rngs=nnx.Rngs(0)))
  ids, mask = _texts()
  whole, cache = jax.jit(encoder.text_features_and_cache)(params, ids, mask)
  start = np.array([2, 5, 1])  # at most each text's end-token position
  # Each text from `start` on, padded back to the full length (positions after the end token are not read).
  tail = np.stack([np.pad(np.asarray(ids)[i, s:], (0, s)) for i, s in enumerate(start)])
  continued = jax.jit(encoder.text_features_continued)(params, cache, jnp.asarray(start), jnp.asarray(tail))
  assert _max_diff(continued, whole) <= 1e-5


@pytest.mark.parametrize("q_len,k_len", [(197, 197), (1, 77), (9, 20)])
def test_cudnn_padding_and_masks_keep_the_numbers(q_len, k_len):
  """The cuDNN path pads queries and keys to a multiple (64 unless set) and passes the true lengths; run
  through XLA here, it must equal the unpadded attention, masks included, values and gradients."""
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (2, q_len, 4, 16))
  k = jax.random.normal(keys[1], (2, k_len, 4, 16))
  v = jax.random.normal(keys[2], (2, k_len, 4, 16))
  causal_padding = (jnp.arange(k_len)[None, None, None, :] <= (jnp.arange(q_len)[:, None] + k_len - q_len)) & (
      jnp.arange(k_len) < jnp.array([k_len, k_len - 3])[:, None, None, None])
  for mask in (None, causal_padding):
    def loss(q, k, v, pad, mask=mask):
      out = layers.dot_product_attention(q, k, v, mask, implementation="xla", pad_multiple=pad)
      return jnp.sum(jnp.sin(out)), out
    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
    (_, want), grads_want = value_and_grad(q, k, v, 1)
    for pad in (2, 64):  # an odd length made even, and the default multiple
      (_, got), grads_got = value_and_grad(q, k, v, pad)
      assert got.shape == want.shape
      assert _max_diff(got, want) <= 1e-5
      assert _max_diff(grads_got, grads_want) <= 1e-5
      assert all(np.isfinite(np.asarray(g)).all() for g in grads_got)


@pytest.mark.parametrize("changes", [dict(), dict(scan_layers=True)], ids=str)
def test_tokens_a_tower_adds_for_fused_attention_change_nothing(monkeypatch, changes):
  """The image tower run on extra tokens (`layers.tower_length`, as on the cuDNN path with an even length
  multiple), hidden as keys, gives the features, pixel gradients and parameter gradients of its own
  length: run through XLA's attention here, with one and with three tokens added."""
  encoder, params = split(CLIP(_config(attention="xla", **changes), rngs=nnx.Rngs(0)))
  images = jax.random.uniform(jax.random.key(1), (2, 48, 48, 3))

  def outputs(params, images):
    feats = encoder.image_features(params, images)
    pixel_grad = jax.grad(lambda x: jnp.sum(encoder.image_features(params, x) ** 2))(images)
    param_grad = jax.grad(lambda p: jnp.sum(encoder.image_features(p, images) ** 2))(params)
    return feats, pixel_grad, param_grad

  want = jax.jit(outputs)(params, images)
  for extra in (1, 3):
    lengths = []
    def padded(length, attention, dtype, extra=extra, lengths=lengths):
      lengths.append(length)
      return length + extra
    monkeypatch.setattr(layers, "tower_length", padded)
    jax.clear_caches()  # the encoder's jitted functions would reuse their programs traced without it
    _assert_same(jax.jit(outputs)(params, images), want)
    assert lengths and set(lengths) == {1 + (48 // 16) ** 2}  # the class token and the patches
  jax.clear_caches()  # nor may later tests find these programs


def test_towers_add_tokens_only_where_cheap_and_on_the_cudnn_path(monkeypatch):
  monkeypatch.delenv("MAT_JAX_CUDNN_LENGTH_MULTIPLE", raising=False)
  assert [layers.tower_length(n, "cudnn", jnp.bfloat16) for n in (197, 256, 77)] == [197, 256, 77]  # 64: too dear
  monkeypatch.setenv("MAT_JAX_CUDNN_LENGTH_MULTIPLE", "2")
  assert [layers.tower_length(n, "cudnn", jnp.bfloat16) for n in (197, 198, 77, 9)] == [198, 198, 78, 9]
  assert layers.tower_length(197, "xla", jnp.bfloat16) == 197
  assert layers.tower_length(197, "einsum", jnp.bfloat16) == 197
  assert layers.key_mask(5, 5) is None
  assert np.asarray(layers.key_mask(5, 6)).tolist() == [[[[True] * 5 + [False]]]]


def test_attention_paths_resolve_by_platform():
  # CI runs on CPU; `JAX_PLATFORMS=cuda pytest tests/test_accel.py` checks a GPU.
  want = {"cpu": ("einsum", "einsum"), "gpu": ("xla", "cudnn")}.get(jax.default_backend(), ("xla", "xla"))
  assert (layers.attention_path("auto", jnp.float32), layers.attention_path("auto", jnp.bfloat16)) == want
  assert layers.attention_path("cudnn", jnp.float32) == "cudnn"
  with pytest.raises(ValueError, match="unknown attention 'flash'"):
    layers.attention_path("flash", jnp.float32)
  with pytest.raises(ValueError, match="unknown attention"):
    clip_config("tiny", attention="flash")


def _relative(got, want) -> float:
  """‖got − want‖ / ‖want‖ over all the leaves of a tree together, in float32."""
  def flat(tree):
    return np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(tree)])
  return float(np.linalg.norm(flat(got) - flat(want)) / np.linalg.norm(flat(want)))


gpu_only = pytest.mark.skipif(
    jax.default_backend() != "gpu",
    reason="cuDNN attention needs an NVIDIA GPU: JAX_PLATFORMS=cuda pytest tests/test_accel.py")


@gpu_only
@pytest.mark.parametrize("q_len,k_len", [(197, 197), (1, 77), (9, 20)])
def test_cudnn_attention_matches_xla_on_gpu(q_len, k_len):
  """The real cuDNN kernel (bf16, padded to 64 with sequence lengths) against XLA's attention in float32 on
  the same bf16 inputs: values and gradients within bf16 round-off, masks included."""
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(key, (2, n, 12, 64)).astype(jnp.bfloat16)
             for key, n in zip(keys, (q_len, k_len, k_len), strict=True))
  causal_padding = (jnp.arange(k_len)[None, None, None, :] <= (jnp.arange(q_len)[:, None] + k_len - q_len)) & (
      jnp.arange(k_len) < jnp.array([k_len, k_len - 3])[:, None, None, None])
  for mask in (None, causal_padding):
    def loss(q, k, v, implementation, pad, mask=mask):
      out = layers.dot_product_attention(q, k, v, mask, implementation=implementation, pad_multiple=pad)
      return jnp.sum(jnp.sin(out.astype(jnp.float32))), out
    grad = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
    (_, got), grads_got = jax.jit(grad, static_argnums=(3, 4))(q, k, v, "cudnn", runtime.cudnn_length_multiple())
    f32 = [t.astype(jnp.float32) for t in (q, k, v)]
    (_, want), grads_want = jax.jit(grad, static_argnums=(3, 4))(*f32, "xla", 1)
    assert got.dtype == jnp.bfloat16 and got.shape == want.shape
    assert _relative(got, want) <= 1e-2
    assert _relative(grads_got, grads_want) <= 2e-2


@gpu_only
def test_bf16_model_on_cudnn_matches_xla_on_gpu():
  """The whole model in bf16 on the "auto" path (cuDNN attention on a GPU) against the same parameters with
  XLA's attention in float32: features, pixel gradients, the text cache and its cached continuation, and
  parameter gradients within bf16 round-off."""
  encoder, params = split(CLIP(_config(attention="auto", dtype="bfloat16"), rngs=nnx.Rngs(0)))
  reference, _ = split(nnx.eval_shape(lambda: CLIP(_config(attention="xla"), rngs=nnx.Rngs(0))))
  assert layers.attention_path("auto", jnp.bfloat16) == "cudnn"
  got, want = _outputs(encoder, params), _outputs(reference, params)
  for name, x, y in zip(("features", "pixel grad", "text", "cache", "continued", "param grad"), got, want,
                        strict=True):
    assert _relative(x, y) <= 3e-2, name


def test_bf16_compute_keeps_pgd_as_strong():
  """PGD run with bfloat16 compute (float32 parameters, images and loss) lowers the float32 model's
  image-caption cosine by at least 90% as much as PGD run in float32: the attack stays as strong."""
  from mat_jax.attacks import image as image_attacks
  from mat_jax import runs

  model = CLIP(clip_config("tiny"), rngs=nnx.Rngs(0))
  f32, params = split(model)
  bf16, bf16_params = split(runs.with_options(model, dtype="bfloat16"))
  assert bf16.config.dtype == "bfloat16"
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bf16_params))  # parameters stay float32
  images = jax.random.uniform(jax.random.key(2), (8, 48, 48, 3))
  ids = jnp.asarray(np.array([[2, 5 + i, 9 + i, 3] + [0] * 20 for i in range(8)], np.int32))
  mask = (ids > 0).astype(jnp.int32).at[:, 0].set(1)

  @jax.jit
  def cosine(x):  # the float32 model's paired cosine, whatever computed the attack
    return jnp.mean(jnp.sum(f32.image_embeddings(params, x) * f32.text_embeddings(params, ids, mask), -1))

  kw = dict(eps=4 / 255, step_size=1 / 255, steps=10)
  clean = float(cosine(images))
  drops = {}
  for name, encoder in (("float32", f32), ("bfloat16", bf16)):
    adv = image_attacks.pgd_attack(encoder, params, images, ids, mask, jax.random.key(0), **kw)
    assert adv.dtype == jnp.float32
    drops[name] = clean - float(cosine(adv))
  assert drops["float32"] > 0.01, drops  # the attack does something at this budget
  assert drops["bfloat16"] >= 0.9 * drops["float32"], drops


def _sub_jaxprs(eqn):
  for value in eqn.params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


def test_a_towers_blocks_share_one_traced_program():
  """The blocks of a tower (one structure, one input shape) are traced once and called as one program
  (`layers.shared_call`, a trace-time saving; XLA inlines the calls): the blocks that keep every row
  (four image blocks' first three, three text blocks' first two) call one program per tower. The
  numbers are those of the unrolled einsum model (tested above)."""
  encoder, params = split(CLIP(_config(), rngs=nnx.Rngs(0)))
  ids, mask = _texts()
  images = jnp.zeros((2, 48, 48, 3))

  def features(params, images):
    image = jax.grad(lambda x: encoder.image_features(params, x).sum())(images)
    return image, encoder.text_features(params, ids, mask)

  calls = {}

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.params.get("name") == "_shared_call":
        calls.setdefault(id(eqn.params["jaxpr"].jaxpr), []).append(eqn)
      for sub in _sub_jaxprs(eqn):
        walk(sub)

  walk(jax.make_jaxpr(features)(params, images).jaxpr)
  # Text: 2 calls of one program; image: 3 calls of its linearised program, and 3 of its transpose in
  # the gradient's backward pass. One program per block would give eight programs of one call each.
  assert sorted(len(eqns) for eqns in calls.values()) == [2, 3, 3]


def test_remat_keeps_less_of_the_scanned_blocks_for_the_backward_pass():
  """Rematerialisation must change what the compiled gradient holds, not only pass the parity test above
  (which a policy left unused would pass too). On XLA:CPU, which drops the recomputation's optimization
  barriers, this shows in the scanned blocks' stacked residuals (docs/performance.md)."""
  def temp_bytes(remat):
    cfg = _config(scan_layers=True, remat=remat)
    encoder, params = split(nnx.eval_shape(lambda: CLIP(cfg, rngs=nnx.Rngs(0))))
    pixel_and_param_grad = jax.jit(jax.grad(lambda p, x: jnp.sum(encoder.image_features(p, x) ** 2), argnums=(0, 1)))
    images = jax.ShapeDtypeStruct((16, 48, 48, 3), jnp.float32)
    return pixel_and_param_grad.lower(params, images).compile().memory_analysis().temp_size_in_bytes

  kept_all, kept_nothing = temp_bytes("none"), temp_bytes("nothing_saveable")
  assert kept_nothing < 0.75 * kept_all, (kept_nothing, kept_all)


def test_unknown_remat_policy_is_refused():
  with pytest.raises(ValueError, match="unknown remat policy 'everything'.*nothing_saveable"):
    _config(remat="everything")


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_feature_products_of_the_losses_run_in_full_float32_on_every_backend(monkeypatch, backend):
  """A float32 product at JAX's default precision is one bfloat16 pass on a TPU and TF32 on an NVIDIA GPU:
  the similarity products of every loss and attack objective ask for full float32 there (lowered here for
  the CPU with the backend's name faked: the precision asked for is in the lowered program)."""
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  from mat_jax.attacks import losses, text
  from mat_jax.objectives.contrastive import contrastive_loss

  # The stand-in's own products are (B, 48) @ (48, 6) and (B, 6) @ (6, 8); the losses' are the rest.
  encoder = helpers.MLPEncoder()
  params = {"w1": jnp.ones((4 * 4 * 3, 6)) / 10, "w2": jnp.ones((6, 8)), "logit_scale": jnp.asarray(4.6)}
  images, key = jnp.ones((2, 4, 4, 3)) / 2, jax.random.key(0)
  texts, captions = jnp.ones((3, 8)), jnp.ones((2, 2, 8)) / 8 ** 0.5
  programs = {
      "contrastive_loss": (lambda a, b: contrastive_loss(a, b, 100.0, jnp.arange(2), jnp.arange(3) % 2)[0],
                           (jnp.ones((2, 8)), texts)),
      "retrieval_logits": (lambda x: losses.retrieval_logits(encoder, params, texts)(x), (images,)),
      "paired_cosine": (lambda x: losses.paired_cosine(encoder, params, captions)(x, key), (images,)),
      "mava_terms": (lambda x: losses.mava_terms(encoder, params, x, key, jnp.ones((2, 8)), captions,
                                                  neighbours=2, radius=0.01), (images,)),
      "text.image_objective": (text.image_objective, (jnp.ones((2, 3, 8)), jnp.ones((2, 8)))),
  }
  for name, (fn, args) in programs.items():
    with jax.default_matmul_precision("default"):  # not this file's "highest", which every product would show
      products = [line for line in jax.jit(fn).lower(*args).as_text().splitlines() if "dot_general" in line]
    similarity = [line for line in products if not ("tensor<48x6xf32>" in line or "tensor<6x8xf32>" in line)]
    assert similarity and all("precision = [HIGHEST, HIGHEST]" in line for line in similarity), (name, products)


def test_feature_products_keep_the_cpus_own_float32_product():
  """On a CPU the default already is float32: the CPU's programs (and their compilation-cache entries) stay
  those of the default product."""
  with jax.default_matmul_precision("default"):
    lowered = jax.jit(lambda a, b: feature_products("bd,td->bt", a, b)).lower(jnp.ones((2, 8)), jnp.ones((3, 8)))
  assert "precision = [DEFAULT, DEFAULT]" in lowered.as_text()


@pytest.mark.parametrize("platform_version, want", [("cuda 12080", "cudnn"), ("rocm 60300", "xla")])
def test_auto_attention_takes_cudnn_on_nvidia_gpus_only(monkeypatch, platform_version, want):
  """JAX names AMD's ROCm backend "gpu" as it does CUDA's; cuDNN exists on NVIDIA's only."""
  class Device:
    client = type("Client", (), {"platform_version": platform_version})()

  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax, "devices", lambda *args: [Device()])
  assert layers.attention_path("auto", jnp.bfloat16) == want
  assert layers.attention_path("auto", jnp.float32) == "xla"
