"""HTTP drills of `kvcomm bench reliability`: malformed requests and concurrent load against the Serve app.

This module owns the drills that need the HTTP service, as functions the reliability tests call too:

* `fuzz_corpus`: a seeded (`random.Random`) corpus of malformed and adversarial requests, of the kinds
  tests/reliability/test_fuzz_http.py generates with Hypothesis (which shares this module's value lists):
  ``job`` / ``chat`` (a valid job or chat with 1-3 mutations: a field deleted, replaced by any JSON value, wrapped
  in a list, or an unknown one added), ``raw`` (bodies that are not what the route expects: random bytes,
  truncated JSON, NaN, 5000-digit integers, surrogates, deep nesting, UTF-16, bodies above the size limit with a
  length or chunked), ``auth`` (``Authorization`` / ``X-KVCOMM-Namespace`` headers of every shape) and ``route``
  (wrong methods and paths). The same seed gives the same requests.
* `fuzz_drill`: sends a corpus; returns the status-code histogram, the 5xx count, error bodies not in OpenAI's
  shape, and whether the server still serves a valid chat and job afterwards (every slot back, no accepted job
  ended in a server error).
* `load_drill`: N jobs in dense mode one after another (the oracle), then the same N at once (httpx async, each
  with ``?wait=true``): every job must come back with exactly its own sequential tokens (dense decoding is
  deterministic however the worker batches it: any difference is a lost or mixed-up result); p50/p99 latency and
  throughput.
* `run_with_app`: the Serve app on a local Ray cluster (`cluster.serve_app.run_server`, as ``kvcomm demo``
  starts it), the drills against it, everything shut down; `bench_app_config` is the app it serves.

httpx (a dev dependency, as for ``kvcomm demo``) is imported when a drill runs.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import json
import logging
import random
import secrets
import statistics
import sys
import time
from typing import Any, Callable, Iterator, Sequence
from urllib.parse import quote

from kvcomm.harness.jobs import GenerationParams
from kvcomm.harness.topologies import build_job

NAMESPACE_HEADER = "X-KVCOMM-Namespace"     # as cluster.serve_app (not imported: it pulls in Serve)
KINDS = ("auth", "chat", "job", "raw", "route")

# ------------------------------------------------------------------------------------------------------------
# Shared values (tests/reliability/test_fuzz_http.py draws from these same lists)
# ------------------------------------------------------------------------------------------------------------
SPECIAL_STRINGS = ["", " ", "\x00", "null", "dense", "kvcomm", "turbo", "{user_question}", "{agent_1_current}",
                   "{agent_9_history}", "{bogus}", "💥" * 20, "é" * 300, "\u202e\u200b", "a" * 5000, "1", "-1",
                   "system", "user", "assistant", "python", "../../etc/passwd", "<script>"]
SPECIAL_INTS = [0, -1, 2 ** 31, 2 ** 63, 2 ** 64, -(2 ** 63) - 1, 10 ** 30]
SPECIAL_FLOATS = [0.0, -0.0, 1e308, -1e308, 5e-324, 2.5]
WAIT_VALUES = ["true", "1", "", "false", "maybe", "TRUE", "yes"]
MODE_VALUES = ["dense", "kvcomm", "turbo", "", "DENSE", "dense\x00"]
CONTENT_TYPES = ["application/json", "text/plain", "application/x-www-form-urlencoded",
                 "multipart/form-data; boundary=x", ""]
NAMESPACE_VALUES = ["a" * 64, "a" * 65, "-x", "ok.name:1", "team a", "tëam", "x/y"]
ROUTE_PATHS = ["/", "/v1", "/v1/", "/v1/jobs", "/v1/jobs/", "/v1/chat/completions", "/v1/models",
               "/v1/models/", "/healthz", "/metrics", "/v1/completions", "/v1/embeddings", "/docs",
               "/openapi.json", "//v1//jobs", "/v1/jobs/%2e%2e/%2e%2e/metrics", "/V1/JOBS",
               "/v1/chat/completions/", "/v1/jobs/x/events/extra", "/-/routes", "/-/healthz"]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
UNKNOWN_JOB_ID = "job-0123456789abcdef"
HEADER_ALPHABET = [chr(c) for c in range(0x21, 0x7F)] + [chr(c) for c in range(0xA0, 0x100)] + [" ", "\t"]


def special_strings(model: str) -> list[str]:
    return SPECIAL_STRINGS[:17] + [model] + SPECIAL_STRINGS[17:]


def base_job(job_id: str = "fuzz", new_tokens: int = 2) -> dict[str, Any]:
    """The valid job the corpus mutates: two math agents, `new_tokens` tokens each."""
    return build_job("math", "Tom has 3 apples and buys 5 more. How many apples?", num_agents=2, mode="dense",
                     job_id=job_id, generation=GenerationParams(max_new_tokens=new_tokens,
                                                                min_new_tokens=new_tokens)).to_dict()


def base_chat(model: str, content: str = "Say hi", max_tokens: int = 2) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0}


def dumps(document: Any, ascii_only: bool) -> bytes:
    return json.dumps(document, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def raw_bodies(job: dict[str, Any], chat: dict[str, Any]) -> list[bytes]:
    """Bodies that are not what a route expects (JSON that is malformed, out of range, too deep, not UTF-8...)."""
    return [b"", b" ", b"{", b"[", b"}", b"null", b"true", b"0", b'"a job"', b"[]", b"{}", b'{"agents": [',
            b"NaN", b"Infinity", b'{"rounds": -Infinity}', b'{"temperature": NaN}', b"[1e999]", b"-1e400",
            b"9" * 5000, b'{"max_tokens": ' + b"9" * 4400 + b"}", b'{"a": "\\ud800"}', b'"\\udfff"',
            b"[" * 5000 + b"]" * 5000, b"[" * 100_000, b'{"a":' * 70 + b"1" + b"}" * 70,
            '{"task": "é"}'.encode("utf-16"), b"\xff\xfe\x00", b"\xc3\x28", b"\x00" * 64,
            json.dumps(job)[:-7].encode(), json.dumps(chat)[:20].encode(),
            json.dumps([job, job]).encode(), json.dumps({"job": job}).encode()]


def oversized_bodies(limit: int, job: dict[str, Any]) -> list[bytes]:
    """Two bodies above `limit` bytes (serve.max_body_bytes): a long array, a job with a long task."""
    inner = b"1," * (limit // 2 + 64)
    return [b"[" + inner + b"1]", json.dumps({**job, "task": "x" * (limit + 10)}).encode()]


def auth_shapes(key: str, other_key: str) -> list[str]:
    """``Authorization`` values: the right key in wrong shapes, the other key, truncated and huge ones."""
    return [f"Bearer {key}", f"bearer {key}", f"BEARER   {key}", f"Basic {key}", key, f"Bearer{key}",
            f"Bearer {key} {key}", f"Bearer {key[:-1]}", f"Bearer {other_key}", "Bearer", "Bearer ", "",
            "Bearer " + "k" * 8000, f"Token {other_key}"]


def auth_targets(model: str, job: dict[str, Any], chat: dict[str, Any]) -> list[tuple[str, str, bytes | None]]:
    """(method, path, body) of every route, for the auth requests."""
    return [("GET", "/v1/models", None), ("GET", f"/v1/models/{model}", None), ("GET", "/metrics", None),
            ("GET", f"/v1/jobs/{UNKNOWN_JOB_ID}", None), ("GET", f"/v1/jobs/{UNKNOWN_JOB_ID}/events", None),
            ("POST", "/v1/jobs", dumps(job, True)), ("POST", "/v1/chat/completions", dumps(chat, True)),
            ("GET", "/healthz", None)]


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
# The seeded corpus
# ------------------------------------------------------------------------------------------------------------
_TEXT_RANGES = [(0x20, 0x7E), (0x20, 0x7E), (0x00, 0x1F), (0xA0, 0x17F), (0x370, 0x3FF), (0x4E00, 0x4E80),
                (0x1F300, 0x1F64F), (0x200B, 0x202E), (0xFFF0, 0xFFFF)]


def _text(rng: random.Random, max_size: int, min_size: int = 0) -> str:
    chars = []
    for _ in range(rng.randint(min_size, max_size)):
        low, high = rng.choice(_TEXT_RANGES)
        chars.append(chr(rng.randint(low, high)))
    return "".join(chars)


def _scalar(rng: random.Random, strings: list[str]) -> Any:
    pick = rng.randrange(11)
    return [lambda: None, lambda: rng.random() < 0.5, lambda: rng.randint(-10, 10),
            lambda: rng.randint(-2 ** 64, 2 ** 64), lambda: rng.randint(2 ** 60, 2 ** 80),
            lambda: rng.choice(SPECIAL_INTS), lambda: rng.uniform(-1e9, 1e9), lambda: rng.choice(SPECIAL_FLOATS),
            lambda: _text(rng, 30), lambda: rng.choice(strings), lambda: rng.choice(strings)][pick]()


def _json_value(rng: random.Random, strings: list[str], depth: int = 0) -> Any:
    if depth >= 3 or rng.random() < 0.7:
        return _scalar(rng, strings)
    if rng.random() < 0.5:
        return [_json_value(rng, strings, depth + 1) for _ in range(rng.randint(0, 4))]
    return {_text(rng, 8): _json_value(rng, strings, depth + 1) for _ in range(rng.randint(0, 4))}


def _slots(document: Any, path: tuple = ()) -> list[tuple]:
    """Every (path to a container, key) in `document`, the root included as ((), None)."""
    found = [(path, None)] if not path else []
    if isinstance(document, dict):
        for key, value in document.items():
            found.append((path, key))
            found.extend(_slots(value, path + (key,)))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            found.append((path, index))
            found.extend(_slots(value, path + (index,)))
    return found


def mutate(rng: random.Random, document: Any, strings: list[str]) -> Any:
    """`document` (a copy) with 1-3 mutations: a field deleted, replaced by any JSON value, wrapped in a list, or
    a new field (or element) added; the root itself may be replaced or wrapped."""
    document = copy.deepcopy(document)
    for _ in range(rng.randint(1, 3)):
        path, key = rng.choice(_slots(document))
        operation = rng.choice(["delete", "replace", "replace", "add", "wrap"])
        if key is None:
            if operation in ("replace", "wrap"):
                document = _json_value(rng, strings) if operation == "replace" else [document]
            continue
        container = document
        for part in path:
            container = container[part]
        if not isinstance(container, (dict, list)):
            continue
        if operation == "delete":
            del container[key]
        elif operation == "replace":
            container[key] = _json_value(rng, strings)
        elif operation == "wrap":
            container[key] = [container[key]]
        elif isinstance(container, dict):
            container[_text(rng, 12, min_size=1)] = _json_value(rng, strings)
        else:
            container.append(_json_value(rng, strings))
    return document


def _request(method: str, path: str, kind: str, content: bytes | None = None, params: dict | None = None,
             headers: dict | None = None, chunked: bool = False) -> dict[str, Any]:
    return {"method": method, "path": path, "params": params or {}, "headers": headers or {}, "content": content,
            "kind": kind, "chunked": chunked}


def fuzz_corpus(count: int, *, seed: int = 0, key: str = "", other_key: str = "", model: str = "model",
                max_body_bytes: int = 1 << 20, job: dict[str, Any] | None = None,
                chat: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """`count` malformed or adversarial requests (dicts: method, path, params, headers, content, kind, chunked),
    the five kinds drawn uniformly; the same arguments give the same corpus."""
    rng = random.Random(seed)
    job = job if job is not None else base_job()
    chat = chat if chat is not None else base_chat(model)
    strings = special_strings(model)
    raws, oversized = raw_bodies(job, chat), oversized_bodies(max_body_bytes, job)
    shapes, targets = auth_shapes(key, other_key), auth_targets(model, job, chat)
    corpus = []
    for _ in range(count):
        kind = rng.choice(KINDS)
        if kind == "job":
            params = {}
            if rng.random() < 0.5:
                params["wait"] = rng.choice(WAIT_VALUES)
            if rng.randrange(5) == 0:
                params["mode"] = rng.choice(MODE_VALUES)
            body = dumps(mutate(rng, job, strings), rng.random() < 0.5)
            corpus.append(_request("POST", "/v1/jobs", kind, body, params=params))
        elif kind == "chat":
            corpus.append(_request("POST", "/v1/chat/completions", kind,
                                   dumps(mutate(rng, chat, strings), rng.random() < 0.5)))
        elif kind == "raw":
            path = rng.choice(["/v1/jobs", "/v1/chat/completions"])
            choice, chunked = rng.randrange(6), False
            if choice == 0:
                body = rng.randbytes(rng.randint(0, 300))
            elif choice == 1:
                body, chunked = rng.choice(oversized), rng.random() < 0.5
            else:
                body = rng.choice(raws)
            corpus.append(_request("POST", path, kind, body, headers={"content-type": rng.choice(CONTENT_TYPES)},
                                   chunked=chunked))
        elif kind == "auth":
            headers: dict[str, str | None] = {}
            shape = rng.randrange(4)
            if shape == 0:
                headers["Authorization"] = rng.choice(shapes)
            elif shape == 1:
                noise = "".join(rng.choice(HEADER_ALPHABET) for _ in range(rng.randint(0, 60))).strip(" \t")
                headers["Authorization"] = rng.choice(["Bearer ", "Basic ", ""]) + noise
            elif shape == 2:
                headers["Authorization"] = f"Bearer {key}"
                headers[NAMESPACE_HEADER] = (rng.choice(NAMESPACE_VALUES) if rng.random() < 0.5 else "".join(
                    rng.choice(HEADER_ALPHABET) for _ in range(rng.randint(0, 60))).strip(" \t"))
            else:
                headers["Authorization"] = None                 # no Authorization header at all
            method, path, body = rng.choice(targets)
            corpus.append(_request(method, path, kind, body, headers=headers))
        else:
            method = rng.choice(METHODS)
            choice = rng.randrange(5)
            text = quote(_text(rng, 40), safe="")
            path = [rng.choice(ROUTE_PATHS), f"/v1/jobs/{text}", f"/v1/jobs/{text}/events", f"/v1/models/{text}",
                    f"/{text}"][choice]
            body = rng.choice([None, b"{}", dumps(chat, True)]) if method not in ("GET", "HEAD") else None
            corpus.append(_request(method, path, kind, body))
    return corpus


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
    from .demo import DEFAULT_CONFIG
    from .serve_app import load_serve_config_file
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
                 num_cpus: int | None = None) -> dict[str, Any]:
    """Start Ray (or join `address`) and the Serve app of `config` on a free loopback port, exactly as
    ``kvcomm demo`` does (`cluster.serve_app.run_server`), call `drills(url)`, shut everything down, return what
    the drills returned. Serve's progress lines go to stderr."""
    from .demo import _free_port
    from .serve_app import ServeApplication, ServeConfigFile, run_server
    spec = ServeConfigFile(host="127.0.0.1", port=_free_port(), applications=[ServeApplication("kvcomm-bench", "/",
                                                                                              config)], raw={})
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    out: dict[str, Any] = {}
    with contextlib.redirect_stdout(sys.stderr):
        run_server(spec, address=address, num_cpus=num_cpus, ready=lambda urls: out.update(drills(urls[0])))
    return out


def http_drills(*, model: str = "smollm2-135m-instruct", random_weights: bool = False, jobs: int = 32,
                new_tokens: int = 16, fuzz_requests: int = 560, seed: int = 0, cluster: Any = None,
                address: str | None = None, num_cpus: int | None = None,
                make_jobs: Callable[..., Sequence[Any]] | None = None) -> dict[str, Any]:
    """The Serve app on a local Ray cluster, with two API keys; the fuzz corpus, then the load drill with `jobs`
    dense jobs from `make_jobs(count, mode=, tag=, new_tokens=)` (default: 3 math agents and a decision agent,
    as the worker-fault drill's). Returns ``{"fuzz": ..., "http_load": ...}`` plus the limits the app had."""
    if make_jobs is None:
        from .bench_reliability import make_jobs
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
