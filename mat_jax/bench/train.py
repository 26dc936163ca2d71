"""`python -m mat_jax.bench train`: one MAT training step, mat_jax (its jitted step) vs PyTorch.

A randomly initialised transformers `CLIPModel` (ViT-B/16 by default) is saved and loaded into mat_jax,
so both sides train the same weights on the same batch (shapes-world images resized to the model's
resolution, captions tokenised by the shapes tokenizer, text-attack candidates from the world's synonym
table (the paraphrase source)).
The step is MAT's (mat_jax.objectives.mat):

  1. 1-word text attack guided by the clean image: word importance by masking each word ([UNK]) and
     KL of the softmaxed text embedding, then words in importance order, each word's candidates scored
     by minus the cosine similarity to the image, first improvement taken;
  2. 2-step L-inf PGD (eps 2/255, step 1/255) on the contrastive cross-entropy against the adversarial
     captions;
  3. contrastive loss on the adversarial pairs, gradients, AdamW update.

PyTorch runs it twice over: as the reference implementations do (`TorchMAT`: eager, in mat_jax's precision
(bf16 autocast when mat_jax computes in bfloat16), the text attack caption by caption, one batch of masked
texts per caption, one batch of candidates per word; PGD with autograd on the pixels, then
`loss.backward()` and `optimizer.step()`), and batched (`BatchedTorchMAT`: the text attack's texts built
once on the host, then encoded in three calls, no host round trip in the step) in the variants of
`--torch` (eager or torch.compile, float32 or bf16 autocast, on JAX's device;
`mat_jax.bench.torch_reference`), the strongest reference. All pad texts to the same length and see the
same candidates. mat_jax's first call and compile seconds are printed as soon as they are measured, each
reference's warm-up as it ends; then the implementations are timed round by round, one step of each per
round, so the machine's drift hits them alike. Printed: images/s of each, the ratio, mat_jax's achieved
GFLOP/s (XLA's count of the step, in which a loop body counts once: a lower bound; on a GPU, whose cost
analysis counts none, the count of the step lowered for the host's CPU) as a fraction of the
device's peak (a known accelerator's data sheet, else a matmul measured in the run), the number of
compilations of the step in the run (one per batch shape), and the machine's load average (other jobs slow
PyTorch more than XLA). The batch is `--batch` images per device (8 on CPU, 64 on an accelerator); mat_jax
computes in `--dtype` (auto: bfloat16 on GPU/TPU, the mixed-precision policy of
`python -m mat_jax.train`).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from typing import Any

import jax
import numpy as np

from mat_jax import checkpoint as checkpoint_lib
from mat_jax import errors, processes
from mat_jax import config as config_lib
from mat_jax import mesh as mesh_lib
from mat_jax import runs, runtime
from mat_jax.bench import common, torch_reference
from mat_jax.data import shapes
from mat_jax.models import layers, split
from mat_jax.models.clip import CLIP_MEAN, CLIP_STD, PRESETS, resolve_dtype
from mat_jax.models.weights import clip_config_to_hf, load_clip
from mat_jax.objectives.mat import MAT
from mat_jax.training import inputs, optim
from mat_jax.training import step as step_lib


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--preset", default="vit-b-16", choices=sorted(PRESETS), help="CLIP architecture")
  parser.add_argument("--batch", type=errors.positive_int, default=None,
                      help="images per step, on one device (default: 8 on CPU, 64 on an accelerator)")
  parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                      help="mat_jax compute dtype (auto: bfloat16 on GPU/TPU, float32 on CPU)")
  parser.add_argument("--remat", default="none", choices=layers.REMAT_POLICIES,
                      help="what mat_jax's backward pass keeps of each encoder block (CLIPConfig.remat)")
  parser.add_argument("--scan-layers", action="store_true",
                      help="mat_jax runs the encoder blocks as one lax.scan (CLIPConfig.scan_layers)")
  parser.add_argument("--steps", type=errors.positive_int, default=3,
                      help="timed steps of each implementation (median), one of each per round")
  parser.add_argument("--top-k", type=errors.positive_int, default=10, help="candidates per word")
  parser.add_argument("--max-targets", type=errors.positive_int, default=8, help="attackable words per caption")
  parser.add_argument("--no-torch", action="store_true", help="time mat_jax only")
  parser.add_argument("--torch", default=None, metavar="VARIANTS",
                      help="variants of the batched PyTorch step: eager, compile, eager-bf16, compile-bf16 or all "
                           "(default: eager on CPU, all on an accelerator)")


def _mat_step_fn(encoder, meta):
  """MAT's pure train step (1-word text attack, 2-step PGD at 2/255, AdamW): (step_fn, tx, is_trainable)."""
  objective = MAT(eps=2 / 255, steps=2, step_size=1 / 255, text_changes=1, candidate_meta=meta)
  settings = config_lib.build({"optimizer": {"name": "adamw", "learning_rate": 1e-5, "weight_decay": 0.1},
                               "schedule": {"name": "constant"}})
  schedule = optim.make_schedule(settings.schedule, 1e-5, 1000)
  tx = optim.make_optimizer(settings.optimizer, schedule)
  is_trainable = step_lib.trainable_filter("all")
  return step_lib.make_step_fn(encoder, objective, tx, is_trainable, schedule), tx, is_trainable


