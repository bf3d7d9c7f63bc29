"""The source's shape: no import cycle between modules or between packages, and no oversized module.

The import graph is read from the source with `ast`, not by importing it: every `import loragen.x`,
`from loragen.x import y` and relative import counts, at module level or inside a function, since a
function-level import is still a dependency (deferring it only hides the cycle from the interpreter).
A package here is the first level under `loragen` (`loragen.api`, `loragen.generator`, ...); the
top-level modules (`loragen.config`, `loragen.errors`, ...) are packages of their own.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "loragen"
MAX_LINES = 400
# Imports flow down this list (README, "Architecture"); a package may import its own layer's
# others only where that makes no cycle. The client sits beside the service and depends on its
# schemas alone (`test_the_client_depends_on_its_schemas_alone`).
LAYERS = (
    ("cli",),
    ("bench",),
    ("api", "batch", "client"),
    ("demo",),
    ("training", "evaluation"),
    ("generator",),
    ("registry", "basemodel", "encoder"),
    ("embeddings", "adapters"),
    ("config", "errors", "schemas"),
)
# What the client imports besides its own modules: the torch-free schemas it shares with the API,
# and, inside `to_lora()` only (so `import loragen.client` stays torch-free), `Lora`.
CLIENT_IMPORTS = {"loragen.schemas", "loragen.errors", "loragen.adapters", "loragen.adapters.lora"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((SRC / ROOT).rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of `name` that is a module of ours (`a.b.c` where `c` is a function of `a.b`)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of ours that `module` imports, anywhere in its body."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from pkg import sub` imports the submodule `pkg.sub` when there is one, else `pkg`
            names = [f"{prefix}.{a.name}" for a in node.names]
        for name in names:
            if name == ROOT or name.startswith(ROOT + "."):
                target = _resolve(name, modules)
                if target is not None and target != module:
                    out.add(target)
    return out


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    packages: dict[str, set[str]] = {}
    for m, targets in graph.items():
        if m == ROOT:
            continue
        deps = packages.setdefault(_package(m), set())
        deps.update(_package(t) for t in targets if t != ROOT and _package(t) != _package(m))
    return packages


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_the_graph_sees_relative_and_function_level_imports():
    graph = import_graph()
    assert "loragen.batch.config" in graph["loragen.batch.run"]  # relative, at module level
    assert "loragen.errors" in graph["loragen.cli"]  # `from ..errors import LoragenError`: the module, not the name
    assert "loragen.demo.world" in graph["loragen.cli.eval_cmds"]  # inside a function
    assert "loragen.demo.sets" in graph["loragen.bench.demo_eval"]  # `from ..demo import sets`: a submodule


def test_absolute_imports_count_too(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import loragen.errors\nfrom loragen.demo import sets\n\n\ndef f():\n    from loragen.config import Settings\n")
    assert _imports("loragen.m", f, _modules()) == {"loragen.errors", "loragen.demo.sets", "loragen.config"}


def test_cycles_are_found_whatever_their_length():
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_modules():
    assert cycles(import_graph()) == []


def test_no_import_cycle_between_packages():
    assert cycles(package_graph(import_graph())) == []


def test_imports_flow_down_the_layers():
    layer = {f"{ROOT}.{name}": i for i, names in enumerate(LAYERS) for name in names}
    packages = package_graph(import_graph())
    assert set(packages) <= set(layer), f"place these in LAYERS (and the README): {set(packages) - set(layer)}"
    upward = sorted((p, q) for p, deps in packages.items() for q in deps if layer[q] < layer[p])
    assert upward == []


def test_the_test_sets_are_not_importable_from_training_code():
    graph = import_graph()
    for module, targets in graph.items():
        if _package(module) == f"{ROOT}.training":
            assert not {t for t in targets if _package(t) in (f"{ROOT}.demo", f"{ROOT}.bench")}, module


def test_the_client_depends_on_its_schemas_alone():
    graph = import_graph()
    outside = {t for m, ts in graph.items() if _package(m) == f"{ROOT}.client" for t in ts
               if _package(t) != f"{ROOT}.client"}
    assert outside <= CLIENT_IMPORTS


def test_no_module_over_400_lines():
    over = {str(p.relative_to(SRC)): n for p in (SRC / ROOT).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not over, over
