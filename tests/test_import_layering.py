"""Imports point one way: kvcomm <- actors <- cluster. kvcomm never pulls in Ray, pydantic or HTTP stacks."""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


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