# The MAT step's programs, in the order it calls them (`step.TrainStep`).
STEP_PROGRAMS = ("text_stage", "attack", "gradient", "apply")


def mat_train_step(encoder, params, meta):
  """The train step of `python -m mat_jax.train` with MAT's objective (1-word text attack, 2-step PGD at
  2/255, AdamW) on a one-device mesh: (the jitted step, its initial state, the mesh)."""
  step_fn, tx, is_trainable = _mat_step_fn(encoder, meta)
  mesh = mesh_lib.make_mesh(1)
  shardings = step_lib.state_shardings(params, tx, is_trainable, mesh)
  state = step_lib.create_state(params, tx, is_trainable, 0, shardings)
  return step_lib.jit_step(step_fn, shardings, mesh), state, mesh


def step_call(step, state, batch: dict):
  """A zero-argument call of the train `step` on `batch`, each call from the state the last one made,
  returning (the new state, the metrics): a clock that waits on both waits for the step's last program, the
  optimizer's update, which the metrics (the gradient program's) do not."""
  holder = {"state": state}

  def call():
    holder["state"], metrics = step(holder["state"], batch, None)
    return holder["state"], metrics

  return call


def host_lowered_flops(encoder, params, meta, batch: dict) -> float:
  """XLA's FLOP count of the MAT step lowered for the host's CPU, from abstract arguments (nothing is
  allocated, nothing compiled), for devices whose cost analysis counts none: on GPUs it misses the cuBLAS
  and cuDNN custom calls. The program is the device's (its text-attack chunks and update guard follow the
  default backend) except attention, which takes the CPU's einsum path: cuDNN's kernel cannot be lowered
  for a CPU, and its padding to 64 tokens is not work the model needs. 0.0 when JAX has no CPU backend
  (JAX_PLATFORMS without cpu)."""
  try:
    cpu = jax.devices("cpu")[:1]
  except RuntimeError:
    return 0.0
  counting, _ = split(runs.with_options(encoder.merge(params), attention="einsum"))
  lowerings = lower_mat_step(counting, params, meta, batch, mesh_lib.make_mesh(1, devices=cpu))
  return sum(_flops(lowered.cost_analysis()) for lowered in lowerings)


