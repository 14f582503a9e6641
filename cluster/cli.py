"""The `kvcomm` command line: demo, run, serve, submit, and the benchmarks (runner, ttft, fidelity, anchors, throughput).

Each benchmark's options live next to its code and are added here; commands import the heavy parts (Ray, the
model) only when they run, and nothing imports GPU code on a CPU-only machine.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvcomm.bench import write_json_report


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="embedded name, HF checkpoint dir, .gguf file, or preset (with --random-weights)")
    p.add_argument("--random-weights", action="store_true", help="random weights for a preset architecture")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")


def _apply_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        import torch
        torch.set_num_threads(args.threads)


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
    from kvcomm.harness.jobs import load_jobs
    from kvcomm.job_runner import run_job
    from kvcomm.session import build_engine
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


def cmd_demo(args: argparse.Namespace) -> int:
    """A 3-agent GSM8K-style job in dense and kvcomm mode on the embedded model, in this process."""
    import time

    from kvcomm.harness.jobs import load_jobs
    from kvcomm.job_runner import run_job
    from kvcomm.session import build_engine
    from kvcomm.config import KVCommConfig

    jobs = load_jobs(args.jobs)
    # anchors match content no longer than themselves: show the job with the shortest question, warm on the rest
    demo = min(jobs, key=lambda j: len(j.task))
    warmup = [j for j in jobs if j is not demo]
    print(f"[demo] loading {args.model} ...", flush=True)
    engine = build_engine(args.model, device=args.device, dtype=args.dtype, random_weights=args.random_weights,
                          config=KVCommConfig(gamma=args.gamma))
    for job in warmup:
        t = time.perf_counter()
        r = run_job(engine, job, mode="kvcomm")
        print(f"[demo] warm-up job {job.id} in kvcomm mode: anchors learned, reuse {r.reuse_rate:.0%} "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
    results = {}
    for mode in ("dense", "kvcomm"):
        print(f"[demo] job {demo.id} in {mode} mode ...", flush=True)
        results[mode] = run_job(engine, demo, mode=mode)
    print(f"\nQuestion: {demo.task}\n")
    for d, k in zip(results["dense"].turns, results["kvcomm"].turns):
        print(f"agent {d.agent_id} ({d.role})\n  dense : {' '.join(d.text.split())[:160]}\n"
              f"  kvcomm: {' '.join(k.text.split())[:160]}\n")
    print(f"{'agent':<8}{'role':<24}{'dense TTFT':>12}{'kvcomm TTFT':>13}{'speedup':>9}{'same tokens':>13}"
          "  kvcomm decision")
    for d, k in zip(results["dense"].turns, results["kvcomm"].turns):
        prefix = next((i for i, (a, b) in enumerate(zip(d.token_ids, k.token_ids)) if a != b),
                      min(len(d.token_ids), len(k.token_ids)))
        print(f"{d.agent_id:<8}{d.role[:23]:<24}{d.ttft_s*1e3:>10.0f}ms{k.ttft_s*1e3:>11.0f}ms"
              f"{d.ttft_s / k.ttft_s:>8.1f}x{prefix:>6}/{len(d.token_ids):<6}  {k.reason}")
    same = sum(d.token_ids == k.token_ids for d, k in zip(results["dense"].turns, results["kvcomm"].turns))
    print(f"\nreuse rate {results['kvcomm'].reuse_rate:.0%}; answers identical to dense for {same} of "
          f"{len(results['dense'].turns)} agents ('same tokens': how many leading tokens match dense; upstream "
          "answers differ once one agent diverges)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from cluster.serve_app import run_server
    return run_server(args.config, host=args.host, port=args.port, address=args.address)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvcomm", description="KVCOMM multi-agent KV sharing on Ray")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="a 3-agent job in dense and kvcomm mode, side by side")
    p.add_argument("--jobs", default=str(Path(__file__).resolve().parent.parent / "examples" / "gsm8k_3agents.jsonl"),
                   help="job file: the job with the shortest question is shown, the others warm the anchor pool")
    p.add_argument("--gamma", type=float, default=1.0, help="entropy gate (1.0 as the reference TTFT script)")
    _model_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", help="serve the HTTP API (jobs, OpenAI chat, metrics) from a Serve config file")
    p.add_argument("--config", default=str(Path(__file__).resolve().parent.parent / "configs" / "local.yaml"))
    p.add_argument("--host", default=None, help="default: the config's (127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="default: the config's (8000)")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: start a local one)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("run", help="run multi-agent job(s) from a JSON/JSONL/YAML file in this process")
    p.add_argument("job")
    p.add_argument("--mode", default=None, help="override the job's mode; a comma list runs each")
    p.add_argument("--json", default=None)
    _model_args(p)
    p.set_defaults(func=cmd_run)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    p = bench.add_parser("runner", help="our runner vs transformers: prefill ms and decode tok/s")
    _model_args(p)
    p.add_argument("--prefill", default="256,512,1024,2048")
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    p.set_defaults(func=cmd_bench_runner)

    # the options of each benchmark live next to its code (one home); building them imports torch
    from kvcomm.bench import fidelity, ttft
    from cluster import bench_throughput, submit

    p = bench.add_parser("ttft", help="TTFT per agent and serving mode (the paper's Tables 2 and 3)")
    ttft.add_arguments(p)
    p.set_defaults(func=ttft.cli_main)
    p = bench.add_parser("fidelity", help="KV error, first-token agreement and KL of every reuse method vs dense")
    fidelity.add_arguments(p)
    p.set_defaults(func=fidelity.cli_main)
    p = bench.add_parser("anchors", help="anchor-pool size V against memory, reuse rate, KL and offset time")
    fidelity.add_sweep_arguments(p)
    p.set_defaults(func=fidelity.sweep_cli_main)
    p = bench.add_parser("throughput", help="continuous batching vs batch-1, 1 vs N workers, KV transfer")
    bench_throughput.add_arguments(p)
    p.set_defaults(func=bench_throughput.cli_main)

    submit.add_submit_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _apply_threads(args)
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
