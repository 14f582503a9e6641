"""HTTP drills of `kvcomm bench reliability`: malformed requests and concurrent load against the Serve app.

This module owns the drills that need the HTTP service, as functions the reliability tests call too:

* `send` / `response_problem`: one request sent, one response judged (the Hypothesis test uses these too).
* `fuzz_drill`: sends a corpus (`cluster.bench.fuzz.fuzz_corpus`); returns the status-code histogram, the 5xx count, error bodies not in OpenAI's
  shape, and whether the server still serves a valid chat and job afterwards (every slot back, no accepted job
  ended in a server error).
* `load_drill`: N jobs in dense mode one after another (the oracle), then the same N at once (httpx async, each
  with ``?wait=true``): every job must come back with exactly its own sequential tokens (dense decoding is
  deterministic however the worker batches it: any difference is a lost or mixed-up result); p50/p99 latency and
  throughput.
* `run_with_app`: the Serve app on a local Ray cluster (`cluster.serve.app.run_server`, as ``kvcomm demo``
  starts it), the drills against it, everything shut down; `bench_app_config` is the app it serves.

httpx (a dev dependency, as for ``kvcomm demo``) is imported when a drill runs.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import secrets
import statistics
import sys
import time
from typing import Any, Callable, Iterator, Sequence

from kvcomm.names import EMBEDDED_MODEL

from .fuzz import base_chat, base_job, fuzz_corpus
# ------------------------------------------------------------------------------------------------------------
# Sending one request, judging one response (the Hypothesis test uses these too)
# ------------------------------------------------------------------------------------------------------------
def _chunks(body: bytes) -> Iterator[bytes]:
    for start in range(0, len(body), 16384):
        yield body[start:start + 16384]


def request_headers(request: dict[str, Any], default_key: str | None) -> dict[str, bytes]:
    """The headers `send` sends: ``Authorization: Bearer default_key`` unless the request sets (or, with None,
    removes) it; values stripped of blanks, as latin-1 bytes."""
    headers: dict[str, str | None] = {"Authorization": f"Bearer {default_key}" if default_key else None}
    headers.update(request["headers"])
    return {name: value.strip(" \t").encode("latin-1") for name, value in headers.items() if value is not None}


def send(http: Any, request: dict[str, Any], default_key: str | None) -> Any:
    """Send one corpus request on an `httpx.Client` (headers: `request_headers`; a ``chunked`` body as an
    iterator, without content-length)."""
    content = request["content"]
    if request.get("chunked") and content is not None:
        content = _chunks(content)
    return http.request(request["method"], request["path"], params=request["params"],
                        headers=request_headers(request, default_key), content=content)


def response_problem(response: Any, method: str, retry_after_s: int | None = None) -> str | None:
    """What is wrong with a response to a malformed request (None: nothing): a 5xx, an error body that is not
    OpenAI's ``{"error": {"message", "type", ...}}``, a 429 without the configured ``Retry-After``."""
    status = response.status_code
    if status >= 500:
        return f"{status}: {response.text[:300]}"
    if status >= 400 and method != "HEAD":
        try:
            error = response.json()["error"]
            shaped = isinstance(error["message"], str) and bool(error["message"]) and "type" in error
        except (ValueError, KeyError, TypeError):
            shaped = False
        if not shaped:
            return f"{status}: not an OpenAI error body: {response.text[:300]}"
    if status == 429 and retry_after_s is not None and response.headers.get("retry-after") != str(retry_after_s):
        return f"429 without Retry-After: {retry_after_s}"
    return None


# ------------------------------------------------------------------------------------------------------------
# The drills
# ------------------------------------------------------------------------------------------------------------
def wait_idle(http: Any, timeout_s: float = 300.0) -> None:
    """Until ``GET /healthz`` shows no job or chat in flight."""
    deadline = time.monotonic() + timeout_s
    while True:
        in_flight = http.get("/healthz").json()["jobs_in_flight"]
        if in_flight == 0:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{in_flight} jobs/chats still in flight after {timeout_s:.0f} s")
        time.sleep(0.2)


def served_model(http: Any) -> str:
    return http.get("/v1/models").json()["data"][0]["id"]


