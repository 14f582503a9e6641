"""`kvcomm bench scale`: agents by worker replicas on a cluster of several nodes simulated on this machine.

For each worker count (``--replicas``), a simulated cluster (`cluster.bench.simcluster`: ``--nodes`` worker nodes
with fake GPUs) gets that many `AgentWorker`s, one GPU-shaped bundle each, placed SPREAD (the model runs on the
CPU: ``simulate_gpus``). For each agent count (``--agents``), ``--jobs`` fully connected kvcomm jobs run at once
(after one warm-up job that teaches the pool the job's shape), and the benchmark reports:

* job latency (mean over the jobs) and per-agent TTFT (mean over the jobs, by agent position);
* turns per replica;
* KV bytes the workers fetched from another node's object store (contents they read that another node computed);
* the workers' anchor-pool snapshot calls, p50 / p99 (ms);
* the largest p99 of the workers' gaps between two decode steps with sequences waiting (ms).

JSON (``--json``), a markdown table, and a plot (``--plot``: job latency and bytes between nodes by agents, one line
per replica count). On a 2-core machine every replica shares the same cores, so more replicas do not make a job
faster here: the figures show where turns go and what moves between nodes, not a speedup.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from typing import Any, Sequence

from kvcomm.bench import write_json_report
from kvcomm.cli_args import add_model_args
from kvcomm.harness.jobs import GenerationParams
from kvcomm.harness.topologies import build_job
from kvcomm.names import EMBEDDED_MODEL

from ..config import ClusterConfig


def _jobs(count: int, agents: int, new_tokens: int, namespace: str, offset: int) -> list[Any]:
    return [build_job("math", f"Question {offset + i}: Ben has {3 + i} cards and gets {4 + 2 * i} more. How many?",
                      num_agents=agents, mode="kvcomm", namespace=namespace, job_id=f"scale-{agents}-{offset + i}",
                      generation=GenerationParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens))
            for i in range(count)]


def _worker_totals(runner: Any) -> dict[str, Any]:
    import ray
    stats = ray.get([w.stats.remote() for w in runner.workers])
    return {"remote_bytes": sum(s["contents"]["bytes_from_other_nodes"] for s in stats),
            "pool_p50": max(s["pool"]["snapshot_call_ms"]["p50"] for s in stats),
            "pool_p99": max(s["pool"]["snapshot_call_ms"]["p99"] for s in stats),
            "gap_p99": max(s["scheduler"]["step_gap_ms"]["p99"] for s in stats),
            "nodes": sorted({s["node_id"] for s in stats})}


def run_setting(runner: Any, agents: int, jobs: int, new_tokens: int) -> dict[str, Any]:
    namespace = f"scale-{agents}-{uuid.uuid4().hex[:6]}"
    runner.run_job(_jobs(1, agents, new_tokens, namespace, offset=100)[0])          # the pool learns the shape
    before = _worker_totals(runner)
    started = time.perf_counter()
    tickets = [runner.submit(job) for job in _jobs(jobs, agents, new_tokens, namespace, offset=0)]
    results = [runner.result(t) for t in tickets]
    wall = time.perf_counter() - started
    after = _worker_totals(runner)
    per_replica: dict[str, int] = {}
    for result in results:
        for turn in result["turns"]:
            per_replica[turn["worker"]] = per_replica.get(turn["worker"], 0) + 1
    ttft = [statistics.fmean(r["turns"][k]["ttft_s"] for r in results) * 1e3 for k in range(agents)]
    return {"agents": agents, "jobs": jobs, "wall_s": wall,
            "job_latency_s": statistics.fmean(r["wall_s"] for r in results),
            "ttft_ms_by_agent": ttft, "turns_per_replica": sorted(per_replica.values(), reverse=True),
            "reuse_rate": statistics.fmean(r["reuse_rate"] for r in results),
            "bytes_between_nodes": after["remote_bytes"] - before["remote_bytes"],
            "pool_call_p50_ms": after["pool_p50"], "pool_call_p99_ms": after["pool_p99"],
            "decode_gap_p99_ms": after["gap_p99"], "nodes_used": len(after["nodes"])}


def run(*, agents: Sequence[int] = (2, 4, 8, 16), replicas: Sequence[int] = (1, 2, 4), nodes: int = 2,
        jobs: int = 2, new_tokens: int = 8, model: str = EMBEDDED_MODEL, random_weights: bool = False
        ) -> dict[str, Any]:
    from ..batch.runner import ClusterRunner
    from .simcluster import SimulatedCluster
    report: dict[str, Any] = {"model": model, "nodes": nodes, "jobs": jobs, "new_tokens": new_tokens,
                              "settings": []}
    for count in replicas:
        gpus = -(-count // nodes)
        print(f"scale: {count} worker(s) on {nodes} simulated nodes ({gpus} fake GPU(s) each)", file=sys.stderr)
        config = ClusterConfig(model=model, random_weights=random_weights, device="cpu", simulate_gpus=True,
                               num_workers=count, gpus_per_worker=1, cpus_per_worker=0.5, threads_per_worker=1,
                               placement_strategy="SPREAD", pool_actor_name=f"scale-pool-{uuid.uuid4().hex[:6]}",
                               kvcomm={"gamma": 1.0, "pool_byte_budget": 128 << 20})   # fits a node
        with SimulatedCluster(worker_nodes=nodes, cpus_per_node=max(1, count), gpus_per_node=gpus):
            with ClusterRunner(config) as runner:
                for agent_count in agents:
                    print(f"scale: {count} worker(s), {jobs} job(s) of {agent_count} agents", file=sys.stderr)
                    row = run_setting(runner, agent_count, jobs, new_tokens)
                    report["settings"].append({"replicas": count, **row})
    return report


def markdown_table(report: dict[str, Any]) -> str:
    lines = [f"{report['jobs']} kvcomm jobs at once per cell, fully connected, {report['new_tokens']} tokens per turn, "
             f"{report['model']}, {report['nodes']} simulated nodes", "",
             "| replicas | agents | job latency s | TTFT agent 1 / last ms | turns per replica | KB between nodes "
             "| pool call p50 / p99 ms | decode gap p99 ms |", "|---:|---:|---:|---|---|---:|---|---:|"]
    for s in report["settings"]:
        ttft = s["ttft_ms_by_agent"]
        lines.append(f"| {s['replicas']} | {s['agents']} | {s['job_latency_s']:.2f} | {ttft[0]:.0f} / {ttft[-1]:.0f} | "
                     f"{' / '.join(map(str, s['turns_per_replica']))} | {s['bytes_between_nodes'] / 1024:.0f} | "
                     f"{s['pool_call_p50_ms']:.1f} / {s['pool_call_p99_ms']:.1f} | {s['decode_gap_p99_ms']:.1f} |")
    return "\n".join(lines)


def plot(report: dict[str, Any], png_path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for count in sorted({s["replicas"] for s in report["settings"]}):
        rows = [s for s in report["settings"] if s["replicas"] == count]
        xs = [s["agents"] for s in rows]
        left.plot(xs, [s["job_latency_s"] for s in rows], marker="o", label=f"{count} replica(s)")
        right.plot(xs, [s["bytes_between_nodes"] / 1024 for s in rows], marker="o", label=f"{count} replica(s)")
    left.set(xlabel="agents per job", ylabel="job latency (s)", title="job latency")
    right.set(xlabel="agents per job", ylabel="KB", title="KV fetched from another node")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle(f"kvcomm bench scale ({report['model']}, {report['nodes']} simulated nodes)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--agents", default="2,4,8,16")
    parser.add_argument("--replicas", default="1,2,4")
    parser.add_argument("--nodes", type=int, default=2, help="simulated worker nodes")
    parser.add_argument("--jobs", type=int, default=2, help="jobs at once per cell")
    parser.add_argument("--new-tokens", type=int, default=8)
    add_model_args(parser, local=False)
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None, help="write a PNG here (e.g. docs/img/scale.png)")


def cli_main(args: argparse.Namespace) -> int:
    report = run(agents=tuple(int(x) for x in args.agents.split(",")),
                 replicas=tuple(int(x) for x in args.replicas.split(",")), nodes=args.nodes, jobs=args.jobs,
                 new_tokens=args.new_tokens, model=args.model, random_weights=args.random_weights)
    print(markdown_table(report))
    write_json_report(args.json, report)
    if args.plot:
        print(f"plot: {plot(report, args.plot)}")
    return 0
