"""The package's import graph: no cycles, and no import from a lower layer up to a higher one."""
import ast
from pathlib import Path

from rallrec_jax import pipeline

PACKAGE = Path(__file__).resolve().parents[1] / "rallrec_jax"
# The layers that nothing below may import: the pipeline and entry points, the stage modules,
# the benchmarks.
TOP = ("rallrec_jax.pipeline", "rallrec_jax.main", "rallrec_jax.bench", "rallrec_jax.sweep",
       "rallrec_jax.report", "rallrec_jax.benchmarks")
LOW = ("rallrec_jax.data", "rallrec_jax.llm", "rallrec_jax.parallel")


def _module_name(path):
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph():
  """{module: set of rallrec_jax modules it imports}, lazy (in-function) imports included."""
  modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
  graph = {}
  for name, path in modules.items():
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        found.update(a.name for a in node.names)
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        # `from P import m` of a submodule m imports m; of any other name, P itself.
        subs = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
        found.update(subs)
        if len(subs) < len(node.names):
          found.add(node.module)
    graph[name] = {m for m in found if m in modules and m != name}
  return graph


def _is_stage_module(name):
  return name == "rallrec_jax.stage" or name.endswith(".stage")


def _in(name, prefixes):
  return any(name == p or name.startswith(p + ".") for p in prefixes)


def _reachable(graph, start):
  seen, todo = set(), [start]
  while todo:
    for nxt in graph[todo.pop()]:
      if nxt not in seen:
        seen.add(nxt)
        todo.append(nxt)
  return seen


def test_no_module_imports_one_that_imports_it_back():
  graph = import_graph()
  cycles = sorted(name for name in graph if name in _reachable(graph, name)
                  and name != "rallrec_jax")
  assert not cycles, f"modules on an import cycle: {cycles}"


def test_no_import_runs_from_a_lower_layer_to_a_higher_one():
  graph = import_graph()
  upward = sorted(
      (name, target) for name, targets in graph.items() for target in targets
      if (_in(name, LOW) or not (_in(name, TOP) or _is_stage_module(name)))
      and (_in(target, TOP) or (_is_stage_module(target) and target != "rallrec_jax.stage")))
  assert not upward, f"imports that run up a layer: {upward}"


def test_every_stage_is_declared_in_a_stage_module_of_its_package():
  for name, stage in pipeline.STAGES.items():
    module = stage.run.__module__
    assert _is_stage_module(module), (name, module)
  assert not (PACKAGE / "stages.py").exists()


def test_the_graph_sees_imports_inside_functions(tmp_path):
  assert "rallrec_jax.pipeline" in import_graph()["rallrec_jax.benchmarks.quality"]