def lower_mat_step(encoder, params, meta, batch: dict, mesh) -> list:
  """The MAT step of `mat_train_step` lowered for `mesh` from abstract arguments (params and the host batch
  give only shapes and dtypes: nothing is allocated or compiled), as the loop calls it: its programs'
  lowerings in the order the step calls them (STEP_PROGRAMS); `mesh` may be of compile-only devices
  (`bench.cross_compile`)."""
  step_fn, tx, is_trainable = _mat_step_fn(encoder, meta)
  shardings = step_lib.state_shardings(params, tx, is_trainable, mesh)
  abstract = jax.eval_shape(lambda p: step_lib.init_state(p, tx, is_trainable, 0), params)
  state = checkpoint_lib.abstract_like(abstract, shardings)
  rows = mesh_lib.batch_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=rows) for k, v in mesh_lib.device_arrays(batch).items()}
  return step_lib.jit_step(step_fn, shardings, mesh).lower(state, batch, None)


def memory_summary(compiled, name: str = "step") -> str:
  """What XLA allocates for a compiled program (`name`), from its memory analysis (the call that compiled it
  cached the executable: this compiles nothing)."""
  stats = compiled.memory_analysis()
  if stats is None:
    return "memory analysis not available on this backend"
  def mib(n: int) -> str:
    return f"{n / 2 ** 20:,.1f} MiB"

  return (f"compiled {name}'s memory: {mib(stats.temp_size_in_bytes)} temporaries (activations and workspace), "
          f"{mib(stats.argument_size_in_bytes)} arguments, {mib(stats.output_size_in_bytes)} outputs, "
          f"{mib(stats.alias_size_in_bytes)} of them donated")


def _flops(cost) -> float:
  """The 'flops' entry of a cost analysis (a dict, one per program in older JAX, or None)."""
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost or {}).get("flops", 0.0))


def mat_batch(size: int, batch: int, tokenizer, max_targets: int, top_k: int):
  """Shapes-world images (resized) and captions with paraphrase candidates (the synonym table), as the
  training pipeline gives."""
  from PIL import Image


  rng = np.random.default_rng(0)
  scenes = [shapes.sample_scene(rng) for _ in range(batch)]
  images = np.stack([np.asarray(Image.fromarray(shapes.render(s)).resize((size, size), Image.BICUBIC))
                     for s in scenes]).astype(np.float32) / 255.0
  captions = np.asarray([shapes.describe(s, rng) for s in scenes])
  tokens = tokenizer(list(captions))
  attach = inputs.AttachCandidates(
      tokenizer, inputs.make_source("paraphrase"), max_words=tokenizer.context_length - 2, max_pieces=4,
      top_k=top_k, max_targets=max_targets)
  out = attach({"images": images, "captions": captions, "input_ids": tokens.input_ids,
                "attention_mask": tokens.attention_mask, "image_ids": np.arange(batch, dtype=np.int32)})
  return out, attach.meta


# ----------------------------------------------------------------------------------------------------
# The PyTorch reference step.


