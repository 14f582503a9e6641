"""`kvcomm bench pool-stall`: does a busy anchor pool stall a worker's decoding?

One `AgentWorker` (a `ClusterRunner` with one worker) decodes one long dense sequence. While it decodes:

* ``--clients`` threads of this process hammer the pool actor with snapshots of a namespace of ``--hot-anchors``
  anchors (as many workers' job threads would);
* one thread commits ``--commit-mb`` MB payloads to the pool, one after another (a large question's anchors);
* small pooled orders go to the same worker, one after another: a two-token user input offered to the gate of a
  namespace holding a few anchors. Each reads the pool; a worker that reads it on its model thread waits for the
  busy pool between two decode steps.

The worker's scheduler reports every decode step's time and every gap between two steps while a sequence waits
(its stats start empty: nothing decodes before the long sequence). The figure of merit is the largest gap over
the median step (the reliability test `tests/reliability/test_pool_stall.py` requires < 2); next to it the
hammering clients' snapshot latency and the commits' time, so a run shows how busy the pool was.
Runs on main's API too (it only uses the runner, the worker's orders and stats, and the pool's calls), so the
same command gives before and after figures.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
import uuid
from typing import Any

import numpy as np

from kvcomm.bench import write_json_report
from kvcomm.cli_args import add_model_args
from kvcomm.harness.jobs import GenerationParams
from kvcomm.harness.topologies import build_job
from kvcomm.names import EMBEDDED_MODEL

from ..config import ClusterConfig

HOT = "stall-hot"            # the namespace the clients hammer
GATED = "stall-gated"        # the namespace the worker's small orders offer to


def anchor_payload(namespace: str, shape: dict[str, int], tokens: int, count: int, seed: int) -> dict[str, Any]:
    """`count` new anchors of `tokens` tokens of the model's KV shape (float32), in the pool's commit format."""
    rng = np.random.default_rng(seed)
    dims = (shape["layers"], shape["kv_heads"], tokens, shape["head_dim"])
    anchors = [{"anchor_id": uuid.uuid4().hex, "placeholder": "user_question", "dtype": "float32",
                "base": {"base_keys": rng.standard_normal(dims, dtype=np.float32),
                         "base_values": rng.standard_normal(dims, dtype=np.float32)}} for _ in range(count)]
    return {"namespace": namespace, "anchors": anchors, "deltas": [], "activations": {}}


def _hammer(pool: Any, stop: threading.Event, latencies: list[float]) -> None:
    import ray
    while not stop.is_set():
        started = time.perf_counter()
        ray.get(pool.snapshot.remote(HOT, None))
        latencies.append(time.perf_counter() - started)


def _commit_loop(pool: Any, payload_ref: Any, stop: threading.Event, durations: list[float]) -> None:
    import ray
    while not stop.is_set():
        started = time.perf_counter()
        ray.get(pool.commit.remote(payload_ref))
        durations.append(time.perf_counter() - started)


def _small_orders(worker: Any, stop: threading.Event, done: list[int]) -> None:
    import ray
    from actors.turns import ContentOrder
    order = ContentOrder(namespace=GATED, text="ok", offer_as=("user_question",), pooled=True)
    while not stop.is_set():
        ray.get(worker.make_content.options(num_returns=3).remote(order)[0])
        done[0] += 1


def run(*, model: str = EMBEDDED_MODEL, random_weights: bool = False, clients: int = 32,
        commit_mb: int = 100, decode_tokens: int = 96, hot_anchors: int = 64, load: bool = True,
        small_orders: bool = True, sequences: int = 1, cluster: dict[str, Any] | None = None,
        isolate_worker: bool = False) -> dict[str, Any]:
    """One measurement (`load=False`: the same decode with nothing else running, the baseline). `cluster`: cluster
    config fields to set (e.g. prefill_step_tokens, pool_nice, pool_cpus); unset ones keep their defaults.
    `isolate_worker`: the worker's process gets a CPU core of its own and the pool actor and this process (the
    clients, the commits) the others, as on a node whose pool has CPUs of its own (Linux only; other processes
    of the machine are not moved)."""
    import ray
    from ..batch.runner import ClusterRunner
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, object_store_memory=1 << 30, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    config = ClusterConfig(model=model, random_weights=random_weights, num_workers=1, cpus_per_worker=1,
                           threads_per_worker=1, max_batch_size=4, pool_actor_name=f"stall-pool-{uuid.uuid4().hex[:6]}",
                           kvcomm={"pool_byte_budget": (3 * commit_mb + 64) << 20, "max_anchors": 64},
                           **(cluster or {}))
    with ClusterRunner(config) as runner:
        worker, pool = runner.workers[0], runner.pool_actor
        shape = ray.get(worker.stats.remote())["kv_shape"]
        ray.get(pool.commit.remote(anchor_payload(GATED, shape, tokens=16, count=4, seed=1)))
        ray.get(pool.commit.remote(anchor_payload(HOT, shape, tokens=16, count=hot_anchors, seed=2)))
        per_anchor = 2 * 4 * shape["layers"] * shape["kv_heads"] * shape["head_dim"]    # K+V fp32 bytes per token
        big = ray.put(anchor_payload("stall-big", shape, tokens=max(1, (commit_mb << 20) // per_anchor), count=1,
                                     seed=3))
        if load:   # the worker fetches the gated anchors once (its part cache), before anything decodes
            from actors.turns import ContentOrder
            ray.get(worker.make_content.options(num_returns=3).remote(
                ContentOrder(namespace=GATED, text="warm", offer_as=("user_question",), pooled=True))[0])
        jobs = [build_job("math", f"Ben has {3 + i} cards and gets 4 more. How many cards does he have?",
                          num_agents=1, mode="dense", job_id=f"stall-{uuid.uuid4().hex[:6]}",
                          generation=GenerationParams(max_new_tokens=decode_tokens, min_new_tokens=decode_tokens))
                for i in range(sequences)]
        cores = _isolate(worker, pool) if isolate_worker else None
        tickets = [runner.submit(job) for job in jobs]
        deadline = time.monotonic() + 120
        while ray.get(worker.load.remote()).active < sequences:   # inputs and prefills run before the first step
            if time.monotonic() > deadline:
                raise TimeoutError("the long sequence never started decoding")
            time.sleep(0.005)
        stop = threading.Event()
        snapshot_s: list[float] = []
        commit_s: list[float] = []
        orders = [0]
        threads = []
        if load:
            threads = [threading.Thread(target=_hammer, args=(pool, stop, snapshot_s), daemon=True)
                       for _ in range(clients)]
            threads.append(threading.Thread(target=_commit_loop, args=(pool, big, stop, commit_s), daemon=True))
            if small_orders:
                threads.append(threading.Thread(target=_small_orders, args=(worker, stop, orders), daemon=True))
        for thread in threads:
            thread.start()
        result = [runner.result(ticket) for ticket in tickets][0]
        stop.set()
        for thread in threads:
            thread.join(60)
        stats = ray.get(worker.stats.remote())
        pool_stats = ray.get(pool.stats.remote())
    scheduler = stats["scheduler"]
    step, gap, token = scheduler["step_ms"], scheduler["step_gap_ms"], scheduler["token_interval_ms"]
    quantile = (lambda values, q: sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1e3 if values else 0.0)
    return {"load": load, "model": model, "prefill_step_tokens": config.prefill_step_tokens, "worker_cores": cores,
            "pool_nice": config.pool_nice, "pool_cpus": config.pool_cpus, "load_average": _load_average(),
            "sequences": sequences, "clients": clients if load else 0, "commit_mb": commit_mb if load else 0,
            "decode_tokens": len(result["turns"][0]["token_ids"]), "steps": scheduler["steps"],
            "step_p50_ms": step["p50"], "step_max_ms": step["max"], "gap_max_ms": gap["max"], "gap_p99_ms": gap["p99"],
            # the machine's own noise: the slowest decode step over the median one (no pool call is in a step)
            "step_max_over_step_p50": step["max"] / step["p50"] if step["p50"] else 0.0,
            "gap_max_over_step_p50": gap["max"] / step["p50"] if step["p50"] else 0.0,
            "largest_gap": scheduler.get("largest_gap"),     # what ran in it: engine calls, prefill tokens
            # what the decoding sequence saw: from one token to the next (a gap and the step after it)
            "token_interval_p50_ms": token["p50"], "token_interval_max_ms": token["max"],
            "token_interval_max_over_p50": token["max"] / token["p50"] if token["p50"] else 0.0,
            "steps_riding": scheduler.get("steps_riding", 0),
            "small_orders": orders[0], "client_snapshots": len(snapshot_s),
            "client_snapshot_p50_ms": quantile(snapshot_s, 0.5), "client_snapshot_p99_ms": quantile(snapshot_s, 0.99),
            "commits": len(commit_s), "commit_mean_s": statistics.fmean(commit_s) if commit_s else 0.0,
            "worker_pool_call_ms": stats["pool"].get("snapshot_call_ms"),
            "worker_pool_calls_by_thread": stats["pool"].get("calls_by_thread"),
            "pool_bytes_per_question": pool_stats.get("bytes_per_question")}


def _isolate(worker: Any, pool: Any) -> dict[str, list[int]]:
    """Pin the worker's process to the last CPU core and the pool actor's and this process's to the others."""
    import ray
    worker_pid = ray.get(worker.stats.remote())["pid"]
    available = sorted(os.sched_getaffinity(worker_pid))    # a fresh worker may use every core Ray's node may
    if len(available) < 2:
        raise RuntimeError(f"--isolate-worker needs at least 2 CPU cores, the worker may use {available}")
    mine, others = {available[-1]}, set(available[:-1])
    os.sched_setaffinity(worker_pid, mine)
    os.sched_setaffinity(ray.get(pool.stats.remote())["pid"], others)
    for thread_id in os.listdir("/proc/self/task"):   # every thread of this process, the clients' included
        os.sched_setaffinity(int(thread_id), others)
    return {"worker": sorted(mine), "pool_and_clients": sorted(others)}


