"""The package's architecture, read from the source: stages as subpackages, imports one way.

Every `import` of archscale counts, lazy ones inside functions and `TYPE_CHECKING` blocks too: a
lazy import that dodges a cycle is still a cycle of the design.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "archscale"

# Each stage may import the stages of lower rank and itself, never a sibling of the same rank.
LAYERS = {
    "core": 0,      # paths and atomic I/O, locks, exit statuses, the config schema, hardware
    "model": 1,     # ArchSpec and accounting, the Flax decoder, kernels, sharding, HF weights
    "data": 1,      # sources, tokenizers, prepared datasets, batches
    "train": 2,     # optimizer step, loss, checkpoints, monitoring, the training loop
    "serve": 2,     # generation, the decode harness, the cost model, throughput sources
    "interop": 3,   # HF export of a trained run, lm-evaluation-harness
    "study": 4,     # sweeps and launchers, the results table, laws and fits, search, report
    "main": 5,      # the command line
}


def _stage(module: str) -> str:
  parts = module.split(".")
  return "main" if parts[1] == "main" else parts[1]


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in sorted(ROOT.rglob("*.py")):
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


def _imports(module: str, path: pathlib.Path, known: set[str]) -> set[str]:
  """The archscale modules `module` imports (a package's `from P import m` names P.m)."""
  found = set()
  package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names if a.name.startswith("archscale")}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                        + ([base] if base else []))
      if not base.startswith("archscale"):
        continue
      for a in node.names:
        found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
  return {m for m in found if m != module}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
  modules = _modules()
  return {m: _imports(m, p, set(modules)) for m, p in modules.items()}


def test_every_module_belongs_to_a_stage(graph):
  assert ROOT.joinpath("main.py").exists()
  stray = [m for m in graph if m != "archscale" and _stage(m) not in LAYERS]
  assert not stray, f"modules outside the stage packages {sorted(LAYERS)}: {stray}"
  for stage in set(LAYERS) - {"main"}:
    init = ROOT / stage / "__init__.py"
    assert init.exists() and ast.get_docstring(ast.parse(init.read_text())), stage


def test_imports_run_down_the_layer_table(graph):
  wrong = []
  for module, deps in graph.items():
    for dep in deps:
      if dep == "archscale" or module == "archscale":
        continue
      a, b = _stage(module), _stage(dep)
      if a != b and LAYERS[b] >= LAYERS[a]:
        wrong.append(f"{module} -> {dep}")
  assert not wrong, "imports against the layer table:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles(graph):
  cycles, state = [], {}

  def visit(m: str, stack: list[str]) -> None:
    state[m] = "open"
    for dep in sorted(graph.get(m, ())):
      if dep not in graph:
        continue
      if state.get(dep) == "open":
        cycles.append(stack[stack.index(dep):] + [dep])
      elif dep not in state:
        visit(dep, stack + [dep])
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])
  assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_lazy_and_type_checking_imports():
  source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n  from archscale.study import x\n"
            "def f():\n  from archscale.core import io\n")
  path = ROOT.parent / "tests" / "_layout_probe.py"
  try:
    path.write_text(source)
    known = {"archscale.study.x", "archscale.core.io"}
    assert _imports("archscale.model.y", path, known) == known
  finally:
    path.unlink()


def test_size_limits():
  long_modules = {p.name: n for p in ROOT.rglob("*.py")
                  if (n := len(p.read_text().splitlines())) > 700}
  assert not long_modules, long_modules
  long_functions = []
  for path in ROOT.rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        n = node.end_lineno - node.lineno + 1
        if n > 80 and node.name != "get_config":
          long_functions.append(f"{path.relative_to(ROOT)}:{node.name} ({n} lines)")
  assert not long_functions, long_functions
