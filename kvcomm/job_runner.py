"""Runs a multi-agent job on one in-process engine: the DAG's turns level by level, shared contents wired in.

This is the single-process oracle that the Ray job runner (`cluster.job_runner`) must agree with. It turns
a `JobSpec` into engine turns: the user input's base KV is computed once, every response becomes shared
content for the agents downstream, a programming agent's code runs in a sandbox and its output becomes a
condition, and in kvcomm/hybrid modes every new content passes the entropy gate and all pool updates of the
job are staged in one transaction committed at the end.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from .engine import KVCommEngine, SharedContent, TurnRequest, TurnResult
from .generation import Sampling
from .harness.jobs import AgentSpec, JobSpec, Turn
from .harness.sandbox import run_python
from .harness.scoring import extract_code

POOL_MODES = ("kvcomm", "hybrid")


@dataclass
class TurnRecord:
    agent_id: str
    round: int
    role: str
    text: str
    token_ids: list[int]
    ttft_s: float
    total_s: float
    reused: bool
    reason: str
    prompt_tokens: int
    recomputed_tokens: int
    timings: dict[str, float]
    first_logits: Any = field(default=None, repr=False)   # [vocab] fp32 tensor when kept

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("first_logits")
        return d


@dataclass
class JobResult:
    job_id: str
    mode: str
    turns: list[TurnRecord]
    final_answer: str
    wall_s: float
    namespace: str = "default"
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def reuse_rate(self) -> float:
        """Turns that skipped prefill entirely / all turns (the paper's definition)."""
        return sum(t.reused for t in self.turns) / len(self.turns) if self.turns else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "mode": self.mode, "namespace": self.namespace,
                "final_answer": self.final_answer, "reuse_rate": self.reuse_rate, "wall_s": self.wall_s,
                "metadata": self.metadata, "turns": [t.to_dict() for t in self.turns]}


def sampling_for(agent: AgentSpec, engine: KVCommEngine) -> Sampling:
    g = agent.generation
    stop = set(engine.spec.eos_token_ids)
    eos = getattr(engine.tokenizer, "eos_token_id", None)
    if eos is not None:
        stop.add(int(eos))
    return Sampling(max_new_tokens=g.max_new_tokens, min_new_tokens=g.min_new_tokens, temperature=g.temperature,
                    top_p=g.top_p, seed=g.seed, stop_token_ids=tuple(sorted(stop)))


class JobContents:
    """Who said what: the job's input, every turn's response and every condition, as shared contents."""

    def __init__(self, engine: KVCommEngine, job: JobSpec, mode: str):
        self.engine, self.job, self.mode = engine, job, mode
        self.txn = engine.pool.begin(job.namespace) if mode in POOL_MODES else None
        self.responses: dict[tuple[str, int], SharedContent] = {}
        self.conditions: dict[tuple[str, int], SharedContent] = {}
        self.consumed_names = {name for a in job.agents for name in job.placeholders_of(a.id)}
        self.user_input = engine.make_input(job.task) if "user_question" in self.consumed_names else None
        if self.user_input is not None:
            engine.offer_content(job.namespace, "user_question", self.user_input, self.txn)

    def _latest(self, store: dict[tuple[str, int], SharedContent], agent_id: str, before_round: int,
                name: str) -> SharedContent:
        rounds = [r for (a, r) in store if a == agent_id and r <= before_round]
        if not rounds:
            raise KeyError(f"placeholder {{{name}}}: agent {agent_id!r} has produced nothing yet")
        return store[(agent_id, max(rounds))]

    def resolve(self, turn: Turn, name: str) -> SharedContent:
        if name == "user_question":
            return self.user_input
        kind, owner, when = name.split("_")
        store = self.responses if kind == "agent" else self.conditions
        latest_round = turn.round if when == "current" else turn.round - 1
        return self._latest(store, owner, latest_round, name)

    def add_response(self, turn: Turn, agent: AgentSpec, result: TurnResult) -> None:
        content = result.response or SharedContent("response", (), base=self.engine.make_input(()).base)
        self.responses[(turn.agent_id, turn.round)] = content
        for when in ("current", "history"):
            name = f"agent_{turn.agent_id}_{when}"
            if name in self.consumed_names:
                self.engine.offer_content(self.job.namespace, name, content, self.txn)
        if agent.condition == "python":
            outcome = run_python(extract_code(result.text))
            text = outcome.stdout if outcome.ok else f"error: {outcome.error}"
            condition = self.engine.make_input(text.strip()[:2000], kind="condition")
            self.conditions[(turn.agent_id, turn.round)] = condition
            for when in ("current", "history"):
                name = f"condition_{turn.agent_id}_{when}"
                if name in self.consumed_names:
                    self.engine.offer_content(self.job.namespace, name, condition, self.txn)

    def commit(self) -> None:
        if self.txn is not None:
            self.engine.pool.commit(self.txn)

    def abort(self) -> None:
        if self.txn is not None:
            self.engine.pool.abort(self.txn)


def run_job(engine: KVCommEngine, job: JobSpec, *, mode: str | None = None, keep_logits: bool = False,
            on_turn: Callable[[TurnRecord], None] | None = None) -> JobResult:
    """Run every turn of `job` (in `mode`, default the job's own) and return what each agent said."""
    mode = mode or job.mode
    started = time.perf_counter()
    agents = {a.id: a for a in job.agents}
    contents = JobContents(engine, job, mode)
    records: list[TurnRecord] = []
    try:
        for level in job.turn_levels():
            requests = []
            for turn in level:
                agent = agents[turn.agent_id]
                template = agent.template_for_round(turn.round)
                placeholders = {name: contents.resolve(turn, name) for name in template.placeholders()}
                requests.append(TurnRequest(template, placeholders, mode=mode, sampling=sampling_for(agent, engine),
                                            namespace=job.namespace, transaction=contents.txn))
            for turn, result in zip(level, engine.run_turns(requests)):
                agent = agents[turn.agent_id]
                contents.add_response(turn, agent, result)
                record = TurnRecord(agent_id=turn.agent_id, round=turn.round, role=agent.role, text=result.text,
                                    token_ids=result.token_ids, ttft_s=result.ttft_s, total_s=result.total_s,
                                    reused=result.reused, reason=result.reason,
                                    prompt_tokens=len(result.prompt_ids), recomputed_tokens=result.recomputed_tokens,
                                    timings=result.timings, first_logits=result.first_logits if keep_logits else None)
                records.append(record)
                if on_turn is not None:
                    on_turn(record)
    except BaseException:
        contents.abort()
        raise
    contents.commit()
    final = records[-1].text if records else ""
    return JobResult(job.id, mode, records, final, time.perf_counter() - started, job.namespace,
                     dict(job.metadata or {}))
