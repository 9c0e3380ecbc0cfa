"""The package's shape: imports run one way, form no cycle, and change nothing.

The import graph is read from the source (every import statement, those inside
functions included, so a lazy import cannot hide a cycle). Packages sit in layers;
a module imports only from its own layer or lower ones:

    entry points (cli, __main__, __init__)
    cluster control (cluster/)
    Ray Serve and the ingest gateway (serve/)
    Ray actors (actors/)
    the HTTP API (api/)
    domain packages (ingest/, storage/, warehouse/, query/, tasks/, testing/, client)
    settings (config)
    the pure core (core/)
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "flowray"
LAYERS = {
    "core": 0,
    "config": 1,
    "ingest": 2,
    "storage": 2,
    "warehouse": 2,
    "query": 2,
    "tasks": 2,
    "testing": 2,
    "client": 2,
    "api": 3,
    "actors": 4,
    "serve": 5,
    "cluster": 6,
    "cli": 7,
    "__main__": 7,
    "__init__": 7,
}
# Packages whose code must run without Ray (pure rules, domain code, the HTTP API).
RAY_FREE = ("core", "config", "ingest", "storage", "warehouse", "query", "api")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 2:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports (flowray's resolved to modules, others by name)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = (
                    name.split(".")[: -node.level]
                    if path.name != "__init__.py"
                    else (name.split(".")[: len(name.split(".")) - node.level + 1])
                )
                base = ".".join([*package, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    return LAYERS[key]


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        assert _layer(module) >= 0, module


def test_imports_run_one_way() -> None:
    upward = [
        f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
        for module, targets in GRAPH.items()
        for target in targets
        if target in MODULES and _layer(target) > _layer(module)
    ]
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_there_is_no_import_cycle() -> None:
    """Tarjan's strongly connected components over flowray's own modules."""
    edges = {m: sorted(t for t in ts if t in MODULES and t != m) for m, ts in GRAPH.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
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
                cycles.append(sorted(component))

    for module in edges:
        if module not in index:
            visit(module)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("package", RAY_FREE)
def test_pure_and_api_packages_do_not_import_ray(package: str) -> None:
    """Directly or through any flowray module they import."""
    seen: set[str] = set()
    todo = [m for m in MODULES if m == f"flowray.{package}" or m.startswith(f"flowray.{package}.")]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        for target in GRAPH[module]:
            assert target.split(".")[0] != "ray", f"{module} imports {target}"
            if target in MODULES:
                todo.append(target)


def test_the_graph_sees_lazy_imports() -> None:
    """The reader must find imports inside functions, or a cycle could hide there."""
    lazy = set()
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith(
                        "flowray"
                    ):
                        lazy.add((module, inner.module))
    assert lazy, "no lazy import to check the reader against"
    for module, target in lazy:
        assert any(t == target or t.startswith(f"{target}.") for t in GRAPH[module]), (
            module,
            target,
        )


def test_the_layers_are_enforced() -> None:
    """A check that cannot fail proves nothing: the graph holds downward edges of
    every kind the layers allow, so an upward one would be seen too."""
    assert "flowray.core.replication" in GRAPH["flowray.actors.replica"]
    assert "flowray.serve.deployment" in GRAPH["flowray.cluster.control"]


def test_importing_a_module_changes_nothing() -> None:
    """Import every module after the libraries it uses, in a fresh interpreter, and
    check after each that no attribute of an already imported module was replaced (a
    patch) and that the environment is as it was."""
    program = textwrap.dedent(
        f"""
        import importlib, os, sys, types
        for lib in ("asyncio", "ray", "ray.serve", "ray.serve._private.replica", "fastapi",
                    "starlette.applications", "uvicorn", "duckdb", "pyarrow", "numpy",
                    "redis", "typer", "httpx", "orjson", "msgpack", "prometheus_client"):
            importlib.import_module(lib)

        def snapshot():
            out = {{}}
            for name, module in list(sys.modules.items()):
                if module is None or name.startswith("flowray"):
                    continue
                try:
                    items = list(vars(module).items())
                except TypeError:
                    continue
                out[name] = {{k: id(v) for k, v in items if not isinstance(v, types.ModuleType)}}
            return out

        before, env = snapshot(), dict(os.environ)
        for name in {sorted(m for m in MODULES if not m.endswith("__main__"))!r}:
            importlib.import_module(name)
            after = snapshot()
            for mod, attrs in before.items():
                now = after.get(mod, {{}})
                changed = [k for k, v in attrs.items() if k in now and now[k] != v]
                if changed:
                    sys.exit(f"importing {{name}} replaced {{mod}}.{{changed}}")
            if dict(os.environ) != env:
                sys.exit(f"importing {{name}} changed the environment")
        print("ok")
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
