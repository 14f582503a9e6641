"""The HTTP drills of `kvcomm bench reliability` (`cluster.bench.http`) against the package's Serve app.

The benchmark runs them on its own app (SmolLM2 on a fresh local cluster); here they run, with the same code, on
tests/reliability/conftest.py's app: the seeded corpus of malformed requests (no 5xx, every error in OpenAI's
shape, the server serves afterwards) and the load drill with a few jobs against their sequential runs over HTTP.
test_load_http.py runs the 32-job load drill against the in-process oracle; test_fuzz_http.py is the Hypothesis
fuzz test over the same kinds of requests.
"""
from __future__ import annotations

import collections

from cluster.bench.fuzz import fuzz_corpus
from cluster.bench.http import fuzz_drill, load_drill
from cluster.bench.reliability import markdown_table

from .conftest import MODEL_NAME, App, math_job, report


def test_the_corpus_is_seeded_and_has_every_kind() -> None:
    corpus = fuzz_corpus(560, seed=3, key="k-one", other_key="k-two", model=MODEL_NAME, max_body_bytes=4096)
    assert corpus == fuzz_corpus(560, seed=3, key="k-one", other_key="k-two", model=MODEL_NAME, max_body_bytes=4096)
    assert corpus != fuzz_corpus(560, seed=4, key="k-one", other_key="k-two", model=MODEL_NAME, max_body_bytes=4096)
    kinds = collections.Counter(request["kind"] for request in corpus)
    assert set(kinds) == {"job", "chat", "raw", "auth", "route"} and min(kinds.values()) > 60, kinds
    assert any(request.get("chunked") for request in corpus)
    assert any(len(request["content"] or b"") > 4096 for request in corpus)              # above the body limit
    assert any(request["headers"].get("Authorization", "") is None for request in corpus)  # no key at all
    assert {request["method"] for request in corpus} >= {"GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"}


def test_the_report_prints_the_http_drills() -> None:
    table = markdown_table({
        "model": "m", "random_weights": True, "workers": 2, "new_tokens": 4,
        "http_load": {"jobs_submitted": 32, "jobs_completed": 32, "jobs_failed": 0, "results_mismatched": 0,
                      "faults": [], "p50_s": 1.5, "p99_s": 2.25, "jobs_per_s": 12.5, "turns_per_s": 50.0,
                      "wall_s": 2.6, "sequential_s": 9.0},
        "fuzz": {"requests": 560, "status_codes": {"400": 500, "401": 60}, "server_errors": 0,
                 "healthy_after": True}})
    assert "| http load | - | 32 | 32 | 0 | 0 |" in table
    assert "p50 1.50 s, p99 2.25 s; throughput 12.50 jobs/s" in table
    assert "560 sent, status codes {400: 500, 401: 60}, 5xx: 0, valid request afterwards: True" in table


def test_the_benchmarks_drills_pass_against_the_app(app: App) -> None:
    fuzz = fuzz_drill(app.url, app.key, app.other_key, count=500, seed=1, model=MODEL_NAME,
                      max_body_bytes=app.limits["max_body_bytes"], retry_after_s=app.limits["retry_after_s"])
    report("bench_fuzz_http", fuzz)
    assert fuzz["requests"] == 500 and fuzz["server_errors"] == 0 and not fuzz["problems"], fuzz
    assert fuzz["healthy_after"] and fuzz["jobs_server_failed"] == 0, fuzz
    codes = fuzz["status_codes"]
    assert codes["400"] > 100 and codes["401"] > 0 and codes["404"] > 0 and codes["405"] > 0 and codes["413"] > 0

    jobs = [math_job(f"Bench {i}: Kim has {i + 2} pens and buys {i + 1} more. How many pens?", job_id=f"bench-{i}",
                     new_tokens=3) for i in range(4)]
    load = load_drill(app.url, app.key, jobs)            # the oracle: the same jobs one at a time over HTTP
    report("bench_load_http", load)
    assert (load["jobs_completed"], load["jobs_failed"], load["results_mismatched"]) == (4, 0, 0), load
    assert 0 < load["p50_s"] <= load["p99_s"] and load["jobs_per_s"] > 0 and load["sequential_s"] > 0
