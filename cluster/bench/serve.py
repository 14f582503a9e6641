"""`kvcomm bench serve`: the HTTP service as a cluster. Multi-agent jobs over HTTP on 1 and on N worker replicas,
and the anchor pool shared by batch (`kvcomm submit --url`) and HTTP clients.

For each replica count, the Serve app (``configs/local.yaml``'s application, ``num_workers`` replicas of
``cpus_per_replica`` CPUs each) runs, over HTTP with ``?wait=true``:

1. **latency**: `agents`-agent fully connected jobs in dense mode, one alone and then `concurrent` at once: job
   latency, which replica ran each turn, and whether every job's tokens equal the in-process oracle's
   (`kvcomm.job_runner.run_job`, one job at a time, computed once before the first app starts);
2. **a shared pool** (on the last replica count): `shared_jobs` kvcomm jobs through `kvcomm submit`'s own HTTP
   path (`cluster.batch.submit.run_over_http`), then as many other kvcomm jobs from a plain HTTP client in the same
   namespace: the reuse rate of each group (the HTTP jobs reuse what the batch taught the pool).

Prints a markdown table; writes JSON (``--json``). Every figure in the README's cluster section comes from it.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import uuid
from typing import Any, Sequence

from kvcomm.bench import write_json_report
from kvcomm.cli_args import add_model_args
from kvcomm.harness.jobs import GenerationParams, JobSpec
from kvcomm.harness.topologies import build_job
from kvcomm.names import EMBEDDED_MODEL

TASKS = ["Tom has {a} apples and buys {b} more. How many apples does Tom have?",
         "A shop sells {a} pencils on Monday and {b} on Tuesday. How many pencils does it sell?",
         "Lena has {a} shells and finds {b} more. How many shells does she have?",
         "A farm has {a} cows and buys {b} more. How many cows does it have?"]


def make_job(index: int, *, agents: int, new_tokens: int, mode: str, namespace: str, tag: str) -> JobSpec:
    task = TASKS[index % len(TASKS)].format(a=3 + index, b=5 + 2 * index)
    return build_job("math", task, num_agents=agents, mode=mode, job_id=f"{tag}-{index}", namespace=namespace,
                     generation=GenerationParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens))


def _post_all(url: str, jobs: Sequence[JobSpec]) -> list[tuple[dict[str, Any], float]]:
    """Post every job at once (``?wait=true``); (response body, seconds) per job, in order."""
    import httpx
    out: list[Any] = [None] * len(jobs)

    def one(index: int) -> None:
        started = time.perf_counter()
        with httpx.Client(base_url=url, timeout=3600) as http:
            response = http.post("/v1/jobs", params={"wait": "true"}, json=jobs[index].to_dict())
        body = response.json()
        if response.status_code != 200:
            raise RuntimeError(f"job {jobs[index].id}: {response.status_code} {response.text[:300]}")
        out[index] = (body["result"], time.perf_counter() - started)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if any(item is None for item in out):
        raise RuntimeError("a job's request failed (see the log above)")
    return out


def _tokens(result: dict[str, Any]) -> list[list[int]]:
    return [t["token_ids"] for t in result["turns"]]


def latency(url: str, jobs: Sequence[JobSpec], expected: Sequence[list[list[int]]], concurrent: int
            ) -> list[dict[str, Any]]:
    """One job alone, then `concurrent` at once: latency, turns per replica, tokens equal to the oracle."""
    rows = []
    for count in (1, concurrent):
        answers = _post_all(url, jobs[:count])
        per_replica: dict[str, int] = {}
        for result, _ in answers:
            for turn in result["turns"]:
                per_replica[turn["worker"]] = per_replica.get(turn["worker"], 0) + 1
        rows.append({"jobs_at_once": count, "latency_s": statistics.fmean(s for _, s in answers),
                     "turns_per_replica": sorted(per_replica.values(), reverse=True),
                     "equal_to_oracle": sum(_tokens(r) == want for (r, _), want in zip(answers, expected)),
                     "jobs": count})
    return rows


def shared_pool(url: str, *, count: int, agents: int, new_tokens: int) -> dict[str, Any]:
    """kvcomm jobs from `kvcomm submit`'s HTTP path, then from a plain HTTP client, in one namespace."""
    from ..batch.submit import run_over_http
    namespace = f"bench-shared-{uuid.uuid4().hex[:6]}"
    batch = [make_job(i, agents=agents, new_tokens=new_tokens, mode="kvcomm", namespace=namespace, tag="batch")
             for i in range(count)]
    records = list(run_over_http(url, batch, mode=None, concurrency=1))
    failed = [r for r in records if "error" in r]
    if failed:
        raise RuntimeError(f"kvcomm submit --url: {failed[0]['error']}")
    http = [make_job(i, agents=agents, new_tokens=new_tokens, mode="kvcomm", namespace=namespace, tag="http")
            for i in range(count, 2 * count)]
    answers = [_post_all(url, [job])[0][0] for job in http]        # one at a time, as a client would
    rate = lambda results: statistics.fmean(r["reuse_rate"] for r in results)   # noqa: E731
    return {"jobs_each": count, "submit_reuse_rate": rate(records), "http_reuse_rate": rate(answers),
            "http_first_job_reuse_rate": answers[0]["reuse_rate"]}


