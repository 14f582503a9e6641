"""Runs multi-agent jobs on one in-process engine, and owns the level loop that every job runner shares.

`JobLevels` is that loop: a job's turns level by level, each turn's placeholders filled from what the job's
earlier turns produced. It knows nothing of engines or clusters, so the in-process oracle (`run_job`,
`run_jobs`, here) and the cluster's driver (`cluster.driver.DagJob`, whose turns run on worker actors or Serve
replicas) iterate the very same object and differ only in how they execute a level.

In process, `JobContents` adds the engine's side: the user input's base KV is computed once, every response
becomes shared content for the agents downstream, a programming agent's code runs in a sandbox and its output
becomes a condition, and in kvcomm/hybrid modes every new content passes the entropy gate and all pool updates
of the job are staged in one transaction committed at the end.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Generic, Iterator, Mapping, Sequence, TypeVar

from .engine import KVCommEngine, SharedContent, TurnRequest, TurnResult
from .generation import Sampling
from .sampling import turn_seed
from .harness.jobs import AgentSpec, JobSpec, Turn
from .harness.sandbox import run_python
from .harness.scoring import extract_code
from .names import POOL_MODES



@dataclass(frozen=True)
class TurnRecord:
    """What a job result keeps of one finished turn; the record every runner (in process, cluster, HTTP) passes
    on. `to_dict` is its wire form (job results, HTTP turn events); `worker` appears there only when set."""
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
    worker: str | None = None           # the cluster worker that ran it (None in one process)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("first_logits")
        if self.worker is None:
            d.pop("worker")
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


def sampling_for(agent: AgentSpec, round_index: int, engine: KVCommEngine) -> Sampling:
    """How `agent` samples in round `round_index`: its generation parameters, its seed or one derived from the
    agent and the round (`turn_seed`)."""
    return Sampling.of(agent.generation, engine.stop_token_ids, turn_seed(agent.id, round_index))


C = TypeVar("C")   # how a runner holds a shared content: `SharedContent` in process, a handle on a cluster


@dataclass(frozen=True)
class TurnInputs(Generic[C]):
    """One turn ready to run: its agent and its placeholders' contents (placeholder name -> content)."""
    turn: Turn
    agent: AgentSpec
    contents: dict[str, C]


class JobLevels(Generic[C]):
    """The level loop every job runner drives: iterate it for the job's levels (each a list of `TurnInputs`
    whose turns are independent of each other), run a level however the runner runs turns, and report each turn
    with `done` before asking for the next level. `records` holds what `done` was given, in turn order."""

    def __init__(self, job: JobSpec, user_input: C | None):
        self.job = job
        self.user_input = user_input
        self.responses: dict[tuple[str, int], C] = {}     # (agent, round) -> its response
        self.conditions: dict[tuple[str, int], C] = {}    # (agent, round) -> its code's output
        self.records: list[Any] = []

    @property
    def consumed_names(self) -> frozenset[str]:
        """Every placeholder some agent of the job reads."""
        return consumed_names(self.job)

    def __iter__(self) -> Iterator[list[TurnInputs[C]]]:
        for level in self.job.turn_levels():
            inputs = [self._inputs(turn) for turn in level]
            yield inputs
            missing = [f"{t.agent_id}/{t.round}" for t in level if (t.agent_id, t.round) not in self.responses]
            if missing:
                raise RuntimeError(f"job {self.job.id}: turns {', '.join(missing)} were not reported done")

    def _inputs(self, turn: Turn) -> TurnInputs[C]:
        agent = self.job.agent(turn.agent_id)
        names = agent.template_for_round(turn.round).placeholders()
        return TurnInputs(turn, agent, {name: self.resolve(turn, name) for name in names})

    def resolve(self, turn: Turn, name: str) -> C:
        return resolve_placeholder(name, turn, self.user_input, self.responses, self.conditions)

    def done(self, turn: Turn, response: C, condition: C | None, record: Any) -> None:
        key = (turn.agent_id, turn.round)
        self.responses[key] = response
        if condition is not None:
            self.conditions[key] = condition
        self.records.append(record)


def consumed_names(job: JobSpec) -> frozenset[str]:
    """Every placeholder some agent of `job` reads (a content nobody reads is never offered to the gate)."""
    return frozenset(name for a in job.agents for name in job.placeholders_of(a.id))


