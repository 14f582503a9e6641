"""`kvcomm submit`: results file, resume, error lines, and a clean shutdown of everything it started.

Real runs: one `AgentWorker` of tiny-llama (random weights, embedded tokenizer) on the session `ray_cluster`, and
once in a subprocess that starts (and must stop) its own local Ray cluster. Every result written must equal the
in-process engine's run of its job (`kvcomm.job_runner.run_job`, the oracle): token ids and final answer.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from kvcomm.harness.jobs import GenerationParams, JobSpec
from kvcomm.harness.topologies import build_job
from kvcomm.job_runner import run_job
from kvcomm.engine import build_engine

from cluster.batch.submit import finished_ids, main, read_jobs

REPO = Path(__file__).resolve().parents[2]


def write_config(tmp_path: Path, model_dir: str) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(f"model: {model_dir}\nrandom_weights: true\nnum_workers: 1\ncpus_per_worker: 0.5\n"
                    f"threads_per_worker: 1\npool_actor_name: submit-pool-{uuid.uuid4().hex[:8]}\n"
                    f"ray_namespace: kvcomm-test\n")
    return path


def job_line(job_id: str, task: str = "Ann has 2 pens and finds 3 more. How many pens?", **changes) -> str:
    job = build_job("math", task, num_agents=2, mode="dense", job_id=job_id,
                    generation=GenerationParams(max_new_tokens=4)).to_dict()
    job.update(changes)
    return json.dumps(job)


@pytest.fixture(scope="module")
def oracle(tiny_model_dir):
    return build_engine(tiny_model_dir, random_weights=True)


def assert_equals_oracle(record: dict, line: str, oracle) -> None:
    """A result record has the tokens and final answer of the in-process run of its job (given as its line)."""
    want = run_job(oracle, JobSpec.from_dict(json.loads(line)))
    assert record["job_id"] == want.job_id
    assert [t["token_ids"] for t in record["turns"]] == [t.token_ids for t in want.turns], record["id"]
    assert [t["text"] for t in record["turns"]] == [t.text for t in want.turns], record["id"]
    assert record["final_answer"] == want.final_answer, record["id"]


def records(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def test_submit_writes_results_records_errors_and_resumes(ray_cluster, tmp_path, tiny_model_dir, oracle) -> None:
    jobs = tmp_path / "jobs.jsonl"
    ok2_line = job_line("ok2", task="Bo has 4 cups and breaks 1. How many cups?")
    jobs.write_text("\n".join([
        job_line("ok1"),
        ok2_line,
        job_line("badmode", mode="warp"),
        job_line("toolong", task="apple " * 5000),      # past tiny-llama's 4096-token context: fails in the worker
        "{not json",
    ]) + "\n")
    out = tmp_path / "results.jsonl"
    # a previous run finished ok1 and crashed while writing ok2's line
    out.write_text(json.dumps({"id": "ok1", "final_answer": "from the earlier run"}) + "\n" + '{"id": "ok2", "fin')
    config = write_config(tmp_path, tiny_model_dir)
    argv = [str(jobs), "--out", str(out), "--config", str(config), "--no-progress"]

    assert main(argv) == 1                                   # some jobs failed; the batch still finished
    by_id: dict[str, list[dict]] = {}
    for record in records(out):
        by_id.setdefault(record["id"], []).append(record)
    assert by_id["ok1"] == [{"id": "ok1", "final_answer": "from the earlier run"}]     # skipped: already done
    [ok2] = by_id["ok2"]
    assert ok2["job_id"] == "ok2" and len(ok2["turns"]) == 2 and ok2["workers"] == ["worker-0"]
    assert_equals_oracle(ok2, ok2_line, oracle)
    assert "mode" in by_id["badmode"][0]["error"] and "warp" in by_id["badmode"][0]["error"]
    assert "ContextLengthError" in by_id["toolong"][0]["error"]
    assert "invalid JSON" in by_id["line-5"][0]["error"]
    assert finished_ids(out) == {"ok1", "ok2"}

    # a second run skips everything that succeeded and retries only the failures
    assert main(argv) == 1
    again: dict[str, int] = {}
    for record in records(out):
        again[record["id"]] = again.get(record["id"], 0) + 1
    assert again["ok1"] == 1 and again["ok2"] == 1
    assert again["badmode"] == 2 and again["toolong"] == 2
    assert [r for r in records(out) if r["id"] == "ok2"] == [ok2]      # not run again, not rewritten


def test_read_jobs_reports_each_bad_line_and_duplicate(tmp_path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(job_line("a") + "\n\n" + job_line("a") + "\n" + json.dumps({"id": "b", "agents": []}) + "\n")
    valid, errors = read_jobs(jobs)
    assert [j.id for j in valid] == ["a"]
    assert [e["id"] for e in errors] == ["a", "b"]
    assert "duplicate" in errors[0]["error"] and "line 3" in errors[0]["error"]
    assert "agents" in errors[1]["error"]


def _processes_with_marker(marker: str) -> dict[int, str]:
    """Live processes whose environment carries `marker` (inherited by everything a process starts)."""
    found = {}
    needle = marker.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if needle in Path(f"/proc/{entry}/environ").read_bytes():
                found[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                    errors="replace")[:160]
        except OSError:
            continue
    return found


def test_submit_in_a_fresh_process_leaves_no_ray_processes(tmp_path, tiny_model_dir, oracle) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(job_line("solo") + "\n")
    out = tmp_path / "results.jsonl"
    config = write_config(tmp_path, tiny_model_dir)
    marker = f"kvcomm-submit-test-{uuid.uuid4().hex}"
    env = dict(os.environ, RAY_AUTH_MODE="disabled", KVCOMM_TEST_MARKER=marker)
    process = subprocess.Popen(
        [sys.executable, "-m", "cluster.batch.submit", str(jobs), "--out", str(out), "--config", str(config),
         "--num-cpus", "1", "--object-store-mb", "256", "--no-progress"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen_while_running: dict[int, str] = {}
    deadline = time.monotonic() + 240
    while process.poll() is None and time.monotonic() < deadline:
        seen_while_running.update(_processes_with_marker(marker))
        time.sleep(0.5)
    if process.poll() is None:
        process.kill()
    output = process.communicate()[0]
    assert process.returncode == 0, output[-3000:]
    # the marker does reach Ray's own processes, so its absence afterwards means they are gone
    assert any("raylet" in c for c in seen_while_running.values()), seen_while_running
    [record] = records(out)
    assert record["id"] == "solo" and len(record["turns"]) == 2
    assert_equals_oracle(record, job_line("solo"), oracle)
    deadline = time.monotonic() + 20            # Ray's processes exit asynchronously after ray.shutdown()
    leftovers = _processes_with_marker(marker)
    while leftovers and time.monotonic() < deadline:
        time.sleep(0.5)
        leftovers = _processes_with_marker(marker)
    assert not leftovers, leftovers
