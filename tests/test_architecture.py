"""The layers of docs/architecture.md hold: no module imports a higher layer, no circles, no mat_jax import
hidden inside a function; and the shapes world imports without tensorflow-datasets.

The layer of each module is read from the table in docs/architecture.md (its one place), so the table
cannot go stale: a module without a row, or a row without a module, fails here too.
"""

import ast
import functools
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| `(mat_jax[\w.]*)` \| (\d+) \|", re.M)
# The main-guard imports of a higher layer that docs/architecture.md names: `python -m mat_jax.evaluate` runs
# the library as a script, whose main guard hands over to the command line.
MAIN_GUARD_HANDOVERS = frozenset({("mat_jax.evaluate", "mat_jax.evaluate_cli")})
# The imports by name (`importlib.import_module(f"mat_jax.bench.{name}")`) allowed inside a function, with the
# prefix of the names: `python -m mat_jax.bench SUITE` imports only the chosen suite, whose references pull in
# torch and transformers.
LAZY_IMPORTS = frozenset({("mat_jax.bench.__main__", "mat_jax.bench.")})
DIAGRAM_LINE = re.compile(r"^ ?(\d+)  \S+(?: \S+)?\s{2,}(.+)$", re.M)


def _is_main_guard(node: ast.AST) -> bool:
  """`if __name__ == "__main__":` at module level: where a library run as `python -m` hands over to its
  command line (MAIN_GUARD_HANDOVERS, the only imports of a higher layer allowed)."""
  test = getattr(node, "test", None)
  return (isinstance(node, ast.If) and isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
          and test.left.id == "__name__" and any(isinstance(c, ast.Constant) and c.value == "__main__"
                                                 for c in test.comparators))


class Tree:
  """The modules under `root`/mat_jax, their layers (`root`/docs/architecture.md's table) and imports."""

  def __init__(self, root: pathlib.Path):
    self.root = root
    table = (root / "docs" / "architecture.md").read_text()
    self.layers = {name: int(layer) for name, layer in ROW.findall(table)}
    self.modules = {self.module_name(p): p for p in sorted((root / "mat_jax").rglob("*.py"))}
    self._imports: dict[str, tuple] = {}

  def module_name(self, path: pathlib.Path) -> str:
    parts = list(path.relative_to(self.root).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts.pop()
    return ".".join(parts)

  def syntax(self, name: str) -> ast.Module:
    return ast.parse(self.modules[name].read_text(), str(self.modules[name]))

  def imports_of(self, name: str) -> tuple:
    """(line, imported mat_jax module, where) for every import of a mat_jax module in `name`, statements and
    imports by name (`importlib.import_module`, `__import__`); where is "top", "function", "main" (inside
    the main guard) or "lazy" (a LAZY_IMPORTS import inside a function)."""
    if name not in self._imports:
      self._imports[name] = self._read_imports(name)
    return self._imports[name]

  def _read_imports(self, name: str) -> tuple:
    path = self.modules[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def targets(node) -> list[str]:
      if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "mat_jax"]
      base = node.module or ""
      if node.level:
        parent = package.split(".")[:len(package.split(".")) - (node.level - 1)]
        base = ".".join(parent + ([node.module] if node.module else []))
      if base.split(".")[0] != "mat_jax":
        return []
      # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod.
      subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in self.modules]
      return subs + ([base] if len(subs) < len(node.names) else [])

    def by_name(call) -> tuple[str, list[str]] | None:
      """(the name's constant prefix, the modules it can name) of an import by name of a mat_jax module."""
      func = call.func
      called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
      if called not in ("import_module", "__import__") or not call.args:
        return None
      arg = call.args[0]
      if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        prefix, exact = arg.value, True
      elif isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        prefix, exact = str(arg.values[0].value), False
      else:
        return None
      if not prefix.startswith("mat_jax"):
        return None
      return prefix, [m for m in self.modules if (m == prefix if exact else m.startswith(prefix))]

    def walk(node, where):
      for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
          found.extend((child.lineno, target, where) for target in targets(child))
        if isinstance(child, ast.Call) and (named := by_name(child)):
          prefix, modules = named
          lazy = where == "function" and (name, prefix) in LAZY_IMPORTS
          found.extend((child.lineno, target, "lazy" if lazy else where) for target in modules)
        inner = where
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
          inner = "function"
        elif where == "top" and _is_main_guard(child):
          inner = "main"
        walk(child, inner)

    walk(self.syntax(name), "top")
    return tuple(found)


