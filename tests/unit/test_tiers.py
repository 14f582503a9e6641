"""The suite's layout: every test file sits in a tier folder and every test carries its folder's marker, and only
that tier's, so `pytest -m unit` (ray, http, reliability, multinode) selects exactly one folder."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.support.tiers import TESTS, TIERS, marker_problems, misplaced_files, tier_of

# Collects the whole suite (no test runs) and prints (node id, marker names) per test as one JSON line.
COLLECT = """
import json, sys
import pytest

class Recorder:
    items = []
    def pytest_collection_finish(self, session):
        Recorder.items = [(item.nodeid, sorted(m.name for m in item.iter_markers())) for item in session.items]

code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", sys.argv[1]], plugins=[Recorder()])
print("ITEMS " + json.dumps(Recorder.items))
sys.exit(code)
"""


def test_every_test_file_sits_in_a_tier_folder() -> None:
    assert misplaced_files() == []
    assert {tier_of(TESTS / tier / "test_x.py") for tier in TIERS} == set(TIERS)


def test_the_layout_checks_catch_a_stray_file_and_a_wrong_marker(tmp_path) -> None:
    """The checks above and below would fail on what they are for."""
    for folder in ("unit", "support", "."):
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / "test_a.py").write_text("")
    assert misplaced_files(tmp_path) == ["support/test_a.py", "test_a.py"]
    assert marker_problems([("unit/test_a.py::test_b", {"unit"}), ("ray/test_a.py::test_b", {"ray", "slow"})]) == []
    assert marker_problems([("ray/test_a.py::test_b", {"slow"}), ("http/test_a.py::test_b", {"http", "ray"}),
                            ("test_a.py::test_b", {"unit"})]) == [
        "ray/test_a.py::test_b: lacks the marker 'ray'",
        "http/test_a.py::test_b: carries another tier's marker ['ray']",
        "test_a.py::test_b: outside a tier folder"]


def collected_tests(request) -> list[tuple[str, set[str]]]:
    """(node id relative to tests/, marker names) for every test of the suite: this session's own when it collected
    every tier (the full suite), else a collection of the whole suite in a subprocess (~10 s)."""
    items = [(item.nodeid, {m.name for m in item.iter_markers()}) for item in request.session.items]
    if {node_id.split("/")[1] for node_id, _ in items} != set(TIERS):
        done = subprocess.run([sys.executable, "-c", COLLECT, str(TESTS)], cwd=TESTS.parent, capture_output=True,
                              text=True, timeout=600)
        lines = [line for line in done.stdout.splitlines() if line.startswith("ITEMS ")]
        assert done.returncode == 0 and lines, (done.stdout[-3000:], done.stderr[-3000:])
        items = [(node_id, set(markers)) for node_id, markers in json.loads(lines[-1][6:])]
    return [(node_id.removeprefix("tests/"), markers) for node_id, markers in items]


def test_every_collected_test_carries_its_tier_marker_and_no_other(request) -> None:
    items = collected_tests(request)
    assert len(items) > 300
    assert marker_problems(items) == []
    assert {node_id.split("/", 1)[0] for node_id, _ in items} == set(TIERS)   # every tier has tests