class JobContents(JobLevels[SharedContent]):
    """A job's levels on one in-process engine: who said what, as shared contents offered to the gate."""

    def __init__(self, engine: KVCommEngine, job: JobSpec, mode: str):
        self.engine, self.mode = engine, mode
        self.txn = engine.pool.begin(job.namespace) if mode in POOL_MODES else None
        user_input = engine.make_input(job.task) if "user_question" in consumed_names(job) else None
        super().__init__(job, user_input)
        if user_input is not None:
            engine.offer_content(job.namespace, "user_question", user_input, self.txn)

    def add_response(self, turn: Turn, agent: AgentSpec, result: TurnResult, record: Any = None) -> None:
        response, condition = share_turn_output(self.engine, self.job.namespace, agent, result,
                                                self.consumed_names, self.txn)
        self.done(turn, response, condition, record)

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
    condition = None
    if agent.condition == "python":
        outcome = run_python(extract_code(result.text))
        text = outcome.stdout if outcome.ok else f"error: {outcome.error}"
        condition = engine.make_input(text.strip()[:2000], kind="condition")
    offer_turn_output(engine, namespace, agent.id, response, condition, consumed_names, txn)
    return response, condition


def offer_turn_output(engine: KVCommEngine, namespace: str, agent_id: str, response: SharedContent,
                      condition: SharedContent | None, consumed_names: set[str] | frozenset[str], txn: Any) -> None:
    """Offer a turn's response (then its condition, if any) to the entropy gate under every placeholder name
    downstream agents read it by (``agent_<id>_current/_history``, ``condition_<id>_current/_history``)."""
    for kind, content in (("agent", response), ("condition", condition)):
        if content is None:
            continue
        for when in ("current", "history"):
            name = f"{kind}_{agent_id}_{when}"
            if name in consumed_names:
                engine.offer_content(namespace, name, content, txn)


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
                       sampling=sampling_for(agent, turn.round, engine), namespace=job.namespace, transaction=txn,
                       force_dense=agent.force_dense)


def run_job(engine: KVCommEngine, job: JobSpec, *, mode: str | None = None, keep_logits: bool = False,
            on_turn: Callable[[TurnRecord], None] | None = None) -> JobResult:
    """Run every turn of `job` (in `mode`, default the job's own) and return what each agent said; `on_turn`
    sees each turn's record as it finishes."""
    on_result = None if on_turn is None else (lambda index, turn, result, record: on_turn(record))
    return run_jobs(engine, [job], mode=mode, keep_logits=keep_logits, on_result=on_result)[0]


def run_jobs(engine: KVCommEngine, jobs: Sequence[JobSpec], *, mode: str | None = None, keep_logits: bool = False,
             on_result: Callable[[int, Turn, TurnResult, TurnRecord], None] | None = None,
             before_commit: Callable[[list[JobContents]], None] | None = None) -> list[JobResult]:
    """Run several jobs together on one engine: level l of every job (each job's own level l) is prepared turn by
    turn and decoded in ONE `engine.run_turns` batch, which is far cheaper per token than job after job.

    Each job keeps its own `JobContents` (and pool transaction, in kvcomm/hybrid modes); jobs with fewer levels
    drop out of later batches. `on_result(job_index, turn, result, record)` sees each raw `TurnResult` (prompt
    ids, first logits, finish reason) and its record. The transactions commit after the last level, after
    `before_commit(contents)` (one `JobContents` per job, nothing committed yet) when given; on an error every one
    is aborted. The jobs of one call never see each other's anchors (like concurrent jobs on a cluster), so in
    kvcomm/hybrid modes the gate can decide differently than when the jobs run one by one; in the other modes each
    turn equals a one-job run's up to batched-decode numerics. A result's `wall_s` is the whole call's wall time."""
    started = time.perf_counter()
    modes = [mode or job.mode for job in jobs]
    contents: list[JobContents] = []
    try:
        for job, job_mode in zip(jobs, modes):
            contents.append(JobContents(engine, job, job_mode))
        running = {index: iter(job_contents) for index, job_contents in enumerate(contents)}
        while running:
            batch: list[tuple[int, TurnInputs[SharedContent]]] = []
            for index, levels in list(running.items()):
                level = next(levels, None)
                if level is None:
                    del running[index]
                    continue
                batch.extend((index, inputs) for inputs in level)
            requests = [turn_request(jobs[index], inputs.turn, modes[index], inputs.contents, engine,
                                     contents[index].txn) for index, inputs in batch]
            for (index, inputs), result in zip(batch, engine.run_turns(requests) if requests else []):
                record = turn_record(inputs.turn, inputs.agent, result, keep_logits)
                contents[index].add_response(inputs.turn, inputs.agent, result, record)
                if on_result is not None:
                    on_result(index, inputs.turn, result, record)
        if before_commit is not None:
            before_commit(contents)
    except BaseException:
        for job_contents in contents:
            job_contents.abort()
        raise
    for job_contents in contents:
        job_contents.commit()
    wall = time.perf_counter() - started
    return [JobResult(job.id, job_mode, c.records, c.records[-1].text if c.records else "", wall, job.namespace,
                      dict(job.metadata or {})) for job, job_mode, c in zip(jobs, modes, contents)]