@functools.cache
def _tree(root: pathlib.Path) -> Tree:
  return Tree(root)


def _parents(module: str) -> list[str]:
  """The packages importing `module` loads first (mat_jax.a.b -> mat_jax.a)."""
  parts = module.split(".")
  return [".".join(parts[:i]) for i in range(2, len(parts))]


def _missing_and_stale(tree: Tree) -> tuple[list[str], list[str]]:
  return sorted(set(tree.modules) - set(tree.layers)), sorted(set(tree.layers) - set(tree.modules))


def _layer_problems(tree: Tree) -> list[str]:
  """Imports inside a function, and imports of a higher layer (the packages they load first included; a main
  guard's too, but for the handovers)."""
  layers = tree.layers
  problems = []
  for name, path in tree.modules.items():
    where_file = path.relative_to(tree.root)
    for line, target, where in tree.imports_of(name):
      if where == "function":
        problems.append(f"{where_file}:{line}: imports {target} inside a function; import it at the top "
                        "(if that makes a circle, the module is in the wrong layer)")
      if (where == "main" and (name, target) in MAIN_GUARD_HANDOVERS) or name not in layers:
        continue
      for imported in [target, *_parents(target)]:
        if imported in layers and layers[imported] > layers[name]:
          problems.append(f"{where_file}:{line}: {name} (layer {layers[name]}) imports {imported} "
                          f"(layer {layers[imported]}), a higher layer")
  return problems


def _runs_on_import(tree: Tree, name: str) -> list[str]:
  """The modules importing `name` runs: its imports at the top and in its main guard (less the handovers,
  whose library runs as __main__, a module apart from the one its command line imports), each with the
  packages Python initialises first (importing a.b.c runs a/b/__init__.py), less `name`'s own packages
  (already running when `name` is imported)."""
  found = set()
  for _, target, where in tree.imports_of(name):
    if where in ("function", "lazy") or (where == "main" and (name, target) in MAIN_GUARD_HANDOVERS):
      continue
    found.add(target)
    found.update(p for p in _parents(target) if not name.startswith(p + "."))
  return sorted(found - {name})


def _cycles(tree: Tree) -> list[str]:
  graph = {name: _runs_on_import(tree, name) for name in tree.modules}
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  cycles = []

  def visit(node, path):
    state[node] = 1
    for nxt in graph.get(node, []):
      if state.get(nxt) == 1:
        cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
      elif nxt not in state:
        visit(nxt, path + [nxt])
    state[node] = 2

  for name in sorted(graph):
    if name not in state:
      visit(name, [name])
  return cycles


def _main_guard_problems(tree: Tree) -> list[str]:
  """Main guards below the entry-point layer: a library run as `python -m` would be a command line of its own
  that skips what the listed ones do first (training a cached model, the compilation cache). The one kind
  allowed hands over to its command line (MAIN_GUARD_HANDOVERS)."""
  entry_layer = max(tree.layers.values())
  handing_over = {library for library, _ in MAIN_GUARD_HANDOVERS}
  problems = []
  for name, path in tree.modules.items():
    layer = tree.layers.get(name, entry_layer)
    if layer < entry_layer and name not in handing_over and any(map(_is_main_guard, tree.syntax(name).body)):
      problems.append(f"{path.relative_to(tree.root)}: {name} (layer {layer}) has a main guard, a command line "
                      f"below layer {entry_layer}; remove it (the command lines of layer {entry_layer} call "
                      "its functions), or hand over to one named in docs/architecture.md")
  return problems