def fuzz_drill(url: str, key: str | None, other_key: str | None = None, *, count: int = 560, seed: int = 0,
               model: str | None = None, max_body_bytes: int = 1 << 20, retry_after_s: int | None = None,
               timeout_s: float = 120.0) -> dict[str, Any]:
    """Send `fuzz_corpus(count, seed=seed, ...)` to the app at `url` one request at a time (``Authorization:
    Bearer key`` unless a request sets its own); then wait until no job is in flight and check the server still
    serves. Returns ``requests``, ``status_codes`` (histogram, string keys), ``server_errors`` (5xx),
    ``bad_error_bodies``, ``problems`` (the first few), ``jobs_accepted`` / ``jobs_server_failed`` (jobs the
    corpus started, and those among them that failed with a server error), ``healthy_after``, ``seconds``."""
    import httpx
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(base_url=url, headers=headers, timeout=timeout_s) as http:
        model = model or served_model(http)
        corpus = fuzz_corpus(count, seed=seed, key=key or "", other_key=other_key or "unknown-key", model=model,
                             max_body_bytes=max_body_bytes, chat=base_chat(model))
        wait_idle(http)
        histogram: collections.Counter = collections.Counter()
        by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        problems, accepted, server_errors, transport_errors = [], [], 0, 0
        started = time.perf_counter()
        for request in corpus:
            try:
                response = send(http, request, key)
            except httpx.HTTPError as exc:                  # a dropped connection counts against the server
                transport_errors += 1
                problems.append(f"{request['method']} {request['path'][:80]}: {type(exc).__name__}: {exc}")
                continue
            histogram[response.status_code] += 1
            by_kind[request["kind"]][response.status_code] += 1
            server_errors += response.status_code >= 500
            problem = response_problem(response, request["method"], retry_after_s)
            if problem is not None:
                problems.append(f"{request['method']} {request['path'][:80]} ({request['kind']}): {problem}")
            if response.status_code == 202:
                accepted.append((response.json()["id"], request_headers(request, key)))
        seconds = time.perf_counter() - started
        healthy, server_failed = True, 0
        try:
            wait_idle(http)                                 # every job the corpus started has released its slot
            for job_id, job_headers in accepted:
                status = http.get(f"/v1/jobs/{job_id}", headers=job_headers).json()
                healthy &= status.get("status") in ("succeeded", "failed")
                server_failed += status.get("error", {}).get("type") == "server_error"
            chat = http.post("/v1/chat/completions", json=base_chat(model, "Still there?", max_tokens=3))
            healthy &= chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] >= 1
            job = http.post("/v1/jobs", params={"wait": "true"}, json=base_job("fuzz-after"))
            healthy &= job.status_code == 200 and job.json()["status"] == "succeeded"
        except (httpx.HTTPError, TimeoutError, ValueError, KeyError) as exc:
            healthy = False
            problems.append(f"afterwards: {type(exc).__name__}: {exc}")
    return {"requests": sum(histogram.values()) + transport_errors, "seed": seed,
            "status_codes": {str(code): n for code, n in sorted(histogram.items())},
            "by_kind": {kind: {str(c): n for c, n in sorted(counts.items())} for kind, counts in sorted(by_kind.items())},
            "server_errors": server_errors + transport_errors, "transport_errors": transport_errors,
            "bad_error_bodies": sum("not an OpenAI error body" in p for p in problems),
            "problems": problems[:10], "jobs_accepted": len(accepted), "jobs_server_failed": server_failed,
            "healthy_after": bool(healthy and server_failed == 0), "seconds": round(seconds, 1)}


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (`q` in 0..100)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def _answers(result: dict[str, Any]) -> tuple:
    return ([(t["agent_id"], t["round"], t["token_ids"], t["text"]) for t in result["turns"]],
            result["final_answer"])


