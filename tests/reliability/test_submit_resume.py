"""`kvcomm submit` interrupted and restarted: the batch finishes with each job's result exactly once in the output.

Three runs of ``python -m cluster.batch.submit JOBS --out RESULTS.jsonl`` in fresh processes, each starting its own local
Ray cluster (tiny-llama, random weights, one worker, two jobs in flight): the first gets SIGINT once results are
being written (it shuts down what it started and exits 130), then a crash mid-write is simulated (a torn last
line), the second is SIGKILLed mid-batch, the third finishes. After every exit no process of that run's Ray
cluster is left (tracked by a marker in their environment and as descendants of the driver, sampled while it
runs), and no job thread started a second cluster. After a SIGKILL, Ray's GCS and raylet die with the driver
(parent-death signal) and workers follow the raylet, but its dashboard and runtime-env agents would linger about a
minute: `cluster.reaper` kills them; the test measures how long the cleanup takes. Every result, whichever run
wrote it, must equal the in-process engine's run of its job (token ids, texts, final answer).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from kvcomm.harness.jobs import GenerationParams, JobSpec
from kvcomm.harness.topologies import build_job
from kvcomm.job_runner import run_job

from cluster.batch.submit import finished_ids
from tests.support.procfs import process_stat, running_processes

REPO = Path(__file__).resolve().parents[2]
JOBS = 40          # enough that a run stopped after a few results still has most of the batch to do
SECOND_CLUSTER = "current thread is not the main thread"   # ray.init from a job thread after shutdown


def run_processes(marker: str, driver: int) -> dict[tuple[int, int], str]:
    """(pid, start time) -> command name of the live processes of one run: those whose environment carries
    `marker`, the driver's descendants, and theirs. Both marks are needed: Ray's agents rename themselves
    (setproctitle), which overwrites the start of their /proc/PID/environ and may take the marker with it."""
    processes = running_processes()
    marked, names = set(), {}
    for pid in processes:
        try:
            if marker.encode() in Path(f"/proc/{pid}/environ").read_bytes():
                marked.add(pid)
            names[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
    found = marked | {driver}
    grew = True
    while grew:
        below = {pid for pid, stat in processes.items() if stat.ppid in found} - found
        found |= below
        grew = bool(below)
    return {(pid, processes[pid].start): names.get(pid, processes[pid].name)[-60:].strip()
            for pid in found - {driver} if pid in processes}


def complete_records(out: Path) -> tuple[list[dict], list[str]]:
    """(parsed lines, lines that do not parse)."""
    records, torn = [], []
    if out.exists():
        for line in out.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                torn.append(line)
    return records, torn


def _sigint_default() -> None:
    """In the child before exec: SIGINT back to its default, so Python installs its KeyboardInterrupt handler
    even when this test runs in a background job (a non-interactive shell starts those with SIGINT ignored,
    and children inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)

