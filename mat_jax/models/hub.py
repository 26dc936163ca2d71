"""Where model files come from: a local transformers-layout directory, or a Hugging Face hub id.

Nothing here downloads unless the hub is reachable and allowed (HF_HUB_OFFLINE unset); offline, a
hub id that is not in the local cache is an error that names the id and the command that fetches it.
"""

from __future__ import annotations

import difflib
import json
import os
import socket
from pathlib import Path
from typing import Sequence

from mat_jax.errors import ConfigError, MatJaxError


class ModelSourceError(MatJaxError, FileNotFoundError):
  """A model or tokenizer source that cannot be found or read."""


def cached_repo(directory: Path) -> str | None:
  """The hub id whose cached snapshot `directory` is ($HF_HOME/hub/models--OWNER--NAME/snapshots/REV), else None."""
  repo = directory.parent.parent.name
  if directory.parent.name != "snapshots" or not repo.startswith("models--"):
    return None
  return repo.removeprefix("models--").replace("--", "/")


def missing_files_fix(directory: Path, local_fix: str) -> str:
  """The fix for files a model directory lacks: `local_fix` for a directory of one's own; for a hub cache's
  snapshot, which holds what was fetched of the repository so far, fetching the rest."""
  repo = cached_repo(directory)
  if repo is None:
    return local_fix
  return (f"this is the hub cache's copy of {repo}, which holds only the files fetched so far; fetch the rest "
          f"on a machine with network access with\n  hf download {repo}\n(or pass a local directory instead)")


def looks_like_hub_id(source: str) -> bool:
  """owner/name, or a bare legacy name the hub still redirects (bert-base-uncased, gpt2)."""
  parts = source.split("/")
  return len(parts) in (1, 2) and all(parts) and not source.startswith((".", "/", "~")) and "\\" not in source


def resolve(source: str | os.PathLike, allow_patterns: Sequence[str]) -> Path:
  """A local directory for `source`: the directory itself, or the hub snapshot of that id."""
  path = Path(source).expanduser()
  if path.is_dir():
    return path
  if path.exists():
    raise ModelSourceError(f"{path} is a file; pass the directory that holds config.json and the "
                           "*.safetensors files (the transformers layout).")
  source = str(source)
  if "@" in source and looks_like_hub_id(source.split("@", 1)[0]):
    repo, _, revision = source.partition("@")
    local = f"./{repo.split('/')[-1]}-{revision}"
    raise ModelSourceError(f"{source!r}: hub ids are loaded at their main revision; for revision {revision!r} "
                           f"run\n  hf download {repo} --revision {revision} --local-dir {local}\n"
                           "and pass that directory instead.")
  if not looks_like_hub_id(source):
    raise ModelSourceError(f"no directory {path}; pass a transformers-layout directory "
                           "(config.json + *.safetensors) or a hub id such as openai/clip-vit-base-patch16.")
  import huggingface_hub  # deferred: only hub ids need it
  try:
    return Path(huggingface_hub.snapshot_download(source, allow_patterns=list(allow_patterns)))
  except Exception as err:  # offline, unknown id, no permission: one message with the fix
    # A typo in a local path can read as owner/name: name the directories it most likely meant.
    near = " or ".join(str(p) for p in near_local_directories(path))
    guess = f" (did you mean {near}?)" if near else ""
    raise ModelSourceError(
        f"no local directory {path}{guess}, and cannot obtain {source!r} from the Hugging Face hub "
        f"({type(err).__name__}: {err}). "
        f"On a machine with network access run\n  hf download {source} --local-dir ./{source.split('/')[-1]}\n"
        "and pass that directory instead (or set HF_HOME to a cache that holds it).") from err


def near_local_directories(path: Path) -> list[Path]:
  """Existing directories beside `path` whose names are close to its name (a typo's likely targets)."""
  parent = path.parent
  if not parent.is_dir():
    return []
  try:
    names = [child.name for child in parent.iterdir() if child.is_dir()]
  except OSError:
    return []
  return [parent / name for name in difflib.get_close_matches(path.name, names, n=2, cutoff=0.75)]


def repo_files(repo_id: str) -> list[str]:
  """The file names of a hub repository, or [] when the hub cannot be asked (offline, unknown id)."""
  import huggingface_hub  # deferred: only hub ids need it
  if huggingface_hub.constants.HF_HUB_OFFLINE or not _hub_reachable(huggingface_hub.constants.ENDPOINT):
    return []  # without the network, huggingface_hub retries for ~25 s before giving up
  try:
    return list(huggingface_hub.list_repo_files(repo_id))
  except Exception:  # the caller's own error stands when the hub cannot tell more
    return []


def _hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
  from urllib.parse import urlparse

  url = urlparse(endpoint)
  try:
    with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
      return True
  except OSError:
    return False


def read_json_object(path: Path) -> dict:
  """A config file of a model directory (config.json, preprocessor_config.json, the index): a JSON object."""
  try:
    data = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as err:
    raise ConfigError(f"{path} is not valid JSON ({err}); re-save it with save_pretrained.") from None
  if not isinstance(data, dict):
    raise ConfigError(f"{path} is valid JSON but not an object of settings {{...}} (it holds a Python "
                      f"{type(data).__name__}); re-save it with save_pretrained.")
  return data
