"""The GSM8K multi-agent setting the fidelity, anchor-sweep, Pareto and calibration benchmarks share.

This module owns: the questions (a seeded order over a range of a GSM8K file's lines, so a development split and a
held-out split never meet), the fully connected math agents, each question's fixed dense responses (with their
base KV: every method then sees the very same tokens), the pool warm-up (``jobs``: `job_runner.run_job` in kvcomm
mode as production runs it; ``replay``: the fixed dense responses replayed through `engine.prepare` with the gate
applied exactly as `run_job` applies it, no decoding), one turn prepared with forced reuse plus the engine's own
gate decision traced with a scratch transaction (`kvcomm_turns`), and the metrics against dense (KL, top-1 margin,
bootstrap CI, greedy continuations). The benchmarks own what they measure with these.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch
from tqdm import tqdm

from ..base_cache import shared_prefix
from ..anchor_pool import AnchorPool
from ..config import KVCommConfig
from ..engine import KVCommEngine, PreparedPrompt, SharedContent, TurnRequest
from ..names import POOL_MODES
from ..generation import DecodeBatch, Sampling
from ..harness.datasets import DEFAULT_GSM8K_PATH
from ..model_loading import LoadedModel, load_model
from ..runner import ModelRunner, SequenceKV
from ..templates import AgentTemplate
from .cli import model_options

DEFAULT_DATA = DEFAULT_GSM8K_PATH
NAMESPACE = "fidelity-bench"
# The pool's byte bound must not evict what the count bound V keeps: the benchmarks measure V alone.
BENCH_POOL_BYTE_BUDGET = 64 << 30
WARMUP_MODES = ("jobs", "replay")
DENSE_BATCH = 12                 # turns decoded together when producing the fixed dense responses


# ------------------------------------------------------------------------------------------------------------
# Questions and agents
# ------------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One question with its fixed dense responses: every placeholder's content, as the agents will read it."""
    line: int                                   # 0-based line of the question in the data file
    question: str
    contents: dict[str, SharedContent]          # placeholder name -> content (question and every response)


def parse_lines(text: str | None) -> tuple[int, int] | None:
    """"START:END" (0-based file lines, END exclusive; either side may be empty) as a pair; None/"" -> None."""
    if not text:
        return None
    start, sep, end = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return (int(start) if start else 0, int(end) if end else 1 << 62)
    except ValueError:
        raise ValueError(f"--lines takes START:END (0-based lines of the data file, END exclusive), got {text!r}")


def load_questions(path: str, count: int, *, skip: int = 0, seed: int = 0,
                   lines: tuple[int, int] | None = None) -> list[tuple[int, str]]:
    """(line, question) pairs `skip .. skip+count` of the file's lines (only lines [start, end) of `lines` when
    given: a split) in a seeded random order. Any GSM8K-format JSONL works: one {"question": ...} per line."""
    with open(path) as handle:
        rows = [json.loads(line)["question"] for line in handle if line.strip()]
    start, end = lines if lines is not None else (0, len(rows))
    order = list(range(max(0, start), min(end, len(rows))))
    random.Random(seed).shuffle(order)
    if skip + count > len(order):
        where = f"lines {start}:{min(end, len(rows))} of {path}" if lines is not None else path
        raise ValueError(f"{where} hold {len(order)} questions; {skip} + {count} were asked for")
    return [(i, rows[i]) for i in order[skip:skip + count]]


def math_agents(num_agents: int = 3) -> list[AgentTemplate]:
    """The GSM8K agents of `kvcomm.harness.roles`, fully connected (agent k reads the question and every agent
    j < k); roles cycle through Math Solver, Mathematical Analyst and Inspector."""
    from ..harness.roles import fully_connected_math_agents
    return fully_connected_math_agents(num_agents)


def response_name(agent: AgentTemplate) -> str:
    return f"agent_{agent.agent_id}_current"


def _fresh(content: SharedContent) -> SharedContent:
    """The same content with no gate state: `offer_content` marks contents, so each job needs its own copies."""
    return replace(content, anchor_ids={}, gate_reason={})


def _empty_response(engine: KVCommEngine) -> SharedContent:
    return SharedContent("response", (), base=engine.make_input(()).base)


