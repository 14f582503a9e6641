"""Load over HTTP: 32 concurrent jobs lose nothing and mix nothing up; a burst beyond the in-flight limit is refused
with 429 and Retry-After, and the server serves again once it has passed.

The package's Serve app (tests/reliability/conftest.py: one worker replica of tiny-llama on half a CPU,
``serve.max_in_flight`` 32, ``serve.retry_after_s`` 2). The oracle is the in-process engine over the same random
weights, running each job alone (`kvcomm.job_runner.run_job`): in dense mode every job's turns must come back with
exactly its own sequential tokens, however the worker batched them (`cluster.bench.http.load_drill`, the
benchmark's own drill). Latency percentiles and throughput are printed (`report`).
"""
from __future__ import annotations

import asyncio
import collections
import time

import httpx

from cluster.bench.http import load_drill
from kvcomm.harness.jobs import JobSpec
from kvcomm.job_runner import run_job

from .conftest import App, chat_request, math_job, report


CONCURRENT_JOBS = 32
NEW_TOKENS = 4


def _task(i: int) -> str:
    return (f"A shop has {i + 3} boxes with {i % 5 + 2} pens in each box and sells {i % 4 + 1} boxes. "
            "How many pens are left?")


def test_32_concurrent_jobs_lose_nothing_and_equal_their_sequential_dense_runs(app: App, oracle) -> None:
    jobs = [math_job(_task(i), "dense", job_id=f"load-{i}", new_tokens=NEW_TOKENS) for i in range(CONCURRENT_JOBS)]
    expected = [run_job(oracle, JobSpec.from_dict(job)).to_dict() for job in jobs]   # one at a time, in process
    app.wait_idle()
    # the benchmark's drill: all at once over HTTP (?wait=true); each job's turns (agent, round, tokens, text),
    # final answer, job id and record must be its own
    load = load_drill(app.url, app.key, jobs, expected=expected)
    assert load["jobs_completed"] == CONCURRENT_JOBS and load["jobs_failed"] == 0, load["errors"]
    assert load["results_mismatched"] == 0, load["mismatched_ids"]
    report("load_http", {"jobs": CONCURRENT_JOBS, "new_tokens_per_turn": NEW_TOKENS, "lost": 0, "mismatched": 0,
                         **{k: load[k] for k in ("wall_s", "p50_s", "p99_s", "mean_s", "jobs_per_s", "turns_per_s")}})


def test_a_burst_beyond_the_in_flight_limit_gets_429_with_retry_after_and_then_is_served(app: App) -> None:
    import openai
    limit, retry_after = app.limits["max_in_flight"], app.limits["retry_after_s"]
    jobs = [math_job(f"Burst {i}: Sam has {i} pens and buys 2 more. How many pens?", job_id=f"burst-{i}",
                     new_tokens=app.limits["max_output_tokens"]) for i in range(limit + 16)]
    app.wait_idle()

    async def burst() -> tuple[list[httpx.Response], str]:
        async with httpx.AsyncClient(base_url=app.url, headers={"Authorization": f"Bearer {app.key}"},
                                     timeout=300, limits=httpx.Limits(max_connections=100)) as client:
            posts = [client.post("/v1/jobs", json=job) for job in jobs]
            posts += [client.post("/v1/chat/completions", json=chat_request(f"chat {i}")) for i in range(8)]
            responses = await asyncio.gather(*posts)
            # a client that honours Retry-After (the official one retries 429s) gets through once slots free up
            patient = openai.AsyncOpenAI(base_url=f"{app.url}/v1", api_key=app.key, max_retries=20, timeout=120)
            completion = await patient.chat.completions.create(**chat_request("patient", max_tokens=2))
            return responses, completion.choices[0].finish_reason

    started = time.perf_counter()
    responses, patient_finish = asyncio.run(burst())
    codes = collections.Counter(r.status_code for r in responses)
    assert set(codes) <= {200, 202, 429}, codes
    refused = [r for r in responses if r.status_code == 429]
    assert refused, f"a burst of {len(responses)} requests against {limit} slots was never refused: {codes}"
    assert codes[200] + codes[202] >= limit, codes                          # refused only once every slot was taken
    for response in refused:
        assert response.headers["retry-after"] == str(retry_after)
        error = response.json()["error"]
        assert error["code"] == "server_busy" and error["type"] == "rate_limit_error", error
        assert f"serve.max_in_flight = {limit}" in error["message"], error
    assert patient_finish in ("stop", "length")

    # every accepted job finishes, successfully, and every slot comes back
    app.wait_idle()
    with app.client() as http:
        accepted = [r.json()["id"] for r in responses if r.status_code == 202]
        statuses = collections.Counter(http.get(f"/v1/jobs/{job_id}").json()["status"] for job_id in accepted)
        assert statuses == {"succeeded": len(accepted)}, statuses
        assert http.get("/healthz").json()["jobs_in_flight"] == 0
        # the server serves again
        job = http.post("/v1/jobs", params={"wait": "true"}, json=math_job("After the burst: 1 + 1?"))
        assert job.status_code == 200 and job.json()["status"] == "succeeded", job.text
        assert http.post("/v1/chat/completions", json=chat_request()).status_code == 200
        metrics = http.get("/metrics").text
    refused_counted = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                          if line.startswith("kvcomm_http_requests_total{") and 'code="429"' in line)
    assert refused_counted >= len(refused)
    report("overload_http", {"limit": limit, "requests": len(responses), "accepted": codes[200] + codes[202],
                             "refused_429": len(refused), "retry_after_s": retry_after,
                             "seconds": round(time.perf_counter() - started, 1)})


def test_finished_jobs_kept_are_bounded_and_the_oldest_finished_go_first(app: App) -> None:
    kept = app.limits["max_jobs_kept"]
    app.wait_idle()
    ids = []
    with app.client() as http:
        for i in range(kept + 3):              # one after another: they finish in this order
            job = math_job(f"Keep {i}: 1 + {i}?", agents=1, new_tokens=1, job_id=f"kept-{i}")
            response = http.post("/v1/jobs", params={"wait": "true"}, json=job)
            assert response.status_code == 200, response.text
            ids.append(response.json()["id"])
        codes = [http.get(f"/v1/jobs/{job_id}").status_code for job_id in ids]
    assert codes == [404] * 3 + [200] * kept, codes