def _diagram_problems(tree: Tree) -> list[str]:
  """Modules the layer diagram of docs/architecture.md draws in another layer than its table gives them
  (`x.*` stands for every module under mat_jax.x that the diagram does not draw by name)."""
  text = (tree.root / "docs" / "architecture.md").read_text()
  drawn = [(int(layer), word.rstrip(":,")) for layer, names in DIAGRAM_LINE.findall(text)
           for word in re.sub(r"\([^)]*\)", " ", names).split()]
  by_name = {f"mat_jax.{word}": layer for layer, word in drawn if f"mat_jax.{word}" in tree.layers}
  for layer, word in drawn:
    if word.endswith(".*"):
      by_name.update({m: layer for m in tree.layers if m.startswith(f"mat_jax.{word[:-2]}.") and m not in by_name})
  return [f"{m}: the diagram draws it in layer {layer}, the table gives {tree.layers[m]}"
          for m, layer in sorted(by_name.items()) if tree.layers[m] != layer]


def test_every_module_has_a_layer_and_every_row_a_module():
  missing, stale = _missing_and_stale(_tree(ROOT))
  assert not missing, f"modules without a row in docs/architecture.md's table (give each its layer): {missing}"
  assert not stale, f"rows of docs/architecture.md's table naming no module (remove or rename them): {stale}"


def test_the_diagram_agrees_with_the_table():
  problems = _diagram_problems(_tree(ROOT))
  assert not problems, "\n".join(problems)


def test_no_import_of_a_higher_layer_and_none_inside_a_function():
  problems = _layer_problems(_tree(ROOT))
  assert not problems, "\n".join(problems)


def test_no_import_circles():
  cycles = _cycles(_tree(ROOT))
  assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_main_guards_only_in_command_lines_and_the_named_handovers():
  tree = _tree(ROOT)
  problems = _main_guard_problems(tree)
  assert not problems, "\n".join(problems)
  main_imports = {(name, target) for name in tree.modules for _, target, where in tree.imports_of(name)
                  if where == "main"}
  assert MAIN_GUARD_HANDOVERS <= main_imports, f"handovers no longer in the tree: {MAIN_GUARD_HANDOVERS - main_imports}"


def _write_tree(root: pathlib.Path, layers: dict[str, int], files: dict[str, str]) -> Tree:
  """A tree of `files` (path under root -> source) and an architecture table giving `layers`."""
  (root / "docs").mkdir(parents=True)
  (root / "docs" / "architecture.md").write_text("".join(f"| `{n}` | {layer} | - |\n" for n, layer in layers.items()))
  for relative, source in files.items():
    (root / relative).parent.mkdir(parents=True, exist_ok=True)
    (root / relative).write_text(source)
  return Tree(root)


def test_a_circle_through_a_package_init_is_found(tmp_path):
  # Importing mat_jax.b.y runs mat_jax/b/__init__.py first, which imports mat_jax.a.x back.
  layers = {"mat_jax": 0, "mat_jax.a": 1, "mat_jax.a.x": 1, "mat_jax.b": 1, "mat_jax.b.y": 1, "mat_jax.a.z": 1}
  tree = _write_tree(tmp_path / "circle", layers, {
      "mat_jax/__init__.py": "", "mat_jax/a/__init__.py": "", "mat_jax/a/x.py": "from mat_jax.b import y\n",
      "mat_jax/b/__init__.py": "from mat_jax.a.x import y as _y\n", "mat_jax/b/y.py": ""})
  assert _cycles(tree) == ["mat_jax.a.x -> mat_jax.b -> mat_jax.a.x"]
  # A module's own packages are already running when it is imported: importing a sibling is no circle.
  tree = _write_tree(tmp_path / "siblings", layers, {
      "mat_jax/__init__.py": "", "mat_jax/a/__init__.py": "from mat_jax.a import x\n",
      "mat_jax/a/x.py": "from mat_jax.a import z\n", "mat_jax/a/z.py": ""})
  assert _cycles(tree) == []


