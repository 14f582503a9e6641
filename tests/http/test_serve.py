"""The Ray Serve application over real HTTP on 127.0.0.1: jobs, OpenAI chat, metrics, auth and bad input.

One Serve app for the module (the session's local Ray cluster, tiny-llama with random weights and the embedded
tokenizer, one worker replica on half a CPU), built through `app_builder` exactly as ``serve run`` builds it, with
two API keys. The in-process engine (`kvcomm.job_runner.run_job`) is the oracle for jobs; the official `openai`
client talks to the chat endpoint. Serve is shut down at the end of the module.
"""
from __future__ import annotations

import json
import re
import time
import uuid

import httpx
import pytest

from kvcomm.chat_template import chat_prompt_ids
from kvcomm.generation import Sampling, generate_from_ids
from kvcomm.harness.jobs import GenerationParams
from kvcomm.harness.topologies import build_job
from kvcomm.job_runner import run_job

from cluster.config import ClusterConfig
from cluster.serve.config import ServeAppConfig, api_key_digests, load_serve_config_file

from tests.support.serve_app import running_app, tiny_app_args

KEY, OTHER_KEY = "test-key-" + uuid.uuid4().hex, "other-key-" + uuid.uuid4().hex
MODEL_NAME = "tiny-test"
NEW_TOKENS = 8
PER_KEY = 2          # serve.max_in_flight_per_key of the module's app


def math_job(task: str, mode: str, job_id: str = "serve-job") -> dict:
    return build_job("math", task, num_agents=3, mode=mode, job_id=job_id,
                     generation=GenerationParams(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)).to_dict()


def turn_facts(turns) -> list[tuple]:
    """(agent, round, tokens, gate reason, reused) per turn, of result dicts or `TurnRecord`s."""
    return [(t["agent_id"], t["round"], t["token_ids"], t["reason"], t["reused"]) if isinstance(t, dict) else
            (t.agent_id, t.round, t.token_ids, t.reason, t.reused) for t in turns]


def parse_sse(text: str) -> list[tuple[str | None, str]]:
    """(event name or None, data) per server-sent event."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        name, data = None, []
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                data.append(line[len("data: "):])
        events.append((name, "\n".join(data)))
    return events


def metric(text: str, sample: str) -> float:
    """The value of one exact sample line (name and labels) of a Prometheus text page; 0 when absent."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# ------------------------------------------------------------------------------------------------------------
# configuration (no Ray needed)
# ------------------------------------------------------------------------------------------------------------
def test_in_flight_slots_cap_each_key_and_the_total() -> None:
    from cluster.serve.http import APIError, InFlightSlots
    slots = InFlightSlots(limit=5, per_key=3, retry_after_s=2)
    for _ in range(3):
        slots.take("tenant-a")
    with pytest.raises(APIError) as refused:
        slots.take("tenant-a")
    assert refused.value.status == 429 and refused.value.code == "key_busy"
    assert refused.value.headers == {"Retry-After": "2"} and "serve.max_in_flight_per_key = 3" in refused.value.message
    slots.take("tenant-b")                      # another key still gets in ...
    slots.take("tenant-b")
    with pytest.raises(APIError) as busy:       # ... until the total is reached
        slots.take("tenant-c")
    assert busy.value.code == "server_busy" and "serve.max_in_flight = 5" in busy.value.message
    slots.give_back("tenant-a")
    slots.take("tenant-a")                      # a slot given back is free again, for its key
    assert (slots.total, slots.of("tenant-a"), slots.of("tenant-b")) == (5, 3, 2)
    for tenant in ["tenant-a"] * 3 + ["tenant-b"] * 2:
        slots.give_back(tenant)
    assert slots.total == 0 and slots.of("tenant-a") == 0
    open_server = InFlightSlots(limit=2, per_key=1, retry_after_s=1)   # no auth: only the total applies
    open_server.take(None)
    open_server.take(None)
    with pytest.raises(APIError, match="serve.max_in_flight = 2"):
        open_server.take(None)


