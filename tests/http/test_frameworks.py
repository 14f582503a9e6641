"""Unmodified agent frameworks against the Serve app over real HTTP: AutoGen's `RoundRobinGroupChat` of three
agents, a three-node LangGraph graph on `ChatOpenAI` (streaming), three OpenAI Agents SDK agents run in turn and a
sequential CrewAI crew of three agents, driven by `cluster.bench.frameworks` exactly as ``kvcomm bench agents``
drives them, on the tiny random-weight model; the official `openai` client for streaming, stop strings and tool
messages with reuse, and the chat errors.

With reuse off (``kvcomm.mode: dense``) every answer equals the in-process dense generation on the very prompt
tokens the server reports; with reuse on, agents 2 and 3 reuse from the third question on (the entropy gate makes
a namespace's first two contents of each kind anchors: a pool of <= 1 anchor always takes a new one; CrewAI's
agents all reuse from the second, see its test), and their first-token agreement and KL against dense on the same
tokens are printed.
"""
from __future__ import annotations

import base64
import uuid

import httpx
import numpy as np
import pytest
import torch

from cluster.bench.frameworks import run_autogen, run_crewai, run_langgraph, run_openai_agents
from kvcomm.generation import Sampling, generate_from_ids

from tests.support.outbound import outbound_attempts
from tests.support.serve_app import running_app, tiny_app_args

MODEL_NAME = "tiny-chat"
MAX_TOKENS = 6
QUESTIONS = ("Tom has 3 apples and buys 5 more. How many apples does Tom have?",
             "Sam has 4 pens and buys 2 more. How many pens does Sam have?",
             "Ann has 2 cats and gets 1 more. How many cats?",
             "Bob has 9 cars and sells 3. How many cars?")


@pytest.fixture(scope="module")
def app_url(ray_cluster, tiny_model_dir):
    args = tiny_app_args(tiny_model_dir, "frameworks-pool", {"served_model_name": MODEL_NAME})
    with running_app(args, "kvcomm-frameworks") as url:
        yield url


def dense_tokens(oracle, prompt_ids, max_tokens: int = MAX_TOKENS) -> tuple[list[int], torch.Tensor]:
    out = generate_from_ids(oracle.runner, prompt_ids, Sampling(max_new_tokens=max_tokens,
                                                                stop_token_ids=oracle.stop_token_ids))
    return out.token_ids, out.first_logits


def served_logprobs(encoded: str | bytes) -> torch.Tensor:
    raw = base64.b64decode(encoded) if isinstance(encoded, str) else encoded
    return torch.from_numpy(np.frombuffer(raw, dtype="<f4").copy())


def check_framework(run, url: str, oracle, framework: str, *, answers_inline: bool = False, **options) -> None:
    """`answers_inline`: the framework writes the earlier agents' answers into the task's user message as text
    (CrewAI's task context) instead of sending them as messages of their own (see the CrewAI test)."""
    tag = uuid.uuid4().hex[:6]
    conversations = {mode: run(url, QUESTIONS, mode=mode, namespace=f"{framework}-{mode}-{tag}",
                               max_tokens=MAX_TOKENS, model=MODEL_NAME, **options) for mode in ("dense", "kvcomm")}
    for conversation in conversations["dense"]:                 # reuse off: dense, token for token
        assert len(conversation.turns) == 3
        for turn in conversation.turns:
            assert (turn["mode"], turn["reason"], turn["cached_tokens"]) == ("dense", "dense_mode", 0)
            assert turn["completion_ids"] == dense_tokens(oracle, turn["prompt_ids"])[0]
        first, second, third = conversation.turns
        ids = third["prompt_ids"]
        for earlier in (first, second):
            if answers_inline:                                 # as text inside the one user message
                assert earlier["text"] in third["messages"][-1]["content"], framework
            assert any(ids[i:i + len(earlier["completion_ids"])] == earlier["completion_ids"]
                       for i in range(len(ids))), framework    # earlier answers enter as their producer's ids
        if answers_inline:
            assert all([m["role"] for m in t["messages"]] == ["system", "user"] for t in conversation.turns)
    reasons, kls, agree = [], [], []
    for number, conversation in enumerate(conversations["kvcomm"]):
        reasons.append([t["reason"] for t in conversation.turns])
        for position, turn in enumerate(conversation.turns):
            tokens, logits = dense_tokens(oracle, turn["prompt_ids"])
            if not turn["reused"]:
                assert turn["completion_ids"] == tokens, (framework, number, position, turn["reason"])
                continue
            assert 0 < turn["cached_tokens"] < turn["prompt_tokens"]
            dense = torch.log_softmax(logits.double(), -1)
            served = served_logprobs(turn["first_logprobs"]).double()
            kls.append(float((dense.exp() * (dense - served)).sum()))
            agree.append(int(dense.argmax()) == int(served.argmax()))
    # agent 1 reads each new task first (CrewAI's: its message's pieces): dense-prefix's prefill, whose KV becomes the
    # task's base KV; the first two questions teach the pool, then agents 2 and 3 reuse
    assert all(row[0] == "first_read" for row in reasons), reasons
    assert all(reason.startswith("new_anchor:") for row in reasons[:2] for reason in row[1:]), reasons
    assert all(row[1:] == ["reused", "reused"] for row in reasons[2:]), reasons
    print(f"\n{framework}: reuse on vs dense on the same tokens, {len(kls)} reused turns: first-token agreement "
          f"{sum(agree)}/{len(agree)}, KL mean {np.mean(kls):.2e}, max {max(kls):.2e}")
    assert max(kls) < 0.5                     # reuse stays close to dense (the tiny model: ~0)


