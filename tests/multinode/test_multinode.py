"""The cluster on several nodes, simulated on this machine (`cluster.bench.simcluster`, `ray.cluster_utils`): a
head node without CPUs and worker nodes with fake GPUs, the model on the CPU (`ClusterConfig.simulate_gpus`).

Each drill (tests/support/multinode_drills.py) runs in a process of its own, because this session's local Ray cluster
cannot share a process with another cluster; the drill asserts what it checks and prints its figures:

* ``spread``: jobs from `kvcomm submit` (worker actors placed SPREAD) and over HTTP (one worker replica per node)
  run their turns on two nodes, with the in-process oracle's tokens;
* ``node_lost``: a node holding the anchor pool and two of four workers is removed without warning while 16 dense
  jobs run (half of them stars, whose level-0 agents read the question at once); every job completes with the
  oracle's tokens, the pool restarts on a surviving node from its snapshot, and kvcomm jobs reuse its anchors
  again;
* ``store_per_node``: the pool's byte budget is checked against each node's object store, not their sum.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def run_drill(name: str, model_dir: str, workdir: Path, timeout_s: float = 900) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.update(RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "support" / "multinode_drills.py"), name, model_dir,
                           str(workdir)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, (done.stdout[-3000:], done.stderr[-6000:])
    result = json.loads(lines[-1][len("RESULT "):])
    print(f"\n[multinode] {name}: {json.dumps(result)}")
    return result


def test_jobs_from_submit_and_over_http_spread_over_two_nodes(tiny_model_dir, tmp_path) -> None:
    result = run_drill("spread", tiny_model_dir, tmp_path)
    assert result["submit_workers"] == ["worker-0", "worker-1"] and result["http_nodes"] == 2


def test_a_node_lost_under_load_loses_no_job_and_the_pool_comes_back(tiny_model_dir, tmp_path) -> None:
    result = run_drill("node_lost", tiny_model_dir, tmp_path)
    assert result["jobs"] == 16 and result["reuse_after"] > 0


def test_the_pool_budget_is_checked_per_node(tiny_model_dir, tmp_path) -> None:
    result = run_drill("store_per_node", tiny_model_dir, tmp_path)
    assert result["budget_mb"] < result["sum_mb"] and result["problem"]
