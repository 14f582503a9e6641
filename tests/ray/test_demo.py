"""`kvcomm demo`, run as a user runs it (a subprocess with its own local Ray cluster and Serve app), on tiny-llama
with random weights (the embedded tokenizer) and three short jobs: every answer and decision it prints is the
single-process oracle's, for the same jobs in the same order."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvcomm.config import KVCommConfig
from kvcomm.harness.jobs import GenerationParams
from kvcomm.harness.topologies import build_job
from kvcomm.job_runner import run_job
from kvcomm.engine import build_engine

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
QUESTIONS = (
    "A baker makes 24 muffins in the morning and 18 in the afternoon. She sells 35 of them. How many are left?",
    "Tom has 3 boxes with 12 pencils in each box and gives away 10 pencils. How many pencils does he have now?",
    "Sara has 7 apples and buys 5 more. How many apples does she have?",   # the shortest: the one shown
)
GAMMA = 1.0   # configs/local.yaml's kvcomm.gamma, which the demo runs with


def _jobs():
    return [build_job("math", q, num_agents=3, mode="kvcomm", job_id=f"demo-{i}",
                      generation=GenerationParams(max_new_tokens=6, min_new_tokens=6)) for i, q in enumerate(QUESTIONS)]


def _one_line(text: str) -> str:
    return " ".join(text.split())[:160]


def test_demo_prints_the_oracle_s_answers_decisions_and_reuse(tmp_path, tiny_model_dir):
    """Every turn the demo reports (warm-ups, then the shown job in dense and in kvcomm mode: agent, reused or
    prefilled, the engine's reason, token count), each agent's dense and kvcomm answer, its 'same tokens' count and
    the job's reuse rate equal those of `run_job` on one in-process engine that ran the same jobs in the same
    order. A demo that ran the wrong mode, lost the warm-up's anchors or misread a field fails. (On random weights
    kvcomm's answers equal dense's; the modes differ in their decisions: dense_mode, cold_pool, reused.)"""
    jobs = _jobs()
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(json.dumps(job.to_dict()) + "\n" for job in jobs))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run([sys.executable, "-m", "cluster.cli", "demo", "--jobs", str(path), "--model", tiny_model_dir,
                           "--random-weights", "--num-cpus", "2"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    printed = done.stdout
    assert done.returncode == 0, printed[-3000:] + done.stderr[-3000:]

    oracle = build_engine(tiny_model_dir, random_weights=True, config=KVCommConfig(gamma=GAMMA))
    shown = min(jobs, key=lambda j: len(j.task))
    runs = [run_job(oracle, job, mode="kvcomm") for job in jobs if job is not shown]   # the warm-up, in file order
    dense, kvcomm = run_job(oracle, shown, mode="dense"), run_job(oracle, shown, mode="kvcomm")
    runs += [dense, kvcomm]

    # every turn the demo followed on its event streams (warm-ups, then dense, then kvcomm): the oracle's
    followed = re.findall(r"^\[demo\]   agent (\S+) \((.+?)\) answered: TTFT \d+ ms, (reused|prefilled) \[(.+?)\], "
                          r"(\d+) tokens$", printed, re.MULTILINE)
    assert followed == [(t.agent_id, t.role, "reused" if t.reused else "prefilled", t.reason, str(len(t.token_ids)))
                        for run in runs for t in run.turns], printed[-4000:]

    assert f"Question: {shown.task}" in printed
    for d, k in zip(dense.turns, kvcomm.turns):
        block = f"agent {d.agent_id} ({d.role})\n  dense : {_one_line(d.text)}\n  kvcomm: {_one_line(k.text)}\n"
        assert block in printed, (block, printed[-2500:])
        same = next((i for i, (a, b) in enumerate(zip(d.token_ids, k.token_ids)) if a != b),
                    min(len(d.token_ids), len(k.token_ids)))
        row = re.search(rf"^{re.escape(d.agent_id)}\s+{re.escape(d.role[:23])}\s+.*?(\d+)/(\d+)\s+(\S+)$", printed,
                        re.MULTILINE)
        assert row is not None, (d.agent_id, printed[-2500:])
        assert (int(row[1]), int(row[2]), row[3]) == (same, len(d.token_ids), k.reason), d.agent_id
    assert f"reuse rate of this job {kvcomm.reuse_rate:.0%};" in printed
    assert kvcomm.reuse_rate > 0   # the warm-up left anchors the shown job could use
    same_answers = sum(d.token_ids == k.token_ids for d, k in zip(dense.turns, kvcomm.turns))
    assert f"answers identical to dense for {same_answers} of 3 agents" in printed
