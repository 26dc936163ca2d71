"""The persistent compilation cache every entry point turns on, and its XLA flags (mat_jax.runtime)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax._src import compilation_cache as cc

from mat_jax import runtime
from mat_jax.errors import ConfigError


@pytest.fixture
def restore_jax_cache():
  saved = {name: getattr(jax.config, name) for name in (
      "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
      "jax_persistent_cache_min_entry_size_bytes")}
  yield
  for name, value in saved.items():
    jax.config.update(name, value)
  cc.reset_cache()


def test_directory_from_environment(monkeypatch, tmp_path):
  monkeypatch.setenv("MAT_JAX_CACHE_DIR", str(tmp_path / "root"))
  monkeypatch.delenv("MAT_JAX_COMPILATION_CACHE", raising=False)
  assert runtime.compilation_cache_dir() == tmp_path / "root" / "jax"
  monkeypatch.setenv("MAT_JAX_COMPILATION_CACHE", "1")
  assert runtime.compilation_cache_dir() == tmp_path / "root" / "jax"
  monkeypatch.setenv("MAT_JAX_COMPILATION_CACHE", str(tmp_path / "elsewhere"))
  assert runtime.compilation_cache_dir() == tmp_path / "elsewhere"
  for off in ("0", "off", "False", "no"):
    monkeypatch.setenv("MAT_JAX_COMPILATION_CACHE", off)
    assert runtime.compilation_cache_dir() is None


def test_an_unusable_cache_directory_warns_and_runs_without_the_cache(monkeypatch, tmp_path, capsys,
                                                                       restore_jax_cache):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  monkeypatch.setenv("MAT_JAX_CACHE_DIR", str(blocker))  # ~/.cache shadowed by a file, or read-only
  monkeypatch.delenv("MAT_JAX_COMPILATION_CACHE", raising=False)
  jax.config.update("jax_compilation_cache_dir", None)  # the suite's own cache (conftest) would be kept
  assert runtime.enable_compilation_cache() is None
  assert jax.config.jax_compilation_cache_dir is None
  err = capsys.readouterr().err
  assert f"warning: the compilation cache directory {blocker / 'jax'} cannot be created" in err
  assert "MAT_JAX_COMPILATION_CACHE=0" in err


def test_off_leaves_jax_alone(monkeypatch, restore_jax_cache):
  monkeypatch.setenv("MAT_JAX_COMPILATION_CACHE", "0")
  before = jax.config.jax_compilation_cache_dir
  assert runtime.enable_compilation_cache() is None
  assert jax.config.jax_compilation_cache_dir == before


def test_small_programs_are_written_and_read_back(monkeypatch, tmp_path, restore_jax_cache):
  """Even a program that compiles in milliseconds is cached (JAX's defaults skip those), and a fresh
  compilation of the same program is served from the directory."""
  monkeypatch.setenv("MAT_JAX_COMPILATION_CACHE", str(tmp_path / "xla"))
  jax.config.update("jax_compilation_cache_dir", None)
  path = runtime.enable_compilation_cache()
  assert path == tmp_path / "xla" and path.is_dir()

  def program(x):
    return jnp.sin(x) * 3.25 + jnp.arange(7.0)  # a constant no other test compiles

  x = jnp.ones(7)
  jax.jit(program).lower(x).compile()
  entries = sorted(p.name for p in path.iterdir())
  assert entries, "the compiled program was not written to the cache"
  hits = []
  def listener(event, **kw):
    return hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None
  jax.monitoring.register_event_listener(listener)
  jax.clear_caches()  # forget the in-memory executable, as a new process would
  try:
    jax.jit(program).lower(x).compile()
  finally:
    jax.monitoring.unregister_event_listener(listener)
  assert hits, "the second compilation did not read the cache"
  assert sorted(p.name for p in path.iterdir()) == entries


def test_explicit_directory_wins(monkeypatch, tmp_path, restore_jax_cache):
  monkeypatch.setenv("MAT_JAX_COMPILATION_CACHE", "0")
  path = runtime.enable_compilation_cache(tmp_path / "explicit")
  assert path == tmp_path / "explicit"
  assert jax.config.jax_compilation_cache_dir == str(path)
  assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0


def _xla_flags_after_entry_point(tmp_path, flags: str | None, *, small_models: bool = False,
                                 triton_gemm: str | None = None) -> str:
  """XLA_FLAGS as a fresh process sees it after an entry point's first call (prepare_process), once its CPU
  backend has started with them and run a program."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "MAT_JAX_TRITON_GEMM")}
  if flags is not None:
    env["XLA_FLAGS"] = flags
  if triton_gemm is not None:
    env["MAT_JAX_TRITON_GEMM"] = triton_gemm
  env["MAT_JAX_COMPILATION_CACHE"] = str(tmp_path / "xla")
  code = (f"import os; from mat_jax import runtime; runtime.prepare_process(small_models={small_models}); "
          "import jax, jax.numpy as jnp; assert float(jax.jit(lambda x: x @ x)(jnp.eye(3)).sum()) == 3.0; "
          "print(os.environ.get('XLA_FLAGS', ''))")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
  return out.stdout.strip().splitlines()[-1]


def test_triton_gemms_are_off_for_the_small_models_unless_chosen(tmp_path):
  # XLA:GPU's Triton GEMM kernels: most of a tiny model's compile time there (runtime's docstring).
  off = "--xla_gpu_enable_triton_gemm=false"
  ynn = "--xla_cpu_experimental_ynn_fusion_type="
  assert _xla_flags_after_entry_point(tmp_path, None, small_models=True).split() == [off, ynn]
  assert _xla_flags_after_entry_point(tmp_path, None).split() == [ynn]  # other models: XLA's default
  assert _xla_flags_after_entry_point(tmp_path, None, small_models=True, triton_gemm="1").split() == [ynn]
  assert _xla_flags_after_entry_point(tmp_path, None, triton_gemm="0").split() == [off, ynn]
  assert _xla_flags_after_entry_point(tmp_path, None, small_models=True, triton_gemm="auto").split() == [off, ynn]
  chosen = "--xla_gpu_enable_triton_gemm=true"  # the user's XLA_FLAGS win
  assert _xla_flags_after_entry_point(tmp_path, chosen, small_models=True).split() == [chosen, ynn]


def test_a_mistyped_triton_gemm_setting_names_the_choices(monkeypatch):

  monkeypatch.setenv("MAT_JAX_TRITON_GEMM", "maybe")
  with pytest.raises(ConfigError, match="MAT_JAX_TRITON_GEMM='maybe'.*auto.*1.*0"):
    runtime.triton_gemm(small_models=True)
  for value, small, expected in (("", True, False), ("", False, True), ("ON", True, True), (" off ", False, False)):
    monkeypatch.setenv("MAT_JAX_TRITON_GEMM", value)
    assert runtime.triton_gemm(small_models=small) is expected, value


def test_cudnn_length_multiple_reads_its_setting(monkeypatch):
  monkeypatch.delenv("MAT_JAX_CUDNN_LENGTH_MULTIPLE", raising=False)
  assert runtime.cudnn_length_multiple() == runtime.CUDNN_LENGTH_MULTIPLE == 64
  monkeypatch.setenv("MAT_JAX_CUDNN_LENGTH_MULTIPLE", " 2 ")
  assert runtime.cudnn_length_multiple() == 2
  for value in ("0", "3", "-2", "sixty-four"):
    monkeypatch.setenv("MAT_JAX_CUDNN_LENGTH_MULTIPLE", value)
    with pytest.raises(ConfigError, match=f"MAT_JAX_CUDNN_LENGTH_MULTIPLE='{value}'.*positive even number"):
      runtime.cudnn_length_multiple()


@pytest.mark.parametrize("experiment, small", [(None, True), ("shapes_mat.py", True), ("flickr30k.py:mat", False)])
def test_train_names_the_shapes_worlds_small_models_to_the_runtime(monkeypatch, experiment, small):
  from mat_jax import runs, train

  argv = [] if experiment is None else ["--config", str(runs.EXPERIMENTS_DIR / experiment)]  # None: the demo

  seen = []

  class Stop(Exception):
    pass

  def prepare_process(*, small_models=False):
    seen.append(small_models)
    raise Stop

  monkeypatch.setattr(runtime, "prepare_process", prepare_process)
  with pytest.raises(Stop):
    train._main(argv)
  assert seen == [small]


def test_entry_points_turn_off_cpu_ynn_fusions_unless_the_user_chose(tmp_path):
  assert _xla_flags_after_entry_point(tmp_path, None) == "--xla_cpu_experimental_ynn_fusion_type="
  assert _xla_flags_after_entry_point(tmp_path, "--xla_backend_optimization_level=0") == (
      "--xla_backend_optimization_level=0 --xla_cpu_experimental_ynn_fusion_type=")
  chosen = "--xla_cpu_experimental_ynn_fusion_type=dot"
  assert _xla_flags_after_entry_point(tmp_path, chosen) == chosen


def test_xla_flags_untouched_once_a_backend_started(monkeypatch, tmp_path, restore_jax_cache):
  jax.devices()  # this process's backend has read XLA_FLAGS already
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
  runtime.enable_compilation_cache(tmp_path / "xla")
  assert os.environ["XLA_FLAGS"] == "--xla_backend_optimization_level=0"


def test_the_imports_objects_are_frozen_once_per_process_and_full_collections_made_rarer(tmp_path):
  # gc.freeze: the collector's oldest-generation passes, which tracing triggers, skip the imports' objects.
  code = ("import gc; from mat_jax import runtime, train; before = gc.get_freeze_count(); "
          "print(*gc.get_threshold()); "
          "runtime.prepare_process(); first = gc.get_freeze_count(); [object() for _ in range(10)]; "
          "cycle = []; cycle.append(cycle); runtime.prepare_process(); print(before, first, gc.get_freeze_count(), "
          "*gc.get_threshold())")
  env = dict(os.environ, MAT_JAX_COMPILATION_CACHE=str(tmp_path / "xla"))
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
  *pythons, before, first, second, young, middle, full = map(int, out.stdout.split()[-9:])
  # jax, flax and mat_jax leave hundreds of thousands of objects; Python 3.12 starts with 375 frozen.
  assert first - before > 100_000
  assert second == first  # a second call (a command line run again in-process) freezes nothing more
  # The full passes rarer (CPython's default is 10); the young generations' thresholds are Python's own.
  assert (young, middle) == tuple(pythons[:2]) and full == max(pythons[2], runtime.FULL_COLLECTION_INTERVAL) >= 100


def test_every_entry_point_prepares_the_process():
  import ast
  from pathlib import Path

  package = Path(runtime.__file__).parent
  for module in ("train.py", "evaluate_cli.py", "study.py", "bench/__main__.py", "data/__main__.py",
                 "models/__main__.py"):
    calls = {node.func.attr for node in ast.walk(ast.parse((package / module).read_text()))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
             and isinstance(node.func.value, ast.Name) and node.func.value.id == "runtime"}
    assert "prepare_process" in calls and "enable_compilation_cache" not in calls, module


def test_a_flax_too_old_for_the_installed_jax_is_named_with_its_fix():
  import mat_jax

  with pytest.raises(ImportError, match=r"jax 0\.11\.2 needs flax >= 0\.12\.10.*pip install 'flax>=0\.12\.10,<0\.13'"):
    mat_jax.check_jax_and_flax("0.11.2", "0.12.8")
  mat_jax.check_jax_and_flax("0.11.2", "0.12.10")  # the pair the GPU image ships
  mat_jax.check_jax_and_flax("0.10.2", "0.12.8")  # the pair CI installs
