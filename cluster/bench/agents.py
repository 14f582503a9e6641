"""`kvcomm bench agents`: unmodified agent frameworks against the OpenAI chat API, KV reuse off and on.

This module owns the benchmark and the framework drivers the tests use too:

* `ChatLog`: httpx event hooks that keep each chat completion a framework sends, with the response's ``kvcomm``
  details (the server's TTFT, reuse decision, prompt and completion token ids, first-token log-probabilities).
* `run_autogen` / `run_langgraph` / `run_openai_agents`: one conversation per question through three agents (Math
  Solver, Mathematical Analyst and Inspector of `kvcomm.harness.roles.MATH`) of a framework used as its users use
  it, pointed at the server's base URL: AutoGen's `RoundRobinGroupChat` of `AssistantAgent`s on
  `OpenAIChatCompletionClient`, a LangGraph graph of three nodes that call `langchain-openai`'s `ChatOpenAI` on the
  shared messages, and three OpenAI Agents SDK `Agent`s run in turn on the conversation so far. The serving
  mode and namespace ride in ``extra_body={"kvcomm": ...}``, the one thing the frameworks are told.
* `run`: the Serve app (``configs/local.yaml``: the embedded model on the CPU, one replica), every question
  through each framework with reuse off (``mode: dense``) and on (``kvcomm``), in namespaces of their own, the two
  alternating question by question; then, in this process, a dense prefill of every reused prompt's very tokens:
  first-token agreement and KL. `warmup` questions first teach the anchor pool (the entropy gate turns a
  namespace's first two contents of each kind into anchors) and are not counted. `markdown_table` and `plot`
  (docs/img/agents.png) show TTFT per agent position, reuse rate and wall time per conversation.

TTFT is the server's: from the chat reaching its worker replica to its first token (the content lookups, the gate
and the prefill or reuse included; the HTTP hop, ~13 ms here, not).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from kvcomm.cli_args import add_model_args
from kvcomm.harness.datasets import DEFAULT_GSM8K_PATH as DEFAULT_DATA
from kvcomm.names import EMBEDDED_MODEL

FRAMEWORKS = ("autogen", "langgraph")   # the default; `RUNNERS` has every framework
NEEDS = {"autogen": "autogen_agentchat", "langgraph": "langgraph", "openai-agents": "agents"}   # their modules
MODES = ("dense", "kvcomm")          # reuse off, reuse on
AUTOGEN_MODEL_INFO = {"vision": False, "function_calling": False, "json_output": False, "family": "unknown",
                      "structured_output": False}   # AutoGen needs it for a model name OpenAI does not know


def math_agents() -> list[tuple[str, str]]:
    """(name, system prompt) of the three agents: Math Solver, Mathematical Analyst, Inspector."""
    from kvcomm.harness.roles import MATH
    roles = [r for r in MATH.roles if r.condition is None][:3]   # no code runs in a framework: skip the programmer
    return [(role.name.split()[-1].lower(), role.system_prompt) for role in roles]


def _need(module: str) -> None:
    import importlib.util
    if importlib.util.find_spec(module) is None:
        raise RuntimeError(f"`kvcomm bench agents` needs {module!r}: install the dev extra (pip install -e '.[dev]')")


# ------------------------------------------------------------------------------------------------------------
# What the frameworks send and get
# ------------------------------------------------------------------------------------------------------------
@dataclass
class Conversation:
    """One question through the agents of one framework in one mode: a turn per chat completion, in order."""
    framework: str
    mode: str
    question: str
    turns: list[dict[str, Any]]
    wall_s: float
    warmup: bool = False


def turn_of(request: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    """A chat completion (request and response body, or the streamed chunks merged) as one turn's record."""
    info = body.get("kvcomm") or {}
    logprobs = info.get("first_token_logprobs")
    return {"messages": request.get("messages", []), "text": body["choices"][0]["message"]["content"],
            "mode": info.get("mode"), "reused": info.get("reused"), "reason": info.get("reason"),
            "cached_tokens": body["usage"]["prompt_tokens_details"]["cached_tokens"],
            "prompt_tokens": body["usage"]["prompt_tokens"], "ttft_s": info.get("ttft_s"),
            "prompt_ids": info.get("prompt_token_ids"), "completion_ids": info.get("completion_token_ids"),
            "first_logprobs": None if logprobs is None else base64.b64decode(logprobs)}


