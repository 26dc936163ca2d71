"""The notebooks run end to end in quick mode, in fresh kernels of this interpreter, writing only to tmp.

nbclient executes in-memory copies of the notebooks (the stored files keep no outputs); the checks read
what the cells printed and drew: the interpreter and devices, the attacks' budgets, the recall tables
(percentages, and the same numbers as results.json), the plots. What only the full setting does (its run
directories, the report's text threat) is checked by running the cells that decide it, without training.
"""

from __future__ import annotations

import json
import re
import sys
import tomllib
from pathlib import Path

import pytest

from helpers import xla_flags

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
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
  monkeypatch.setenv("MAT_JAX_NOTEBOOK_MODEL", str(kernel_env / "runs" / "quick" / "clip" / "model"))
  _check_robustness_report(_execute("robustness_report.ipynb", kernel_env), kernel_env)


def _check_quickstart(notebook, root: Path) -> None:
  text = _text(notebook)

  assert f"python {sys.executable}\n" in text  # the kernel runs this interpreter
  assert re.search(r"jax \S+ on cpu: \[CpuDevice", text)
  assert "test split: 16 images, 80 captions" in text
  assert "trained 4 steps" in text
  assert (root / "runs" / "quick" / "clip" / "model" / "config.json").exists()  # quick mode's runs in the workdir
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
  blip_config = json.loads((root / "runs" / "quick" / "blip" / "model" / "config.json").read_text())
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
  assert f"model {root / 'runs' / 'quick' / 'clip' / 'model'}: ViT 1 layers x 32, 16 px images" in text
  assert not (root / "runs" / "quick_clip").exists()
  assert "shapes/test: 8 images, 40 captions; captions checked against their scenes" in text
  # Quick mode attacks text with the paraphrase control, and says that it is not the threat.
  assert "text attacks' substitutes: LexiconSource, the paraphrase control (synonyms that keep the meaning), " \
         "not the threat" in text
  header = re.search(r"^attack\s+Linf eps\(/255\)\s+tr@1\s+tr@5\s+tr@10\s+ir@1\s+ir@5\s+ir@10\s+drop tr@1\s+"
                     r"drop ir@1\s+ASR tr@1\s+ASR ir@1\s+flips %\s+ASR-mp tr@1\s+ASR-mp ir@1$", text, re.M)
  assert header, text  # the label-flip columns of the shapes world's meaning-aware scoring
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
  # Meaning-aware scoring: the label-flip share of the captions a text attack changed (the control's synonyms
  # keep every caption's meaning: none), "-" for image-only attacks.
  table = {tuple(cells[:2]): cells for cells in map(str.split, text.splitlines())
           if cells[:1] in (["pgd"], ["bert"], ["co"]) and len(cells) == 15}  # attack, eps and 13 numbers
  assert sorted(table) == [("bert", "-"), ("co", "1"), ("co", "4"), ("pgd", "1"), ("pgd", "4")], table
  for (attack, eps), cells in table.items():
    entry = results["attacks"][attack]["text" if eps == "-" else eps]
    if attack == "pgd":
      assert cells[-3:] == ["-"] * 3 and "label_flip_share" not in entry
    else:
      assert entry["captions_changed"] > 0 and entry["label_flip_share"] == 0 and cells[-3] == "0.0"
  assert all(0 <= v <= 100 for v in results["clean"].values())
  assert (out / "recall_vs_eps.png").stat().st_size > 0
  assert _images(notebook) == 1  # the recall-vs-eps plot, shown inline


# ----------------------------------------------------------------------------------------------------
# What the full setting decides, checked by running the deciding cells alone (no training, no attack).

def _code(name: str) -> dict[str, str]:
  """The notebook's code cells by id."""
  notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
  return {cell.id: cell.source for cell in notebook.cells if cell.cell_type == "code"}


