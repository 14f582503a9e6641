"""`kvcomm bench throughput`: jobs per minute and decode tokens per second of the Ray cluster.

This module owns the cluster throughput benchmark: `run(...) -> report` (a JSON-able dict), `markdown_table`,
and its command line (`add_arguments` / `cli_main`, also ``python -m cluster.bench.throughput``).

What it measures, all in one run on one cluster (ratios are the figures to quote; on a shared 2-core CPU the
absolute numbers drift by 15-20%):

* continuous batching vs batch-1 on one worker: the same N jobs, all in flight at once, on worker 0 with
  ``max_batch_size`` B and then 1 (the scheduler then decodes one sequence per step); in dense mode, and (with
  ``--modes dense,kvcomm``) in kvcomm mode after a warm-up (``--mode-warmup`` jobs, one at a time) that records
  anchors, where reused turns skip most of their prefill, so a replica is decode-bound and batching pays more;
* 1 vs 2 (or more) workers, continuous batching, jobs routed by load;
* KV transfer: a response segment of T tokens of this model's KV (fp32 numpy, one object per segment) `ray.put`
  by the driver and `ray.get` + copied into a torch tensor in another process: MB/s both ways;
* the share of a reused agent's TTFT that moving its inputs would cost: a kvcomm pass over the jobs (after a
  warm-up pass that records anchors) gives the median TTFT of reused turns; the share is the transfer time of
  a segment as long as the median response divided by it.

Every response is forced to exactly `new_tokens` tokens (min = max), so token counts are equal across settings.
Each worker gets `threads_per_worker` CPUs and torch threads (default one, so that 1 vs 2 workers compares like
with like; ``--threads-per-worker 2 --workers 1`` gives one replica the whole 2-core machine).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kvcomm.bench import write_json_report
from kvcomm.cli_args import add_model_args
from kvcomm.harness.jobs import GenerationParams, JobSpec
from kvcomm.harness.topologies import build_job
from kvcomm.names import EMBEDDED_MODEL

from ..config import ClusterConfig

TASK_TEMPLATE = ("A shop sells {a} boxes of pencils with {b} pencils in each box, and {c} loose pencils. "
                 "How many pencils does the shop sell in total?")


def make_jobs(count: int, *, agents: int, new_tokens: int, mode: str, tag: str, offset: int = 0,
              namespace: str | None = None) -> list[JobSpec]:
    """`count` fully connected math jobs with distinct numbers (question `offset` on); dense jobs each in their
    own namespace (routing by load), other modes in `namespace` (default: one per tag) so they share anchors."""
    jobs = []
    for i in range(offset, offset + count):
        task = TASK_TEMPLATE.format(a=3 + i % 7, b=12 + i % 5, c=5 + i % 9)
        jobs.append(build_job("math", task, num_agents=agents, mode=mode, job_id=f"{tag}-{i}",
                              namespace=f"bench-{tag}-{i}" if mode == "dense" else namespace or f"bench-{tag}",
                              generation=GenerationParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens)))
    return jobs


def _scheduler_totals(runner: Any, workers: Sequence[int]) -> tuple[int, int]:
    import ray
    stats = ray.get([runner.workers[i].stats.remote() for i in workers])
    return (sum(s["scheduler"]["steps"] for s in stats), sum(s["scheduler"]["step_sequences"] for s in stats))


def _run_setting(runner: Any, jobs: list[JobSpec], workers: Sequence[int], max_batch_size: int,
                 mode: str = "dense") -> dict[str, Any]:
    """All `jobs` in flight at once on `workers` (round-robin when one, else routed by load)."""
    import ray
    ray.get([runner.workers[i].set_max_batch_size.remote(max_batch_size) for i in workers])
    steps0, seqs0 = _scheduler_totals(runner, workers)
    started = time.perf_counter()
    if len(workers) == 1:
        tickets = [runner.submit(job, worker=workers[0]) for job in jobs]
    else:
        tickets = [runner.submit(job) for job in jobs]
    results = [runner.result(t) for t in tickets]
    wall = time.perf_counter() - started
    steps1, seqs1 = _scheduler_totals(runner, workers)
    turns = [t for r in results for t in r["turns"]]
    tokens = sum(len(t["token_ids"]) for t in turns)
    return {"mode": mode, "workers": len(workers), "max_batch_size": max_batch_size, "jobs": len(jobs),
            "turns": len(turns), "reuse_rate": sum(t["reused"] for t in turns) / max(len(turns), 1),
            "wall_s": wall, "jobs_per_min": len(jobs) / wall * 60, "decode_tok_per_s": tokens / wall,
            "mean_batch": (seqs1 - seqs0) / max(steps1 - steps0, 1),
            "ttft_median_s": statistics.median(t["ttft_s"] for t in turns),
            "used_workers": sorted({w for r in results for w in r["workers"]})}


def _transfer(kv_shape: dict[str, int], tokens: int, repeats: int) -> dict[str, Any]:
    """put (driver) and get + torch copy (another process) of one response segment's K and V."""
    import ray
    import torch

    @ray.remote(num_cpus=0)
    def fetch(boxed: list) -> float:
        t0 = time.perf_counter()
        arrays = ray.get(boxed[0])
        tensors = {name: torch.from_numpy(np.array(a, copy=True)) for name, a in arrays.items()}
        assert tensors["keys"].shape[2] == tokens
        return time.perf_counter() - t0

    shape = (kv_shape["layers"], kv_shape["kv_heads"], tokens, kv_shape["head_dim"])
    segment = {"keys": np.random.default_rng(0).standard_normal(shape, dtype=np.float32),
               "values": np.random.default_rng(1).standard_normal(shape, dtype=np.float32)}
    nbytes = sum(a.nbytes for a in segment.values())
    ray.get(fetch.remote([ray.put(segment)]))            # warm the task's worker process
    puts, gets = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ref = ray.put(segment)
        puts.append(time.perf_counter() - t0)
        gets.append(ray.get(fetch.remote([ref])))
        del ref
    put_s, get_s = statistics.median(puts), statistics.median(gets)
    return {"tokens": tokens, "mb": nbytes / 1e6, "put_s": put_s, "get_s": get_s,
            "put_mb_per_s": nbytes / 1e6 / put_s, "get_mb_per_s": nbytes / 1e6 / get_s}