# ------------------------------------------------------------------------------------------------------------
# Fixed dense responses and pool warm-up
# ------------------------------------------------------------------------------------------------------------
def dense_cases(engine: KVCommEngine, agents: Sequence[AgentTemplate], questions: Sequence[tuple[int, str]],
                sampling: Sampling, *, progress: bool = True, desc: str = "dense responses") -> list[Case]:
    """Run every question's job in dense mode, agent by agent, the turns of one agent batched across questions."""
    cases = [Case(line, text, {"user_question": engine.make_input(text)}) for line, text in questions]
    bar = tqdm(total=len(cases) * len(agents), desc=desc, unit="turn", disable=not progress, file=sys.stderr)
    for agent in agents:
        for first in range(0, len(cases), DENSE_BATCH):
            chunk = cases[first:first + DENSE_BATCH]
            requests = [TurnRequest(agent, {n: c.contents[n] for n in agent.placeholders()}, mode="dense",
                                    sampling=sampling, namespace=NAMESPACE) for c in chunk]
            for case, result in zip(chunk, engine.run_turns(requests)):
                case.contents[response_name(agent)] = result.response or _empty_response(engine)
            bar.update(len(chunk))
    bar.close()
    return cases


def consumed_names(agents: Sequence[AgentTemplate]) -> set[str]:
    return {name for agent in agents for name in agent.placeholders()}


def warm_pool(engine: KVCommEngine, agents: Sequence[AgentTemplate], cases: Sequence[Case], sampling: Sampling,
              *, progress: bool = True, desc: str = "warm-up") -> dict[str, Any]:
    """Replay each case's job in kvcomm mode (one pool transaction per job, gate as in `run_job`), committing
    the anchors its dense turns record. Returns the warm-up's turn counts by engine decision."""
    consumed = consumed_names(agents)
    reasons: Counter[str] = Counter()
    for case in tqdm(cases, desc=desc, unit="job", disable=not progress, file=sys.stderr):
        txn = engine.pool.begin(NAMESPACE)
        contents = {name: _fresh(c) for name, c in case.contents.items()}
        if "user_question" in consumed:
            engine.offer_content(NAMESPACE, "user_question", contents["user_question"], txn)
        for agent in agents:
            prepared = engine.prepare(TurnRequest(agent, {n: contents[n] for n in agent.placeholders()},
                                                  mode="kvcomm", sampling=sampling, namespace=NAMESPACE,
                                                  transaction=txn))
            reasons[prepared.reason] += 1
            name = response_name(agent)
            if name in consumed:
                engine.offer_content(NAMESPACE, name, contents[name], txn)
        engine.pool.commit(txn)
    turns = sum(reasons.values())
    return {"turns": turns, "reused": reasons["reused"], "reasons": dict(reasons)}


def warm_pool_with_jobs(engine: KVCommEngine, agents: Sequence[AgentTemplate], questions: Sequence[tuple[int, str]],
                        response_tokens: int, *, progress: bool = True, desc: str = "warm-up") -> dict[str, Any]:
    """Run each warm-up question's job with `job_runner.run_job` in kvcomm mode: responses are generated (reused
    or dense, as the gate decides) and the dense turns record anchors, committed at the end of each job."""
    from ..harness.jobs import AgentSpec, GenerationParams, JobSpec
    from ..job_runner import run_job
    generation = GenerationParams(max_new_tokens=response_tokens)
    specs = tuple(AgentSpec(a.agent_id, f"agent {a.agent_id}", a.system_prompt, a.user_template, a.assistant_prefix,
                            generation) for a in agents)
    reasons: Counter[str] = Counter()
    for line, question in tqdm(questions, desc=desc, unit="job", disable=not progress, file=sys.stderr):
        job = JobSpec(id=f"warmup-{line}", task=question, agents=specs, mode="kvcomm", namespace=NAMESPACE)
        for turn in run_job(engine, job).turns:
            reasons[turn.reason] += 1
    turns = sum(reasons.values())
    return {"turns": turns, "reused": reasons["reused"], "reasons": dict(reasons)}


def pool_summary(pool: AnchorPool) -> dict[str, Any]:
    stats = pool.stats()
    lists = stats["namespaces"].get(NAMESPACE, {})
    return {"bytes": stats["total_bytes"], "evictions": stats["evictions"],
            "anchors": {ph: entry["anchors"] for ph, entry in lists.items()}}