def merge_stream(text: str) -> dict[str, Any]:
    """A streamed completion's SSE chunks as one response body (content joined; usage and kvcomm kept)."""
    content, body = [], {"choices": [{"message": {"content": ""}}]}
    for block in text.split("\n\n"):
        data = "".join(line[len("data: "):] for line in block.split("\n") if line.startswith("data: "))
        if not data or data == "[DONE]":
            continue
        chunk = json.loads(data)
        for choice in chunk.get("choices", []):
            content.append(choice["delta"].get("content") or "")
        body.update({k: chunk[k] for k in ("usage", "kvcomm") if chunk.get(k)})
    body["choices"][0]["message"]["content"] = "".join(content)
    return body


class ChatLog:
    """Keeps every chat completion a framework's HTTP client sends (event hooks on httpx clients given to it)."""

    def __init__(self) -> None:
        self.turns: list[dict[str, Any]] = []

    def _keep(self, response: Any) -> None:
        if not response.request.url.path.endswith("/chat/completions"):
            return
        if response.status_code != 200:
            raise RuntimeError(f"chat completion failed: {response.status_code} {response.text[:300]}")
        request = json.loads(response.request.content)
        streamed = response.headers.get("content-type", "").startswith("text/event-stream")
        self.turns.append(turn_of(request, merge_stream(response.text) if streamed else response.json()))

    def client(self, timeout: float = 600.0) -> Any:
        import httpx

        def hook(response: Any) -> None:
            response.read()            # the client reads the body again from memory
            self._keep(response)
        return httpx.Client(timeout=timeout, event_hooks={"response": [hook]})

    def async_client(self, timeout: float = 600.0) -> Any:
        import httpx

        async def hook(response: Any) -> None:
            await response.aread()
            self._keep(response)
        return httpx.AsyncClient(timeout=timeout, event_hooks={"response": [hook]})

    def take(self) -> list[dict[str, Any]]:
        turns, self.turns = self.turns, []
        return turns


def _options(mode: str, namespace: str) -> dict[str, Any]:
    return {"kvcomm": {"mode": mode, "namespace": namespace, "details": True}}


def run_autogen(base_url: str, questions: Sequence[str], *, mode: str, namespace: str, max_tokens: int,
                model: str, api_key: str = "unused") -> list[Conversation]:
    """Each question through a fresh AutoGen `RoundRobinGroupChat` of three `AssistantAgent`s (one message each)."""
    _need(NEEDS["autogen"])
    from autogen_agentchat.agents import AssistantAgent
    from autogen_agentchat.conditions import MaxMessageTermination
    from autogen_agentchat.teams import RoundRobinGroupChat
    from autogen_ext.models.openai import OpenAIChatCompletionClient

    async def conversations() -> list[Conversation]:
        log = ChatLog()
        client = OpenAIChatCompletionClient(model=model, base_url=f"{base_url}/v1", api_key=api_key,
                                            model_info=AUTOGEN_MODEL_INFO, temperature=0, max_tokens=max_tokens,
                                            extra_body=_options(mode, namespace), http_client=log.async_client())
        out = []
        try:
            for question in questions:
                agents = [AssistantAgent(name, model_client=client, system_message=system)
                          for name, system in math_agents()]
                team = RoundRobinGroupChat(agents, termination_condition=MaxMessageTermination(len(agents) + 1))
                started = time.perf_counter()
                await team.run(task=question)
                out.append(Conversation("autogen", mode, question, log.take(), time.perf_counter() - started))
        finally:
            await client.close()
        return out
    return asyncio.run(conversations())


