"""The import graph of the package, read from the source (every import, top-level or not)."""
import ast
from pathlib import Path

import rallrec_jax

ROOT = Path(rallrec_jax.__file__).parent
COMPETITORS = ("torch", "peft")


def _module_name(path):
  parts = ("rallrec_jax",) + path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path):
  """Absolute names each import statement of `path` reaches (`from a import b`: a and a.b)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f"{node.module}.{alias.name}" for alias in node.names)
  return names


def _graph():
  modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
  return {name: _imports(path) for name, path in modules.items()}


def _is_benchmark(name):
  return name == "rallrec_jax.bench" or name.startswith("rallrec_jax.benchmarks")


def test_the_graph_sees_known_imports():
  graph = _graph()
  assert "rallrec_jax.benchmarks.control" in graph["rallrec_jax.benchmarks.cli"]
  assert "torch" in graph["rallrec_jax.benchmarks.control"]


def test_nothing_in_the_library_imports_a_benchmark():
  wrong = {name: sorted(n for n in deps if _is_benchmark(n))
           for name, deps in _graph().items() if not _is_benchmark(name)}
  assert not {k: v for k, v in wrong.items() if v}


def test_only_benchmarks_import_competitor_frameworks():
  wrong = {name: sorted(n for n in deps if n.split(".")[0] in COMPETITORS)
           for name, deps in _graph().items() if not _is_benchmark(name)}
  assert not {k: v for k, v in wrong.items() if v}
