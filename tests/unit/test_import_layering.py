"""Imports point one way: kvcomm <- actors <- cluster. kvcomm never pulls in Ray, pydantic or HTTP stacks."""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _imported_top_levels(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


def test_importing_every_kvcomm_module_loads_no_ray_pydantic_or_fastapi():
    code = ("import importlib, pkgutil, sys, kvcomm\n"
            "for m in pkgutil.walk_packages(kvcomm.__path__, 'kvcomm.'):\n"
            "    importlib.import_module(m.name)\n"
            "print(sorted(n for n in ('ray', 'pydantic', 'fastapi', 'actors', 'cluster') if n in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_source_imports_point_one_way():
    for path, names in _imported_top_levels("kvcomm").items():
        assert not names & {"ray", "pydantic", "fastapi", "actors", "cluster"}, path
    for path, names in _imported_top_levels("actors").items():
        assert "cluster" not in names, path


def module_imports(root: pathlib.Path, package: str) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (at the top or inside functions; relative imports resolved)."""
    paths = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (root / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        here = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                while name and name not in paths:
                    name = name.rpartition(".")[0]
                if name and name != module and not module.startswith(name + "."):
                    targets.add(name)
        graph[module] = targets
    return graph


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path (first module repeated at the end), or None."""
    state: dict[str, int] = {}            # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_no_import_cycle_in_any_package():
    for package in ("kvcomm", "actors", "cluster"):
        cycle = import_cycle(module_imports(ROOT, package))
        assert cycle is None, f"import cycle in {package}: {' -> '.join(cycle)}"


def test_the_cycle_check_finds_a_cycle_through_an_import_inside_a_function(tmp_path):
    """The check above would catch what it is for: a cycle closed by a function-level relative import."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from .sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from ..a import x\n")
    assert import_cycle(module_imports(tmp_path, "pkg")) == ["pkg.a", "pkg.sub.b", "pkg.a"]
    (package / "sub" / "b.py").write_text("def f():\n    import json\n")
    assert import_cycle(module_imports(tmp_path, "pkg")) is None


def test_cluster_modules_stay_short():
    """A newcomer reads a module in one sitting: nothing in cluster/ over 500 lines."""
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "cluster").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long