def _reuse_pass(runner: Any, jobs: list[JobSpec], warmup: int) -> dict[str, Any]:
    """kvcomm mode on worker 0, one job at a time: `warmup` jobs record anchors, the rest are measured."""
    for job in jobs[:warmup]:
        runner.run_job(job, worker=0)
    turns = [t for job in jobs[warmup:] for t in runner.run_job(job, worker=0)["turns"]]
    reused = [t for t in turns if t["reused"]]
    return {"turns": len(turns), "reuse_rate": len(reused) / len(turns) if turns else 0.0,
            "reused_ttft_median_s": statistics.median(t["ttft_s"] for t in reused) if reused else None,
            "dense_ttft_median_s": statistics.median(t["ttft_s"] for t in turns if not t["reused"])
            if len(reused) < len(turns) else None,
            "response_tokens_median": statistics.median(len(t["token_ids"]) for t in turns) if turns else 0}


def run(workers: Sequence[int] = (1, 2), jobs: int = 16, *, model: str = EMBEDDED_MODEL,
        random_weights: bool = False, agents: int = 3, new_tokens: int = 32, max_batch_size: int = 16,
        transfer_tokens: Sequence[int] = (128, 512), transfer_repeats: int = 5, reuse_jobs: int = 6,
        reuse_warmup: int = 2, address: str | None = None, config: ClusterConfig | None = None,
        modes: Sequence[str] = ("dense",), threads_per_worker: int | None = None,
        mode_warmup: int = 6) -> dict[str, Any]:
    """Run the benchmark (see the module docstring) and return its report."""
    import ray
    from ..batch.runner import ClusterRunner
    from ..runtime import RayRuntime

    most = max(workers)
    base = config or ClusterConfig(cpus_per_worker=1, threads_per_worker=1)
    if threads_per_worker is not None:
        base = base.with_(cpus_per_worker=threads_per_worker, threads_per_worker=threads_per_worker)
    cfg = base.with_(model=model, random_weights=random_weights, num_workers=most, max_batch_size=max_batch_size,
                     pool_actor_name=f"bench-pool-{uuid.uuid4().hex[:8]}")
    connection = RayRuntime(address, num_cpus=int(most * cfg.cpus_per_worker) or 1, object_store_mb=2560)
    report: dict[str, Any] = {"model": model, "random_weights": random_weights, "agents": agents,
                              "new_tokens": new_tokens, "jobs": jobs, "threads_per_worker": cfg.worker_threads,
                              "settings": []}
    try:
        with ClusterRunner(cfg) as runner:
            worker_info = ray.get(runner.workers[0].stats.remote())
            warm = make_jobs(most, agents=agents, new_tokens=new_tokens, mode="dense", tag="warm")
            for ticket in [runner.submit(job, worker=i) for i, job in enumerate(warm)]:   # templates, first calls
                runner.result(ticket)
            tag = 0
            for mode in modes:
                namespace = f"bench-{mode}-{uuid.uuid4().hex[:6]}"
                order = (1, max_batch_size)
                if mode != "dense":          # record anchors on other questions first, in the mode's namespace,
                    # one job at a time (jobs in flight together cannot use each other's anchors yet);
                    for job in make_jobs(mode_warmup, agents=agents, new_tokens=new_tokens, mode=mode,
                                         tag=f"warm-{mode}", offset=jobs, namespace=namespace):
                        runner.run_job(job, worker=0)
                    order = (max_batch_size, 1)   # the pool grows as jobs run: batched goes first, not favoured
                for batch in order:
                    tag += 1
                    print(f"throughput: {mode}, 1 worker, max batch {batch}: {jobs} jobs", file=sys.stderr)
                    report["settings"].append(_run_setting(
                        runner, make_jobs(jobs, agents=agents, new_tokens=new_tokens, mode=mode, tag=f"s{tag}",
                                          namespace=namespace), [0], batch, mode))
            for count in sorted(w for w in workers if w > 1):
                tag += 1
                print(f"throughput: dense, {count} workers: {jobs} jobs", file=sys.stderr)
                report["settings"].append(_run_setting(
                    runner, make_jobs(jobs, agents=agents, new_tokens=new_tokens, mode="dense", tag=f"s{tag}"),
                    list(range(count)), max_batch_size))
            report["transfer"] = [_transfer(worker_info["kv_shape"], t, transfer_repeats) for t in transfer_tokens]
            report["reuse"] = _reuse_pass(runner, make_jobs(reuse_jobs, agents=agents, new_tokens=new_tokens,
                                                            mode="kvcomm", tag="reuse"), reuse_warmup)
            report["device"] = worker_info["device"]
            report["kv_shape"] = worker_info["kv_shape"]
    finally:
        connection.close()
    _add_ratios(report)
    return report


