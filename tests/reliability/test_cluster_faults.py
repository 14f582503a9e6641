"""Faults on a live cluster: agent workers and the anchor pool die while jobs run; nothing is lost or mixed up.

A 2-worker `ClusterRunner` on the session's local Ray cluster (tiny-llama, random weights, embedded tokenizer),
driving jobs turn by turn. The drills are `cluster.bench.reliability`'s own (the benchmark prints the same
figures): dense jobs run fault-free, then again while one worker is killed through Ray and another's process gets
SIGKILL; kvcomm jobs run while the pool actor is killed and restarted by Ray.
"""
from __future__ import annotations

import uuid

import pytest

from cluster.bench.reliability import make_jobs, memory_report, pool_faults, worker_faults
from cluster.config import ClusterConfig

pytestmark = [pytest.mark.reliability, pytest.mark.ray]


@pytest.fixture(scope="module")
def runner(ray_cluster, tiny_model_dir):
    from cluster.batch.runner import ClusterRunner
    config = ClusterConfig(model=tiny_model_dir, random_weights=True, num_workers=2, cpus_per_worker=0.5,
                           threads_per_worker=1, max_batch_size=16, worker_max_restarts=-1, job_retries=4,
                           pool_retry_after_s=0.5, pool_call_timeout_s=5.0,
                           pool_actor_name=f"faults-pool-{uuid.uuid4().hex[:8]}", ray_namespace="kvcomm-test",
                           kvcomm={"gamma": 1.0})
    runner = ClusterRunner(config).start()
    yield runner
    runner.shutdown()


def test_jobs_survive_worker_deaths_with_the_fault_free_answers(runner) -> None:
    report = worker_faults(runner, make_jobs(8, mode="dense", tag=f"wf-{uuid.uuid4().hex[:6]}", new_tokens=48))
    assert report["faults"][0] == "ray.kill(worker-0)"
    assert report["jobs_failed"] == 0, report["errors"]
    assert report["jobs_completed"] == 8
    assert report["results_mismatched"] == 0, report["mismatched_ids"]
    assert report["resubmitted"] >= 1          # turns in flight on a dead worker went to another one


def test_jobs_survive_the_pool_dying_and_reuse_comes_back(runner) -> None:
    tag = f"pf-{uuid.uuid4().hex[:6]}"
    report = pool_faults(runner, make_jobs(14, mode="kvcomm", tag=tag, new_tokens=8), kill_after=4)
    assert report["jobs_failed"] == 0, report["errors"]
    assert report["jobs_completed"] == 14
    assert report["reuse_rate"]["before"] > 0                  # anchors learned on the first jobs
    assert report["reuse_recovered_after"] is not None, report  # relearned after the restart
    assert report["reuse_rate"]["recovered"] > 0


def test_memory_report_stays_within_budgets(runner) -> None:
    mem = memory_report(runner)
    assert len(mem["workers"]) == 2
    for worker in mem["workers"]:
        assert 0 < worker["peak_rss_mb"]
        assert worker["anchor_cache_mb"] <= mem["anchor_cache_budget_mb"]
        assert worker["content_cache_mb"] <= mem["content_cache_budget_mb"]
    assert mem["pool_mb"] <= mem["pool_budget_mb"]
