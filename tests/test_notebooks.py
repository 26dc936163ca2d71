"""The notebooks run end to end in quick mode, in fresh kernels of this interpreter, writing only to tmp.

nbclient executes in-memory copies of the notebooks (the stored files keep no outputs); the checks read
what the cells printed and drew: the interpreter and devices, the attacks' budgets, the recall tables
(percentages, and the same numbers as results.json), the plots.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from helpers import xla_flags

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
KERNEL_NAME = "mat-jax-test"
NUMBER = r"-?\d+(?:\.\d+)?"
RECALL_KEYS = ("tr@1", "tr@5", "tr@10", "ir@1", "ir@5", "ir@10")


def _kernel_spec(root: Path) -> Path:
  """A kernelspec that starts this very interpreter.

  Which "python3" spec jupyter finds depends on the search order (the environment's share/jupyter or
  the user's ~/.local one first, per JUPYTER_PREFER_ENV_PATH), and a user-level spec may name another
  environment's interpreter. This one names sys.executable, and JUPYTER_PATH is searched before both.
  """
  spec_dir = root / "kernels" / KERNEL_NAME
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "mat_jax tests", "language": "python"}))
  return root


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
  """Environment of the notebook kernels: quick mode, every path inside tmp_path, one CPU device."""
  home = tmp_path / "home"
  home.mkdir()
  values = {
      "MAT_JAX_NOTEBOOK_QUICK": "1",
      "MAT_JAX_NOTEBOOK_WORKDIR": str(tmp_path / "runs"),
      "MAT_JAX_DATA_DIR": str(tmp_path / "data"),
      "MAT_JAX_CACHE_DIR": str(tmp_path / "cache"),
      "HOME": str(home),                       # anything else that writes to ~ lands here
      "MPLCONFIGDIR": str(tmp_path / "matplotlib"),
      "IPYTHONDIR": str(tmp_path / "ipython"),
      "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter_runtime"),   # the connection files
      "JUPYTER_PATH": str(_kernel_spec(tmp_path / "jupyter")),
      "JAX_PLATFORMS": "cpu",
      # One device (the session's 8 simulated ones would only cost time) and the session's cheap CPU code
      # generation: the kernels spend most of their time compiling tiny programs that run for milliseconds.
      "XLA_FLAGS": xla_flags(),
      # The second notebook reuses what the first compiled (same tiny model, same shapes).
      "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
      "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
      "HF_HUB_OFFLINE": "1",
      "TF_CPP_MIN_LOG_LEVEL": "2",
  }
  for key, value in values.items():
    monkeypatch.setenv(key, value)
  monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend draws the figures
  monkeypatch.delenv("MAT_JAX_NOTEBOOK_MODEL", raising=False)
  return tmp_path


def _execute(name: str, cwd: Path) -> nbformat.NotebookNode:
  notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
  client = nbclient.NotebookClient(notebook, kernel_name=KERNEL_NAME, timeout=300,
                                   resources={"metadata": {"path": str(cwd)}})
  client.execute()  # raises CellExecutionError, with the cell and its traceback, on any failure
  return notebook


def _text(notebook) -> str:
  """Everything the code cells printed (stdout, results), in order."""
  parts = []
  for cell in notebook.cells:
    for output in cell.get("outputs", []):
      if output.output_type == "stream" and output.name == "stdout":
        parts.append(output.text)
      elif output.output_type in ("execute_result", "display_data") and "text/plain" in output.data:
        parts.append(output.data["text/plain"])
  return "".join(parts)


def _images(notebook) -> int:
  return sum("image/png" in output.get("data", {}) for cell in notebook.cells
             for output in cell.get("outputs", []))


def _recall_rows(text: str, names) -> dict[str, list[float]]:
  rows = {}
  for name in names:
    match = re.search(rf"^{re.escape(name)}\s+((?:{NUMBER}\s+){{5}}{NUMBER})\s*$", text, re.M)
    assert match, f"no recall row {name!r} in:\n{text}"
    rows[name] = [float(v) for v in match.group(1).split()]
  return rows


@pytest.mark.parametrize("name", ["quickstart.ipynb", "robustness_report.ipynb"])
def test_stored_notebooks_are_clean(name):
  notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
  nbformat.validate(notebook)
  code = [cell for cell in notebook.cells if cell.cell_type == "code"]
  assert code and all(not cell.outputs and cell.execution_count is None for cell in code), \
      f"{name} is stored with outputs: clear them before saving"
  parameters = [cell for cell in code if "parameters" in cell.metadata.get("tags", [])]
  assert len(parameters) == 1 and "MAT_JAX_NOTEBOOK_QUICK" in parameters[0].source
  assert "google.colab" in code[0].source and "pip" in code[0].source  # the install cell comes first


def test_notebooks_run_in_quick_mode(kernel_env, monkeypatch):
  # One test, in sequence: the report evaluates the model the quickstart trained and exported (the
  # transformers layout), and its kernel finds the quickstart's compilations in the cache.
  _check_quickstart(_execute("quickstart.ipynb", kernel_env), kernel_env)
  monkeypatch.setenv("MAT_JAX_NOTEBOOK_MODEL", str(kernel_env / "runs" / "clip" / "model"))
  _check_robustness_report(_execute("robustness_report.ipynb", kernel_env), kernel_env)


def _check_quickstart(notebook, root: Path) -> None:
  text = _text(notebook)

  assert f"python {sys.executable}\n" in text  # the kernel runs this interpreter
  assert re.search(r"jax \S+ on cpu: \[CpuDevice", text)
  assert "test split: 16 images, 80 captions" in text
  assert "trained 4 steps" in text
  assert (root / "runs" / "clip" / "model" / "config.json").exists()  # the run went to the workdir
  assert any((root / "data").rglob("dataset_info.json"))  # the world was built in tmp, not in ~

  linf = [float(v) for v in re.findall(rf"max \|delta\| = ({NUMBER})/255", text)]
  assert len(linf) == 3 and all(0 < v <= 2 + 1e-3 for v in linf)  # PGD, Co-Attack, BLIP Co-Attack within 2/255
  clean, adversarial = map(float, re.search(rf"clean ({NUMBER}), PGD ({NUMBER})", text).groups())
  assert adversarial < clean  # PGD lowered the similarity of each image to its captions

  changed, total, words = map(int, re.search(r"changed (\d+) of (\d+) captions, at most (\d+) word", text).groups())
  assert total == 40 and 0 < changed <= total and words == 1  # 8 images x 5 captions, one word each

  rows = _recall_rows(text, ["clean", "PGD", "Co-Attack"])
  for values in rows.values():
    assert all(0 <= v <= 100 for v in values)
    assert values[0] <= values[1] <= values[2] and values[3] <= values[4] <= values[5]  # R@1 <= R@5 <= R@10
  assert _images(notebook) == 2  # the world's scenes, then clean vs adversarial
  # BLIP: trained into the workdir, exported in its own layout, attacked, ranked by ITC and re-ranked by ITM.
  assert "trained a BLIP 4 steps" in text
  blip_config = json.loads((root / "runs" / "blip" / "model" / "config.json").read_text())
  assert blip_config["architectures"] == ["BlipForImageTextRetrieval"]
  blip_rows = re.findall(rf"^BLIP (clean|Co-Attack), (ITC|ITM top-16)\s+((?:{NUMBER}\s+){{5}}{NUMBER})$", text, re.M)
  assert sorted((a, b) for a, b, _ in blip_rows) == [("Co-Attack", "ITC"), ("Co-Attack", "ITM top-16"),
                                                    ("clean", "ITC"), ("clean", "ITM top-16")]
  for *_, numbers in blip_rows:
    values = [float(v) for v in numbers.split()]
    assert all(0 <= v <= 100 for v in values) and values[0] <= values[1] <= values[2]


def _check_robustness_report(notebook, root: Path) -> None:
  text = _text(notebook)

  assert f"python {sys.executable}\n" in text
  # MODEL (the quickstart's export) was loaded, not replaced by the quick mode's own tiny model.
  assert f"model {root / 'runs' / 'clip' / 'model'}: ViT 1 layers x 32, 16 px images" in text
  assert not (root / "runs" / "quick_clip").exists()
  assert "shapes/test: 8 images, 40 captions; substitutes from LexiconSource" in text
  header = re.search(r"^attack\s+Linf eps\(/255\)\s+tr@1\s+tr@5\s+tr@10\s+ir@1\s+ir@5\s+ir@10\s+drop tr@1", text, re.M)
  assert header, text
  rows = re.findall(rf"^(clean|pgd|bert|co)\s+(-|{NUMBER})\s+((?:{NUMBER}\s+){{5}}{NUMBER})", text, re.M)
  assert sorted({(a, e) for a, e, _ in rows}) == [("bert", "-"), ("clean", "-"), ("co", "1"), ("co", "4"),
                                                  ("pgd", "1"), ("pgd", "4")]
  out = root / "runs" / "robustness_report"
  results = json.loads((out / "results.json").read_text())
  for attack, eps, values in rows:  # the table shows what results.json holds
    if attack == "clean":
      recall = results["clean"]
    else:
      recall = results["attacks"][attack]["text" if eps == "-" else eps]["recall"]
    shown = [float(v) for v in values.split()]
    assert all(0 <= v <= 100 for v in shown)
    assert shown == pytest.approx([recall[k] for k in RECALL_KEYS], abs=0.051)  # printed with one decimal
  assert set(results["attacks"]) == {"pgd", "bert", "co"} and set(results["attacks"]["pgd"]) == {"1", "4"}
  assert all(0 <= v <= 100 for v in results["clean"].values())
  assert (out / "recall_vs_eps.png").stat().st_size > 0
  assert _images(notebook) == 1  # the recall-vs-eps plot, shown inline