def _parameters(name: str, quick: bool, monkeypatch, workdir: Path, edit: tuple[str, str] = ("", "")) -> dict:
  """The namespace after the notebook's parameter cell, in quick or full mode; `edit`: (old, new), a line of
  the cell as a user would change it."""
  monkeypatch.setenv("MAT_JAX_NOTEBOOK_QUICK", "1" if quick else "0")
  monkeypatch.setenv("MAT_JAX_NOTEBOOK_WORKDIR", str(workdir))
  monkeypatch.delenv("MAT_JAX_NOTEBOOK_MODEL", raising=False)
  notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
  cell, = (c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
  namespace = {"Path": Path, "CHECKOUT": ROOT}  # what the install cell defines
  assert not edit[0] or cell.source.count(edit[0]) == 1, edit
  exec(cell.source.replace(*edit), namespace)  # noqa: S102 -- the notebook's own code
  return namespace


def test_quickstart_modes_train_into_separate_directories(monkeypatch, tmp_path):
  # Quick and full runs have other model shapes: one workdir's checkpoint cannot resume the other mode's run.
  code = "\n".join(_code("quickstart.ipynb").values())
  targets = re.findall(r"loop\.train\(\w+, ([^,]+),", code)
  assert len(targets) == 2, targets  # the CLIP and the BLIP run
  directories = {}
  for quick in (True, False):
    namespace = _parameters("quickstart.ipynb", quick, monkeypatch, tmp_path)
    directories[quick] = {Path(eval(target, namespace)) for target in targets}  # noqa: S307
    assert len(directories[quick]) == 2 and all(tmp_path in d.parents for d in directories[quick])
  assert not directories[True] & directories[False], directories
  assert not any(q in f.parents or f in q.parents for q in directories[True] for f in directories[False])


def _report_source(monkeypatch, namespace: dict, **parameters) -> tuple:
  """The text source the report's cell asks `inputs.make_source` for, with `parameters` set after the
  parameter cell: (name, bert, top_k), bert only for "bert"; or the exception it raised."""
  from mat_jax import evaluate
  from mat_jax.errors import InputError
  from mat_jax.training import inputs

  calls = []
  monkeypatch.setattr(inputs, "make_source", lambda name, *, bert="", top_k=10, **_: calls.append(
      (name, bert if name == "bert" else None, top_k)) or object())
  cell = _code("robustness_report.ipynb")["robustness_report-text-source"]
  namespace = {**namespace, **parameters, "evaluate": evaluate}
  try:
    exec(cell, namespace)  # noqa: S102
  except (ValueError, InputError) as err:
    return (type(err).__name__,)
  return calls[-1]


def _command_line_source(monkeypatch, text_source: str, data: str, bert: str) -> tuple:
  """What `python -m mat_jax.evaluate --text-source ... --data ... --bert ...` asks make_source for."""
  from mat_jax import evaluate_cli
  from mat_jax.errors import InputError
  from mat_jax.training import inputs

  calls = []
  monkeypatch.setattr(inputs, "make_source", lambda name, *, bert="", top_k=10, **_: calls.append(
      (name, bert if name == "bert" else None, top_k)) or object())
  try:
    evaluate_cli._text_source(text_source, data, bert or None, 10)
  except InputError as err:
    return (type(err).__name__,)
  return calls[-1]


def test_report_attacks_text_as_the_command_line(monkeypatch, tmp_path, capsys):
  full = _parameters("robustness_report.ipynb", False, monkeypatch, tmp_path)
  # In full mode the shapes world's text threat: BERT-Attack with its masked LM, as the command line.
  assert _report_source(monkeypatch, full) == ("bert", "shapes-mlm", 10)
  assert "LexiconSource" not in capsys.readouterr().out
  for text_source in ("auto", "bert", "paraphrase", "charedit"):
    for data in ("shapes", "flickr30k"):
      for bert in ("", "bert-base-uncased"):
        notebook = _report_source(monkeypatch, full, TEXT_SOURCE=text_source, DATA=data, BERT=bert)
        command_line = _command_line_source(monkeypatch, text_source, data, bert)
        assert (notebook == command_line) or (len(notebook) == len(command_line) == 1), \
            (text_source, data, bert, notebook, command_line)
  # Quick mode falls back to the paraphrase control (no masked LM to train) unless TEXT_SOURCE names one.
  quick = _parameters("robustness_report.ipynb", True, monkeypatch, tmp_path)
  assert _report_source(monkeypatch, quick) == ("paraphrase", None, 10)
  quick_bert = _parameters("robustness_report.ipynb", True, monkeypatch, tmp_path,
                           edit=('TEXT_SOURCE = "auto"', 'TEXT_SOURCE = "bert"'))
  assert _report_source(monkeypatch, quick_bert) == ("bert", "shapes-mlm", 10)


def test_accelerator_installs_stay_in_pyprojects_jax_range():
  dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
  pinned, = (d[len("jax"):] for d in dependencies if re.fullmatch(r"jax[<>=!~].*", d))
  for name in ("quickstart.ipynb", "robustness_report.ipynb"):
    text = "\n".join(cell.source for cell in nbformat.read(NOTEBOOKS / name, as_version=4).cells)
    installs = re.findall(r"jax\[(\w+)\]([^\"\\\s`]*)", text)
    assert {extra for extra, _ in installs} == {"tpu", "cuda12"}, (name, installs)
    assert all(spec == pinned for _, spec in installs), (name, installs, pinned)
