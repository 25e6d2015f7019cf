"""Imports inside ``lm_mini`` flow one way: no module imports itself back through others (DESIGN.md section 2),
the packages stand in layers, and the light commands import no deep-learning stack.

The graph is read from the source with ``ast`` (nothing is imported): an edge ``a -> b`` for every ``import b`` /
``from b import x`` (``b.x`` when that is a module) in ``a``. Module-level imports run when a module loads; a
cycle among them is an import-order bug waiting for a new entry point. Imports inside functions run later and
cannot deadlock an import, but a cycle through them still means two layers know each other: they are checked
separately, and evaluation in particular never reaches into training (training imports evaluation).
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lm_mini"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> Dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module, module: str, is_package: bool) -> Tuple[List[Tuple[str, List[str]]], List[Tuple[str, List[str]]]]:
    """(module-level, function-level) imports of one file: (imported module, names taken from it)."""
    top: List[Tuple[str, List[str]]] = []
    nested: List[Tuple[str, List[str]]] = []

    def visit(node: ast.AST, level: List, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue  # annotations only: never executed
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            target = nested if inner else top
            if isinstance(child, ast.Import):
                target.extend((alias.name, []) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: from the module's package
                    package = module.split(".") if is_package else module.split(".")[:-1]
                    package = package[: len(package) - (child.level - 1)]
                    base = ".".join(package + ([base] if base else []))
                target.append((base, [a.name for a in child.names]))
            visit(child, level, inner)

    visit(tree, [], False)
    return top, nested


def import_graph() -> Tuple[Dict[str, Set[str]], Dict[str, Set[str]]]:
    """(module-level edges, function-level edges) between lm_mini modules."""
    modules = _modules()
    top_edges: Dict[str, Set[str]] = {m: set() for m in modules}
    nested_edges: Dict[str, Set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        top, nested = _imports(ast.parse(path.read_text(), str(path)), module, path.name == "__init__.py")
        for edges, found in ((top_edges, top), (nested_edges, nested)):
            for base, names in found:
                targets = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules] or ([base] if base in modules else [])
                edges[module].update(t for t in targets if t != module)
    return top_edges, nested_edges


def cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    return out


def test_the_graph_is_read_from_the_source():
    top, nested = import_graph()
    assert "lm_mini.registry" in top["lm_mini.eval.benchmarks.base"]  # from lm_mini.registry import Registry
    assert "lm_mini.eval.generation" in top["lm_mini.training.module"]  # training imports evaluation ...
    assert "lm_mini.eval.evaluate" in nested["lm_mini.training.run"]  # ... also inside functions
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the detector finds one


def test_no_import_cycle_among_module_level_imports():
    top, _ = import_graph()
    assert cycles(top) == []


def test_no_import_cycle_counting_imports_inside_functions():
    top, nested = import_graph()
    both = {m: top[m] | nested[m] for m in top}
    assert cycles(both) == []


def test_evaluation_never_imports_training():
    top, nested = import_graph()
    reached = {(m, t) for m in top if m.startswith("lm_mini.eval") for t in top[m] | nested[m] if t.startswith("lm_mini.training")}
    assert reached == set()


# DESIGN.md section 2, bottom up: a module imports only from its own layer or the ones before it (also inside
# functions). runs.py is a base module: interop and the commands resolve RUN|CHECKPOINT|MODEL_DIR through it.
LAYERS = (
    ("lm_mini", "lm_mini.constants", "lm_mini.trust", "lm_mini.quiet", "lm_mini.registry", "lm_mini.config", "lm_mini.runs"),
    ("lm_mini.models",),
    ("lm_mini.data",),
    ("lm_mini.interop",),
    ("lm_mini.eval",),
    ("lm_mini.training",),
    ("lm_mini.sweeps", "lm_mini.recipes"),
    ("lm_mini.cli",),
)


def _layer(module: str) -> int:
    best = None
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > best[1]):
                best = (i, len(name))
    assert best is not None, f"{module} is in no layer of LAYERS"
    return best[0]


# The edges upward, and why: the config refuses credentials in URLs (they would be saved with the run) and the run
# directory keeps its tracking URI without them, with data.remote's own redact / secrets_in / without_credentials,
# which import nothing heavy for that reason; a tracking server's URL is shown redacted the same way.
ALLOWED_UPWARD = {("lm_mini.config", "lm_mini.data.remote"), ("lm_mini.runs", "lm_mini.data.remote"),
                  ("lm_mini.tracking_server", "lm_mini.data.remote")}


def test_packages_import_downward_only():
    top, nested = import_graph()
    upward = sorted(f"{m} -> {t}" for m in top for t in top[m] | nested[m]
                    if _layer(t) > _layer(m) and (m, t) not in ALLOWED_UPWARD)
    assert upward == []


LIGHT_COMMANDS = [["--help"], ["config", "show", "experiments/demo.yaml"],
                  ["sweep", "experiments/sweeps/demo_c_depth.yaml", "--dry-run"]]


@pytest.mark.parametrize("argv", LIGHT_COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_light_commands_import_no_deep_learning_stack(argv):
    """``lm-mini --help``, ``config show`` and ``sweep --dry-run`` answer in well under a second: they import neither
    torch nor Lightning (nor transformers or MLflow), checked in a fresh interpreter."""
    import json
    import subprocess
    import sys

    code = ("import contextlib, io, json, sys\n"
            "from lm_mini.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n"
            f"        rc = main({argv!r})\n"
            "    except SystemExit as e:\n"
            "        rc = e.code\n"
            "heavy = ('torch', 'lightning', 'transformers', 'mlflow', 'torchmetrics', 'webdataset')\n"
            "print(json.dumps({'rc': rc, 'loaded': sorted(m for m in heavy if m in sys.modules)}))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == {"rc": 0, "loaded": []}
