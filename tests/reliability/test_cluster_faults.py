"""Faults on a live cluster: agent workers and the anchor pool die while jobs run; nothing is lost or mixed up;
and caches and the pool on tight budgets evict and stay within them.

A 2-worker `ClusterRunner` on the session's local Ray cluster (tiny-llama, random weights, embedded tokenizer),
driving jobs turn by turn. The drills are `cluster.bench.reliability`'s own (the benchmark prints the same
figures): dense jobs run fault-free, then again while one worker is killed through Ray and another's process gets
SIGKILL; kvcomm jobs run while the pool actor is killed and restarted by Ray, replayed on the in-process oracle;
kvcomm jobs on a second runner whose caches and pool hold a few hundred tokens of KV.
"""
from __future__ import annotations

import uuid

import pytest

from cluster.bench.reliability import (TIGHT_BUDGET_TOKENS, kv_bytes_per_token, make_jobs, memory_drill,
                                       pool_faults, tight_budgets, worker_faults)
from cluster.config import ClusterConfig


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
    """Both faults must land while their worker runs orders (48 forced tokens per turn keep them busy): a fault
    between turns would prove nothing."""
    report = worker_faults(runner, make_jobs(8, mode="dense", tag=f"wf-{uuid.uuid4().hex[:6]}", new_tokens=48))
    assert report["faults"][0] == "ray.kill(worker-0)" and report["faults"][1].startswith("SIGKILL worker-1")
    assert report["orders_hit"]["ray.kill"] > 0 and report["orders_hit"]["SIGKILL"] > 0, report["orders_hit"]
    assert report["jobs_failed"] == 0, report["errors"]
    assert report["jobs_completed"] == 8
    assert report["results_mismatched"] == 0, report["mismatched_ids"]
    assert report["resubmitted"] >= 2          # each fault's turns in flight went to another worker


def test_jobs_survive_the_pool_dying_and_every_turn_equals_the_oracle(runner, tiny_model_dir) -> None:
    """The oracle replays the jobs in process, its pool emptied where the actor was killed: equal turns (tokens,
    reasons, reuse) and an equal restarted pool (anchors per placeholder, version = non-empty commits) mean no job
    was lost, no gate decision went astray, and no job's anchors were committed twice."""
    from kvcomm.engine import build_engine
    oracle = build_engine(tiny_model_dir, random_weights=True, config=runner.config.kvcomm.to_kvcomm())
    tag = f"pf-{uuid.uuid4().hex[:6]}"
    report = pool_faults(runner, make_jobs(10, mode="kvcomm", tag=tag, new_tokens=8), kill_after=4, oracle=oracle)
    assert report["jobs_failed"] == 0, report["errors"]
    assert report["jobs_completed"] == 10 and report["commits_dropped"] == 0
    assert report["pool_restart_s"] is not None                # the next job ran on the restarted, empty pool
    assert report["results_mismatched"] == 0, report["mismatched_ids"]
    assert report["pool_matches_oracle"], (report["pool_after"], report["oracle_pool"])
    assert report["pool_after"]["version"] == report["pool_after"]["commits"] > 0   # one commit per version
    assert report["reuse_rate"]["before"] > 0                  # anchors learned on the first jobs
    assert report["reuse_rate"]["right_after"] == 0            # the restarted pool was empty
    assert report["reuse_rate"]["recovered"] > 0               # and learned again


def test_caches_and_pool_on_tight_budgets_evict_and_stay_within_them(ray_cluster, runner) -> None:
    """Budgets of a few hundred tokens of KV (the default 256 MiB caches never fill with the tiny model's 768
    bytes per token), so the jobs must evict from every worker's anchor and content cache and from the pool."""
    from cluster.batch.runner import ClusterRunner
    kv_token_bytes = kv_bytes_per_token(runner)
    config = tight_budgets(runner.config.with_(pool_actor_name=f"tight-pool-{uuid.uuid4().hex[:8]}"), kv_token_bytes)
    assert config.content_cache_bytes == TIGHT_BUDGET_TOKENS["content_cache"] * kv_token_bytes
    with ClusterRunner(config) as tight:
        report = memory_drill(tight, make_jobs(6, mode="kvcomm", tag=f"md-{uuid.uuid4().hex[:6]}", new_tokens=8))
    assert report["jobs_failed"] == 0 and report["jobs_completed"] == 6, report["errors"]
    evictions, peaks, budgets = report["evictions"], report["peaks"], report["budgets_mb"]
    assert evictions["anchor_cache"] > 0 and evictions["content_cache"] > 0 and evictions["pool"] > 0, evictions
    assert 0 < max(peaks["anchor_cache_mb"]) and max(peaks["anchor_cache_mb"]) <= budgets["anchor_cache"], peaks
    assert 0 < max(peaks["content_cache_mb"]) and max(peaks["content_cache_mb"]) <= budgets["content_cache"], peaks
    assert 0 < peaks["pool_mb"] <= budgets["pool"], (peaks, budgets)
