"""The suite's tiers: which folder a test file belongs to and the marker that folder gives its tests.

`tests/conftest.py` marks each collected test with its folder's tier; `tests/unit/test_tiers.py` checks that every
test file sits in a tier folder and that each test carries its own tier's marker and no other.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
# tier -> what its tests start (the order runs from cheapest to dearest)
TIERS = {
    "unit": "no Ray: the model, the engine and the code in this process (subprocesses at most)",
    "ray": "a local Ray cluster (actors, the object store, `kvcomm submit`), no HTTP",
    "http": "a Serve app (or `kvcomm serve`) over loopback HTTP",
    "reliability": "fault, load and fuzz tests against one Serve app",
    "multinode": "a Ray cluster of several nodes simulated on this machine",
}


def tier_of(path: Path, tests: Path = TESTS) -> str | None:
    """The tier of a test file: the first folder under `tests` when it names a tier, else None."""
    try:
        parts = Path(path).resolve().relative_to(tests.resolve()).parts
    except ValueError:
        return None
    return parts[0] if len(parts) > 1 and parts[0] in TIERS else None


def misplaced_files(tests: Path = TESTS) -> list[str]:
    """Test files (``test_*.py``) under `tests` that sit outside a tier folder."""
    return sorted(str(p.relative_to(tests)) for p in tests.rglob("test_*.py") if tier_of(p, tests) is None)


def marker_problems(items: Iterable[tuple[str, set[str]]]) -> list[str]:
    """(node id relative to tests/, marker names) per test -> a line per test that lacks its tier's marker or
    carries another tier's."""
    problems = []
    for node_id, markers in items:
        tier = node_id.split("/", 1)[0] if "/" in node_id else None
        if tier not in TIERS:
            problems.append(f"{node_id}: outside a tier folder")
            continue
        if tier not in markers:
            problems.append(f"{node_id}: lacks the marker {tier!r}")
        others = sorted((markers & set(TIERS)) - {tier})
        if others:
            problems.append(f"{node_id}: carries another tier's marker {others}")
    return problems