WARMUP_DETAIL = {
    "jobs": "job_runner.run_job in kvcomm mode per warm-up question: generated responses, anchors from dense turns",
    "replay": "the warm-up questions' fixed dense responses replayed through engine.prepare in kvcomm mode, one "
              "pool transaction per job, the gate as in run_job (no decoding)"}


def warmer(dense_engine: KVCommEngine, agents: Sequence[AgentTemplate], questions: Sequence[tuple[int, str]],
           warmup_mode: str, response_tokens: int, sampling: Sampling, progress: bool
           ) -> Callable[[KVCommEngine, str], dict[str, Any]]:
    """A function warming one engine's pool on `questions` by `warmup_mode` (replay computes the fixed dense
    responses once, here, for every pool it warms)."""
    if warmup_mode == "jobs":
        return lambda engine, desc: warm_pool_with_jobs(engine, agents, questions, response_tokens,
                                                        progress=progress, desc=desc)
    cases = dense_cases(dense_engine, agents, questions, sampling, progress=progress,
                        desc="dense responses (warm-up questions)") if questions else []
    return lambda engine, desc: warm_pool(engine, agents, cases, sampling, progress=progress, desc=desc)


# ------------------------------------------------------------------------------------------------------------
# One turn with forced reuse, and the gate's own decision
# ------------------------------------------------------------------------------------------------------------
@dataclass
class PreparedTurn:
    """One method's cache for one turn, ready to decode."""
    kv: SequenceKV
    last_logits: torch.Tensor        # [vocab] fp32, the first generated token's distribution
    prepare_s: float
    offset_s: float | None = None
    recomputed: int = 0
    predicted_kl: float | None = None   # the turn gate's forecast (kvcomm and hybrid turns)


def timed_prepare(engine: KVCommEngine, request: TurnRequest, *, force_reuse: bool = False
                  ) -> tuple[PreparedPrompt, float]:
    """`engine.prepare(request)` and its wall seconds (`force_reuse`: both gates held open)."""
    started = time.perf_counter()
    prepared = engine.prepare(request, force_reuse=force_reuse)
    return prepared, time.perf_counter() - started


def as_turn(prepared: PreparedPrompt, seconds: float) -> PreparedTurn:
    has_offsets = prepared.reused and prepared.request.mode in POOL_MODES
    offset = prepared.timings.get("offset") if has_offsets else None
    predicted = None if prepared.forecast is None else prepared.forecast.predicted_kl
    return PreparedTurn(prepared.kv, prepared.last_logits[-1].float(), seconds, offset, prepared.recomputed,
                        predicted)


@dataclass
class GateTrace:
    """What a job would have done on one turn (engine decision; None when not traced), and the turn prepared
    with forced reuse."""
    reused: bool | None
    reason: str | None
    forced: PreparedTurn
    served_s: float | None = None     # what the engine's own decision took to prepare (a fallback: both attempts)


def kvcomm_turns(engine: KVCommEngine, agents: Sequence[AgentTemplate], case: Case, sampling: Sampling,
                 mode: str = "kvcomm", trace_gate: bool = True) -> list[GateTrace]:
    """Every agent's turn of `case` in `mode` (kvcomm or hybrid), prepared with forced reuse, and (with
    `trace_gate`) the engine's own decision with a scratch transaction (aborted: measured questions never change
    the pool)."""
    consumed = consumed_names(agents)
    txn = engine.pool.begin(NAMESPACE) if trace_gate else None
    gated = {name: _fresh(c) for name, c in case.contents.items()}
    if "user_question" in consumed and txn is not None:
        engine.offer_content(NAMESPACE, "user_question", gated["user_question"], txn)
    traces = []
    for agent in agents:
        names = agent.placeholders()
        reused = reason = served_s = None
        if txn is not None:      # the engine's own decision, as a job would take it
            prepared, seconds = timed_prepare(engine, TurnRequest(
                agent, {n: gated[n] for n in names}, mode=mode, sampling=sampling, namespace=NAMESPACE,
                transaction=txn))
            reused, reason, served_s = prepared.reused, prepared.reason, seconds
        if txn is None or not prepared.reused:   # sent dense (or not traced): measure the reuse path anyway
            prepared, seconds = timed_prepare(engine, TurnRequest(
                agent, {n: case.contents[n] for n in names}, mode=mode, sampling=sampling, namespace=NAMESPACE),
                force_reuse=True)
        traces.append(GateTrace(reused, reason, as_turn(prepared, seconds), served_s))
        if response_name(agent) in consumed and txn is not None:
            engine.offer_content(NAMESPACE, response_name(agent), gated[response_name(agent)], txn)
    if txn is not None:
        engine.pool.abort(txn)
    return traces