def load_drill(url: str, key: str | None, jobs: Sequence[dict[str, Any]], *,
               expected: Sequence[dict[str, Any]] | None = None, timeout_s: float = 1800.0) -> dict[str, Any]:
    """Run `jobs` (job specs as dicts) in dense mode over HTTP one after another, then all at once; every
    concurrent job must succeed with its own sequential answers (turns' agent, round, tokens and text; the final
    answer) and its own job record. `expected` (results as dicts, e.g. from the in-process engine) replaces
    the sequential HTTP runs as the oracle. Returns ``jobs_submitted``, ``jobs_completed``, ``jobs_failed``,
    ``results_mismatched``, ``p50_s``, ``p99_s``, ``mean_s``, ``jobs_per_s``, ``turns_per_s``, ``wall_s``,
    ``sequential_s`` (the oracle's wall time, when over HTTP), ``errors`` / ``mismatched_ids`` (the first few),
    ``faults`` (none injected)."""
    import httpx
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    jobs = list(jobs)
    sequential_s = None
    with httpx.Client(base_url=url, headers=headers, timeout=timeout_s) as http:
        wait_idle(http)
        if expected is None:
            started, expected = time.perf_counter(), []
            for job in jobs:
                response = http.post("/v1/jobs", params={"wait": "true", "mode": "dense"}, json=job)
                if response.status_code != 200 or response.json().get("status") != "succeeded":
                    raise RuntimeError(f"the sequential (oracle) run of job {job.get('id')} failed: "
                                       f"{response.status_code} {response.text[:300]}")
                expected.append(response.json()["result"])
            sequential_s = time.perf_counter() - started
        wait_idle(http)

    async def submit_all() -> tuple[list[tuple[Any, float]], float]:
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout_s,
                                     limits=httpx.Limits(max_connections=max(1, len(jobs)))) as client:
            async def one(job: dict[str, Any]) -> tuple[Any, float]:
                started = time.perf_counter()
                try:
                    response = await client.post("/v1/jobs", params={"wait": "true", "mode": "dense"}, json=job)
                except httpx.HTTPError as exc:
                    response = exc
                return response, time.perf_counter() - started
            started = time.perf_counter()
            answers = await asyncio.gather(*(one(job) for job in jobs))
            return answers, time.perf_counter() - started

    answers, wall_s = asyncio.run(submit_all())
    completed, errors, mismatched, record_ids, latencies, turns = 0, [], [], set(), [], 0
    for job, want, (response, seconds) in zip(jobs, expected, answers):
        if isinstance(response, Exception):
            errors.append(f"{job['id']}: {type(response).__name__}: {response}")
            continue
        body = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
        if response.status_code != 200 or body.get("status") != "succeeded":
            errors.append(f"{job['id']}: {response.status_code} {response.text[:200]}")
            continue
        completed += 1
        latencies.append(seconds)
        result = body["result"]
        turns += len(result["turns"])
        if (body.get("job_id") != job["id"] or result.get("job_id") != job["id"] or body["id"] in record_ids
                or _answers(result) != _answers(want)):
            mismatched.append(job["id"])
        record_ids.add(body["id"])
    return {"jobs_submitted": len(jobs), "jobs_completed": completed, "jobs_failed": len(errors),
            "results_mismatched": len(mismatched), "errors": errors[:5], "mismatched_ids": mismatched[:5],
            "p50_s": round(percentile(latencies, 50), 3) if latencies else None,
            "p99_s": round(percentile(latencies, 99), 3) if latencies else None,
            "mean_s": round(statistics.fmean(latencies), 3) if latencies else None,
            "wall_s": round(wall_s, 2), "jobs_per_s": round(completed / wall_s, 3) if wall_s else None,
            "turns_per_s": round(turns / wall_s, 3) if wall_s else None,
            "sequential_s": None if sequential_s is None else round(sequential_s, 2), "faults": []}


# ------------------------------------------------------------------------------------------------------------
# The app the benchmark drills
# ------------------------------------------------------------------------------------------------------------
BENCH_LIMITS = {"max_output_tokens": 16, "default_max_tokens": 4, "max_prompt_chars": 4000, "max_job_agents": 6,
                "max_job_turns": 12, "max_body_bytes": 64 * 1024}