def run_langgraph(base_url: str, questions: Sequence[str], *, mode: str, namespace: str, max_tokens: int,
                  model: str, api_key: str = "unused", stream: bool = False, stop: Sequence[str] | None = None
                  ) -> list[Conversation]:
    """Each question through a LangGraph graph of three nodes (solver -> analyst -> inspector), each calling
    `ChatOpenAI` on the shared messages with its own system prompt and adding its answer as a named AI message."""
    _need(NEEDS["langgraph"])
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
    from langchain_openai import ChatOpenAI
    from langgraph.graph import END, START, MessagesState, StateGraph

    log = ChatLog()
    http = log.client()
    llm = ChatOpenAI(model=model, base_url=f"{base_url}/v1", api_key=api_key, temperature=0,
                     max_completion_tokens=max_tokens, extra_body=_options(mode, namespace), streaming=stream,
                     stream_usage=stream, stop=list(stop) if stop else None, http_client=http)

    def node(name: str, system: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
        def answer(state: dict[str, Any]) -> dict[str, Any]:
            reply = llm.invoke([SystemMessage(system), *state["messages"]])
            return {"messages": [AIMessage(reply.content, name=name)]}
        return answer

    graph = StateGraph(MessagesState)
    names = []
    for name, system in math_agents():
        graph.add_node(name, node(name, system))
        names.append(name)
    for source, target in zip([START, *names], [*names, END]):
        graph.add_edge(source, target)
    app = graph.compile()
    out = []
    with http:
        for question in questions:
            started = time.perf_counter()
            app.invoke({"messages": [HumanMessage(question)]})
            out.append(Conversation("langgraph", mode, question, log.take(), time.perf_counter() - started))
    return out


def run_openai_agents(base_url: str, questions: Sequence[str], *, mode: str, namespace: str, max_tokens: int,
                      model: str, api_key: str = "unused") -> list[Conversation]:
    """Each question through three OpenAI Agents SDK `Agent`s on `OpenAIChatCompletionsModel`, run one after the
    other as the SDK chains agents without tools: each `Runner.run` gets the conversation so far
    (`result.to_input_list()`), its instructions being the agent's system prompt. Tracing is off for these runs
    (it would export to OpenAI)."""
    _need(NEEDS["openai-agents"])
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, RunConfig, Runner
    from openai import AsyncOpenAI

    async def conversations() -> list[Conversation]:
        log = ChatLog()
        client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key=api_key, http_client=log.async_client())
        settings = ModelSettings(temperature=0, max_tokens=max_tokens, extra_body=_options(mode, namespace))
        chat_model = OpenAIChatCompletionsModel(model=model, openai_client=client)
        agents = [Agent(name=name, instructions=system, model=chat_model, model_settings=settings)
                  for name, system in math_agents()]
        out = []
        try:
            for question in questions:
                started = time.perf_counter()
                history: Any = question
                for agent in agents:
                    result = await Runner.run(agent, history, run_config=RunConfig(tracing_disabled=True))
                    history = result.to_input_list()
                out.append(Conversation("openai-agents", mode, question, log.take(), time.perf_counter() - started))
        finally:
            await client.close()
        return out
    return asyncio.run(conversations())


RUNNERS = {"autogen": run_autogen, "langgraph": run_langgraph, "openai-agents": run_openai_agents}


# ------------------------------------------------------------------------------------------------------------
# The benchmark
# ------------------------------------------------------------------------------------------------------------
def app_config(model: str, random_weights: bool, gamma: float | None = None) -> Any:
    """``configs/local.yaml``'s application with the model (and the gate's gamma) overridden and an anchor pool of
    its own."""
    from ..serve.command import DEFAULT_CONFIG
    from ..serve.config import load_serve_config_file
    app = load_serve_config_file(DEFAULT_CONFIG).applications[0].config
    changes: dict[str, Any] = {"kvcomm": {"gamma": gamma}} if gamma is not None else {}
    cluster = app.cluster.with_(model=model, random_weights=random_weights,
                                pool_actor_name=f"bench-agents-pool-{uuid.uuid4().hex[:8]}", **changes)
    serve = app.serve.model_copy(update={"served_model_name": "bench-model"})
    return app.model_copy(update={"cluster": cluster, "serve": serve})


def fidelity(engine: Any, conversations: Sequence[Conversation]) -> None:
    """For every turn of a reuse-on conversation: the dense prefill of its very prompt tokens (in this process),
    the first-token agreement and KL(dense || served) (in place: ``dense_first``, ``agree``, ``kl``)."""
    import numpy as np
    import torch
    for conversation in conversations:
        if conversation.mode == "dense":
            continue
        for turn in conversation.turns:
            logits, _ = engine.runner.prefill(turn["prompt_ids"])
            dense = torch.log_softmax(logits[-1].double(), dim=-1)                       # [vocab]
            served = torch.from_numpy(np.frombuffer(turn["first_logprobs"], dtype="<f4").copy()).double()
            turn["agree"] = int(dense.argmax()) == int(served.argmax())
            turn["kl"] = float((dense.exp() * (dense - served)).sum().clamp_min(0.0))


