"""`kvcomm bench reliability`: faults injected into a live cluster, and what the jobs saw.

This module owns the cluster-side fault drills, as functions the reliability tests call too:

* `worker_faults`: a batch of dense jobs runs fault-free, then again while agent workers die mid-batch (one
  killed through Ray, then one process killed with SIGKILL, each once it has orders in flight): every job must
  complete with the fault-free answers (dense decoding is deterministic, so any difference is a lost or mixed-up
  result).
* `pool_faults`: kvcomm jobs run one after another; after some of them the anchor-pool actor is killed and
  restarted by Ray (empty, without a snapshot). No job may fail; reuse comes back as anchors are learned again.
  With an in-process oracle engine the same jobs are replayed there (its pool emptied at the same point): every
  turn must equal the oracle's (tokens, reason, reuse), and the restarted pool must hold the oracle's anchors
  after as many commits as the oracle's pool (a job committed twice, or a lost commit, shows).
* `memory_drill`: kvcomm jobs on a cluster whose caches and pool have budgets of a few hundred tokens of KV
  (`tight_budgets`), so evictions must happen: the most each worker's anchor and content caches and the pool
  held after any job, against their budgets, and how many entries each evicted.
* `memory_report`: peak resident memory of every worker and the pool's and caches' bytes against their budgets.

`run` puts them together on a fresh cluster and returns one report; `markdown_table` is the README's table. The
command line adds the HTTP drills of `cluster.bench.http` (malformed requests, 32 concurrent jobs against their
sequential runs) on the Serve app, after the cluster drills (``--no-http`` leaves them out).
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time
import uuid
from typing import Any, Callable, Sequence

from kvcomm.bench import write_json_report
from kvcomm.cli_args import add_model_args
from kvcomm.harness.jobs import JobSpec
from kvcomm.names import EMBEDDED_MODEL

from ..config import ClusterConfig
from .jobs import make_jobs

def _tokens(result: dict[str, Any]) -> list[list[int]]:
    return [t["token_ids"] for t in result["turns"]]


def _wait_until(predicate: Callable[[], bool], timeout_s: float, step_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step_s)
    return False


def _ping_all(runner: Any, timeout_s: float = 300.0) -> None:
    """Wait until every worker answers again (restarted ones reload their model)."""
    import ray
    from ray.exceptions import ActorUnavailableError
    deadline = time.monotonic() + timeout_s
    for worker in runner.workers:
        while True:
            try:
                ray.get(worker.ping.remote(), timeout=max(1.0, deadline - time.monotonic()))
                break
            except ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


def _orders_on(runner: Any, index: int) -> int:
    """Orders (turns, user inputs) the worker itself is running now; 0 while it is dead or restarting."""
    import ray
    try:
        return ray.get(runner.workers[index].load.remote(), timeout=5).orders
    except Exception:  # noqa: BLE001 - a dead or restarting worker runs nothing
        return 0


def worker_faults(runner: Any, jobs: Sequence[JobSpec], *, kill_process: bool = True,
                  busy_timeout_s: float = 60.0) -> dict[str, Any]:
    """Run `jobs` fault-free, then again while workers die; compare every job's tokens.

    Each fault waits until its worker has orders in flight (the jobs should not stop early: `min_new_tokens`), so
    it always lands mid-turn; ``orders_hit`` says how many orders each one cut short (0: the jobs were too short)."""
    import ray
    reference = {r["job_id"]: r for r in runner.run_jobs(jobs)}
    resubmitted = runner.jobs_resubmitted
    pid = ray.get(runner.workers[1].stats.remote())["pid"] if kill_process and len(runner.workers) > 1 else None
    started = time.perf_counter()
    tickets = [runner.submit(job) for job in jobs]
    faults, orders_hit = [], {}
    # both faults land mid-turn: wait until both workers run orders, so worker-1 is still busy right after the kill
    # (waiting for it only after worker-0's kill can miss it when the jobs' last orders are on worker-0)
    # (each count is the read that saw the worker busy: a second read could find its orders just finished)
    seen = {0: 0, 1: 0}

    def busy(index: int) -> bool:
        seen[index] = _orders_on(runner, index)
        return seen[index] > 0
    _wait_until(lambda: busy(0) and (pid is None or busy(1)), busy_timeout_s)
    orders_hit["ray.kill"] = seen[0]
    ray.kill(runner.workers[0], no_restart=False)                    # the actor dies; Ray restarts it
    faults.append("ray.kill(worker-0)")
    if pid is not None:
        _wait_until(lambda: busy(1), busy_timeout_s)
        orders_hit["SIGKILL"] = seen[1]
        os.kill(pid, signal.SIGKILL)                                 # its process dies; Ray restarts it
        faults.append(f"SIGKILL worker-1 process {pid}")
    results, errors = [], []
    for ticket in tickets:
        try:
            results.append(runner.result(ticket))
        except Exception as exc:  # noqa: BLE001 - counted: a lost job is what this measures
            errors.append(f"{ticket.job_id}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    wall = time.perf_counter() - started
    mismatched = [r["job_id"] for r in results
                  if r["job_id"] not in reference or _tokens(r) != _tokens(reference[r["job_id"]])]
    _ping_all(runner)
    return {"faults": faults, "orders_hit": orders_hit, "jobs_submitted": len(jobs), "jobs_completed": len(results),
            "jobs_failed": len(errors), "errors": errors[:5], "results_mismatched": len(mismatched),
            "mismatched_ids": mismatched[:5], "resubmitted": runner.jobs_resubmitted - resubmitted, "wall_s": wall}


def pool_faults(runner: Any, jobs: Sequence[JobSpec], *, kill_after: int, oracle: Any = None,
                restart_timeout_s: float = 60.0) -> dict[str, Any]:
    """Run kvcomm `jobs` one after another; kill the pool actor after `kill_after` of them and wait until Ray has
    restarted it (a new, empty pool) before the next.

    Reports the reuse rate before the loss, on the job right after it, and on the rest, and how long after the
    kill (seconds, jobs) the first job reused again. With `oracle` (a `KVCommEngine`) the jobs are replayed on its
    model with a fresh pool, emptied after `kill_after` jobs too: ``results_mismatched`` counts jobs with a turn
    whose tokens, reason or reuse differ, and ``pool_matches_oracle`` says whether the restarted pool holds as
    many anchors per placeholder, after as many commits (its version), as the oracle's."""
    import ray
    phases: dict[str, list[dict[str, Any]]] = {"before": [], "right_after": [], "recovered": []}
    errors, results = [], []
    dropped = runner.commits_dropped
    faults, killed_at, recovered_after, restart_s = [], None, None, None
    for i, job in enumerate(jobs):
        if i == kill_after:
            epoch = ray.get(runner.pool_actor.stats.remote(), timeout=30)["epoch"]
            ray.kill(runner.pool_actor, no_restart=False)
            killed_at = time.perf_counter()
            faults.append("ray.kill(anchor pool)")
            if _wait_until(lambda: _pool_epoch(runner) not in (None, epoch), restart_timeout_s, step_s=0.1):
                restart_s = time.perf_counter() - killed_at
        try:
            result = runner.run_job(job)
        except Exception as exc:  # noqa: BLE001 - counted
            errors.append(f"{job.id}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            continue
        results.append(result)
        phase = "before" if i < kill_after else "right_after" if i == kill_after else "recovered"
        phases[phase].append(result)
        if killed_at is not None and recovered_after is None and result["reuse_rate"] > 0:
            recovered_after = {"seconds": time.perf_counter() - killed_at, "jobs": i - kill_after + 1}
    reuse = {name: statistics.mean(r["reuse_rate"] for r in rs) if rs else None for name, rs in phases.items()}
    stats = ray.get(runner.pool_actor.stats.remote(), timeout=30)
    namespaces = sorted({job.namespace for job in jobs})
    report = {"faults": faults, "jobs_submitted": len(jobs), "jobs_completed": sum(len(v) for v in phases.values()),
              "jobs_failed": len(errors), "errors": errors[:5], "reuse_rate": reuse, "pool_restart_s": restart_s,
              "reuse_recovered_after": recovered_after, "commits_dropped": runner.commits_dropped - dropped,
              "pool_after": {"anchors": _anchor_count(stats), "bytes": stats.get("total_bytes"),
                             "version": stats.get("version"), "commits": stats.get("commits"),
                             "by_placeholder": _anchors_by_placeholder(stats, namespaces),
                             "restored_from_snapshot": stats.get("restored_from_snapshot")}}
    if oracle is not None:
        report.update(_replay(oracle, jobs, kill_after, results, namespaces, report["pool_after"]))
    return report


def _turn_facts(turns: Sequence[Any]) -> list[tuple[str, int, list[int], str, bool]]:
    """(agent, round, tokens, reason, reused) per turn, from result dicts or `TurnRecord`s."""
    get = (lambda t, k: t[k]) if turns and isinstance(turns[0], dict) else getattr
    return [(get(t, "agent_id"), get(t, "round"), list(get(t, "token_ids")), get(t, "reason"), get(t, "reused"))
            for t in turns]


def _replay(oracle: Any, jobs: Sequence[JobSpec], kill_after: int, results: Sequence[dict[str, Any]],
            namespaces: Sequence[str], pool_after: dict[str, Any]) -> dict[str, Any]:
    """The pool drill's jobs on the in-process oracle (a fresh pool, emptied where the pool actor was killed)."""
    from kvcomm.anchor_pool import AnchorPool
    from kvcomm.engine import KVCommEngine
    from kvcomm.job_runner import run_job

    def fresh() -> Any:
        pool = AnchorPool(oracle.config, oracle.runner.rope)
        return KVCommEngine(oracle.runner, oracle.tokenizer, oracle.config, pool)

    engine, expected = fresh(), {}
    for i, job in enumerate(jobs):
        if i == kill_after:
            engine = fresh()
        expected[job.id] = run_job(engine, job)
    mismatched = [r["job_id"] for r in results
                  if _turn_facts(r["turns"]) != _turn_facts(expected[r["job_id"]].turns)]
    stats = engine.pool.stats()
    oracle_pool = {"version": stats["version"], "by_placeholder": _anchors_by_placeholder(stats, namespaces)}
    matches = (oracle_pool["version"] == pool_after["version"]
               and oracle_pool["by_placeholder"] == pool_after["by_placeholder"])
    return {"results_mismatched": len(mismatched), "mismatched_ids": mismatched[:5], "oracle_pool": oracle_pool,
            "pool_matches_oracle": matches}


def _pool_epoch(runner: Any) -> str | None:
    import ray
    try:
        return ray.get(runner.pool_actor.stats.remote(), timeout=2)["epoch"]
    except Exception:  # noqa: BLE001 - dead or restarting
        return None


def _anchors_by_placeholder(pool_stats: dict[str, Any], namespaces: Sequence[str]) -> dict[str, int]:
    """Anchors per "namespace/placeholder" of `namespaces` in a pool's stats."""
    lists = pool_stats.get("namespaces", {})
    return {f"{ns}/{ph}": entry["anchors"] for ns in namespaces for ph, entry in sorted(lists.get(ns, {}).items())}


def _anchor_count(pool_stats: dict[str, Any]) -> int:
    return sum(entry["anchors"] for lists in pool_stats.get("namespaces", {}).values() for entry in lists.values())


def memory_report(runner: Any) -> dict[str, Any]:
    """Peak RSS per worker and the pool's and caches' bytes against their budgets."""
    import ray
    workers = ray.get([w.stats.remote() for w in runner.workers])
    pool = ray.get(runner.pool_actor.stats.remote(), timeout=30)
    cfg = runner.config
    return {"workers": [{"worker": w["worker"], "peak_rss_mb": w.get("peak_rss_bytes", 0) / 2**20,
                         "anchor_cache_mb": w["pool"]["cache_bytes"] / 2**20,
                         "content_cache_mb": w["contents"]["bytes"] / 2**20} for w in workers],
            "anchor_cache_budget_mb": cfg.anchor_cache_bytes / 2**20,
            "content_cache_budget_mb": cfg.content_cache_bytes / 2**20,
            "pool_mb": (pool.get("total_bytes") or 0) / 2**20, "pool_budget_mb": cfg.kvcomm.pool_byte_budget / 2**20}


TIGHT_BUDGET_TOKENS = {"anchor_cache": 256, "content_cache": 96, "pool": 512}   # in tokens of the model's KV


def kv_bytes_per_token(runner: Any) -> int:
    """Bytes of K and V for one token in every layer, from a worker's model."""
    import ray
    import torch
    stats = ray.get(runner.workers[0].stats.remote())
    shape = stats["kv_shape"]
    itemsize = torch.empty((), dtype=getattr(torch, stats["dtype"])).element_size()
    return 2 * shape["layers"] * shape["kv_heads"] * shape["head_dim"] * itemsize


def tight_budgets(config: ClusterConfig, kv_token_bytes: int) -> ClusterConfig:
    """`config` with the worker caches and the pool bounded at `TIGHT_BUDGET_TOKENS` tokens of KV each: a few
    contents or anchors, so that a handful of jobs must evict."""
    t = TIGHT_BUDGET_TOKENS
    return config.with_(anchor_cache_bytes=t["anchor_cache"] * kv_token_bytes,
                        content_cache_bytes=t["content_cache"] * kv_token_bytes,
                        kvcomm={"pool_byte_budget": t["pool"] * kv_token_bytes})


def memory_drill(runner: Any, jobs: Sequence[JobSpec]) -> dict[str, Any]:
    """Run kvcomm `jobs` one after another; after each, read every worker's anchor and content cache and the
    pool. Reports the most each held after any job against its budget, and the evictions the jobs caused."""
    import ray

    def evictions() -> dict[str, int]:
        workers = ray.get([w.stats.remote() for w in runner.workers])
        pool = ray.get(runner.pool_actor.stats.remote(), timeout=30)
        return {"anchor_cache": sum(w["pool"]["cache_evictions"] for w in workers),
                "content_cache": sum(w["contents"]["evictions"] for w in workers),
                "pool": pool["evictions"]["count"] + pool["evictions"]["bytes"]}

    before = evictions()
    peaks = {"anchor_cache_mb": [0.0] * len(runner.workers), "content_cache_mb": [0.0] * len(runner.workers),
             "pool_mb": 0.0}
    errors, completed, reused = [], 0, 0
    mem: dict[str, Any] = {}
    for job in jobs:
        try:
            result = runner.run_job(job)
            completed += 1
            reused += sum(t["reused"] for t in result["turns"])
        except Exception as exc:  # noqa: BLE001 - counted
            errors.append(f"{job.id}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        mem = memory_report(runner)
        for i, worker in enumerate(mem["workers"]):
            peaks["anchor_cache_mb"][i] = max(peaks["anchor_cache_mb"][i], worker["anchor_cache_mb"])
            peaks["content_cache_mb"][i] = max(peaks["content_cache_mb"][i], worker["content_cache_mb"])
        peaks["pool_mb"] = max(peaks["pool_mb"], mem["pool_mb"])
    after = evictions()
    return {"jobs_submitted": len(jobs), "jobs_completed": completed, "jobs_failed": len(errors),
            "errors": errors[:5], "turns_reused": reused, "peaks": peaks,
            "budgets_mb": {"anchor_cache": mem.get("anchor_cache_budget_mb"),
                           "content_cache": mem.get("content_cache_budget_mb"), "pool": mem.get("pool_budget_mb")},
            "evictions": {k: after[k] - before[k] for k in after},
            "peak_rss_mb": [w["peak_rss_mb"] for w in mem.get("workers", [])]}


def run(*, model: str = EMBEDDED_MODEL, random_weights: bool = False, jobs: int = 16, new_tokens: int = 16,
        pool_jobs: int = 8, memory_jobs: int = 8, address: str | None = None, config: ClusterConfig | None = None,
        extra: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Every drill on a fresh 2-worker cluster (the memory drill on a second one with `tight_budgets`); `extra`
    adds sections run after them (the HTTP drills)."""
    from kvcomm.engine import build_engine

    from ..batch.runner import ClusterRunner
    from ..runtime import RayRuntime

    base = config or ClusterConfig(num_workers=2, cpus_per_worker=1, threads_per_worker=1)
    cfg = base.with_(model=model, random_weights=random_weights, worker_max_restarts=-1, job_retries=4,
                     pool_retry_after_s=1.0,
                     pool_actor_name=f"rel-pool-{uuid.uuid4().hex[:8]}")
    connection = RayRuntime(address, num_cpus=max(2, int(cfg.num_workers * cfg.cpus_per_worker)),
                               object_store_mb=1024)
    report: dict[str, Any] = {"model": model, "random_weights": random_weights, "workers": cfg.num_workers,
                              "new_tokens": new_tokens}
    try:
        with ClusterRunner(cfg) as runner:
            print(f"worker faults: {jobs} dense jobs, fault-free then with workers killed", file=sys.stderr)
            report["worker_faults"] = worker_faults(runner, make_jobs(jobs, mode="dense", tag="wf",
                                                                      new_tokens=new_tokens))
            print(f"pool faults: {pool_jobs} kvcomm jobs, pool killed after {pool_jobs // 2}; then replayed in "
                  "process", file=sys.stderr)
            oracle = build_engine(model, random_weights=random_weights, config=cfg.kvcomm.to_kvcomm())
            report["pool_faults"] = pool_faults(runner, make_jobs(pool_jobs, mode="kvcomm", tag="pf",
                                                                  new_tokens=new_tokens), kill_after=pool_jobs // 2,
                                                oracle=oracle)
            del oracle
            report["memory"] = memory_report(runner)
            kv_token_bytes = kv_bytes_per_token(runner)
        tight = tight_budgets(cfg.with_(pool_actor_name=f"rel-pool-{uuid.uuid4().hex[:8]}"), kv_token_bytes)
        print(f"memory: {memory_jobs} kvcomm jobs on caches and a pool of {TIGHT_BUDGET_TOKENS} tokens of KV",
              file=sys.stderr)
        with ClusterRunner(tight) as runner:
            report["memory_drill"] = memory_drill(runner, make_jobs(memory_jobs, mode="kvcomm", tag="md",
                                                                    new_tokens=new_tokens))
    finally:
        connection.close()
    if extra is not None:
        report.update(extra())
    return report


def markdown_table(report: dict[str, Any]) -> str:
    lines = [f"Model {report['model']}{' (random weights)' if report['random_weights'] else ''}, "
             f"{report['workers']} workers, {report['new_tokens']} tokens per response.", "",
             "| drill | faults injected | jobs submitted | completed | failed | results mismatched |",
             "|---|---|---:|---:|---:|---:|"]
    for name in ("worker_faults", "pool_faults", "memory_drill", "http_load"):
        d = report.get(name)
        if d:
            lines.append(f"| {name.replace('_', ' ')} | {'; '.join(d.get('faults', [])) or '-'} | "
                         f"{d['jobs_submitted']} | {d['jobs_completed']} | {d['jobs_failed']} | "
                         f"{d.get('results_mismatched', '-')} |")
    pool = report.get("pool_faults")
    if pool:
        r = pool["reuse_rate"]
        fmt = lambda v: "-" if v is None else f"{v:.0%}"   # noqa: E731
        lines.append("")
        back = pool.get("reuse_recovered_after")
        lines.append(f"- pool loss: reuse {fmt(r['before'])} before, {fmt(r['right_after'])} on the job right after, "
                     f"{fmt(r['recovered'])} on the jobs after that"
                     + (f" (first reuse {back['seconds']:.1f} s / {back['jobs']} job(s) after the kill)" if back
                        else " (no reuse after the kill)") + f"; commits dropped: {pool['commits_dropped']}"
                     + ("" if "pool_matches_oracle" not in pool else
                        f"; the restarted pool equals the in-process oracle's: {pool['pool_matches_oracle']}"))
    load = report.get("http_load")
    if load and load.get("p50_s") is not None:
        oracle = (f"sequential runs over HTTP, {load['sequential_s']:.0f} s" if load.get("sequential_s") is not None
                  else "given results")
        lines.append(f"- HTTP load: {load['jobs_submitted']} dense jobs at once (`?wait=true`): latency p50 "
                     f"{load['p50_s']:.2f} s, p99 {load['p99_s']:.2f} s; throughput {load['jobs_per_s']:.2f} jobs/s "
                     f"({load['turns_per_s']:.2f} turns/s, {load['wall_s']:.0f} s in all); oracle: {oracle}")
    fuzz = report.get("fuzz")
    if fuzz:
        codes = ", ".join(f"{k}: {v}" for k, v in sorted(fuzz["status_codes"].items()))
        lines.append(f"- malformed requests: {fuzz['requests']} sent, status codes {{{codes}}}, 5xx: "
                     f"{fuzz['server_errors']}, valid request afterwards: {fuzz['healthy_after']}"
                     + (f"; error bodies not in OpenAI's shape: {fuzz['bad_error_bodies']}"
                        if fuzz.get("bad_error_bodies") else ""))
    if report.get("http_error"):
        lines.append(f"- HTTP drills did not finish: {report['http_error']}")
    drill = report.get("memory_drill")
    if drill:
        peaks, budgets, ev = drill["peaks"], drill["budgets_mb"], drill["evictions"]
        lines.append(f"- memory drill (budgets of {TIGHT_BUDGET_TOKENS['anchor_cache']}, "
                     f"{TIGHT_BUDGET_TOKENS['content_cache']} and {TIGHT_BUDGET_TOKENS['pool']} tokens of KV): most "
                     f"held after any job: anchor cache {max(peaks['anchor_cache_mb']):.2f} of "
                     f"{budgets['anchor_cache']:.2f} MB, content cache {max(peaks['content_cache_mb']):.2f} of "
                     f"{budgets['content_cache']:.2f} MB, pool {peaks['pool_mb']:.2f} of {budgets['pool']:.2f} MB; "
                     f"evictions: {ev['anchor_cache']} anchor parts, {ev['content_cache']} contents, "
                     f"{ev['pool']} anchors")
    mem = report.get("memory")
    if mem:
        peak = max(w["peak_rss_mb"] for w in mem["workers"])
        cache = max(w["anchor_cache_mb"] for w in mem["workers"])
        lines.append(f"- memory: peak worker RSS {peak:.0f} MB; anchor cache {cache:.1f} of "
                     f"{mem['anchor_cache_budget_mb']:.0f} MB; pool {mem['pool_mb']:.1f} of "
                     f"{mem['pool_budget_mb']:.0f} MB")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser, local=False)
    parser.add_argument("--jobs", type=int, default=16, help="dense jobs in the worker-fault drill")
    parser.add_argument("--pool-jobs", type=int, default=8, help="kvcomm jobs in the pool-fault drill")
    parser.add_argument("--memory-jobs", type=int, default=8, help="kvcomm jobs in the memory drill")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: start a local one)")
    parser.add_argument("--config", default=None, help="cluster config YAML (resources, kvcomm knobs)")
    parser.add_argument("--json", default=None, help="write the report here")
    parser.add_argument("--http", action=argparse.BooleanOptionalAction, default=True,
                        help="after the cluster drills, start the Serve app (configs/local.yaml's, on a local Ray "
                             "cluster as kvcomm demo does) and run the HTTP drills: malformed requests, and "
                             "--http-jobs concurrent dense jobs against their sequential runs (default: on)")
    parser.add_argument("--http-jobs", type=int, default=32, help="concurrent jobs in the HTTP load drill")
    parser.add_argument("--fuzz-requests", type=int, default=560, help="malformed requests in the HTTP fuzz drill")
    parser.add_argument("--fuzz-seed", type=int, default=0, help="seed of the malformed-request corpus")


def cli_main(args: argparse.Namespace) -> int:
    config = ClusterConfig.from_yaml(args.config) if args.config else None

    def http_drills() -> dict[str, Any]:
        from .http import http_drills as drills
        try:
            return drills(model=args.model, random_weights=args.random_weights, jobs=args.http_jobs,
                          new_tokens=args.new_tokens, fuzz_requests=args.fuzz_requests, seed=args.fuzz_seed,
                          cluster=config, address=args.address)
        except Exception as exc:  # noqa: BLE001 - the cluster drills' report is still printed
            print(f"HTTP drills failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return {"http_error": f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"}

    report = run(model=args.model, random_weights=args.random_weights, jobs=args.jobs, pool_jobs=args.pool_jobs,
                 memory_jobs=args.memory_jobs,
                 new_tokens=args.new_tokens, address=args.address, config=config,
                 extra=http_drills if args.http else None)
    print(markdown_table(report))
    write_json_report(args.json, report)
    return 0