def bench_app_config(*, model: str | None = None, random_weights: bool = False, cluster: Any = None,
                     new_tokens: int = 16, keys: Sequence[str] = ()) -> Any:
    """The `ServeAppConfig` the drills run against: ``configs/local.yaml``'s application (or its cluster replaced
    by `cluster`, a `ClusterConfig`), the model overridden, its own pool actor, API `keys`, and small limits
    (`BENCH_LIMITS`, with room for `new_tokens`): a mutated job may not run for minutes."""
    from ..serve.command import DEFAULT_CONFIG
    from ..serve.config import load_serve_config_file
    app = load_serve_config_file(DEFAULT_CONFIG).applications[0]
    base = cluster if cluster is not None else app.config.cluster
    changes: dict[str, Any] = {"pool_actor_name": f"bench-http-pool-{secrets.token_hex(4)}"}
    if model is not None:
        changes.update(model=model, random_weights=random_weights)
    limits = {**BENCH_LIMITS, "max_output_tokens": max(BENCH_LIMITS["max_output_tokens"], new_tokens)}
    serve_settings = type(app.config.serve).model_validate(
        {**app.config.serve.model_dump(), **limits, "api_keys": list(keys)})
    return app.config.model_copy(update={"cluster": base.with_(**changes), "serve": serve_settings})


def run_with_app(config: Any, drills: Callable[[str], dict[str, Any]], *, address: str | None = None,
                 num_cpus: int | None = None, deployments: dict[str, dict[str, Any]] | None = None
                 ) -> dict[str, Any]:
    """Start Ray (or join `address`) and the Serve app of `config` (with Serve `deployments` overrides) on a free
    loopback port, exactly as ``kvcomm demo`` does (`cluster.serve.app.run_server`), call `drills(url)`, shut
    everything down, return what the drills returned. Serve's progress lines go to stderr."""
    from ..demo import _free_port
    from ..serve.app import run_server
    from ..serve.config import ServeApplication, ServeConfigFile
    app = ServeApplication("kvcomm-bench", "/", config, dict(deployments or {}))
    spec = ServeConfigFile(host="127.0.0.1", port=_free_port(), proxy_location=None, applications=[app], raw={})
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    out: dict[str, Any] = {}
    with contextlib.redirect_stdout(sys.stderr):
        run_server(spec, address=address, num_cpus=num_cpus, ready=lambda urls: out.update(drills(urls[0])))
    return out


def http_drills(*, model: str = EMBEDDED_MODEL, random_weights: bool = False, jobs: int = 32,
                new_tokens: int = 16, fuzz_requests: int = 560, seed: int = 0, cluster: Any = None,
                address: str | None = None, num_cpus: int | None = None,
                make_jobs: Callable[..., Sequence[Any]] | None = None) -> dict[str, Any]:
    """The Serve app on a local Ray cluster, with two API keys; the fuzz corpus, then the load drill with `jobs`
    dense jobs from `make_jobs(count, mode=, tag=, new_tokens=)` (default: 3 math agents and a decision agent,
    as the worker-fault drill's). Returns ``{"fuzz": ..., "http_load": ...}`` plus the limits the app had."""
    if make_jobs is None:
        from .jobs import make_jobs
    key, other_key = f"bench-{secrets.token_hex(16)}", f"bench-other-{secrets.token_hex(16)}"
    config = bench_app_config(model=model, random_weights=random_weights, cluster=cluster, new_tokens=new_tokens,
                              keys=(key, other_key))
    specs = [job.to_dict() for job in make_jobs(jobs, mode="dense", tag="http", new_tokens=new_tokens)]

    def drills(url: str) -> dict[str, Any]:
        print(f"http fuzz: {fuzz_requests} malformed requests (seed {seed})", file=sys.stderr)
        fuzz = fuzz_drill(url, key, other_key, count=fuzz_requests, seed=seed,
                          max_body_bytes=config.serve.max_body_bytes, retry_after_s=config.serve.retry_after_s)
        print(f"http load: {jobs} dense jobs one by one, then all at once", file=sys.stderr)
        load = load_drill(url, key, specs)
        return {"fuzz": fuzz, "http_load": load}

    report = run_with_app(config, drills, address=address, num_cpus=num_cpus)
    report["http_app"] = {"workers": config.cluster.num_workers, "cpus_per_worker": config.cluster.cpus_per_worker,
                          "limits": {k: getattr(config.serve, k) for k in (*BENCH_LIMITS, "max_in_flight")}}
    return report
