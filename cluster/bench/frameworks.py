"""Agent frameworks, unmodified, as clients of the Serve app's OpenAI chat API: what each one sends, recorded.

* `ChatLog`: httpx hooks that keep each chat completion a framework sends, with the response's ``kvcomm`` details
  (the server's TTFT, reuse decision, prompt and completion token ids, first-token log-probabilities).
* `run_autogen` / `run_langgraph` / `run_openai_agents` / `run_crewai` (`RUNNERS`): one conversation per question
  through three agents (Math Solver, Mathematical Analyst and Inspector of `kvcomm.harness.roles.MATH`) of a
  framework used as its users use it, pointed at the server's base URL: AutoGen's `RoundRobinGroupChat` of
  `AssistantAgent`s on `OpenAIChatCompletionClient`, a LangGraph graph of three nodes that call `langchain-openai`'s
  `ChatOpenAI` on the shared messages, three OpenAI Agents SDK `Agent`s run in turn on the conversation so far, and
  a CrewAI `Crew` of three `Agent`s with a `Task` each, run sequentially (each task reads the earlier tasks' outputs
  as its context). The serving mode and namespace ride in ``extra_body={"kvcomm": ...}``, the one thing the
  frameworks are told.

`kvcomm bench agents` (`cluster.bench.agents`) and tests/http/test_frameworks.py drive them.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

NEEDS = {"autogen": "autogen_agentchat", "langgraph": "langgraph", "openai-agents": "agents",
         "crewai": "crewai"}   # their modules
AUTOGEN_MODEL_INFO = {"vision": False, "function_calling": False, "json_output": False, "family": "unknown",
                      "structured_output": False}   # AutoGen needs it for a model name OpenAI does not know


def math_agents() -> list[tuple[str, str]]:
    """(name, system prompt) of the three agents: Math Solver, Mathematical Analyst, Inspector."""
    from kvcomm.harness.roles import MATH
    roles = [r for r in MATH.roles if r.condition is None][:3]   # no code runs in a framework: skip the programmer
    return [(role.name.split()[-1].lower(), role.system_prompt) for role in roles]


def need(module: str) -> None:
    """Fail with the install command when a framework's module is missing."""
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

    def keep(self, sent: Any, response: Any) -> None:
        """Keep one chat completion: the httpx request sent and its response, read."""
        if not sent.url.path.endswith("/chat/completions"):
            return
        if response.status_code != 200:
            raise RuntimeError(f"chat completion failed: {response.status_code} {response.text[:300]}")
        request = json.loads(sent.content)
        streamed = response.headers.get("content-type", "").startswith("text/event-stream")
        self.turns.append(turn_of(request, merge_stream(response.text) if streamed else response.json()))

    def client(self, timeout: float = 600.0) -> Any:
        import httpx

        def hook(response: Any) -> None:
            response.read()            # the client reads the body again from memory
            self.keep(response.request, response)
        return httpx.Client(timeout=timeout, event_hooks={"response": [hook]})

    def async_client(self, timeout: float = 600.0) -> Any:
        import httpx

        async def hook(response: Any) -> None:
            await response.aread()
            self.keep(response.request, response)
        return httpx.AsyncClient(timeout=timeout, event_hooks={"response": [hook]})

    def take(self) -> list[dict[str, Any]]:
        turns, self.turns = self.turns, []
        return turns


def _options(mode: str, namespace: str) -> dict[str, Any]:
    return {"kvcomm": {"mode": mode, "namespace": namespace, "details": True}}


def run_autogen(base_url: str, questions: Sequence[str], *, mode: str, namespace: str, max_tokens: int,
                model: str, api_key: str = "unused") -> list[Conversation]:
    """Each question through a fresh AutoGen `RoundRobinGroupChat` of three `AssistantAgent`s (one message each)."""
    need(NEEDS["autogen"])
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
    need(NEEDS["langgraph"])
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
    need(NEEDS["openai-agents"])
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


@contextlib.contextmanager
def crewai_telemetry_off() -> Any:
    """CrewAI's anonymous telemetry (spans exported to CrewAI's servers) off while the block runs, through its
    documented switch, the ``CREWAI_DISABLE_TELEMETRY`` environment variable (read when CrewAI's telemetry starts
    and at every event), put back as it was afterwards. Not ``OTEL_SDK_DISABLED``: that would silence every
    OpenTelemetry user in the process."""
    before = os.environ.get("CREWAI_DISABLE_TELEMETRY")
    os.environ["CREWAI_DISABLE_TELEMETRY"] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CREWAI_DISABLE_TELEMETRY", None)
        else:
            os.environ["CREWAI_DISABLE_TELEMETRY"] = before


def run_crewai(base_url: str, questions: Sequence[str], *, mode: str, namespace: str, max_tokens: int,
               model: str, api_key: str = "unused") -> list[Conversation]:
    """Each question through one CrewAI `Crew` of three `Agent`s (role, goal, the system prompt as backstory) with
    a `Task` each, `Process.sequential`, every task taking the earlier tasks as its context (CrewAI writes their
    outputs into the task's user message), kicked off once per question (``inputs={"question": ...}``). The `LLM` is
    CrewAI's native OpenAI provider on an OpenAI-compatible server (``custom_openai``); its HTTP traffic reaches
    `ChatLog` through CrewAI's transport hook (an ``interceptor``: CrewAI builds both a sync and an async OpenAI
    client from one ``client_params``, so it cannot take an httpx client). Tracing is off (``tracing=False``), and
    so is telemetry while the crews run (`crewai_telemetry_off`)."""
    need(NEEDS["crewai"])
    log = ChatLog()
    with crewai_telemetry_off():
        from crewai import LLM, Agent, Crew, Process, Task
        from crewai.llms.hooks import BaseInterceptor

        class Recorder(BaseInterceptor):
            """Hands each request and its response (read here, in the transport) to the log."""
            sent = threading.local()           # the request a thread's transport call is handling

            def on_outbound(self, message: Any) -> Any:
                self.sent.request = message
                return message

            def on_inbound(self, message: Any) -> Any:
                message.read()
                log.keep(self.sent.request, message)
                return message

        llm = LLM(model=model, custom_openai=True, base_url=f"{base_url}/v1", api_key=api_key, temperature=0,
                  max_tokens=max_tokens, extra_body=_options(mode, namespace), interceptor=Recorder())
        agents = [Agent(role=name, goal="Answer the math question correctly", backstory=system, llm=llm,
                        allow_delegation=False) for name, system in math_agents()]
        tasks: list[Any] = []
        for agent in agents:
            tasks.append(Task(description="{question}", expected_output="The answer, worked out step by step",
                              agent=agent, context=list(tasks)))
        crew = Crew(agents=agents, tasks=tasks, process=Process.sequential, tracing=False)
        out = []
        for question in questions:
            started = time.perf_counter()
            crew.kickoff(inputs={"question": question})
            out.append(Conversation("crewai", mode, question, log.take(), time.perf_counter() - started))
    return out


RUNNERS = {"autogen": run_autogen, "langgraph": run_langgraph, "openai-agents": run_openai_agents,
           "crewai": run_crewai}


__all__ = ["AUTOGEN_MODEL_INFO", "ChatLog", "Conversation", "NEEDS", "RUNNERS", "crewai_telemetry_off", "math_agents",
           "merge_stream", "need", "run_autogen", "run_crewai", "run_langgraph", "run_openai_agents", "turn_of"]