def test_autogen_round_robin_group_chat_reuses_across_requests(app_url, oracle) -> None:
    check_framework(run_autogen, app_url, oracle, "autogen")


def test_langgraph_three_node_graph_reuses_across_requests_streaming(app_url, oracle) -> None:
    check_framework(run_langgraph, app_url, oracle, "langgraph", stream=True)


def test_openai_agents_sdk_agents_in_turn_reuse_across_requests(app_url, oracle) -> None:
    check_framework(run_openai_agents, app_url, oracle, "openai-agents")


def test_crewai_sequential_crew_reuses_across_requests(app_url, oracle) -> None:
    """CrewAI shapes its prompts unlike the three others, so two of `check_framework`'s checks take another form
    (the dense checks do not change: with reuse off every answer is dense generation, token for token).

    Every CrewAI call is two messages: the agent's system prompt (role, backstory, goal) and one user message that
    holds the task, the earlier tasks' outputs under "This is the context you're working with:" and CrewAI's
    instructions. An earlier answer therefore reaches a later agent as text inside that message; the server cuts it
    out (`kvcomm.chat_template.quote_pieces`) and it enters as its producer's token ids and KV, as it does where a
    framework sends it as a message of its own. Every piece is a content of a new kind (the task text, each quoted
    answer, each separator): agent 1's are all new (its first read), the first two questions teach the pool, and
    agents 2 and 3 reuse from the third on.

    CrewAI's telemetry and tracing are off (`crewai_telemetry_off`, ``tracing=False``): while the crews run, this
    process tries to reach no host but loopback."""
    with outbound_attempts() as attempts:
        check_framework(run_crewai, app_url, oracle, "crewai", answers_inline=True)
    assert attempts == []


def test_streaming_stop_strings_and_tool_messages_work_with_reuse(app_url, oracle) -> None:
    import openai
    api = openai.OpenAI(base_url=f"{app_url}/v1", api_key="unused", max_retries=0, timeout=120)
    options = {"kvcomm": {"mode": "kvcomm", "namespace": f"tools-{uuid.uuid4().hex[:6]}", "details": True}}
    messages = [{"role": "system", "content": "You check tool results."},
                {"role": "user", "content": QUESTIONS[0]},
                {"role": "tool", "tool_call_id": "call_1", "content": "3 + 5 = 8"},
                {"role": "user", "content": "What does the tool say?"}]
    first, second = (api.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=24, temperature=0,
                                                 extra_body=options) for _ in range(2))
    assert first.model_extra["kvcomm"]["reason"] == "first_read"
    assert first.usage.prompt_tokens_details.cached_tokens > 0     # the leading system prompt's exact prefix only
    assert "<|im_start|>tool\n3 + 5 = 8<|im_end|>" in oracle.tokenizer.decode(
        first.model_extra["kvcomm"]["prompt_token_ids"])
    assert second.model_extra["kvcomm"]["reused"] and second.usage.prompt_tokens_details.cached_tokens > \
        first.usage.prompt_tokens_details.cached_tokens
    text = second.choices[0].message.content
    stop = next(text[i:i + 2] for i in range(8, len(text) - 2) if text.find(text[i:i + 2]) == i)
    cut = api.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=24, temperature=0, stop=stop,
                                      extra_body=options)
    assert cut.choices[0].message.content == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"
    chunks = list(api.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=24, temperature=0,
                                              stop=stop, stream=True, stream_options={"include_usage": True},
                                              extra_body=options))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 1 and "".join(deltas) == cut.choices[0].message.content
    final = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    assert final.choices[0].finish_reason == "stop" and final.model_extra["kvcomm"]["reused"]
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens_details.cached_tokens