# ------------------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------------------
def kl_divergence(dense_logits: torch.Tensor, method_logits: torch.Tensor) -> float:
    """KL(dense || method) of the softmax distributions of two [vocab] logit vectors, in fp64."""
    log_p = torch.log_softmax(dense_logits.double(), dim=-1)
    log_q = torch.log_softmax(method_logits.double(), dim=-1)
    return float((log_p.exp() * (log_p - log_q)).sum().clamp_min(0.0))


def top_margin(logits: torch.Tensor) -> float:
    """Top-1 minus top-2 probability."""
    top = torch.softmax(logits.double(), dim=-1).topk(2).values
    return float(top[0] - top[1])


def bootstrap_ci(values: Sequence[float], resamples: int, seed: int) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean."""
    if not values:
        return (math.nan, math.nan)
    data = torch.tensor(values, dtype=torch.float64)                                  # [n]
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(values), (resamples, len(values)), generator=gen)      # [B, n]
    means = data[idx].mean(dim=1)                                                     # [B]
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return (lo, hi)


def greedy_continuations(runner: ModelRunner, turns: dict[str, PreparedTurn], sampling: Sampling
                         ) -> dict[str, list[int]]:
    """Decode every method's cache greedily, all in one batch."""
    batch = DecodeBatch(runner, max_batch_size=len(turns))
    states = {name: batch.add(t.kv, t.last_logits, sampling) for name, t in turns.items()}
    batch.run_until_done()
    return {name: list(state.tokens) for name, state in states.items()}


def matching_prefix(candidate: Sequence[int], reference: Sequence[int], budget: int) -> int:
    """Leading tokens in common; an identical sequence (both stopped at the same token) counts as `budget`."""
    return budget if list(candidate) == list(reference) else shared_prefix(candidate, reference)


# ------------------------------------------------------------------------------------------------------------
# Models, engines and command lines
# ------------------------------------------------------------------------------------------------------------
def engine_for(runner: ModelRunner, tokenizer: Any, config: KVCommConfig) -> KVCommEngine:
    return KVCommEngine(runner, tokenizer, config, AnchorPool(config, runner.rope))


def load_checked(model: str, device: str, dtype: str | None, random_weights: bool,
                 loaded: LoadedModel | None) -> LoadedModel:
    loaded = loaded or load_model(model, device=device, dtype=dtype, random_weights=random_weights)
    if loaded.tokenizer is None:
        raise ValueError(f"{model}: no tokenizer; agent templates need one")
    return loaded


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def model_arguments(parser: argparse.ArgumentParser, defaults: Any) -> None:
    """The options every GSM8K benchmark shares; `defaults` (the benchmark's setting) gives questions, warm-up,
    agents, token budgets and seed their defaults."""
    model_options(parser)
    parser.add_argument("--questions", type=int, default=defaults.questions, help="measured questions")
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="warm-up questions (disjoint)")
    parser.add_argument("--warmup-mode", choices=WARMUP_MODES, default=defaults.warmup_mode)
    parser.add_argument("--agents", type=int, default=defaults.agents)
    parser.add_argument("--response-tokens", type=int, default=defaults.response_tokens)
    parser.add_argument("--continuation-tokens", type=int, default=defaults.continuation_tokens)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--data", default=DEFAULT_DATA, help="any GSM8K-format JSONL ({\"question\": ...} per line)")
    parser.add_argument("--lines", default=None, metavar="START:END",
                        help="draw every question (measured and warm-up) from these 0-based lines of --data only "
                             "(END exclusive): a split, e.g. 0:500 to tune, 500:1000 held out")
    parser.add_argument("--json", default=None, help="write the report here")
    parser.add_argument("--plot", default=None, help="write a PNG here")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
