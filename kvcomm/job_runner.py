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
from typing import Any, Callable, Mapping, Sequence

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
    predicted_kl: float | None = None   # the turn gate's forecast for a kvcomm/hybrid turn it saw (engine docs)

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
    return Sampling(max_new_tokens=g.max_new_tokens, min_new_tokens=g.min_new_tokens, temperature=g.temperature,
                    top_p=g.top_p, seed=g.seed, stop_token_ids=engine.stop_token_ids, stop_strings=g.stop)


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

    def resolve(self, turn: Turn, name: str) -> SharedContent:
        return resolve_placeholder(name, turn, self.user_input, self.responses, self.conditions)

    def add_response(self, turn: Turn, agent: AgentSpec, result: TurnResult) -> None:
        response, condition = share_turn_output(self.engine, self.job.namespace, agent, result,
                                                self.consumed_names, self.txn)
        self.responses[(turn.agent_id, turn.round)] = response
        if condition is not None:
            self.conditions[(turn.agent_id, turn.round)] = condition

    def commit(self) -> None:
        if self.txn is not None:
            self.engine.pool.commit(self.txn)

    def abort(self) -> None:
        if self.txn is not None:
            self.engine.pool.abort(self.txn)


def resolve_placeholder(name: str, turn: Turn, user_input: Any, responses: Mapping[tuple[str, int], Any],
                        conditions: Mapping[tuple[str, int], Any]) -> Any:
    """What placeholder `name` of `turn` reads: the user input, or an agent's latest response (or condition) of
    this round ("_current") or of an earlier round ("_history"); `responses`/`conditions`: (agent, round) -> it."""
    if name == "user_question":
        return user_input
    kind, owner, when = name.split("_")
    store = responses if kind == "agent" else conditions
    latest_round = turn.round if when == "current" else turn.round - 1
    rounds = [r for (a, r) in store if a == owner and r <= latest_round]
    if not rounds:
        raise KeyError(f"placeholder {{{name}}}: agent {owner!r} has produced nothing yet")
    return store[(owner, max(rounds))]


def share_turn_output(engine: KVCommEngine, namespace: str, agent: AgentSpec, result: TurnResult,
                      consumed_names: set[str] | frozenset[str], txn: Any) -> tuple[SharedContent, SharedContent | None]:
    """A finished turn's response (and, for a programming agent, its code's output) as shared contents, each
    offered to the entropy gate under every placeholder name downstream agents read it by."""
    response = result.response or SharedContent("response", (), base=engine.make_input(()).base)
    for when in ("current", "history"):
        name = f"agent_{agent.id}_{when}"
        if name in consumed_names:
            engine.offer_content(namespace, name, response, txn)
    condition = None
    if agent.condition == "python":
        outcome = run_python(extract_code(result.text))
        text = outcome.stdout if outcome.ok else f"error: {outcome.error}"
        condition = engine.make_input(text.strip()[:2000], kind="condition")
        for when in ("current", "history"):
            name = f"condition_{agent.id}_{when}"
            if name in consumed_names:
                engine.offer_content(namespace, name, condition, txn)
    return response, condition


def turn_record(turn: Turn, agent: AgentSpec, result: TurnResult, keep_logits: bool = False) -> TurnRecord:
    """What the job result keeps of one turn."""
    return TurnRecord(agent_id=turn.agent_id, round=turn.round, role=agent.role, text=result.text,
                      token_ids=result.token_ids, ttft_s=result.ttft_s, total_s=result.total_s,
                      reused=result.reused, reason=result.reason, prompt_tokens=len(result.prompt_ids),
                      recomputed_tokens=result.recomputed_tokens, timings=result.timings,
                      first_logits=result.first_logits if keep_logits else None, predicted_kl=result.predicted_kl)


def turn_request(job: JobSpec, turn: Turn, mode: str, contents: Mapping[str, SharedContent], engine: Any,
                 txn: Any) -> TurnRequest:
    """The engine request for `turn` of `job`, its placeholders filled from `contents` (name -> content)."""
    agent = job.agent(turn.agent_id)
    return TurnRequest(agent.template_for_round(turn.round), contents, mode=mode,
                       sampling=sampling_for(agent, engine), namespace=job.namespace, transaction=txn,
                       force_dense=agent.force_dense)


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
                template = agents[turn.agent_id].template_for_round(turn.round)
                filled = {name: contents.resolve(turn, name) for name in template.placeholders()}
                requests.append(turn_request(job, turn, mode, filled, engine, contents.txn))
            for turn, result in zip(level, engine.run_turns(requests)):
                agent = agents[turn.agent_id]
                contents.add_response(turn, agent, result)
                record = turn_record(turn, agent, result, keep_logits)
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


def run_jobs(engine: KVCommEngine, jobs: Sequence[JobSpec], *, mode: str | None = None, keep_logits: bool = False,
             on_result: Callable[[int, Turn, TurnResult], None] | None = None,
             before_commit: Callable[[list[JobContents]], None] | None = None) -> list[JobResult]:
    """Run several jobs together on one engine: level l of every job (each job's own level l) is prepared turn by
    turn and decoded in ONE `engine.run_turns` batch, which is far cheaper per token than job after job.

    Each job keeps its own `JobContents` (and pool transaction, in kvcomm/hybrid modes), exactly as in `run_job`;
    jobs with fewer levels drop out of later batches. `on_result(job_index, turn, result)` sees each raw
    `TurnResult` (prompt ids, first logits, finish reason). The transactions commit after the last level, after
    `before_commit(contents)` (one `JobContents` per job, nothing committed yet) when given; on an error every one
    is aborted. The jobs of one call never see each other's anchors (like concurrent jobs on a cluster), so in
    kvcomm/hybrid modes the gate can decide differently than when the jobs run one by one; in the other modes each
    turn equals `run_job`'s up to batched-decode numerics. A result's `wall_s` is the whole call's wall time."""
    started = time.perf_counter()
    modes = [mode or job.mode for job in jobs]
    contents: list[JobContents] = []
    records: list[list[TurnRecord]] = [[] for _ in jobs]
    try:
        for job, job_mode in zip(jobs, modes):
            contents.append(JobContents(engine, job, job_mode))
        levels = [job.turn_levels() for job in jobs]
        for depth in range(max((len(lv) for lv in levels), default=0)):
            batch: list[tuple[int, Turn]] = []
            requests: list[TurnRequest] = []
            for index, job in enumerate(jobs):
                if depth >= len(levels[index]):
                    continue
                for turn in levels[index][depth]:
                    template = job.agent(turn.agent_id).template_for_round(turn.round)
                    filled = {name: contents[index].resolve(turn, name) for name in template.placeholders()}
                    requests.append(turn_request(job, turn, modes[index], filled, engine, contents[index].txn))
                    batch.append((index, turn))
            for (index, turn), result in zip(batch, engine.run_turns(requests)):
                agent = jobs[index].agent(turn.agent_id)
                contents[index].add_response(turn, agent, result)
                records[index].append(turn_record(turn, agent, result, keep_logits))
                if on_result is not None:
                    on_result(index, turn, result)
        if before_commit is not None:
            before_commit(contents)
    except BaseException:
        for job_contents in contents:
            job_contents.abort()
        raise
    for job_contents in contents:
        job_contents.commit()
    wall = time.perf_counter() - started
    return [JobResult(job.id, job_mode, recs, recs[-1].text if recs else "", wall, job.namespace,
                      dict(job.metadata or {})) for job, job_mode, recs in zip(jobs, modes, records)]