class TorchMAT:
  """MAT's step in eager PyTorch on a transformers CLIPModel, structured as the references run it."""

  def __init__(self, model, batch: dict, meta, *, eps: float, step_size: float, steps: int, lr: float,
               device: Any = "cpu", variant: Any = None):
    import torch

    self.torch = torch
    self.device = torch.device(device)
    self.model = model.to(self.device)
    self.meta = meta
    self.eps, self.step_size, self.steps = eps, step_size, steps
    self.mean = torch.tensor(CLIP_MEAN, device=self.device).view(1, 3, 1, 1)
    self.std = torch.tensor(CLIP_STD, device=self.device).view(1, 3, 1, 1)
    self.images = torch.from_numpy(batch["images"].transpose(0, 3, 1, 2).copy()).to(self.device)
    self.batch = batch
    self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.1)
    # What calls the model (the batched subclass compiles these): normalised pixels -> image features,
    # (ids, mask) -> text features.
    self.image_features = lambda pixels: self.model.get_image_features(pixel_values=pixels).pooler_output
    self.text_features = lambda ids, mask: self.model.get_text_features(input_ids=ids,
                                                                        attention_mask=mask).pooler_output
    # `variant` runs them compiled and/or in bf16 autocast; the loops, backward and AdamW stay eager around
    # them (`torch_reference`), and what they return is scored in float32, as mat_jax scores.
    if variant is not None:
      self.image_features = variant.wrap(self.image_features, self.device)
      self.text_features = variant.wrap(self.text_features, self.device)

  # -- text helpers (host lists of word pieces -> padded id tensors)
  def _ids(self, texts: list[list[list[int]]]):
    torch, m = self.torch, self.meta
    ids = np.full((len(texts), m.context_length), m.pad_id, np.int64)
    mask = np.zeros_like(ids)
    for i, words in enumerate(texts):
      seq = [m.start_id] + [p for w in words for p in w][: m.context_length - 2] + [m.end_id]
      ids[i, : len(seq)] = seq
      mask[i, : len(seq)] = 1
    return torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device)

  def _text_features(self, texts):
    return self.text_features(*self._ids(texts)).float()

  def _caption(self, n: int):
    b = self.batch
    lengths = b["cand_word_lengths"][n]
    return [list(b["cand_word_pieces"][n, w, : lengths[w]]) for w in range(len(lengths)) if lengths[w] > 0]

  def text_attack(self, guide):
    """Per caption: importance of each attackable word, then greedy substitution (1 word)."""
    torch, b = self.torch, self.batch
    normalise = torch.nn.functional.normalize
    guide = guide.float()
    mask_word = list(b["cand_mask_pieces"][0, : b["cand_mask_length"][0]])
    adversarial = []
    for n in range(len(b["captions"])):
      words = self._caption(n)
      targets = [int(w) for w, ok in zip(b["cand_target_words"][n], b["cand_target_valid"][n], strict=True) if ok]
      clean = self._text_features([words])
      log_p = torch.log_softmax(normalise(clean, dim=-1), dim=-1)
      masked = [words[:w] + [mask_word] + words[w + 1:] for w in targets]
      if masked:
        log_q = torch.log_softmax(normalise(self._text_features(masked), dim=-1), dim=-1)
        importance = (log_p.exp() * (log_p - log_q)).sum(-1)
        order = [targets[i] for i in torch.argsort(-importance, stable=True).tolist()]
      else:
        order = []
      def score(feats, n=n):  # bound now: the loop moves on
        return -(normalise(feats, dim=-1) @ normalise(guide[n], dim=-1))
      keep = score(clean)[0]
      current = words
      for w in order:
        slot = targets.index(w)
        subs = [list(b["cand_sub_pieces"][n, slot, k, : b["cand_sub_lengths"][n, slot, k]])
                for k in range(b["cand_sub_lengths"].shape[2]) if b["cand_sub_lengths"][n, slot, k] > 0]
        if not subs:
          continue
        variants = [current[:w] + [s] + current[w + 1:] for s in subs]
        scores = score(self._text_features(variants))
        best = int(torch.argmax(scores))
        if scores[best] > keep:
          current = variants[best]
          break  # one word changed: the references stop here
      adversarial.append(current)
    return self._ids(adversarial)

  def step(self) -> float:
    torch = self.torch
    with torch.no_grad():
      guide = self.image_features(self._pixels(self.images))
      adv_ids, adv_mask = self.text_attack(guide)
    return self.update(adv_ids, adv_mask)

  def _pixels(self, images):
    return (images - self.mean) / self.std

  def update(self, adv_ids, adv_mask):
    """PGD on the images against the adversarial captions, then the contrastive loss, backward, AdamW."""
    torch = self.torch
    normalise = torch.nn.functional.normalize
    model, x, pixels = self.model, self.images, self._pixels
    with torch.no_grad():
      text = normalise(self.text_features(adv_ids, adv_mask), dim=-1)
      scale = model.logit_scale.exp().clamp(max=100.0)
    labels = torch.arange(len(x), device=self.device)
    adv = (x + torch.empty_like(x).uniform_(-self.eps, self.eps)).clamp(0, 1)
    for _ in range(self.steps):
      adv.requires_grad_(True)
      image = normalise(self.image_features(pixels(adv)).float(), dim=-1)
      loss = torch.nn.functional.cross_entropy(scale * image @ text.float().T, labels, reduction="sum")
      grad, = torch.autograd.grad(loss, adv)
      adv = adv.detach() + self.step_size * grad.sign()
      adv = torch.min(torch.max(adv, x - self.eps), x + self.eps).clamp(0, 1)
    image = normalise(self.image_features(pixels(adv)).float(), dim=-1)
    text = normalise(self.text_features(adv_ids, adv_mask).float(), dim=-1)
    logits = model.logit_scale.exp().clamp(max=100.0) * image @ text.T
    ce = torch.nn.functional.cross_entropy
    loss = 0.5 * (ce(logits, labels) + ce(logits.T, labels))
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    self.optimizer.step()
    return loss.detach()


