"""The persistent compilation cache every entry point turns on (mat_jax.runtime)."""

import jax
import jax.numpy as jnp
import pytest
from jax._src import compilation_cache as cc

from mat_jax import runtime


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


def test_known_peaks_by_device_kind():
  from mat_jax.bench import common

  assert common.known_peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.0
  assert common.known_peak_tflops("NVIDIA H200", "float32") == 494.5
  assert common.known_peak_tflops("NVIDIA A100-SXM4-40GB", "bfloat16") == 312.0
  assert common.known_peak_tflops("TPU v5 lite", "bfloat16") == 197.0
  assert common.known_peak_tflops("TPU v5", "bfloat16") == 459.0
  assert common.known_peak_tflops("TPU v6 lite", "bfloat16") == 918.0
  assert common.known_peak_tflops("TPU v4", "float32") is None
  assert common.known_peak_tflops("cpu", "float32") is None