def test_a_main_guard_imports_like_its_module_except_the_named_handover(tmp_path):
  tree = _write_tree(tmp_path / "guard", {"mat_jax": 0, "mat_jax.low": 1, "mat_jax.high": 9}, {
      "mat_jax/__init__.py": "", "mat_jax/low.py": 'if __name__ == "__main__":\n  from mat_jax import high\n',
      "mat_jax/high.py": "from mat_jax import low\n"})
  assert _layer_problems(tree) == ["mat_jax/low.py:2: mat_jax.low (layer 1) imports mat_jax.high (layer 9), "
                                   "a higher layer"]
  assert _cycles(tree) == ["mat_jax.high -> mat_jax.low -> mat_jax.high"]
  assert [p.split(":")[0] for p in _main_guard_problems(tree)] == ["mat_jax/low.py"]
  # `python -m mat_jax.evaluate` runs evaluate.py as __main__, a module apart from the mat_jax.evaluate that
  # evaluate_cli imports: the handover is neither a higher-layer import nor a circle.
  tree = _write_tree(tmp_path / "handover", {"mat_jax": 0, "mat_jax.evaluate": 8, "mat_jax.evaluate_cli": 9}, {
      "mat_jax/__init__.py": "",
      "mat_jax/evaluate.py": 'if __name__ == "__main__":\n  from mat_jax import evaluate_cli\n',
      "mat_jax/evaluate_cli.py": "from mat_jax import evaluate\n"})
  assert _layer_problems(tree) == _cycles(tree) == _main_guard_problems(tree) == []


@pytest.mark.parametrize("source", ['if __name__ == "__main__":\n  from mat_jax import evaluate_cli\n',
                                    "from mat_jax import evaluate_cli\n"])
def test_only_the_handover_is_allowed(tmp_path, source):
  # The same import from another library's main guard, or at the top of evaluate.py, is a higher layer.
  name = "zeroshot" if "__main__" in source else "evaluate"
  tree = _write_tree(tmp_path, {"mat_jax": 0, f"mat_jax.{name}": 8, "mat_jax.evaluate_cli": 9},
                     {"mat_jax/__init__.py": "", f"mat_jax/{name}.py": source, "mat_jax/evaluate_cli.py": ""})
  assert [p.split(": ", 1)[1] for p in _layer_problems(tree)] == [
      f"mat_jax.{name} (layer 8) imports mat_jax.evaluate_cli (layer 9), a higher layer"]


def test_imports_by_name_count_like_import_statements(tmp_path):
  source = "import importlib\ndef load(n):\n  return importlib.import_module(f'mat_jax.high.{n}')\n"
  layers = {"mat_jax": 0, "mat_jax.low": 1, "mat_jax.high": 9, "mat_jax.high.x": 9}
  files = {"mat_jax/__init__.py": "", "mat_jax/low.py": source, "mat_jax/high/__init__.py": "",
           "mat_jax/high/x.py": "from mat_jax import low\n"}
  tree = _write_tree(tmp_path / "by_name", layers, files)
  assert [p.split(": ", 1)[1] for p in _layer_problems(tree)] == [
      "imports mat_jax.high.x inside a function; import it at the top (if that makes a circle, the module is in "
      "the wrong layer)", "mat_jax.low (layer 1) imports mat_jax.high.x (layer 9), a higher layer",
      "mat_jax.low (layer 1) imports mat_jax.high (layer 9), a higher layer"]
  tree = _write_tree(tmp_path / "constant", layers, dict(files, **{"mat_jax/low.py": "__import__('mat_jax.high.x')\n"}))
  assert _cycles(tree) == ["mat_jax.high.x -> mat_jax.low -> mat_jax.high.x"]


def test_the_diagram_check_reads_wildcards_and_notes(tmp_path):
  tree = _write_tree(tmp_path, {"mat_jax": 0, "mat_jax.a": 2, "mat_jax.a.x": 2, "mat_jax.b": 3}, {
      "mat_jax/__init__.py": "", "mat_jax/a/__init__.py": "", "mat_jax/a/x.py": "", "mat_jax/b.py": ""})
  (tmp_path / "docs" / "architecture.md").write_text(
      (tmp_path / "docs" / "architecture.md").read_text()
      + "```\n 3  upper layer      b: its note (a, not a.x)\n 2  lower           a.*  b\n```\n")
  assert _diagram_problems(tree) == ["mat_jax.b: the diagram draws it in layer 2, the table gives 3"]


def test_the_shapes_world_imports_without_tensorflow_datasets():
  code = "import sys, mat_jax.data.shapes; print('tensorflow_datasets' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
  assert out.stdout.strip() == "False", "importing mat_jax.data.shapes loaded tensorflow_datasets"