class Run:
    """One `kvcomm submit` process with its own marker."""

    def __init__(self, jobs: Path, out: Path, config: Path):
        self.marker = f"kvcomm-resume-{uuid.uuid4().hex}"
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}   # never join the test session's cluster
        env.update(RAY_AUTH_MODE="disabled", KVCOMM_TEST_MARKER=self.marker)
        self.out = out
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cluster.batch.submit", str(jobs), "--out", str(out), "--config", str(config),
             "--num-cpus", "1", "--object-store-mb", "256", "--concurrency", "2", "--no-progress"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            preexec_fn=_sigint_default)
        self.seen: dict[tuple[int, int], str] = {}

    def wait_for_results(self, count: int, timeout_s: float = 180) -> None:
        """Returns as soon as `count` results are in (a signal sent next lands with the batch still running),
        having sampled the run's processes right before."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.seen.update(run_processes(self.marker, self.process.pid))
            if len(complete_records(self.out)[0]) >= count:
                return
            assert self.process.poll() is None, f"exited ({self.process.returncode}) early:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"fewer than {count} results after {timeout_s} s"
            time.sleep(0.05)

    def stop(self, sig: int) -> int:
        self.process.send_signal(sig)
        return self.finish(timeout_s=90)

    def finish(self, timeout_s: float) -> int:
        try:
            self._output = self.process.communicate(timeout=timeout_s)[0]
        except subprocess.TimeoutExpired:
            self.process.kill()
            self._output = self.process.communicate()[0]
            pytest.fail(f"kvcomm submit did not exit within {timeout_s} s:\n{self._output[-3000:]}")
        return self.process.returncode

    def output(self) -> str:
        return getattr(self, "_output", "")

    def seconds_until_gone(self, stage: str, timeout_s: float = 30) -> float:
        """Seconds after the driver's exit until none of the run's processes is alive (fails past timeout_s)."""
        assert SECOND_CLUSTER not in self.output(), f"{stage}: a job thread started a second Ray cluster"
        t0 = time.monotonic()
        while True:
            left = {pid: name for (pid, start), name in (self.seen | run_processes(self.marker, self.process.pid)).items()
                    if (stat := process_stat(pid)) is not None and stat.start == start}
            if not left:
                return time.monotonic() - t0
            assert time.monotonic() - t0 < timeout_s, f"{stage}: left behind after {timeout_s} s: {left}"
            time.sleep(0.2)


def test_interrupted_and_killed_batches_resume_to_exactly_one_result_per_job(tiny_model_dir, tmp_path,
                                                                             oracle) -> None:
    ids = [f"job-{i:02d}" for i in range(JOBS)]
    specs = [build_job("math", f"Ann has {i + 2} pens and finds {i % 5 + 1} more. How many pens?", num_agents=2,
                       mode="dense", job_id=job_id, generation=GenerationParams(max_new_tokens=12))
             for i, job_id in enumerate(ids)]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps(spec.to_dict()) + "\n" for spec in specs))
    config = tmp_path / "cluster.yaml"
    config.write_text(f"model: {tiny_model_dir}\nrandom_weights: true\nnum_workers: 1\ncpus_per_worker: 0.5\n"
                      f"threads_per_worker: 1\npool_actor_name: resume-pool-{uuid.uuid4().hex[:8]}\n"
                      f"ray_namespace: kvcomm-test\n")
    out = tmp_path / "results.jsonl"
    cleanup_s = {}

    # 1. Ctrl-C once results are being written: a clean stop, exit 130, everything it started shut down
    first = Run(jobs, out, config)
    first.wait_for_results(2)
    assert first.stop(signal.SIGINT) == 130, first.output()[-3000:]
    assert "interrupted" in first.output() and "Traceback" not in first.output()
    assert any("raylet" in c for c in first.seen.values()), first.seen      # Ray's processes are tracked
    assert any("Agent" in c for c in first.seen.values()), first.seen       # its agents too (the slow ones)
    cleanup_s["SIGINT"] = first.seconds_until_gone("SIGINT")
    after_first, torn = complete_records(out)
    assert 2 <= len(after_first) < JOBS and not torn

    # a crash in the middle of writing a line leaves a torn last line: it must not count as a result
    not_done = next(i for i in ids if i not in {r["id"] for r in after_first})
    with out.open("a") as file:
        file.write(json.dumps({"id": not_done, "job_id": not_done, "final_answer": "x"})[:25])

    # 2. SIGKILL mid-batch: no cleanup code runs at all
    second = Run(jobs, out, config)
    second.wait_for_results(len(after_first) + 2)
    assert second.stop(signal.SIGKILL) == -signal.SIGKILL
    assert f"{JOBS - len(after_first)} job(s) to run, {len(after_first)} already in" in second.output()
    cleanup_s["SIGKILL"] = second.seconds_until_gone("SIGKILL")
    after_second, _ = complete_records(out)
    assert len(after_second) < JOBS, "the second run finished before it was killed; the test needs more jobs"

    # 3. the last run finishes the batch
    third = Run(jobs, out, config)
    assert third.finish(timeout_s=300) == 0, third.output()[-3000:]
    done_before = len(finished_ids_of(after_second))
    assert f"{JOBS - done_before} job(s) to run, {done_before} already in" in third.output()
    cleanup_s["exit"] = third.seconds_until_gone("exit")

    records, torn = complete_records(out)
    assert len(torn) == 1 and torn[0].startswith('{"id": "' + not_done[:5])        # the torn line, never parsed
    assert [r for r in records if "error" in r] == []
    per_id = {job_id: sum(1 for r in records if r["id"] == job_id) for job_id in ids}
    assert per_id == {job_id: 1 for job_id in ids}, per_id                          # each result exactly once
    assert len(records) == JOBS and finished_ids(out) == set(ids)
    assert all(len(r["turns"]) == 2 for r in records)
    # the content: each result, from whichever run, is the in-process engine's run of its job
    expected = {spec.id: run_job(oracle, JobSpec.from_dict(spec.to_dict())) for spec in specs}
    for record in records:
        want = expected[record["id"]]
        assert [t["token_ids"] for t in record["turns"]] == [t.token_ids for t in want.turns], record["id"]
        assert [t["text"] for t in record["turns"]] == [t.text for t in want.turns], record["id"]
        assert record["final_answer"] == want.final_answer, record["id"]
    print(f"\n[reliability] submit resume: {JOBS} jobs over 3 runs ({len(after_first)} done before SIGINT, "
          f"{len(after_second)} before SIGKILL); each result once; Ray processes gone "
          + ", ".join(f"{k} +{v:.1f} s" for k, v in cleanup_s.items()))


def finished_ids_of(records: list[dict]) -> set[str]:
    return {str(r["id"]) for r in records if "error" not in r}
