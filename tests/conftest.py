"""Test harness: 8 simulated CPU devices, so mesh and data-parallel code runs as on a TPU host."""

import atexit
import os
import shutil
import tempfile

# XLA options for the tests' CPU compilations; tests that start processes of their own pass them on.
TEST_XLA_FLAGS = {"xla_backend_optimization_level": "0", "xla_cpu_use_fusion_emitters": "false",
                  "xla_cpu_parallel_codegen_split_count": "1"}


def _jaxlib_version() -> tuple[int, ...]:
  from importlib import metadata
  try:
    return tuple(int(part) for part in metadata.version("jaxlib").split(".")[:2])
  except (metadata.PackageNotFoundError, ValueError):
    return (0, 0)


# XLA aborts the process on a flag it does not know, and jaxlib 0.11 no longer has the choice of CPU emitters.
if _jaxlib_version() >= (0, 11):
  del TEST_XLA_FLAGS["xla_cpu_use_fusion_emitters"]
# A run on an accelerator (`JAX_PLATFORMS=cuda pytest tests/test_accel.py`) compiles as its users' runs do.
if os.environ.get("JAX_PLATFORMS", "cpu") != "cpu":
  TEST_XLA_FLAGS.clear()

# Must happen before jax is imported anywhere in the test session.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags = f"{_flags} --xla_force_host_platform_device_count=8"
# The tests' programs are tiny: most of the suite's time is XLA compiling them. LLVM at -O0 compiles
# about twice as fast; at -O0 XLA:CPU's older elemental emitters generate the fusions' code in about half
# the time of its MLIR fusion emitters; and one LLVM module per program instead of several saves the
# splitting when the two workers keep both cores busy anyway. The programs, which run for milliseconds,
# barely slow down (docs/testing.md). Entry points keep XLA's defaults: at -O2 the emitters' choice
# saves no compile time and the older ones run slower (docs/performance.md).
for _name, _value in TEST_XLA_FLAGS.items():
  if _name not in _flags:
    _flags = f"{_flags} --{_name}={_value}"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Hermetic caches: nothing a test builds (the shapes tokenizer, datasets, cached models, the MLM, compiled
# programs) lands in the user's ~/.cache/mat_jax, and no earlier run's cache changes what a test sees.
_scratch = tempfile.mkdtemp(prefix="mat_jax_tests_")
atexit.register(shutil.rmtree, _scratch, ignore_errors=True)
os.environ["MAT_JAX_CACHE_DIR"] = os.path.join(_scratch, "cache")
os.environ["MAT_JAX_DATA_DIR"] = os.path.join(_scratch, "datasets")
# One persistent compilation cache for the whole session, shared by the pytest-xdist workers (they inherit
# the controller's environment, so the controller's scratch holds it): the many tests that build models
# of the same shapes (tests/helpers.py MICRO) compile each program once, in whichever test comes first.
# An entry is keyed by the program's fingerprint, so a hit gives the same executable a compilation would.
_shared = os.environ.setdefault("MAT_JAX_TESTS_SESSION_SCRATCH", _scratch)
os.environ["MAT_JAX_COMPILATION_CACHE"] = os.path.join(_shared, "xla")

import jax  # noqa: E402
import pytest  # noqa: E402

from mat_jax import runtime  # noqa: E402

runtime.prepare_process()  # in-process tests too, not only the command lines they run


@pytest.fixture(scope="session")
def devices():
  devs = jax.devices()
  assert len(devs) == 8, f"expected 8 simulated devices, got {devs}"
  return devs


# The files that take longest, longest first (see docs/testing.md). Under `pytest -n 2` (`--dist loadfile`
# in pyproject.toml: a file's module fixtures are built once, by one worker) the workers take files in
# collection order, so these go first and the many short files fill in at the end: the two workers then
# finish within a short file of each other.
LONGEST_FIRST = ("test_accel.py", "test_study.py", "test_multimodal.py", "test_blip_attacks.py", "test_objectives.py",
                 "test_checkpoint.py", "test_notebooks.py", "test_train.py", "test_train_multiprocess.py")


def pytest_collection_modifyitems(items):
  def rank(item):
    name = item.path.name
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

  items.sort(key=rank)  # stable: each file keeps its own order