def _add_ratios(report: dict[str, Any]) -> None:
    settings = report["settings"]
    ratios: dict[str, Any] = {}
    for mode in dict.fromkeys(s.get("mode", "dense") for s in settings):
        one = [s for s in settings if s.get("mode", "dense") == mode and s["workers"] == 1]
        batch1 = next((s for s in one if s["max_batch_size"] == 1), None)
        batched_m = next((s for s in one if s["max_batch_size"] > 1), None)
        if batch1 and batched_m:
            key = "batching_speedup" if mode == "dense" else f"batching_speedup_{mode}"
            ratios[key] = batched_m["jobs_per_min"] / batch1["jobs_per_min"]
    batched = next((s for s in settings if s.get("mode", "dense") == "dense" and s["workers"] == 1
                    and s["max_batch_size"] > 1), None)
    for s in settings:
        if s["workers"] > 1 and batched:
            ratios[f"workers_{s['workers']}_vs_1"] = s["jobs_per_min"] / batched["jobs_per_min"]
    reuse = report.get("reuse", {})
    if reuse.get("reused_ttft_median_s") and report.get("transfer"):
        # fetch time of a segment as long as the median response, at the measured get throughput (fp32 K and V)
        per_byte = statistics.median(t["get_s"] / (t["mb"] * 1e6) for t in report["transfer"])
        kv = report["kv_shape"]
        nbytes = 2 * kv["layers"] * kv["kv_heads"] * reuse["response_tokens_median"] * kv["head_dim"] * 4
        ratios["transfer_share_of_reused_ttft"] = per_byte * nbytes / reuse["reused_ttft_median_s"]
    report["ratios"] = ratios