def run(*, replicas: Sequence[int] = (1, 2), agents: int = 16, new_tokens: int = 16, concurrent: int = 2,
        shared_jobs: int = 4, model: str = EMBEDDED_MODEL, random_weights: bool = False,
        cpus_per_replica: float = 1.0, address: str | None = None) -> dict[str, Any]:
    from kvcomm.engine import build_engine

    from ..serve.command import DEFAULT_CONFIG
    from ..serve.config import load_serve_config_file
    from .http import run_with_app
    app = load_serve_config_file(DEFAULT_CONFIG).applications[0]
    jobs = [make_job(i, agents=agents, new_tokens=new_tokens, mode="dense", namespace="bench-latency", tag="lat")
            for i in range(concurrent)]
    print(f"serve bench: the in-process oracle for {len(jobs)} {agents}-agent job(s)", file=sys.stderr)
    from kvcomm.job_runner import run_job
    engine = build_engine(model, random_weights=random_weights)
    expected = [[t.token_ids for t in run_job(engine, job).turns] for job in jobs]
    del engine
    report: dict[str, Any] = {"model": model, "agents": agents, "new_tokens": new_tokens,
                              "cpus_per_replica": cpus_per_replica, "settings": []}
    for count in replicas:
        cluster = app.config.cluster.with_(model=model, random_weights=random_weights, num_workers=count,
                                           cpus_per_worker=cpus_per_replica,
                                           pool_actor_name=f"bench-serve-pool-{uuid.uuid4().hex[:6]}")
        config = app.config.model_copy(update={"cluster": cluster})
        last = count == replicas[-1]

        def drills(url: str, count: int = count, last: bool = last) -> dict[str, Any]:
            print(f"serve bench: {count} replica(s): 1 and {concurrent} {agents}-agent job(s)", file=sys.stderr)
            out: dict[str, Any] = {"replicas": count, "rows": latency(url, jobs, expected, concurrent)}
            if last and shared_jobs:
                print(f"serve bench: {shared_jobs} kvcomm jobs via kvcomm submit --url, then {shared_jobs} over "
                      "HTTP", file=sys.stderr)
                out["shared_pool"] = shared_pool(url, count=shared_jobs, agents=3, new_tokens=new_tokens)
            return out

        report["settings"].append(run_with_app(config, drills, address=address,
                                               num_cpus=max(2, int(count * cpus_per_replica))))
    return report


def markdown_table(report: dict[str, Any]) -> str:
    lines = [f"{report['agents']}-agent fully connected jobs, {report['new_tokens']} tokens per turn, dense, "
             f"{report['model']}, {report['cpus_per_replica']:g} CPU per replica", "",
             "| replicas | jobs at once | mean job latency s | turns per replica | tokens = oracle |",
             "|---:|---:|---:|---|---:|"]
    for setting in report["settings"]:
        for row in setting["rows"]:
            lines.append(f"| {setting['replicas']} | {row['jobs_at_once']} | {row['latency_s']:.1f} | "
                         f"{' / '.join(map(str, row['turns_per_replica']))} | {row['equal_to_oracle']}/{row['jobs']} |")
    for setting in report["settings"]:
        shared = setting.get("shared_pool")
        if shared:
            lines += ["", "| kvcomm jobs in one namespace | from | reuse rate |", "|---|---|---:|",
                      f"| first {shared['jobs_each']} | `kvcomm submit --url` | {shared['submit_reuse_rate']:.0%} |",
                      f"| next {shared['jobs_each']} | HTTP client | {shared['http_reuse_rate']:.0%} |"]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--replicas", default="1,2", help="worker replica counts (comma list)")
    parser.add_argument("--agents", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--concurrent", type=int, default=2, help="jobs at once in the second row")
    parser.add_argument("--shared-jobs", type=int, default=4, help="kvcomm jobs per client in the shared-pool part")
    add_model_args(parser, local=False)
    parser.add_argument("--cpus-per-replica", type=float, default=1.0)
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: start a local one)")
    parser.add_argument("--json", default=None)


def cli_main(args: argparse.Namespace) -> int:
    report = run(replicas=tuple(int(x) for x in args.replicas.split(",")), agents=args.agents,
                 new_tokens=args.new_tokens, concurrent=args.concurrent, shared_jobs=args.shared_jobs,
                 model=args.model, random_weights=args.random_weights, cpus_per_replica=args.cpus_per_replica,
                 address=args.address)
    print(markdown_table(report))
    write_json_report(args.json, report)
    return 0