def test_a_500_tells_the_client_an_error_id_and_logs_the_exception_under_it(caplog) -> None:
    from cluster.serve.http import internal_error_message
    with caplog.at_level("ERROR", logger="cluster.serve.http"):
        try:
            raise RuntimeError("secret /home/tenant-b/prompt.txt")
        except RuntimeError:
            message = internal_error_message("POST /v1/jobs")
    error_id = re.search(r"error id ([0-9a-f]{12})", message).group(1)
    assert "secret" not in message and "RuntimeError" not in message
    (record,) = [r for r in caplog.records if error_id in r.getMessage()]
    assert "POST /v1/jobs" in record.getMessage() and "secret" in str(record.exc_info[1])


@pytest.mark.parametrize("loader, what", [(load_serve_config_file, "serve config"),
                                           (ClusterConfig.from_yaml, "cluster config")])
def test_config_files_that_are_missing_broken_or_not_mappings_are_named(tmp_path, loader, what) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(FileNotFoundError, match=re.escape(f"{what} {missing} does not exist")):
        loader(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("applications: [unclosed\n")
    with pytest.raises(ValueError, match=re.escape(f"{what} {broken} is not valid YAML")):
        loader(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match=re.escape(f"{what} {listed} must be a mapping") + ".*got list"):
        loader(listed)


def test_shipped_configs_validate_and_bad_args_name_the_field(tmp_path) -> None:
    local = load_serve_config_file("configs/local.yaml")
    assert (local.host, local.port) == ("127.0.0.1", 8000)
    [app] = local.applications
    assert app.config.cluster.model == "smollm2-135m-instruct" and app.config.cluster.bundle() == {"CPU": 2.0}

    gpu = load_serve_config_file("configs/h100x8-llama3.1-8b.yaml")
    [app] = gpu.applications
    cluster = app.config.cluster
    assert (cluster.device, cluster.num_workers, cluster.bundle()) == ("cuda", 8, {"CPU": 8.0, "GPU": 1.0})
    assert app.config.model_name == "llama-3.1-8b-instruct"
    assert app.deployments["AgentWorkerDeployment"]["autoscaling_config"]["max_replicas"] == 8
    assert app.deployments["KVCommIngress"]["num_replicas"] == 2
    assert gpu.proxy_location == "HeadOnly"

    two = load_serve_config_file("configs/local-2replicas.yaml")
    [app] = two.applications
    assert app.config.cluster.num_workers == 2 and app.deployments["KVCommIngress"] == {"num_replicas": 2}

    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({**local.raw, "applications": [
        {**local.raw["applications"][0], "args": {"cluster": {"num_wrokers": 2}}}]}))
    with pytest.raises(ValueError, match=r"applications\[0\]\.args: cluster\.num_wrokers"):
        load_serve_config_file(bad)
    bad.write_text(json.dumps({"applications": [{"import_path": "cluster.serve.app:app_builder",
                                                 "deployments": [{"name": "Wrokers", "num_replicas": 2}]}]}))
    with pytest.raises(ValueError, match=r"applications\[0\]\.deployments\[0\]\.name: unknown deployment 'Wrokers'"):
        load_serve_config_file(bad)
    bad.write_text(json.dumps({"applications": [{"import_path": "cluster.serve.app:app_builder", "deployments": [
        {"name": "AgentWorkerDeployment", "autoscaling_config": {"min_replicas": 3, "max_replicas": 2}}]}]}))
    with pytest.raises(ValueError, match=r"autoscaling_config"):
        load_serve_config_file(bad)
    settings = ServeAppConfig.from_args({"serve": {"api_keys": ["sekrit-1"]}}).serve
    assert len(api_key_digests(settings, {"KVCOMM_API_KEY": "sekrit-2, sekrit-3,sekrit-1"})) == 3
    assert "sekrit" not in repr(settings)                # keys never show in a repr (logs)


# ------------------------------------------------------------------------------------------------------------
# the running app
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app_url(ray_cluster, tiny_model_dir):
    args = tiny_app_args(tiny_model_dir, "serve-test-pool", {
        "served_model_name": MODEL_NAME, "api_keys": [KEY, OTHER_KEY], "max_body_bytes": 64 * 1024,
        "max_in_flight_per_key": PER_KEY})
    with running_app(args, "kvcomm-test") as url:
        yield url


