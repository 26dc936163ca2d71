"""Constants and small stand-ins shared by the test files (imported as `helpers`: pytest puts tests/ on sys.path)."""

import contextlib
import dataclasses
import os
import signal
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mat_jax.models import CLIPConfig, l2_normalize
from mat_jax.models.tokenizers import TokenBatch

# The micro model of the training tests: one block of width 32 per tower, 16 px images. Training, resume
# and objective tests share it, so its programs have the same shapes wherever it runs.
MICRO_TOWERS = ("vision.image_size=16,vision.layers=1,vision.width=32,vision.heads=2,vision.mlp_dim=64,"
                "text.layers=1,text.width=32,text.heads=2,text.mlp_dim=64")
# As `model.overrides` of a CLIP ("tiny") and of a BLIP ("blip-tiny") run.
MICRO = f"{MICRO_TOWERS},projection_dim=32"
MICRO_BLIP = f"{MICRO_TOWERS},embed_dim=32"


def xla_flags(device_count: int | None = None) -> str:
  """The session's XLA_FLAGS (conftest.py: its compile-time options) for a process a test starts, with
  `device_count` simulated CPU devices instead of the session's eight (None: XLA's one)."""
  import os
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  if device_count is not None:
    flags.append(f"--xla_force_host_platform_device_count={device_count}")
  return " ".join(flags)


def numpy_initialised(cls, cfg, draw, seed: int = 0):
  """`cls(cfg, ...)` with every parameter from `draw(path, leaf, rng)`, drawn with numpy: no compiled random
  kernel per parameter shape, which would cost a test file seconds of compilation."""
  import jax
  import numpy as np
  from flax import nnx

  graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)
  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(lambda path, leaf: draw(path, leaf, rng), state))


def save_micro_clip(directory, *, image_size: int = 16, std: float = 0.02):
  """A random one-block CLIP on the shapes tokenizer, saved with the tokenizer in the transformers layout
  under `directory` (LayerNorm scales one, biases and the logit scale zero, weights normal(0, std))."""
  import json

  import jax.numpy as jnp

  from mat_jax.data import shapes
  from mat_jax.models import CLIP, save_clip
  from mat_jax.models.clip import CLIPConfig, TextConfig, VisionConfig

  tok_dir = shapes.build_tokenizer(directory)
  vocab = len(json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"])
  cfg = CLIPConfig(
      vision=VisionConfig(image_size=image_size, patch_size=8, width=32, layers=1, heads=2, mlp_dim=64),
      text=TextConfig(vocab_size=vocab, context_length=shapes.DEFAULT_CONTEXT_LENGTH, width=32, layers=1,
                      heads=2, mlp_dim=64, eos_token_id=3, bos_token_id=2, pad_token_id=0),
      projection_dim=16)

  def draw(path, leaf, rng):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "scale":
      return jnp.ones(leaf.shape, leaf.dtype)
    if name == "bias" or "logit_scale" in str(path):
      return jnp.zeros(leaf.shape, leaf.dtype)
    return jnp.asarray(rng.normal(0.0, std, leaf.shape), leaf.dtype)

  save_clip(numpy_initialised(CLIP, cfg, draw), directory)
  return directory


@dataclasses.dataclass(frozen=True)
class MLPEncoder:
  """image -> tanh(x W1) W2: the image side of a DualEncoder (features, embeddings, and the temperature
  clamped as CLIP's), small enough to attack in milliseconds. params: w1, w2, logit_scale. It has no
  `config`: code that checks a tokenizer against the model's config skips it."""

  def temperature(self, params):
    return jnp.exp(jnp.clip(params["logit_scale"], *CLIPConfig.logit_scale_range))

  def image_features(self, params, images):
    hidden = jnp.tanh(images.reshape(images.shape[0], -1) @ params["w1"])
    return hidden @ params["w2"]

  def image_embeddings(self, params, images):
    return l2_normalize(self.image_features(params, images))


class WordTokenizer:
  """A word-level tokenizer of the given words, framed [START] ... [END] in 8 tokens: what
  `prepare_candidates` and the attacks' checks read of a tokenizer, without building a transformers one."""
  pad_id, start_id, end_id, context_length = 0, 2, 3, 8
  hf = types.SimpleNamespace(unk_token_id=1)

  def __init__(self, words):
    self.ids = {word: i for i, word in enumerate(sorted(set(words)), start=4)}
    self.vocab_size = len(self.ids) + 4

  def encode_words(self, words):
    return [[self.ids.get(word, self.hf.unk_token_id)] for word in words]

  def __call__(self, texts):
    ids = np.zeros((len(texts), self.context_length), np.int32)
    for row, text in enumerate(texts):
      framed = [self.start_id, *(p for piece in self.encode_words(str(text).split()) for p in piece), self.end_id]
      ids[row, :len(framed)] = framed[:self.context_length]
    return TokenBatch(ids, (ids > 0).astype(np.int32) | (np.arange(self.context_length) == 0))


def builder_process_that_dies(*args, **kwargs):
  """Stands in for `shapes.encoded_records` in a builder process that the OS kills (OOM killer, kill -9)."""
  import os

  os._exit(137)


class DiesInWorkers:
  """A data source whose reads in a worker process (not in the process that made it) end that process
  abruptly, as the OOM killer would."""

  def __init__(self, source):
    import os

    self.source, self.maker = source, os.getpid()

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    import os

    if os.getpid() != self.maker:
      os._exit(137)
    return self.source[index]


@contextlib.contextmanager
def compiled_programs():
  """The names of the programs XLA compiles (or the persistent cache loads) while the context is open, on any
  thread, in order (`jit(name)`, as JAX's monitoring reports them)."""
  names: list[str] = []

  def record(event, seconds, fun_name=None, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      names.append(fun_name)

  jax.monitoring.register_event_duration_secs_listener(record)
  try:
    yield names
  finally:
    jax.monitoring.unregister_event_duration_listener(record)


def child_processes(parent: int) -> dict[int, str]:
  """The processes whose parent is `parent` (read from /proc): PID -> start time (which tells a reused PID
  apart)."""
  found = {}
  for stat in Path("/proc").glob("[0-9]*/stat"):
    try:
      fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:  # ended meanwhile
      continue
    if int(fields[1]) == parent:
      found[int(stat.parent.name)] = fields[19]
  return found


def process_running(pid: int, started: str) -> bool:
  """Whether the process `pid` that started at `started` (`child_processes`) still runs."""
  try:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
  except OSError:
    return False
  return fields[19] == started and fields[0] != "Z"  # a zombie has ended; init may not have reaped it yet


def survivors_after_kill(process, children: dict[int, str], wait_s: float = 10.0) -> list[int]:
  """SIGKILL `process` (a subprocess.Popen with piped output), wait for its output to close and up to `wait_s`
  for its `children` (`child_processes`) to end: the PIDs still running, which are then killed too."""
  process.kill()
  try:
    process.communicate(timeout=30)  # no child keeps its output open
    deadline = time.monotonic() + wait_s
    while any(process_running(*child) for child in children.items()) and time.monotonic() < deadline:
      time.sleep(0.1)
    return [pid for pid, started in children.items() if process_running(pid, started)]
  finally:
    kill_processes(children)


def kill_processes(processes: dict[int, str]) -> None:
  """SIGKILL those of `processes` (`child_processes`) still running."""
  for pid, started in processes.items():
    if process_running(pid, started):
      os.kill(pid, signal.SIGKILL)
