"""mat_jax: multimodal adversarial training and robustness evaluation for vision-language models."""

__version__ = "0.1.0"

# flax 0.12.8 and older fail to import under jax 0.11 (an AttributeError deep in flax, naming neither
# package): pip may keep an installed flax while upgrading jax, so the pair is checked here first.
FLAX_FOR_JAX = {"0.11": "0.12.10"}  # jax minor -> the oldest flax that imports under it


def check_jax_and_flax(jax_version: str, flax_version: str) -> None:
  """An ImportError that names the fix when the installed flax cannot run under the installed jax."""
  from packaging.version import Version

  jax_minor = ".".join(jax_version.split(".")[:2])
  needed = FLAX_FOR_JAX.get(jax_minor)
  if needed and Version(flax_version) < Version(needed):
    raise ImportError(f"mat_jax: jax {jax_version} needs flax >= {needed}, but flax {flax_version} is installed "
                      f"(it fails to import under jax {jax_minor}): pip install 'flax>={needed},<0.13'")


def _check_installed_versions() -> None:
  from importlib import metadata

  try:
    check_jax_and_flax(metadata.version("jax"), metadata.version("flax"))
  except metadata.PackageNotFoundError:
    pass  # a source checkout on the path: nothing recorded to compare


_check_installed_versions()

# `python -m mat_jax.<command>`: the run starts again with jemalloc or tcmalloc where installed (XLA compiles
# faster with them), before anything heavy is imported; mat_jax imported by a program changes nothing.
from mat_jax import allocator as _allocator  # noqa: E402

_allocator.restart_with_allocator()