def summarize(conversations: Sequence[Conversation]) -> dict[str, Any]:
    """Per framework: TTFT per agent position off and on, reuse rate, first-token agreement and KL of reused
    turns, wall time per conversation (measured questions only)."""
    out: dict[str, Any] = {}
    for framework in sorted({c.framework for c in conversations}):
        measured = [c for c in conversations if c.framework == framework and not c.warmup]
        by_mode = {mode: [c for c in measured if c.mode == mode] for mode in MODES}
        positions = []
        for index in range(max(len(c.turns) for c in measured)):
            row: dict[str, Any] = {"agent": index + 1}
            for mode in MODES:
                turns = [c.turns[index] for c in by_mode[mode] if index < len(c.turns)]
                row[f"ttft_ms_{mode}"] = 1e3 * statistics.median(t["ttft_s"] for t in turns)
                row[f"prompt_tokens_{mode}"] = statistics.fmean(t["prompt_tokens"] for t in turns)
            turns = [c.turns[index] for c in by_mode["kvcomm"] if index < len(c.turns)]
            reused = [t for t in turns if t["reused"]]
            row.update(speedup=row["ttft_ms_dense"] / row["ttft_ms_kvcomm"],
                       reuse_rate=len(reused) / len(turns),
                       cached_share=sum(t["cached_tokens"] for t in turns) / sum(t["prompt_tokens"] for t in turns),
                       agreement=(sum(t["agree"] for t in reused) / len(reused)) if reused else None,
                       kl_mean=statistics.fmean(t["kl"] for t in reused) if reused else None,
                       reasons=dict(sorted(_count(t["reason"] for t in turns).items())))
            positions.append(row)
        kv_turns = [t for c in by_mode["kvcomm"] for t in c.turns]
        reused = [t for t in kv_turns if t["reused"]]
        out[framework] = {
            "questions": len(by_mode["kvcomm"]), "agents": positions,
            "reuse_rate": len(reused) / len(kv_turns),
            "agreement": sum(t["agree"] for t in reused) / len(reused) if reused else None,
            "kl_mean": statistics.fmean(t["kl"] for t in reused) if reused else None,
            "wall_s": {mode: statistics.fmean(c.wall_s for c in by_mode[mode]) for mode in MODES}}
    return out