class BatchedTorchMAT(TorchMAT):
  """The same step with the text attack batched over the whole batch: the strongest PyTorch reference.

  Every masked text (B x A) and every one-word substitution (B x A x K) is built once on the host, then
  encoded in three calls (clean, masked, substituted texts); each caption takes, among its words in
  importance order, the first whose best candidate lowers the similarity to its image, and that candidate:
  the per-caption loop's choice, without the loop (the speculative scoring mat_jax's attack also does).
  No host round trip inside the step. `variant` runs the feature functions compiled and/or in bf16
  autocast; PGD's loop, the backward and AdamW stay eager around them (`torch_reference`).
  """

  def __init__(self, model, batch: dict, meta, **kwargs):
    super().__init__(model, batch, meta, **kwargs)
    torch = self.torch
    mask_word = list(batch["cand_mask_pieces"][0, : batch["cand_mask_length"][0]])
    n, a, k = batch["cand_sub_lengths"].shape
    masked, substituted = [], []
    for i in range(n):
      words = self._caption(i)
      for slot in range(a):
        w = int(batch["cand_target_words"][i, slot])
        usable = bool(batch["cand_target_valid"][i, slot]) and w < len(words)
        masked.append(words[:w] + [mask_word] + words[w + 1:] if usable else words)
        for c in range(k):
          length = int(batch["cand_sub_lengths"][i, slot, c]) if usable else 0
          piece = list(batch["cand_sub_pieces"][i, slot, c, :length])
          substituted.append(words[:w] + [piece] + words[w + 1:] if length else words)
    self.clean_ids, self.clean_mask = self._ids([self._caption(i) for i in range(n)])
    self.masked_ids, self.masked_mask = self._ids(masked)
    self.sub_ids, self.sub_mask = self._ids(substituted)
    self.target_valid = torch.from_numpy(np.asarray(batch["cand_target_valid"], bool)).to(self.device)
    self.sub_valid = torch.from_numpy(np.asarray(batch["cand_sub_lengths"]) > 0).to(self.device) & \
        self.target_valid[..., None]
    self.shape = (n, a, k)

  def text_attack(self, guide):
    torch = self.torch
    normalise = torch.nn.functional.normalize
    n, a, k = self.shape
    def features(ids, mask):
      return self.text_features(ids, mask).float()
    clean = features(self.clean_ids, self.clean_mask)
    log_p = torch.log_softmax(normalise(clean, dim=-1), dim=-1)
    log_q = torch.log_softmax(normalise(features(self.masked_ids, self.masked_mask), dim=-1), dim=-1)
    importance = (log_p.exp()[:, None] * (log_p[:, None] - log_q.view(n, a, -1))).sum(-1)
    guide = normalise(guide.float(), dim=-1)
    keep = -(normalise(clean, dim=-1) * guide).sum(-1)                                        # (n,)
    subs = normalise(features(self.sub_ids, self.sub_mask), dim=-1).view(n, a, k, -1)
    scores = torch.where(self.sub_valid, -(subs * guide[:, None, None]).sum(-1), -torch.inf)  # (n, a, k)
    best_score, best = scores.max(-1)
    improves = best_score > keep[:, None]
    # The most important improving word; argmax takes the first of equals, as a stable argsort would.
    slot = torch.where(improves, importance, -torch.inf).argmax(-1)
    rows = torch.arange(n, device=self.device)
    chosen = (rows * a + slot) * k + best[rows, slot]
    changed = improves.any(-1)[:, None]
    return (torch.where(changed, self.sub_ids[chosen], self.clean_ids),
            torch.where(changed, self.sub_mask[chosen], self.clean_mask))