def markdown_table(report: dict[str, Any]) -> str:
    lines = [f"Model {report['model']}{' (random weights)' if report['random_weights'] else ''}, "
             f"{report['agents']}-agent jobs, {report['new_tokens']} tokens per response, {report['jobs']} jobs "
             f"in flight per setting, {report.get('threads_per_worker', 1)} thread(s) per worker, "
             f"device {report.get('device', '?')}.", "",
             "| mode | workers | max batch | jobs/min | decode tok/s | mean batch | median TTFT (ms) | reuse "
             "| wall (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in report["settings"]:
        lines.append(f"| {s.get('mode', 'dense')} | {s['workers']} | {s['max_batch_size']} | "
                     f"{s['jobs_per_min']:.1f} | "
                     f"{s['decode_tok_per_s']:.1f} | {s['mean_batch']:.1f} | {s['ttft_median_s'] * 1e3:.0f} | "
                     f"{s.get('reuse_rate', 0):.0%} | {s['wall_s']:.1f} |")
    lines += ["", "| KV segment (tokens) | MB | put (ms) | get (ms) | put MB/s | get MB/s |",
              "|---:|---:|---:|---:|---:|---:|"]
    for t in report.get("transfer", []):
        lines.append(f"| {t['tokens']} | {t['mb']:.1f} | {t['put_s'] * 1e3:.1f} | {t['get_s'] * 1e3:.1f} | "
                     f"{t['put_mb_per_s']:.0f} | {t['get_mb_per_s']:.0f} |")
    reuse, ratios = report.get("reuse", {}), report.get("ratios", {})
    lines.append("")
    if "batching_speedup" in ratios:
        lines.append(f"- continuous batching vs batch-1 on one worker: {ratios['batching_speedup']:.2f}x jobs/min")
    for key, value in ratios.items():
        if key.startswith("batching_speedup_"):
            lines.append(f"- the same in {key.removeprefix('batching_speedup_')} mode (reused turns skip prefill): "
                         f"{value:.2f}x jobs/min")
    for key, value in ratios.items():
        if key.startswith("workers_"):
            lines.append(f"- {key.split('_')[1]} workers vs 1 (both batched): {value:.2f}x jobs/min")
    if reuse:
        ttft = reuse.get("reused_ttft_median_s")
        lines.append(f"- kvcomm pass: reuse rate {reuse['reuse_rate']:.0%}"
                     + (f", median reused TTFT {ttft * 1e3:.0f} ms" if ttft else ", no reused turn"))
    if "transfer_share_of_reused_ttft" in ratios:
        lines.append(f"- fetching a {reuse['response_tokens_median']:.0f}-token response segment from the object "
                     f"store would cost {ratios['transfer_share_of_reused_ttft']:.1%} of a reused agent's TTFT")
    return "\n".join(lines)


def plot(report: dict[str, Any], png_path: str) -> str:
    """Jobs per minute and decode tokens per second of every setting, side by side."""
    from matplotlib.figure import Figure   # no pyplot: no global backend state

    settings = report["settings"]
    labels = [f"{s.get('mode', 'dense')}\n{s['workers']} worker{'s' if s['workers'] > 1 else ''}\n"
              f"batch {s['max_batch_size']}" for s in settings]
    palette = {"dense": "C0", "kvcomm": "C1", "hybrid": "C2"}
    colors = [palette.get(s.get("mode", "dense"), "C3") for s in settings]
    fig = Figure(figsize=(11, 4.2), dpi=110)
    for ax, key, title in zip(fig.subplots(1, 2), ("jobs_per_min", "decode_tok_per_s"),
                              ("jobs per minute", "decode tokens per second")):
        values = [s[key] for s in settings]
        bars = ax.bar(range(len(settings)), values, color=colors, edgecolor=["black" if s["workers"] > 1 else "none"
                                                                              for s in settings])
        for bar, value in zip(bars, values):
            ax.annotate(f"{value:.1f}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom",
                        fontsize=8)
        ax.set_xticks(range(len(settings)), labels, fontsize=8)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    model = str(report.get("model", "")).split(" (")[0]
    fig.suptitle(f"{model}, {report['agents']}-agent jobs, {report['new_tokens']} tokens per response, "
                 f"{report['jobs']} jobs in flight, {report.get('threads_per_worker', 1)} thread(s) per worker, "
                 f"{report.get('device', '?')}", fontsize=9)
    fig.tight_layout()
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path)
    return png_path


# ------------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", default="1,2", help="worker counts to compare (comma list)")
    parser.add_argument("--jobs", type=int, default=16, help="jobs in flight per setting")
    add_model_args(parser, local=False)
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--modes", default="dense", help="modes whose batching gain is measured (e.g. dense,kvcomm)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--mode-warmup", type=int, default=6,
                        help="jobs run one at a time to record anchors before a reuse mode is measured")
    parser.add_argument("--threads-per-worker", type=int, default=None,
                        help="CPUs and torch threads per worker (default 1, or the --config's)")
    parser.add_argument("--transfer-tokens", default="128,512")
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: start a local one)")
    parser.add_argument("--config", default=None, help="cluster config YAML (resources, kvcomm knobs)")
    parser.add_argument("--json", default=None, help="write the report here")
    parser.add_argument("--plot", default=None, help="write a PNG of jobs/min and decode tok/s per setting here")


def cli_main(args: argparse.Namespace) -> int:
    config = ClusterConfig.from_yaml(args.config) if args.config else None
    report = run(workers=tuple(int(w) for w in args.workers.split(",")), jobs=args.jobs, model=args.model,
                 random_weights=args.random_weights, agents=args.agents, new_tokens=args.new_tokens,
                 max_batch_size=args.max_batch_size, modes=tuple(args.modes.split(",")),
                 transfer_tokens=tuple(int(t) for t in args.transfer_tokens.split(",")), address=args.address,
                 config=config, threads_per_worker=args.threads_per_worker, mode_warmup=args.mode_warmup)
    print(markdown_table(report))
    write_json_report(args.json, report)
    if args.plot:
        print(f"wrote {plot(report, args.plot)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvcomm bench throughput", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return cli_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