@pytest.fixture(scope="module")
def client(app_url):
    with httpx.Client(base_url=app_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as http:
        yield http


def test_job_over_http_equals_the_in_process_engine_and_streams_its_turns(client, oracle) -> None:
    from kvcomm.harness.jobs import JobSpec
    job = math_job("Tom has 3 apples and buys 5 more. How many apples does Tom have?", "dense")
    expected = run_job(oracle, JobSpec.from_dict(job))

    waited = client.post("/v1/jobs", params={"wait": "true"}, json=job)
    assert waited.status_code == 200, waited.text
    body = waited.json()
    assert body["status"] == "succeeded" and body["result"]["mode"] == "dense"
    assert [t["token_ids"] for t in body["result"]["turns"]] == [t.token_ids for t in expected.turns]
    assert body["result"]["final_answer"] == expected.final_answer

    accepted = client.post("/v1/jobs", json=job, headers={"X-KVCOMM-Namespace": "team-a"})
    assert accepted.status_code == 202 and accepted.json()["status"] in ("queued", "running")
    job_id = accepted.json()["id"]
    stream = client.get(f"/v1/jobs/{job_id}/events", headers={"X-KVCOMM-Namespace": "team-a"})
    assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(stream.text)
    assert [name for name, _ in events] == ["turn", "turn", "turn", "done"]
    turns = [json.loads(data) for _, data in events[:3]]
    assert sorted(t["agent_id"] for t in turns) == ["1", "2", "3"] and all(t["ttft_s"] > 0 for t in turns)
    done = json.loads(events[-1][1])
    assert done["status"] == "succeeded"
    assert [t["token_ids"] for t in done["result"]["turns"]] == [t.token_ids for t in expected.turns]
    status = client.get(f"/v1/jobs/{job_id}", headers={"X-KVCOMM-Namespace": "team-a"}).json()
    assert status["status"] == "succeeded" and status["turns_done"] == 3
    # the anchor namespace is the key's hash plus the header; other keys and namespaces do not see the job
    assert status["namespace"].endswith(".team-a") and status["namespace"] != "team-a"
    assert client.get(f"/v1/jobs/{job_id}").status_code == 404
    assert client.get(f"/v1/jobs/{job_id}", headers={"X-KVCOMM-Namespace": "team-a",
                                                     "Authorization": f"Bearer {OTHER_KEY}"}).status_code == 404


def test_openai_client_gets_a_completion_and_a_stream(app_url, oracle) -> None:
    import openai
    api = openai.OpenAI(base_url=f"{app_url}/v1", api_key=KEY, max_retries=0, timeout=120)
    assert [m.id for m in api.models.list().data] == [MODEL_NAME]
    assert api.models.retrieve(MODEL_NAME).id == MODEL_NAME
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("gpt-9")
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Count to three."}]
    dense = {"kvcomm": {"mode": "dense"}}        # the server's default is kvcomm; dense is the oracle's path
    completion = api.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=6, temperature=0,
                                             seed=7, extra_body=dense)
    prompt = chat_prompt_ids(oracle.tokenizer, messages)
    want = generate_from_ids(oracle.runner, prompt, Sampling(max_new_tokens=6, stop_token_ids=oracle.stop_token_ids))
    text = completion.choices[0].message.content
    assert text == oracle.tokenizer.decode(want.token_ids, skip_special_tokens=True)
    assert completion.usage.prompt_tokens == len(prompt)
    assert completion.usage.completion_tokens == len(want.token_ids)
    assert completion.usage.total_tokens == len(prompt) + len(want.token_ids)
    assert completion.choices[0].finish_reason == ("length" if len(want.token_ids) == 6 else "stop")

    chunks = list(api.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=6, temperature=0,
                                              stream=True, stream_options={"include_usage": True}, extra_body=dense))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 1 and "".join(deltas) == text            # token by token, the same greedy answer
    assert chunks[-1].usage.completion_tokens == completion.usage.completion_tokens
    # the raw stream ends with data: [DONE]
    raw = httpx.post(f"{app_url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                     json={"model": MODEL_NAME, "messages": messages, "max_tokens": 2, "stream": True, "seed": 1})
    assert raw.status_code == 200 and parse_sse(raw.text)[-1] == (None, "[DONE]")


def test_openai_stop_strings_cut_the_answer_before_the_stop_streamed_or_not(app_url, oracle) -> None:
    import openai
    api = openai.OpenAI(base_url=f"{app_url}/v1", api_key=KEY, max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "Name three colours."}]
    prompt = chat_prompt_ids(oracle.tokenizer, messages)
    greedy = generate_from_ids(oracle.runner, prompt, Sampling(max_new_tokens=16, stop_token_ids=oracle.stop_token_ids))
    full = oracle.tokenizer.decode(greedy.token_ids, skip_special_tokens=True)
    # a stop string from the middle of the greedy answer: two printable ASCII characters, first seen there
    stop = next((full[i:i + 2] for i in range(3, len(full) - 2)
                 if full[i:i + 2].isascii() and full[i:i + 2].isprintable() and full.find(full[i:i + 2]) == i), None)
    assert stop is not None, f"no usable stop string in the greedy answer {full!r}"
    want = full[:full.find(stop)]

    dense = {"kvcomm": {"mode": "dense"}}
    completion = api.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=16, temperature=0,
                                             stop=[stop, "never-in-the-answer"], extra_body=dense)
    assert completion.choices[0].message.content == want
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens < len(greedy.token_ids)      # decoding ended at the stop
    chunks = list(api.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=16, temperature=0,
                                              stop=stop, stream=True, extra_body=dense))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want   # never a stop's start
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_a_stream_the_client_drops_stops_decoding(client, oracle) -> None:
    """Counted, not timed: the tiny model decodes 4,000 tokens within seconds, so only the replica's count of the
    tokens it decoded for the chat tells a cancelled chat from one decoded to its end."""
    from ray import serve
    workers = serve.get_deployment_handle("AgentWorkerDeployment", "kvcomm-test")
    messages, max_tokens, bound = [{"role": "user", "content": "go on"}], 4000, 1000
    # OpenAI's API has no min_tokens: the greedy answer must not end by itself within `bound` tokens
    greedy = generate_from_ids(oracle.runner, chat_prompt_ids(oracle.tokenizer, messages),
                               Sampling(max_new_tokens=bound, stop_token_ids=oracle.stop_token_ids))
    assert len(greedy.token_ids) == bound, "the greedy answer stops early: pick another prompt"
    before = workers.stats.remote().result()["chats"]["tokens_generated"]
    request = {"model": MODEL_NAME, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
               "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=request) as stream:
        chunks = 0
        for line in stream.iter_lines():
            chunks += line.startswith("data: ")
            if chunks == 4:
                assert workers.load.remote().result().chats == 1
                break
    deadline = time.monotonic() + 120          # a bound on the wait only: the count below decides
    while workers.load.remote().result().chats and time.monotonic() < deadline:
        time.sleep(0.05)
    assert workers.load.remote().result().chats == 0
    decoded = workers.stats.remote().result()["chats"]["tokens_generated"] - before
    assert 3 <= decoded < bound, f"{decoded} tokens decoded after the client left (of {max_tokens})"
    assert metric(client.get("/metrics").text, "kvcomm_queue_length") == 0


def test_metrics_appear_after_traffic(client) -> None:
    before = client.get("/metrics").text
    job = math_job("Sam has 4 pens and buys 2 more. How many pens does Sam have?", "kvcomm", job_id="metrics-job")
    assert client.post("/v1/jobs", params={"wait": "1"}, json=job).status_code == 200
    page = client.get("/metrics")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain")
    text = page.text
    assert "# TYPE kvcomm_ttft_seconds histogram" in text and "# TYPE kvcomm_turns_total counter" in text
    turns = sum(float(v) for v in re.findall(r'^kvcomm_turns_total\{mode="kvcomm",reason="[^"]+"\} (\S+)$', text,
                                             re.MULTILINE))
    turns_before = sum(float(v) for v in re.findall(r'^kvcomm_turns_total\{mode="kvcomm",reason="[^"]+"\} (\S+)$',
                                                    before, re.MULTILINE))
    assert turns == turns_before + 3
    assert metric(text, 'kvcomm_ttft_seconds_count{mode="kvcomm"}') == turns
    assert metric(text, 'kvcomm_jobs_total{mode="kvcomm",status="succeeded"}') >= 1
    assert 0.0 <= metric(text, 'kvcomm_reuse_rate{mode="kvcomm"}') <= 1.0 and 'kvcomm_reuse_rate{mode="kvcomm"}' in text
    assert metric(text, "kvcomm_anchor_pool_anchors") > 0 and metric(text, "kvcomm_anchor_pool_bytes") > 0
    assert metric(text, 'kvcomm_http_requests_total{route="/v1/jobs",code="200"}') >= 1
    assert metric(text, "kvcomm_queue_length") == 0


def test_every_route_but_healthz_needs_the_key(app_url) -> None:
    with httpx.Client(base_url=app_url, timeout=60) as anonymous:
        assert anonymous.get("/healthz").status_code == 200
        for method, path in [("GET", "/v1/models"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs/job-x"),
                             ("GET", "/v1/jobs/job-x/events"), ("POST", "/v1/chat/completions"), ("GET", "/metrics")]:
            response = anonymous.request(method, path, json={})
            assert response.status_code == 401, (method, path, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.json()["error"]["type"] == "authentication_error"
        wrong = anonymous.get("/v1/models", headers={"Authorization": "Bearer not-the-key"})
        assert wrong.status_code == 401 and "not-the-key" not in wrong.text
        assert anonymous.get("/v1/models", headers={"Authorization": f"Bearer {OTHER_KEY}"}).status_code == 200


def test_bad_input_is_a_4xx_naming_the_field_and_the_server_still_answers(client) -> None:
    job = math_job("Ann has 2 cats and gets 1 more. How many cats does Ann have?", "dense", job_id="bad-input")
    cyclic = {**job, "edges": [["1", "2"], ["2", "3"], ["3", "1"]]}
    too_long = {**job, "agents": [{**job["agents"][0], "generation": {"max_new_tokens": 5000}}, *job["agents"][1:]]}
    chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    cases = [
        ("/v1/jobs", {"content": b'{"id": "x", "agents": [', "headers": {"content-type": "application/json"}},
         400, "body"),
        ("/v1/jobs", {"json": cyclic}, 400, "edges"),
        ("/v1/jobs", {"json": {**job, "mode": "turbo"}}, 400, "mode"),
        ("/v1/jobs?mode=turbo", {"json": job}, 400, "mode"),
        ("/v1/jobs", {"json": too_long}, 400, "agents[0].generation.max_new_tokens"),
        ("/v1/jobs", {"json": {**job, "agents": [{**job["agents"][0], "role": 7}]}}, 400, "agents[0].role"),
        ("/v1/jobs", {"content": b"[" + b"1," * 40_000 + b"1]", "headers": {"content-type": "application/json"}},
         413, "body"),
        ("/v1/jobs", {"json": job, "headers": {"X-KVCOMM-Namespace": "no spaces please"}}, 400, "X-KVCOMM-Namespace"),
        ("/v1/chat/completions", {"json": {**chat, "max_tokens": 100_000}}, 400, "max_tokens"),
        ("/v1/chat/completions", {"json": {**chat, "messages": []}}, 400, "messages"),
        ("/v1/chat/completions", {"json": {**chat, "messages": [{"role": "robot", "content": "x"}]}}, 400,
         "messages[0].role"),
        ("/v1/chat/completions", {"json": {**chat, "temperature": -1}}, 400, "temperature"),
        ("/v1/chat/completions", {"json": {**chat, "model": "gpt-9"}}, 404, "model"),
        ("/v1/chat/completions", {"content": b"not json", "headers": {"content-type": "application/json"}}, 400,
         "body"),
    ]
    for path, request, status, field in cases:
        response = client.post(path, **request)
        assert response.status_code == status, (path, field, response.status_code, response.text)
        error = response.json()["error"]
        assert error["param"] == field and error["message"].startswith(field), (path, field, error)
    # longer than the model's context (the tiny model's: 4096 tokens): OpenAI's code, which clients read to trim
    too_long_chats = [({**chat, "messages": [{"role": "user", "content": "apple " * 4200}]}, "messages"),
                      ({**chat, "max_tokens": 4090, "messages": [{"role": "user", "content": "apple " * 40}]},
                       "max_tokens")]
    for body, field in too_long_chats:
        response = client.post("/v1/chat/completions", json=body)
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == field, response.text
        assert error["code"] == "context_length_exceeded" and "context" in error["message"], error
    ok = client.post("/v1/chat/completions", json=chat)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    assert client.post("/v1/jobs?wait=true", json=job).json()["status"] == "succeeded"


def test_kvcomm_jobs_over_http_equal_the_oracle_job_by_job(client, oracle) -> None:
    """Sequential kvcomm jobs in a fresh namespace, and the same jobs in the same order on the in-process engine:
    every turn's tokens, gate reason and reuse equal, so the pool went through the same states on both."""
    from kvcomm.harness.jobs import JobSpec
    namespace = f"http-kvcomm-{uuid.uuid4().hex[:8]}"
    tasks = [f"Mia has {a} shells and finds {b} more. How many shells does Mia have?" for a, b in
             [(3, 4), (5, 2), (6, 1), (2, 8), (7, 3)]]
    jobs = [{**math_job(task, "kvcomm", job_id=f"kv-{i}"), "namespace": namespace} for i, task in enumerate(tasks)]
    expected = [run_job(oracle, JobSpec.from_dict(job)) for job in jobs]
    assert any(t.reused for want in expected for t in want.turns)        # the jobs exercise reuse, not only dense
    for job, want in zip(jobs, expected):
        response = client.post("/v1/jobs", params={"wait": "true"}, json=job,
                               headers={"X-KVCOMM-Namespace": namespace})
        assert response.status_code == 200, response.text
        result = response.json()["result"]
        assert turn_facts(result["turns"]) == turn_facts(want.turns), job["id"]
        assert result["reuse_rate"] == want.reuse_rate and result["final_answer"] == want.final_answer


def test_a_sampled_job_over_http_equals_the_oracle(client, oracle) -> None:
    """Temperature and top-p with a seed: the server's sampled turns are the in-process engine's, draw for draw
    (and differ from greedy decoding, so the sampler really ran)."""
    from kvcomm.harness.jobs import JobSpec
    def sampled(temperature: float) -> dict:
        return build_job("math", "Ivy has 6 plums and eats 2. How many plums are left?", num_agents=3, mode="dense",
                         job_id="sampled", generation=GenerationParams(max_new_tokens=NEW_TOKENS, top_p=0.9, seed=1234,
                                                                        temperature=temperature)).to_dict()
    job = sampled(0.9)
    want = run_job(oracle, JobSpec.from_dict(job))
    greedy = run_job(oracle, JobSpec.from_dict(sampled(0.0)))
    assert [t.token_ids for t in want.turns] != [t.token_ids for t in greedy.turns]
    response = client.post("/v1/jobs", params={"wait": "true"}, json=job)
    assert response.status_code == 200, response.text
    assert [t["token_ids"] for t in response.json()["result"]["turns"]] == [t.token_ids for t in want.turns]


def test_the_per_key_cap_refuses_a_keys_third_job_with_429_while_another_key_gets_in(app_url, client) -> None:
    """serve.max_in_flight_per_key = 2: key A's third unfinished job is refused at once (429, Retry-After, naming
    the knob), key B is accepted meanwhile, and a slot freed by a cancel lets A in again."""
    from cluster.serve.config import ServeSettings
    slow = build_job("math", "Ben has 3 kites and buys 4 more. How many kites?", num_agents=1, mode="dense",
                     job_id="slow", generation=GenerationParams(max_new_tokens=3000, min_new_tokens=3000)).to_dict()
    with httpx.Client(base_url=app_url, headers={"Authorization": f"Bearer {OTHER_KEY}"}, timeout=120) as other:
        held = []
        try:
            for _ in range(PER_KEY):
                accepted = client.post("/v1/jobs", json=slow)
                assert accepted.status_code == 202, accepted.text
                held.append((client, accepted.json()["id"]))
            refused = client.post("/v1/jobs", json=slow)
            accepted_b = other.post("/v1/jobs", json=slow)
            assert accepted_b.status_code == 202, accepted_b.text
            held.append((other, accepted_b.json()["id"]))
            assert refused.status_code == 429, refused.text
            assert refused.headers["Retry-After"] == str(ServeSettings().retry_after_s)
            error = refused.json()["error"]
            assert error["code"] == "key_busy" and f"serve.max_in_flight_per_key = {PER_KEY}" in error["message"]
            # a running job of A cancelled: its slot is free again once its turn has stopped
            http, job_id = held.pop(0)
            assert http.delete(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
            deadline = time.monotonic() + 30
            while (again := client.post("/v1/jobs", json=slow)).status_code == 429 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert again.status_code == 202, again.text
            held.append((client, again.json()["id"]))
        finally:
            for http, job_id in held:
                http.delete(f"/v1/jobs/{job_id}")
    deadline = time.monotonic() + 60
    while httpx.get(f"{app_url}/healthz", timeout=30).json()["jobs_in_flight"]:
        assert time.monotonic() < deadline, "cancelled jobs still hold their slots"
        time.sleep(0.1)