def _load_average() -> float | None:
    """The machine's 1-minute load average at the end of the run (a shared machine's figures vary with it)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| load | prefill step tokens / pool nice / pool CPUs | load average | step p50 ms | largest gap ms | "
             "gap p99 ms | largest gap / step | slowest step / step | token interval p50 / max ms | "
             "slowest token / median | small orders | client snapshot p50 / p99 ms | 100 MB commits (mean s) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|---|"]
    for r in rows:
        load = f"{r['clients']} clients + {r['commit_mb']} MB commits" if r["load"] else "none"
        settings = f"{r.get('prefill_step_tokens', '-')} / {r.get('pool_nice', '-')} / {r.get('pool_cpus', '-')}"
        lines.append(f"| {load} | {settings} | {r.get('load_average') or 0:.1f} | {r['step_p50_ms']:.1f} | "
                     f"{r['gap_max_ms']:.1f} | {r['gap_p99_ms']:.1f} | "
                     f"{r['gap_max_over_step_p50']:.2f} | {r.get('step_max_over_step_p50', 0):.2f} | "
                     f"{r.get('token_interval_p50_ms', 0):.1f} / {r.get('token_interval_max_ms', 0):.1f} | "
                     f"{r.get('token_interval_max_over_p50', 0):.2f} | {r['small_orders']} | "
                     f"{r['client_snapshot_p50_ms']:.1f} / {r['client_snapshot_p99_ms']:.1f} | "
                     f"{r['commits']} ({r['commit_mean_s']:.2f}) |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser, local=False)
    parser.add_argument("--clients", type=int, default=32, help="threads hammering the pool with snapshots")
    parser.add_argument("--commit-mb", type=int, default=100, help="size of each commit in flight")
    parser.add_argument("--decode-tokens", type=int, default=96, help="tokens the measured sequence decodes")
    parser.add_argument("--prefill-step-tokens", type=int, default=None,
                        help="chunked prefill's budget (config prefill_step_tokens; 0: off; default: the config's)")
    parser.add_argument("--pool-nice", type=int, default=None, help="the pool actor's nice value (config pool_nice)")
    parser.add_argument("--pool-cpus", type=float, default=None, help="CPUs reserved for the pool actor (pool_cpus)")
    parser.add_argument("--isolate-worker", action="store_true",
                        help="give the worker's process a CPU core of its own, the pool and the clients the others")
    parser.add_argument("--json", default=None)


def cli_main(args: argparse.Namespace) -> int:
    rows = []
    cluster = {key: value for key, value in (("prefill_step_tokens", args.prefill_step_tokens),
                                              ("pool_nice", args.pool_nice), ("pool_cpus", args.pool_cpus))
               if value is not None}
    for load in (False, True):
        print(f"pool-stall: decoding {args.decode_tokens} tokens, load {'on' if load else 'off'}", file=sys.stderr)
        rows.append(run(model=args.model, random_weights=args.random_weights, clients=args.clients,
                        commit_mb=args.commit_mb, decode_tokens=args.decode_tokens, load=load, cluster=cluster,
                        isolate_worker=args.isolate_worker))
    print(markdown_table(rows))
    write_json_report(args.json, {"runs": rows})
    return 0


if __name__ == "__main__":   # also runnable as a module (e.g. on an older checkout: before/after figures)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(cli_main(parser.parse_args()))
