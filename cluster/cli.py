"""The `kvcomm` command line: demo, run, serve, submit, plan, calibrate, and the benchmarks (runner, ttft, fidelity,
anchors, pareto, quality, throughput, reliability, serve, scale, agents).

Each benchmark's options live next to its code and are added here; commands import the heavy parts (Ray, the
model) only when they run, and nothing imports GPU code on a CPU-only machine.
"""
from __future__ import annotations

import argparse
import sys

from kvcomm.bench import write_json_report
from kvcomm.cli_args import add_model_args, apply_threads


def cmd_bench_runner(args: argparse.Namespace) -> int:
    from kvcomm.bench import runner_bench
    report = runner_bench.run(args.model, device=args.device, dtype=args.dtype, random_weights=args.random_weights,
                              repeats=args.repeats, decode_tokens=args.decode_tokens,
                              prefill_lengths=tuple(int(x) for x in args.prefill.split(",")),
                              batch_sizes=tuple(int(x) for x in args.batches.split(",")))
    print(runner_bench.markdown_table(report))
    write_json_report(args.json, report)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from kvcomm.harness.job_files import load_jobs
    from kvcomm.job_runner import run_job
    from kvcomm.engine import build_engine
    jobs = load_jobs(args.job)
    engine = build_engine(args.model, device=args.device, dtype=args.dtype, random_weights=args.random_weights)
    results = []
    for job in jobs:
        for mode in (args.mode.split(",") if args.mode else [job.mode]):
            print(f"== job {job.id}  mode {mode}")
            result = run_job(engine, job, mode=mode, on_turn=lambda t: print(
                f"-- agent {t.agent_id} ({t.role}, round {t.round})  TTFT {t.ttft_s*1e3:.0f} ms  "
                f"{'reused' if t.reused else 'prefilled'} [{t.reason}]\n{t.text.strip()}\n", flush=True))
            print(f"== final answer: {result.final_answer.strip()}\n== reuse rate {result.reuse_rate:.0%}  "
                  f"wall {result.wall_s:.1f} s\n")
            results.append(result.to_dict())
    write_json_report(args.json, {"results": results})
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvcomm", description="KVCOMM multi-agent KV sharing on Ray")
    sub = parser.add_subparsers(dest="command", required=True)

    from cluster.demo import add_demo_parser              # light imports: heavy parts load on run
    from cluster.serve.command import add_serve_parser
    add_demo_parser(sub)
    add_serve_parser(sub)

    p = sub.add_parser("run", help="run multi-agent job(s) from a JSON/JSONL/YAML file in this process")
    p.add_argument("job")
    p.add_argument("--mode", default=None, help="override the job's mode; a comma list runs each")
    p.add_argument("--json", default=None)
    add_model_args(p)
    p.set_defaults(func=cmd_run)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    p = bench.add_parser("runner", help="our runner vs transformers: prefill ms and decode tok/s")
    add_model_args(p)
    p.add_argument("--prefill", default="256,512,1024,2048")
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    p.set_defaults(func=cmd_bench_runner)

    # the options of each benchmark live next to its code (one home); building them imports torch
    from kvcomm.bench import anchors, calibrate, fidelity, pareto, quality, ttft
    from cluster.batch import submit
    from cluster.bench import agents as bench_agents
    from cluster.bench import reliability as bench_reliability
    from cluster.bench import pool_stall as bench_pool_stall
    from cluster.bench import scale as bench_scale
    from cluster.bench import serve as bench_serve
    from cluster.bench import throughput as bench_throughput

    benchmarks = [
        ("ttft", "TTFT per agent and serving mode (the paper's Tables 2 and 3)",
         ttft.add_arguments, ttft.cli_main),
        ("fidelity", "KV error, first-token agreement and KL of every reuse method vs dense",
         fidelity.add_arguments, fidelity.cli_main),
        ("anchors", "anchor-pool size V against memory, reuse rate, KL and offset time",
         anchors.add_arguments, anchors.cli_main),
        ("pareto", "KL against reused-turn prepare time: every method, recompute ratios and gate thresholds swept",
         pareto.add_arguments, pareto.cli_main),
        ("quality", "task accuracy, reuse rate and agreement with dense of every mode (GSM8K, HumanEval)",
         quality.add_arguments, quality.cli_main),
        ("throughput", "continuous batching vs batch-1, 1 vs N workers, KV transfer",
         bench_throughput.add_arguments, bench_throughput.cli_main),
        ("reliability", "workers and the anchor pool killed under load; bad input; memory",
         bench_reliability.add_arguments, bench_reliability.cli_main),
        ("serve", "multi-agent jobs over HTTP on 1 and N worker replicas; the pool shared by submit and HTTP",
         bench_serve.add_arguments, bench_serve.cli_main),
        ("agents", "AutoGen and LangGraph against the OpenAI chat API: TTFT per agent with KV reuse off and on",
         bench_agents.add_arguments, bench_agents.cli_main),
        ("scale", "agents x worker replicas on simulated nodes: latency, TTFT, KV between nodes, pool calls",
         bench_scale.add_arguments, bench_scale.cli_main),
        ("pool-stall", "a worker's decode-step gaps while 32 clients and 100 MB commits keep the anchor pool busy",
         bench_pool_stall.add_arguments, bench_pool_stall.cli_main),
    ]
    for name, help_text, add_arguments, run in benchmarks:
        p = bench.add_parser(name, help=help_text)
        add_arguments(p)
        p.set_defaults(func=run)

    p = sub.add_parser("calibrate", help="fit a model's recompute budget and turn-gate threshold on a dev split")
    calibrate.add_arguments(p)
    p.set_defaults(func=calibrate.cli_main)
    submit.add_submit_parser(sub)
    from cluster.plan import add_plan_parser   # light: the memory-plan arithmetic, no Ray
    add_plan_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    apply_threads(args)
    from kvcomm.harness.jobs import JobSpecError
    from kvcomm.model_loading import ModelLoadError
    from kvcomm.templates import TemplateError
    try:
        return args.func(args)
    except (JobSpecError, ModelLoadError, TemplateError, FileNotFoundError) as exc:
        print(f"kvcomm {args.command}: error: {exc}", file=sys.stderr)   # the problem, named; no traceback
        return 2


if __name__ == "__main__":
    sys.exit(main())
