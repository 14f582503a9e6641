"""Work beyond what the worker replicas take (their ``max_ongoing_requests``, then Serve's ``max_queued_requests``
for them): a chat is refused at once with 503 and ``Retry-After``, not an internal error, and a client that honours
``Retry-After`` (the official one retries 503s) then gets its answer; a job, already admitted, has each refused turn
sent again after a pause (`cluster.driver.WorkersBusy`), so every job finishes with its own dense answer.

An app of its own: one worker replica of tiny-llama taking one request at a time with one queued
(``deployments:`` overrides, as a config file gives them), so a burst of concurrent streaming chats passes the
queue at once; all loopback.
"""
from __future__ import annotations

import asyncio

import httpx
import pytest

from kvcomm.harness.jobs import JobSpec
from kvcomm.job_runner import run_job
from tests.support.serve_app import running_app, tiny_app_args

from .conftest import math_job

MODEL = "tiny-backpressure"
RETRY_AFTER_S = 1
BURST = 6


def _chat(i: int, stream: bool) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": f"Count from {i} to {i + 100}."}],
            "max_tokens": 160, "temperature": 0, "stream": stream, "kvcomm": {"mode": "dense"}}


@pytest.fixture(scope="module")
def busy_url(ray_cluster, tiny_model_dir):
    args = tiny_app_args(tiny_model_dir, "backpressure-pool", {"served_model_name": MODEL,
                                                               "retry_after_s": RETRY_AFTER_S})
    one_at_a_time = {"AgentWorkerDeployment": {"max_ongoing_requests": 1, "max_queued_requests": 1}}
    with running_app(args, "kvcomm-backpressure", deployments=one_at_a_time) as url:
        yield url


def test_the_first_model_lookups_at_once_share_one_call_to_the_workers(busy_url) -> None:
    """The ingress asks a worker replica for the model's facts once (`/v1/models`, a job's context check); the first
    requests arriving together wait for that one call rather than each queueing their own past the queue. (First in
    the module: the app's ingress has not looked the model up yet.)"""
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=busy_url, timeout=120) as client:
            return await asyncio.gather(*(client.get("/v1/models") for _ in range(BURST)))

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * BURST, [r.text[:200] for r in responses]
    assert len({r.json()["data"][0]["max_model_len"] for r in responses}) == 1


def test_chats_beyond_the_workers_queue_get_503_with_retry_after_and_a_retrying_client_is_served(busy_url) -> None:
    import openai

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=busy_url, timeout=120) as client:
            async def one(i: int) -> httpx.Response:
                async with client.stream("POST", "/v1/chat/completions", json=_chat(i, True)) as response:
                    await response.aread()
                    return response
            return await asyncio.gather(*(one(i) for i in range(BURST)))

    responses = asyncio.run(burst())
    api = openai.OpenAI(base_url=f"{busy_url}/v1", api_key="unused", max_retries=5, timeout=120)
    retried = api.chat.completions.create(**{k: v for k, v in _chat(0, False).items() if k != "kvcomm"},
                                          extra_body={"kvcomm": {"mode": "dense"}})
    busy = [r for r in responses if r.status_code == 503]
    served = [r for r in responses if r.status_code == 200]
    assert len(busy) + len(served) == BURST, [(r.status_code, r.text[:200]) for r in responses]
    assert busy and served, [r.status_code for r in responses]
    for response in busy:
        error = response.json()["error"]
        assert response.headers["Retry-After"] == str(RETRY_AFTER_S)
        assert (error["type"], error["code"]) == ("server_error", "server_busy") and "queue" in error["message"]
    for response in served:
        assert response.text.rstrip().endswith("data: [DONE]")
    assert retried.choices[0].finish_reason in ("stop", "length") and retried.usage.completion_tokens > 0


def test_jobs_whose_turns_find_the_workers_queue_full_wait_and_finish_with_their_own_answers(busy_url,
                                                                                            oracle) -> None:
    jobs = [math_job(f"Busy {i}: Ann has {i + 2} cards and gets {i + 5} more. How many cards?", "dense",
                     job_id=f"busy-{i}", agents=2, new_tokens=24) for i in range(BURST)]
    expected = [[t.token_ids for t in run_job(oracle, JobSpec.from_dict(job)).turns] for job in jobs]

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=busy_url, timeout=300) as client:
            return await asyncio.gather(*(client.post("/v1/jobs", params={"wait": "true"}, json=job)
                                          for job in jobs))

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * BURST, [r.text[:300] for r in responses]
    bodies = [r.json() for r in responses]
    assert all(body["status"] == "succeeded" for body in bodies), bodies
    assert [[t["token_ids"] for t in body["result"]["turns"]] for body in bodies] == expected
