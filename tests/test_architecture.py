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

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mat_jax"
ROW = re.compile(r"^\| `(mat_jax[\w.]*)` \| (\d+) \|", re.M)


@functools.cache
def _layers() -> dict[str, int]:
  return {name: int(layer) for name, layer in ROW.findall((ROOT / "docs" / "architecture.md").read_text())}


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


@functools.cache
def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_main_guard(node: ast.AST) -> bool:
  """`if __name__ == "__main__":` at module level: where a library run as `python -m` hands over to its
  command line (the one place a higher layer may be imported)."""
  test = getattr(node, "test", None)
  return (isinstance(node, ast.If) and isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
          and test.left.id == "__name__" and any(isinstance(c, ast.Constant) and c.value == "__main__"
                                                 for c in test.comparators))


@functools.cache
def _imports_of(name: str) -> tuple:
  return tuple(_imports(name, _modules()[name], _modules()))


def _imports(name: str, path: pathlib.Path, modules: dict[str, pathlib.Path]):
  """(line, imported mat_jax module, where) for every import of a mat_jax module in `path`; where is
  "top", "function" or "main" (inside the main guard)."""
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
    subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
    return subs + ([base] if len(subs) < len(node.names) else [])

  def walk(node, where):
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.Import, ast.ImportFrom)):
        found.extend((child.lineno, target, where) for target in targets(child))
      inner = where
      if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        inner = "function"
      elif where == "top" and _is_main_guard(child):
        inner = "main"
      walk(child, inner)

  walk(ast.parse(path.read_text(), str(path)), "top")
  return found


def _parents(module: str) -> list[str]:
  """The packages importing `module` loads first (mat_jax.a.b -> mat_jax.a)."""
  parts = module.split(".")
  return [".".join(parts[:i]) for i in range(2, len(parts))]


def test_every_module_has_a_layer_and_every_row_a_module():
  layers, modules = _layers(), _modules()
  missing = sorted(set(modules) - set(layers))
  stale = sorted(set(layers) - set(modules))
  assert not missing, f"modules without a row in docs/architecture.md's table (give each its layer): {missing}"
  assert not stale, f"rows of docs/architecture.md's table naming no module (remove or rename them): {stale}"


def test_no_import_of_a_higher_layer_and_none_inside_a_function():
  layers, modules = _layers(), _modules()
  problems = []
  for name, path in modules.items():
    where_file = path.relative_to(ROOT)
    for line, target, where in _imports_of(name):
      if where == "function":
        problems.append(f"{where_file}:{line}: imports {target} inside a function; import it at the top "
                        "(if that makes a circle, the module is in the wrong layer)")
      if where == "main" or name not in layers:
        continue
      for imported in [target, *_parents(target)]:
        if imported in layers and layers[imported] > layers[name]:
          problems.append(f"{where_file}:{line}: {name} (layer {layers[name]}) imports {imported} "
                          f"(layer {layers[imported]}), a higher layer")
  assert not problems, "\n".join(problems)


def test_no_import_circles():
  modules = _modules()
  graph = {name: sorted({t for _, t, where in _imports_of(name) if where == "top" and t != name})
           for name in modules}
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
  assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_the_shapes_world_imports_without_tensorflow_datasets():
  code = "import sys, mat_jax.data.shapes; print('tensorflow_datasets' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
  assert out.stdout.strip() == "False", "importing mat_jax.data.shapes loaded tensorflow_datasets"