# ----------------------------------------------------------------------------------------------------

MAT_JAX = "mat_jax (jit)"


def torch_references(model, batch: dict, meta, *, dtype: str, variants: list, device: Any) -> dict:
  """The PyTorch steps `bench train` times, by row name: (step, sync). The references' per-caption loop
  runs eager in mat_jax's compute dtype `dtype` (bf16 autocast for bfloat16, as the batched bf16
  variants), so its ratio compares implementations, not precisions; the batched step in each variant."""
  sync = torch_reference.synchronizer(device)
  settings = dict(eps=2 / 255, step_size=1 / 255, steps=2, lr=1e-5, device=device)
  loop_variant = torch_reference.for_dtype(dtype)
  programs = {f"{loop_variant.name}, per-caption loop": (
      TorchMAT(model, batch, meta, variant=loop_variant, **settings).step, sync)}
  for variant in variants:
    programs[f"{variant.name}, batched"] = (BatchedTorchMAT(model, batch, meta, variant=variant, **settings).step,
                                            sync)
  return programs


def time_against_references(jax_step, first_call: float, references: dict, *, rounds: int, where: str,
                            load: common.LoadWatch | None = None) -> dict[str, float]:
  """Median seconds per step of mat_jax's `jax_step` (whose first call took `first_call` seconds) and of
  each `references[name] = (step, sync)`. mat_jax's compile figures are printed at once, before the
  references' warm-up (torch.compile can take minutes), and each warm-up as it ends; then one step of
  each per round, so the machine's drift hits them alike (the ratio is taken under the same conditions)."""
  start = time.perf_counter()
  common.block(jax_step())
  steady = time.perf_counter() - start
  print(f"mat_jax: first call {first_call:.1f} s, then {steady:.3f} s: compiled in {first_call - steady:.1f} s "
        f"(trace, lowering and compilation; {where})", flush=True)

  def warmed(name, seconds):
    if name != MAT_JAX:
      print(f"{name}: first step (warm-up) {seconds:.1f} s", flush=True)

  seconds, _ = common.interleaved_medians({MAT_JAX: (jax_step, common.block), **references}, rounds=rounds,
                                          seconds=0.0, load=load, warmed=warmed)
  return seconds