def metric_samples(http: httpx.Client) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in http.get("/metrics").text.splitlines() if line and not line.startswith("#")}


def test_chat_errors_name_the_field_and_metrics_count_reuse(app_url) -> None:
    chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cases = [({**chat, "n": 2}, "n", "only n=1 is supported"),
             ({**chat, "kvcomm": {"mode": "turbo"}}, "kvcomm.mode", "unknown mode 'turbo'"),
             ({**chat, "kvcomm": {"reuse": True}}, "kvcomm.reuse", "Extra inputs"),
             ({**chat, "kvcomm": {"namespace": "no spaces"}}, "kvcomm.namespace", "pattern"),
             ({**chat, "messages": [{"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}]},
              "messages[1].tool_calls", "not supported"),
             # what would change the answer is refused rather than silently ignored
             ({**chat, "response_format": {"type": "json_object"}}, "response_format", "no JSON mode"),
             ({**chat, "frequency_penalty": 0.5}, "frequency_penalty", "must be 0"),
             ({**chat, "presence_penalty": -1}, "presence_penalty", "must be 0"),
             ({**chat, "logit_bias": {"42": 5}}, "logit_bias", "not supported"),
             ({**chat, "tool_choice": "required"}, "tool_choice", "offers no tools")]
    with httpx.Client(base_url=app_url, timeout=60) as http:
        for body, param, words in cases:
            response = http.post("/v1/chat/completions", json=body)
            error = response.json()["error"]
            assert response.status_code == 400 and error["param"] == param, (param, response.text)
            assert error["message"].startswith(f"{param}: ") and words in error["message"], error
        # null is a field's default (OpenAI's spec), and so are the defaults of what the server does not act on
        defaults = {**chat, "temperature": None, "top_p": None, "n": None, "stream": None, "stop": None,
                    "seed": None, "frequency_penalty": 0, "presence_penalty": None, "logit_bias": {},
                    "response_format": {"type": "text"}, "tool_choice": "none", "user": "u-1", "store": False}
        response = http.post("/v1/chat/completions", json=defaults)
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] <= 2, response.text
        assert http.get("/openapi.json").status_code == 404      # no schema route around the key check
        before = metric_samples(http)
        body = {**chat, "messages": [{"role": "user", "content": QUESTIONS[3]}],
                "kvcomm": {"namespace": f"metrics-{uuid.uuid4().hex[:6]}"}}        # the server's default: kvcomm
        answers = [http.post("/v1/chat/completions", json=body).json() for _ in range(2)]
        after = metric_samples(http)
    assert [a["kvcomm"]["mode"] for a in answers] == ["kvcomm", "kvcomm"] and answers[1]["kvcomm"]["reused"]

    def grew(sample: str) -> float:
        return after.get(sample, 0.0) - before.get(sample, 0.0)
    cached = [a["usage"]["prompt_tokens_details"]["cached_tokens"] for a in answers]
    # the first read still starts from the template's exact prefix; the reused turn reuses far more
    assert 0 < cached[0] < cached[1] and grew('kvcomm_reused_prompt_tokens_total{source="chat"}') == sum(cached)
    assert grew('kvcomm_chat_decisions_total{mode="kvcomm",reason="reused"}') == 1
    assert grew('kvcomm_chat_decisions_total{mode="kvcomm",reason="first_read"}') == 1
    assert grew('kvcomm_ttft_seconds_count{mode="chat-kvcomm"}') == 2


def test_a_chats_namespace_routes_it_to_its_home_replica_when_loads_tie() -> None:
    from cluster.serve.openai_api import ChatCompletionRequest
    from cluster.serve.router import home_replica, rank_replicas
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "kvcomm": {"namespace": "team"}}
    params = ChatCompletionRequest.model_validate(body).params(default_mode="kvcomm", namespace="tenant.team",
                                                               default_max_tokens=16)
    hint = params.routing_hint()
    assert hint.namespace == "tenant.team" and params.request.mode == "kvcomm"
    replicas = {"r1": 0.0, "r2": 0.0, "r3": 0.0}
    ranked = rank_replicas(replicas, {}, cost_bytes_by_node={}, namespace=hint.namespace, slack_tokens=0)
    assert ranked[0] == home_replica("tenant.team", sorted(replicas))
    busy = rank_replicas({**replicas, ranked[0]: 500.0}, {}, cost_bytes_by_node={}, namespace=hint.namespace,
                         slack_tokens=0)
    assert busy[0] != ranked[0]                       # load first: a busy home replica is passed over
