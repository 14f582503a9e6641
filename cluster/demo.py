"""`kvcomm demo`: its argparse subcommand (`add_demo_parser`, setting ``func``) and the demo itself. It imports
Ray, Serve and the model only when the command runs, so building the CLI stays cheap.

`kvcomm demo` shows KVCOMM through the HTTP API, on one machine: it starts a local Ray cluster and the Serve app
of ``configs/local.yaml`` (the embedded SmolLM2-135M-Instruct on the CPU) on a free port of 127.0.0.1, warms the
anchor pool with the other example jobs in ``kvcomm`` mode (anchors match only content no longer than
themselves, so the demo job is the one with the shortest question), runs the demo job in ``dense`` and then in
``kvcomm`` mode with ``POST /v1/jobs`` and follows each run's turns on ``GET /v1/jobs/{id}/events``, prints every
agent's answer and a TTFT / speedup / reuse table, and shuts everything down.
"""
from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
import time
from pathlib import Path
from typing import Any

from .serve.command import DEFAULT_CONFIG

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JOBS = ROOT / "examples" / "gsm8k_3agents.jsonl"
DEMO_NAMESPACE = "demo"


def add_demo_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``kvcomm demo`` to an argparse subparsers object (``func``: `demo_main`)."""
    parser = subparsers.add_parser(
        "demo", help="a 3-agent job in dense and kvcomm mode through the HTTP API, side by side",
        description="Start a local Ray cluster and the Serve app, warm the anchor pool, run a 3-agent GSM8K-style "
                    "job in dense and kvcomm mode over HTTP, print answers, TTFT, speedup and reuse rate, and shut "
                    "everything down.")
    parser.add_argument("--jobs", default=str(DEFAULT_JOBS),
                        help="job file: the job with the shortest question is shown, the others warm the pool")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="Ray Serve config file (default: %(default)s)")
    parser.add_argument("--model", default=None, help="override the config's model")
    parser.add_argument("--random-weights", action="store_true", help="random weights for a preset architecture")
    parser.add_argument("--gamma", type=float, default=None, help="override the entropy gate (config: 1.0)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local cluster (default: all)")
    parser.set_defaults(func=demo_main)
    return parser


def demo_main(args: argparse.Namespace) -> int:
    from kvcomm.harness.job_files import load_jobs
    from kvcomm.harness.jobs import JobSpecError

    from .serve.app import run_server
    from .serve.config import ServeApplication, ServeConfigFile, load_serve_config_file
    try:
        jobs = load_jobs(args.jobs)
        spec = load_serve_config_file(args.config)
    except (JobSpecError, ValueError, FileNotFoundError) as exc:
        print(f"kvcomm demo: error: {exc}", file=sys.stderr)
        return 2
    if len(jobs) < 2:
        print(f"kvcomm demo: error: {args.jobs} needs at least 2 jobs (one to show, the rest to warm the pool)",
              file=sys.stderr)
        return 2
    app = spec.applications[0]
    cluster_changes: dict[str, Any] = {}
    if args.model:
        cluster_changes.update(model=args.model, random_weights=args.random_weights)
    if args.gamma is not None:
        cluster_changes["kvcomm"] = {"gamma": args.gamma}
    cluster = app.config.cluster.with_(**cluster_changes) if cluster_changes else app.config.cluster
    serve_settings = app.config.serve.model_copy(update={"api_keys": []})   # loopback only, for this process
    config = app.config.model_copy(update={"cluster": cluster, "serve": serve_settings})
    demo_spec = ServeConfigFile(host="127.0.0.1", port=_free_port(), proxy_location=spec.proxy_location,
                                applications=[ServeApplication(app.name, "/", config, app.deployments)], raw=spec.raw)

    logging.getLogger("ray.serve").setLevel(logging.WARNING)   # this process prints its own progress
    shown = min(jobs, key=lambda j: len(j.task))
    warmup = [j for j in jobs if j is not shown]
    started = time.perf_counter()
    print(f"[demo] starting a local Ray cluster and the Serve app ({cluster.model} on {cluster.device}, "
          f"{cluster.num_workers} worker(s), gamma {cluster.kvcomm.gamma}) ...", flush=True)
    code = run_server(demo_spec, num_cpus=args.num_cpus,
                      ready=lambda urls: _run_demo(urls[0], shown, warmup, config.model_name))
    print(f"[demo] Serve, the anchor pool and the Ray cluster are shut down ({time.perf_counter() - started:.0f} s "
          "in all)", flush=True)
    return code


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run_job_over_http(client: Any, job: Any, mode: str) -> dict[str, Any]:
    """POST the job, follow its SSE events (printing each finished turn), return its result."""
    response = client.post("/v1/jobs", params={"mode": mode}, json=job.to_dict(),
                           headers={"X-KVCOMM-Namespace": DEMO_NAMESPACE})
    if response.status_code != 202:
        raise RuntimeError(f"POST /v1/jobs: {response.status_code} {response.text[:300]}")
    job_id = response.json()["id"]
    final: dict[str, Any] | None = None
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers={"X-KVCOMM-Namespace": DEMO_NAMESPACE}) as events:
        name = None
        for line in events.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: "):])
                if name == "turn":
                    print(f"[demo]   agent {data['agent_id']} ({data['role']}) answered: TTFT "
                          f"{data['ttft_s'] * 1e3:.0f} ms, {'reused' if data['reused'] else 'prefilled'} "
                          f"[{data['reason']}], {len(data['token_ids'])} tokens", flush=True)
                elif name == "done":
                    final = data
    if final is None or final["status"] != "succeeded":
        raise RuntimeError(f"job {job.id} ({mode}) did not succeed: {final}")
    return final["result"]


def _run_demo(url: str, shown: Any, warmup: list[Any], model_name: str) -> int:
    import httpx
    with httpx.Client(base_url=url, timeout=600) as client:
        print(f"[demo] the API is up at {url}: {client.get('/healthz').json()}", flush=True)
        print(f"[demo] warming the anchor pool (namespace {DEMO_NAMESPACE!r}) with {len(warmup)} other jobs in "
              "kvcomm mode, so that the demo job finds anchors to reuse:", flush=True)
        for job in warmup:
            t0 = time.perf_counter()
            print(f"[demo] POST /v1/jobs?mode=kvcomm  job {job.id}: {job.task}", flush=True)
            result = _run_job_over_http(client, job, "kvcomm")
            print(f"[demo] warm-up job {job.id}: reuse {result['reuse_rate']:.0%} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        results = {}
        for mode in ("dense", "kvcomm"):
            print(f"[demo] POST /v1/jobs?mode={mode}  job {shown.id} ...", flush=True)
            results[mode] = _run_job_over_http(client, shown, mode)
        metrics = client.get("/metrics").text
    dense, kvcomm = results["dense"]["turns"], results["kvcomm"]["turns"]
    print(f"\nQuestion: {shown.task}\n")
    for d, k in zip(dense, kvcomm):
        print(f"agent {d['agent_id']} ({d['role']})\n  dense : {_one_line(d['text'])}\n"
              f"  kvcomm: {_one_line(k['text'])}\n")
    print(f"{'agent':<8}{'role':<24}{'dense TTFT':>12}{'kvcomm TTFT':>13}{'speedup':>9}{'same tokens':>13}"
          "  kvcomm decision")
    for d, k in zip(dense, kvcomm):
        prefix = next((i for i, (a, b) in enumerate(zip(d["token_ids"], k["token_ids"])) if a != b),
                      min(len(d["token_ids"]), len(k["token_ids"])))
        print(f"{d['agent_id']:<8}{d['role'][:23]:<24}{d['ttft_s'] * 1e3:>10.0f}ms{k['ttft_s'] * 1e3:>11.0f}ms"
              f"{d['ttft_s'] / k['ttft_s']:>8.1f}x{prefix:>6}/{len(d['token_ids']):<6}  {k['reason']}")
    dense_ttft, kvcomm_ttft = sum(t["ttft_s"] for t in dense), sum(t["ttft_s"] for t in kvcomm)
    same = sum(d["token_ids"] == k["token_ids"] for d, k in zip(dense, kvcomm))
    print(f"\nsum of TTFTs: dense {dense_ttft * 1e3:.0f} ms, kvcomm {kvcomm_ttft * 1e3:.0f} ms: "
          f"{dense_ttft / kvcomm_ttft:.1f}x speedup")
    overall_reuse = _gauge(metrics, 'kvcomm_reuse_rate{mode="kvcomm"}')
    anchors = _gauge(metrics, "kvcomm_anchor_pool_anchors")
    print(f"reuse rate of this job {results['kvcomm']['reuse_rate']:.0%}; of all kvcomm turns since start "
          f"(kvcomm_reuse_rate on /metrics, warm-ups included) {overall_reuse:.0%}; anchors in the pool {anchors:.0f}")
    print(f"answers identical to dense for {same} of {len(dense)} agents ('same tokens': how many leading tokens "
          "match dense; upstream answers differ once one agent diverges)", flush=True)
    return 0


def _one_line(text: str, limit: int = 160) -> str:
    return " ".join(text.split())[:limit]


def _gauge(page: str, sample: str) -> float:
    for line in page.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