def run(args: argparse.Namespace) -> int:
  import torch
  import transformers


  variants = torch_reference.parse_variants(args.torch)  # before minutes of compiling, not after
  load = common.LoadWatch()
  cores = processes.usable_cores()
  torch.set_num_threads(cores)
  on_cpu = jax.default_backend() == "cpu"
  # One device, as each PyTorch reference: a step over several devices against one would be a ratio of
  # device counts, and the FLOPs of the whole program over one device's peak too high by as much.
  global_batch = args.batch or (8 if on_cpu else 64)
  dtype = resolve_dtype(args.dtype)
  cfg = PRESETS[args.preset]
  size = cfg.vision.image_size
  tokenizer = shapes.tokenizer(context_length=cfg.text.context_length)
  # The shapes tokenizer's special ids (pad 0, start 2, end 3) in the model's text config: both sides
  # pool at the first end token (transformers' legacy argmax rule applies only to eos_token_id 2).
  cfg = cfg.replace(text=dataclasses.replace(cfg.text, bos_token_id=tokenizer.start_id,
                                             eos_token_id=tokenizer.end_id, pad_token_id=tokenizer.pad_id))
  print(f"train: one MAT step (1-word text attack, {2}-step PGD at 2/255, AdamW), CLIP {args.preset}, "
        f"batch {global_batch} on one device of {common.device_summary()}, "
        f"{size}x{size} images, texts of {cfg.text.context_length} tokens, mat_jax {dtype}, remat {args.remat}"
        f"{', scan_layers' if args.scan_layers else ''}")
  print(f"threads: PyTorch {torch.get_num_threads()}, JAX usable cores {cores}")

  transformers.utils.logging.disable_progress_bar()
  torch.manual_seed(0)
  hf = transformers.CLIPModel(transformers.CLIPConfig(**clip_config_to_hf(cfg)))
  with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(tmp, safe_serialization=True)
    encoder, params = split(runs.with_options(load_clip(tmp, dtype=dtype), remat=args.remat,
                                              scan_layers=args.scan_layers))
  batch, meta = mat_batch(size, global_batch, tokenizer, args.max_targets, args.top_k)

  # ---- mat_jax: the train step of `python -m mat_jax.train`
  step, state, mesh = mat_train_step(encoder, params, meta)
  device_batch = mesh_lib.global_batch(batch, mesh)

  jax_step = step_call(step, state, device_batch)

  # The compile time a user waits for: tracing and lowering (done here for the FLOP count; the first call
  # reuses them) and XLA's compilation, or its load from the persistent cache when that holds the program.
  # The FLOP count itself is off the clock: `python -m mat_jax.train` never makes it.
  start = time.perf_counter()
  lowerings = step.lower(state, device_batch, None)
  traced_and_lowered = time.perf_counter() - start
  flops = sum(_flops(lowered.cost_analysis()) for lowered in lowerings)
  start = time.perf_counter()
  common.block(jax_step())
  first_call = traced_and_lowered + time.perf_counter() - start
  counted_by = "XLA count"
  for name, lowered in zip(STEP_PROGRAMS, lowerings, strict=True):
    print(f"mat_jax: {memory_summary(lowered.compile(), name)}", flush=True)
  if flops == 0:  # after the first call's clock: this traces and lowers the step once more
    flops, counted_by = host_lowered_flops(encoder, params, meta, batch), "XLA count of the step lowered for the CPU"
  cache = runtime.compilation_cache_dir()
  where = f"persistent cache {cache}: a load if it held the program" if cache else "persistent cache off"
  references = {}
  if not args.no_torch:
    hf.train()
    device = torch_reference.device()
    references = torch_references(hf, batch, meta, dtype=dtype, variants=variants, device=device)
    print(f"PyTorch: {torch_reference.describe([torch_reference.for_dtype(dtype)], device)} (the per-caption "
          f"loop); {torch_reference.describe(variants, device)} (the batched step's variants)", flush=True)
  seconds = time_against_references(jax_step, first_call, references, rounds=args.steps, where=where, load=load)
  jax_seconds = seconds[MAT_JAX]
  metrics = jax.device_get(jax_step()[1])
  print(f"mat_jax: {jax_seconds:.3f} s/step (median); loss {float(metrics['loss']):.3f}, "
        f"captions changed {float(metrics['text_changed']):.2f}")
  # Speed-up: the implementation's time / mat_jax's.
  rows = [[name, global_batch / t, t, t / jax_seconds] for name, t in seconds.items()]

  common.print_table("MAT train step", ["implementation", "images/s", "s/step", "mat_jax speed-up"], rows)
  if flops > 0:
    # XLA's cost analysis counts the body of a loop once (PGD steps, text-attack rounds): a lower bound.
    peak, peak_source = common.peak_gflops(dtype)
    achieved = flops / jax_seconds / 1e9
    print(f"\nmat_jax: >= {flops / 1e9:,.4g} GFLOP per step ({counted_by}, loop bodies once), {achieved:,.1f} "
          f"GFLOP/s = {100 * achieved / peak:.1f}% of the peak ({peak:,.0f} GFLOP/s, {peak_source})")
  else:
    print("\nmat_jax: FLOPs not counted (this backend's cost analysis returns none for the lowered step, and JAX "
          "has no CPU backend to lower it for; leave cpu in JAX_PLATFORMS)")
  print(f"compilations of the train step in this run: {step.cache_size()} (one batch shape)")
  load.print()
  return 0