def _count(items: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


def run(*, frameworks: Sequence[str] = FRAMEWORKS, questions: int = 8, warmup: int = 2, data: str = DEFAULT_DATA,
        skip: int = 0, seed: int = 0, max_tokens: int = 32, model: str = EMBEDDED_MODEL,
        random_weights: bool = False, gamma: float | None = None, num_cpus: int | None = None,
        progress: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> dict[str, Any]:
    """The benchmark (module docstring): returns the summary, the setting and every conversation's turns."""
    from kvcomm.bench.turns import load_questions
    from kvcomm.engine import build_engine

    from .http import run_with_app
    unknown = [f for f in frameworks if f not in RUNNERS]
    if unknown:
        raise ValueError(f"--framework: unknown {', '.join(unknown)}; frameworks: {', '.join(RUNNERS)}")
    for framework in frameworks:
        _need(NEEDS[framework])
    picked = load_questions(data, warmup + questions, skip=skip, seed=seed)
    config = app_config(model, random_weights, gamma)
    tag = uuid.uuid4().hex[:8]

    def drills(url: str) -> dict[str, Any]:
        done: list[Conversation] = []
        for framework in frameworks:
            for number, (line, question) in enumerate(picked):
                for mode in MODES:
                    [conversation] = RUNNERS[framework](url, [question], mode=mode, max_tokens=max_tokens,
                                                        namespace=f"bench-{framework}-{mode}-{tag}",
                                                        model=config.model_name)
                    conversation.warmup = number < warmup
                    done.append(conversation)
                reasons = " ".join(t["reason"] for t in done[-1].turns)
                progress(f"[agents] {framework} question {number + 1}/{len(picked)} (line {line})"
                         f"{' warm-up' if number < warmup else ''}: off {done[-2].wall_s:.1f} s, "
                         f"on {done[-1].wall_s:.1f} s [{reasons}]")
        return {"conversations": done}

    conversations = run_with_app(config, drills, num_cpus=num_cpus)["conversations"]
    progress("[agents] dense prefill of every reused prompt, in process")
    fidelity(build_engine(model, random_weights=random_weights), [c for c in conversations if not c.warmup])
    return {"setting": {"frameworks": list(frameworks), "questions": questions, "warmup": warmup, "data": data,
                        "skip": skip, "seed": seed, "max_tokens": max_tokens, "model": model,
                        "gamma": config.cluster.kvcomm.gamma,
                        "lines": [line for line, _ in picked]},
            "summary": summarize(conversations),
            "conversations": [{**vars(c), "turns": [{k: v for k, v in t.items() if k != "first_logprobs"}
                                                    for t in c.turns]} for c in conversations]}


def markdown_table(report: dict[str, Any]) -> str:
    lines = ["| framework | agent | prompt tokens | TTFT reuse off (ms) | TTFT reuse on (ms) | speedup | reuse rate "
             "| reused tokens | first-token agreement | KL (reused) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for framework, summary in report["summary"].items():
        for row in summary["agents"]:
            agreement = "-" if row["agreement"] is None else f"{row['agreement']:.0%}"
            kl = "-" if row["kl_mean"] is None else f"{row['kl_mean']:.3f}"
            lines.append(f"| {framework} | {row['agent']} | {row['prompt_tokens_dense']:.0f} | "
                         f"{row['ttft_ms_dense']:.0f} | {row['ttft_ms_kvcomm']:.0f} | {row['speedup']:.2f}x | "
                         f"{row['reuse_rate']:.0%} | {row['cached_share']:.0%} | {agreement} | {kl} |")
    lines.append("")
    for framework, summary in report["summary"].items():
        wall = summary["wall_s"]
        lines.append(f"{framework}: {summary['questions']} questions; wall time per conversation {wall['dense']:.1f} s "
                     f"off, {wall['kvcomm']:.1f} s on; reuse rate {summary['reuse_rate']:.0%}")
    return "\n".join(lines)


def plot(report: dict[str, Any], png_path: str) -> str:
    """TTFT per agent position, reuse off against on, one panel per framework."""
    from matplotlib.figure import Figure   # no pyplot: no global backend state

    summaries = report["summary"]
    fig = Figure(figsize=(4.2 * len(summaries), 3.6), layout="constrained")
    axes = fig.subplots(1, len(summaries), squeeze=False)[0]
    for ax, (framework, summary) in zip(axes, summaries.items()):
        rows = summary["agents"]
        xs = range(len(rows))
        off = [r["ttft_ms_dense"] for r in rows]
        on = [r["ttft_ms_kvcomm"] for r in rows]
        ax.bar([x - 0.2 for x in xs], off, 0.4, label="reuse off (dense)", color="#999999")
        ax.bar([x + 0.2 for x in xs], on, 0.4, label="reuse on (kvcomm)", color="#1f77b4")
        for x, row in zip(xs, rows):
            agree = "" if row["agreement"] is None else f"\nagree {row['agreement']:.0%}"
            ax.annotate(f"{row['speedup']:.1f}x\nreuse {row['reuse_rate']:.0%}{agree}",
                        (x + 0.2, row["ttft_ms_kvcomm"]), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs), [f"agent {r['agent']}" for r in rows])
        ax.set_ylabel("TTFT (ms, median)")
        ax.set_title(f"{framework}: {summary['questions']} GSM8K questions")
        ax.legend(fontsize=8, loc="upper left")
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=120)
    return png_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--framework", default=",".join(FRAMEWORKS),
                        help=f"comma list of {', '.join(RUNNERS)} (default: {','.join(FRAMEWORKS)})")
    parser.add_argument("--questions", type=int, default=8, help="measured GSM8K questions per framework")
    parser.add_argument("--warmup", type=int, default=2, help="questions before them that teach the pool, not counted")
    parser.add_argument("--data", default=DEFAULT_DATA, help="GSM8K jsonl (a 'question' per line)")
    parser.add_argument("--skip", type=int, default=0, help="start this far into the seeded shuffle of the data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=32, help="each agent's answer budget")
    add_model_args(parser, local=False)
    parser.add_argument("--gamma", type=float, default=None, help="the entropy gate's gamma (default: the config's)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster")
    parser.add_argument("--plot", default=None, help="write the TTFT plot here (e.g. docs/img/agents.png)")
    parser.add_argument("--json", default=None)


def cli_main(args: argparse.Namespace) -> int:
    from kvcomm.bench import write_json_report
    report = run(frameworks=[f.strip() for f in args.framework.split(",") if f.strip()], questions=args.questions,
                 warmup=args.warmup, data=args.data, skip=args.skip, seed=args.seed, max_tokens=args.max_tokens,
                 model=args.model, random_weights=args.random_weights, gamma=args.gamma, num_cpus=args.num_cpus)
    print(markdown_table(report))
    if args.plot:
        print(f"wrote {plot(report, args.plot)}", file=sys.stderr)
    write_json_report(args.json, report)
    return 0


__all__ = ["ChatLog", "Conversation", "run", "run_autogen", "run_langgraph", "summarize", "turn_of",
           "markdown_table", "plot"]
