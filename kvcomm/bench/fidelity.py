"""`kvcomm bench fidelity` and `kvcomm bench anchors`: how close each reuse method's cache is to dense prefill.

This module owns the fidelity benchmark (issue #3): the 3-agent GSM8K setting, the fixed upstream texts, the pool
warm-up, the per-turn comparison of every method against dense prefill of the identical tokens, the report
(a JSON-able dict), its markdown table and plot, and the anchor-count sweep (`sweep_anchors`) with its own table
and plot. It owns no algorithm: every method is the engine's own code path, except "naive-other" and the two
diagnostic splices, which exist only here (see below). Command-line entry points: `add_arguments`/`cli_main` and
`add_sweep_arguments`/`sweep_cli_main`, also runnable as ``python -m kvcomm.bench.fidelity {fidelity,anchors}``.

The setting (like ``shared/reference/fidelity-probe.md``): N agents (default 3: Math Solver, Mathematical
Analyst, Inspector from `kvcomm.harness.roles`), fully connected: agent k reads the question and every agent
j < k's response. Questions come from the GSM8K file in a seeded order: the first `questions` are measured, the
next `warmup` warm the pools (disjoint by construction, so the sweep's longer warm-up never overlaps them either).

Fixed upstream texts. Every question's job runs once in dense mode (greedy, level by level, batched across
questions); its responses, with their base KV (the producer's own KV, de-rotated to position 0), become the
shared contents. Every method of every turn then sees the very same token sequence.

Warm-up. Each KVCOMM pool (reference and corrected) is warmed on the same warm-up questions, one of two ways:

* ``warmup_mode="jobs"`` (the default of `run`): every warm-up question's job runs through
  `job_runner.run_job` in kvcomm mode, as production would: the gate decides, dense turns record anchors, the
  job's transaction commits at its end; responses are generated, so each pool sees its own responses.
* ``"replay"`` (the default of `sweep_anchors`): the warm-up questions' fixed dense responses are replayed through
  ``engine.prepare`` in kvcomm mode with one pool transaction per job and the gate applied exactly as `run_job`
  applies it, without decoding. Every pool is then warmed on identical tokens, and one dense pass serves every
  pool, which is what makes a five-point sweep affordable on a CPU.

Methods, each against dense prefill ("oracle") of the identical prompt, at the first decode position:

==================  =================================================================================
dense               a second dense prefill (checks the measurement: KL 0, full agreement)
base-only           engine "naive" mode, reference config: every placeholder's base KV and every fixed
                    segment re-rotated to its positions, no offsets, the last prompt token recomputed
base-only+tail      the same with the corrected config's tail policy: the last fixed segment recomputed
naive-other         each placeholder's KV as it appeared in ANOTHER agent's dense prompt (the nearest other
                    consumer, upstream first; the producer's own context when no other agent reads it),
                    re-rotated; the agent's own fixed segments; the last token recomputed
kvcomm-reference    engine kvcomm mode, `KVCommConfig.reference()`, its own warmed pool
kvcomm-corrected    engine kvcomm mode, `KVCommConfig()`, its own warmed pool
kvcomm-corrected-   the same pool and config but ``tail_policy="last_token"`` (the tail policy changes nothing
  lasttoken         in the pool or the gate): separates the tail recompute from the offset fixes
cacheblend          engine cacheblend mode, `KVCommConfig()` (15% of tokens recomputed + last segment)
hybrid              engine hybrid mode, `KVCommConfig()` (offsets + 10% recomputed + last segment)
diag-exact-         diagnostic: the placeholders' KV taken from the dense oracle itself, the template's fixed
  placeholders      segments re-rotated, the last token recomputed (what perfect placeholder offsets would give)
diag-exact-fixed    diagnostic: base placeholders, the fixed segments taken from the dense oracle, the last token
                    recomputed (what perfect fixed-segment offsets would give)
==================  =================================================================================

Forced reuse. kvcomm and hybrid turns are prepared with ``transaction=None``: `KVCommEngine._needs_dense` then
returns at once and `_reuse` runs with whatever the pool snapshot offers (a placeholder with no compatible anchor
gets no offset). The gate's own decision is traced separately, exactly as a job would take it: a scratch pool
transaction per question (aborted afterwards), contents offered to the gate as `run_job` does, each turn
prepared with it; when the engine reuses, that prepared turn is the measurement itself.

Metrics: per-layer relative K and V error ``||X_m - X_d||_F / ||X_d||_F`` over the reused span (every token after
the first fixed segment, which all methods take exactly, up to the last prompt token, which all compute) and its
placeholder (question, responses) and fixed-segment parts; first-token top-1 agreement (all turns, and turns where dense's top-1 minus
top-2 probability is at least `CONFIDENT_MARGIN`); KL(dense || method) of the next-token distribution with a
95% bootstrap CI; the greedy continuation (`continuation_tokens`, decoded together in one batch) compared with
dense's: the matching prefix length (a full match counts as the whole budget) and exact matches; the wall time of
each method's prepare and of the offset step alone.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from tqdm import tqdm

from . import write_json_report
from ..anchor_pool import AnchorPool
from ..harness.datasets import DEFAULT_GSM8K_PATH
from ..config import KVCommConfig
from ..engine import KVCommEngine, SharedContent, TurnRequest
from ..generation import DecodeBatch, Sampling
from ..kv import KVSegment, concat
from ..model_loading import LoadedModel, load_model
from ..offsets import compatible_anchors, estimate_offsets
from ..runner import ModelRunner, SequenceKV
from ..templates import AgentTemplate

if TYPE_CHECKING:
    from ..engine import _Prepared   # what `KVCommEngine.prepare` returns

DEFAULT_DATA = DEFAULT_GSM8K_PATH
NAMESPACE = "fidelity-bench"
METHODS = ("dense", "base-only", "base-only+tail", "naive-other", "kvcomm-reference", "kvcomm-corrected-lasttoken",
           "kvcomm-corrected", "cacheblend", "hybrid", "diag-exact-placeholders", "diag-exact-fixed")
# method -> the `_Engines` field that prepares it; each engine's pool is "reference" or "corrected"
POOL_METHODS = {"kvcomm-reference": "reference", "kvcomm-corrected-lasttoken": "corrected_lasttoken",
                "kvcomm-corrected": "corrected", "hybrid": "corrected"}
GATE_TRACED = {"kvcomm-reference": "reference", "kvcomm-corrected": "corrected"}   # method -> pool it traces
POOL_MODES = ("kvcomm", "hybrid")   # engine modes with an offset step
ERROR_GROUPS = ("span", "placeholders", "question", "responses", "fixed")
CONFIDENT_MARGIN = 0.1           # dense top-1 minus top-2 probability for a turn to count as confident
SWEEP_ANCHORS = (1, 5, 10, 20, 40)
# The pool's byte bound must not evict what the count bound V keeps: the sweep measures V alone.
BENCH_POOL_BYTE_BUDGET = 64 << 30
WARMUP_MODES = ("jobs", "replay")
DENSE_BATCH = 12                 # turns decoded together when producing the fixed dense responses
PROBE = {"base-only": {"kl": 0.230, "top1": (35, 48), "greedy_exact": (18, 48)},
         "kvcomm-reference": {"kl": 0.054, "top1": (38, 48), "greedy_exact": (20, 48)}}


# ------------------------------------------------------------------------------------------------------------
# Setting and inputs
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """What one run measures. `questions` x `agents` turns are measured; `warmup` other questions warm the pools."""
    questions: int = 12
    warmup: int = 15
    agents: int = 3
    response_tokens: int = 64           # budget of each upstream response (greedy, stops at EOS)
    continuation_tokens: int = 32       # greedy tokens compared with dense's
    methods: tuple[str, ...] = METHODS
    seed: int = 0                       # question order and bootstrap
    bootstrap: int = 2000
    data: str = DEFAULT_DATA
    warmup_mode: str = "jobs"           # "jobs": run_job in kvcomm mode; "replay": the fixed dense responses

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(unknown)}; methods: {', '.join(METHODS)}")
        if self.warmup_mode not in WARMUP_MODES:
            raise ValueError(f"warmup_mode must be one of {', '.join(WARMUP_MODES)}, got {self.warmup_mode!r}")
        if self.questions < 1 or self.warmup < 0 or self.agents < 1:
            raise ValueError(f"need questions >= 1, warmup >= 0, agents >= 1; got {self.questions}, "
                             f"{self.warmup}, {self.agents}")


@dataclass
class Case:
    """One question with its fixed dense responses: every placeholder's content, as the agents will read it."""
    line: int                                   # 0-based line of the question in the data file
    question: str
    contents: dict[str, SharedContent]          # placeholder name -> content (question and every response)


def load_questions(path: str, count: int, *, skip: int = 0, seed: int = 0) -> list[tuple[int, str]]:
    """(line, question) pairs `skip .. skip+count` of the file's lines in a seeded random order."""
    with open(path) as handle:
        rows = [json.loads(line)["question"] for line in handle if line.strip()]
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    if skip + count > len(order):
        raise ValueError(f"{path} has {len(order)} questions; {skip} + {count} were asked for")
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


def _consumed(agents: Sequence[AgentTemplate]) -> set[str]:
    return {name for agent in agents for name in agent.placeholders()}


def warm_pool(engine: KVCommEngine, agents: Sequence[AgentTemplate], cases: Sequence[Case], sampling: Sampling,
              *, progress: bool = True, desc: str = "warm-up") -> dict[str, Any]:
    """Replay each case's job in kvcomm mode (one pool transaction per job, gate as in `run_job`), committing
    the anchors its dense turns record. Returns the warm-up's turn counts by engine decision."""
    consumed = _consumed(agents)
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


# ------------------------------------------------------------------------------------------------------------
# Preparing one turn per method
# ------------------------------------------------------------------------------------------------------------
@dataclass
class PreparedTurn:
    """One method's cache for one turn, ready to decode."""
    kv: SequenceKV
    last_logits: torch.Tensor        # [vocab] fp32, the first generated token's distribution
    prepare_s: float
    offset_s: float | None = None
    recomputed: int = 0


def _timed_prepare(engine: KVCommEngine, request: TurnRequest) -> tuple["_Prepared", float]:
    started = time.perf_counter()
    prepared = engine.prepare(request)
    return prepared, time.perf_counter() - started


def _turn(prepared: "_Prepared", seconds: float) -> PreparedTurn:
    has_offsets = prepared.reused and prepared.request.mode in POOL_MODES
    offset = prepared.timings.get("offset") if has_offsets else None
    return PreparedTurn(prepared.kv, prepared.last_logits[-1].float(), seconds, offset, prepared.recomputed)


@dataclass
class GateTrace:
    """What a job would have done on one turn (engine decision; None when not traced), and the turn prepared
    with forced reuse."""
    reused: bool | None
    reason: str | None
    forced: PreparedTurn


def kvcomm_turns(engine: KVCommEngine, agents: Sequence[AgentTemplate], case: Case, sampling: Sampling,
                 mode: str = "kvcomm", trace_gate: bool = True) -> list[GateTrace]:
    """Every agent's turn of `case` in `mode` (kvcomm or hybrid), prepared with forced reuse, and (with
    `trace_gate`) the engine's own decision with a scratch transaction (aborted: measured questions never change
    the pool)."""
    consumed = _consumed(agents)
    txn = engine.pool.begin(NAMESPACE) if trace_gate else None
    gated = {name: _fresh(c) for name, c in case.contents.items()}
    if "user_question" in consumed and txn is not None:
        engine.offer_content(NAMESPACE, "user_question", gated["user_question"], txn)
    traces = []
    for agent in agents:
        names = agent.placeholders()
        prepared, seconds = _timed_prepare(engine, TurnRequest(
            agent, {n: gated[n] for n in names}, mode=mode, sampling=sampling, namespace=NAMESPACE,
            transaction=txn))
        reused, reason = (prepared.reused, prepared.reason) if txn is not None else (None, None)
        if not prepared.reused:   # the gate sent it dense: measure the reuse path anyway
            prepared, seconds = _timed_prepare(engine, TurnRequest(
                agent, {n: case.contents[n] for n in names}, mode=mode, sampling=sampling, namespace=NAMESPACE,
                transaction=None))
        traces.append(GateTrace(reused, reason, _turn(prepared, seconds)))
        if response_name(agent) in consumed and txn is not None:
            engine.offer_content(NAMESPACE, response_name(agent), gated[response_name(agent)], txn)
    if txn is not None:
        engine.pool.abort(txn)
    return traces


def _placeholder_span(engine: KVCommEngine, agent: AgentTemplate, contents: dict[str, SharedContent],
                      name: str) -> tuple[int, int]:
    rendered = engine.agent_state(agent).rendered
    layout = rendered.layout([contents[n].num_tokens for n in rendered.placeholders])
    return layout.placeholder_spans[rendered.placeholders.index(name)]


def other_context_sources(engine: KVCommEngine, agents: Sequence[AgentTemplate], index: int, case: Case,
                          dense_kv: Sequence[SequenceKV]) -> dict[str, tuple[KVSegment, str]]:
    """For agent `index`'s placeholders: the content's KV as it sits in another agent's dense prompt (the nearest
    other consumer, upstream first), at that prompt's positions, and where it came from."""
    sources = {}
    for name in agents[index].placeholders():
        others = sorted((j for j, a in enumerate(agents) if j != index and name in a.placeholders()),
                        key=lambda j: (abs(j - index), j > index))
        if not others:
            sources[name] = (case.contents[name].base, "own-context base")
            continue
        j = others[0]
        begin, end = _placeholder_span(engine, agents[j], case.contents, name)
        sources[name] = (_copy(dense_kv[j].segment(begin, end)), f"agent {agents[j].agent_id}")
    return sources


def prepare_spliced(engine: KVCommEngine, agent: AgentTemplate, contents: dict[str, SharedContent],
                    placeholder_kv: dict[str, KVSegment], sampling: Sampling,
                    fixed_kv: Sequence[KVSegment] | None = None) -> PreparedTurn:
    """Assemble the prompt from each placeholder's KV in `placeholder_kv` and each fixed segment's KV in
    `fixed_kv` (default: the template's), all re-rotated to this prompt's positions; recompute the last token."""
    started = time.perf_counter()
    state = engine.agent_state(agent)
    rendered, rope = state.rendered, engine.runner.rope
    fixed_kv = state.fixed_kv if fixed_kv is None else fixed_kv
    layout = rendered.layout([contents[n].num_tokens for n in rendered.placeholders])
    prompt_ids = rendered.fill({n: contents[n].token_ids for n in rendered.placeholders})
    pieces = [fixed_kv[0]]
    for i, name in enumerate(rendered.placeholders):
        pieces.append(placeholder_kv[name].shifted(rope, layout.placeholder_spans[i][0]))
        pieces.append(fixed_kv[i + 1].shifted(rope, layout.fixed_spans[i + 1][0]))
    assembled = concat([p for p in pieces if p.num_tokens]).slice(0, len(prompt_ids) - 1)
    logits, kv = engine.runner.prefill(prompt_ids[-1:], context=assembled,
                                       extra_capacity=sampling.max_new_tokens + 1)
    return PreparedTurn(kv, logits[-1].float(), time.perf_counter() - started, None, 1)


def _oracle_placeholders(engine: KVCommEngine, agent: AgentTemplate, contents: dict[str, SharedContent],
                         dense_kv: SequenceKV) -> dict[str, KVSegment]:
    """Every placeholder's KV exactly as dense prefill computed it in this very prompt."""
    rendered = engine.agent_state(agent).rendered
    layout = rendered.layout([contents[n].num_tokens for n in rendered.placeholders])
    return {name: _copy(dense_kv.segment(*span)) for name, span in zip(rendered.placeholders,
                                                                       layout.placeholder_spans)}


def _oracle_fixed(engine: KVCommEngine, agent: AgentTemplate, contents: dict[str, SharedContent],
                  dense_kv: SequenceKV) -> list[KVSegment]:
    """Every fixed segment's KV exactly as dense prefill computed it in this very prompt."""
    rendered = engine.agent_state(agent).rendered
    layout = rendered.layout([contents[n].num_tokens for n in rendered.placeholders])
    return [_copy(dense_kv.segment(*span)) for span in layout.fixed_spans]


def _copy(segment: KVSegment) -> KVSegment:
    return KVSegment(segment.keys.clone(), segment.values.clone(), segment.start)


def offset_diagnostics(engine: KVCommEngine, agent: AgentTemplate, contents: dict[str, SharedContent]
                       ) -> dict[str, float]:
    """For forced reuse on this turn: placeholders with at least one compatible anchor, and the mean number of
    compatible and effective anchors (1 / sum w^2) among those, as this consumer's own weights give them."""
    state = engine.agent_state(agent)
    rendered, rope = state.rendered, engine.runner.rope
    layout = rendered.layout([contents[n].num_tokens for n in rendered.placeholders])
    snapshot = engine.pool.snapshot(NAMESPACE)
    with_offsets, compatible, effective, total = 0, [], [], 0
    for i, name in enumerate(rendered.placeholders):
        content = contents[name]
        if not content.num_tokens:
            continue
        total += 1
        ph = content.base.shifted(rope, layout.placeholder_spans[i][0])
        pf = state.fixed_kv[i + 1].shifted(rope, layout.fixed_spans[i + 1][0])
        anchors = snapshot.anchors(name)
        usable = compatible_anchors(anchors, rendered.key, ph.num_tokens, pf.num_tokens)
        if not usable:
            continue
        estimate = estimate_offsets(ph, pf, anchors, rendered.key, rope, engine.config)
        with_offsets += 1
        compatible.append(len(usable))
        effective.append(estimate.effective_anchors)
    return {"placeholders": total, "with_offsets": with_offsets,
            "compatible": sum(compatible) / len(compatible) if compatible else 0.0,
            "effective": sum(effective) / len(effective) if effective else 0.0}


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


def relative_errors(method_kv: SequenceKV, dense_kv: SequenceKV, token_index: torch.Tensor
                    ) -> tuple[list[float], list[float]]:
    """Per layer, ||X_m - X_d||_F / ||X_d||_F over the tokens `token_index` ([n] int64), for X = K and V."""
    out = []
    for method_x, dense_x in ((method_kv.keys, dense_kv.keys), (method_kv.values, dense_kv.values)):
        m = method_x[:, :, token_index].double()                                   # [layers, kv_heads, n, head_dim]
        d = dense_x[:, :, token_index].double()                                    # [layers, kv_heads, n, head_dim]
        num = torch.linalg.vector_norm(m - d, dim=(1, 2, 3))                       # [layers]
        den = torch.linalg.vector_norm(d, dim=(1, 2, 3)).clamp_min(1e-30)          # [layers]
        out.append((num / den).tolist())
    return out[0], out[1]


def token_groups(engine: KVCommEngine, agent: AgentTemplate, contents: dict[str, SharedContent]
                 ) -> dict[str, torch.Tensor]:
    """Prompt token indices of the reused span and its parts: "span" = after the first fixed segment up to (not
    including) the last prompt token; "placeholders", split into "question" (the user input) and "responses"
    (upstream agents' responses); "fixed" = the fixed segments after placeholders."""
    rendered = engine.agent_state(agent).rendered
    layout = rendered.layout([contents[n].num_tokens for n in rendered.placeholders])
    last = layout.length - 1

    def tokens(spans: Sequence[tuple[int, int]]) -> torch.Tensor:
        return torch.tensor([t for b, e in spans for t in range(b, min(e, last))], dtype=torch.int64)

    ph_spans = dict(zip(rendered.placeholders, layout.placeholder_spans))
    return {"span": tokens([(layout.fixed_spans[0][1], last)]),
            "placeholders": tokens(layout.placeholder_spans),
            "question": tokens([span for name, span in ph_spans.items() if name == "user_question"]),
            "responses": tokens([span for name, span in ph_spans.items() if name.startswith("agent_")]),
            "fixed": tokens(layout.fixed_spans[1:])}


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
    if list(candidate) == list(reference):
        return budget
    n = 0
    for a, b in zip(candidate, reference):
        if a != b:
            break
        n += 1
    return n


# ------------------------------------------------------------------------------------------------------------
# The benchmark
# ------------------------------------------------------------------------------------------------------------
@dataclass
class _Engines:
    """Engines over one runner: dense and baselines on `corrected`; each KVCOMM config its own pool;
    `corrected_lasttoken` shares `corrected`'s pool."""
    reference: KVCommEngine
    corrected: KVCommEngine
    corrected_lasttoken: KVCommEngine


def _engine(runner: ModelRunner, tokenizer: Any, config: KVCommConfig) -> KVCommEngine:
    return KVCommEngine(runner, tokenizer, config, AnchorPool(config, runner.rope))


def _load(model: str, device: str, dtype: str | None, random_weights: bool,
          loaded: LoadedModel | None) -> LoadedModel:
    loaded = loaded or load_model(model, device=device, dtype=dtype, random_weights=random_weights)
    if loaded.tokenizer is None:
        raise ValueError(f"{model}: no tokenizer; agent templates need one")
    return loaded


def _measure_turn(engines: _Engines, agents: Sequence[AgentTemplate], index: int, case: Case,
                  oracle: PreparedTurn, dense_kv: Sequence[SequenceKV], traces: dict[str, list[GateTrace]],
                  setting: Setting, sampling: Sampling, continuation: Sampling) -> dict[str, Any]:
    """Every method on agent `index`'s turn of `case`: metrics against the dense oracle."""
    agent = agents[index]
    contents = {n: case.contents[n] for n in agent.placeholders()}
    dense_engine = engines.corrected
    turns: dict[str, PreparedTurn] = {}
    sources: dict[str, str] = {}
    for method in setting.methods:
        if method == "dense":
            turns[method] = _turn(*_timed_prepare(dense_engine, TurnRequest(agent, contents, "dense", sampling,
                                                                            NAMESPACE)))
        elif method == "base-only":
            turns[method] = _turn(*_timed_prepare(engines.reference, TurnRequest(agent, contents, "naive",
                                                                                 sampling, NAMESPACE)))
        elif method == "base-only+tail":
            turns[method] = _turn(*_timed_prepare(engines.corrected, TurnRequest(agent, contents, "naive",
                                                                                 sampling, NAMESPACE)))
        elif method == "naive-other":
            found = other_context_sources(dense_engine, agents, index, case, dense_kv)
            sources = {name: where for name, (_, where) in found.items()}
            turns[method] = prepare_spliced(dense_engine, agent, contents,
                                            {name: seg for name, (seg, _) in found.items()}, sampling)
        elif method == "diag-exact-placeholders":
            turns[method] = prepare_spliced(dense_engine, agent, contents,
                                            _oracle_placeholders(dense_engine, agent, contents, oracle.kv), sampling)
        elif method == "diag-exact-fixed":
            turns[method] = prepare_spliced(dense_engine, agent, contents, {n: c.base for n, c in contents.items()},
                                            sampling, fixed_kv=_oracle_fixed(dense_engine, agent, contents, oracle.kv))
        elif method == "cacheblend":
            turns[method] = _turn(*_timed_prepare(engines.corrected, TurnRequest(agent, contents, "cacheblend",
                                                                                 sampling, NAMESPACE)))
        else:   # kvcomm-reference, kvcomm-corrected, hybrid: prepared with the gate trace
            turns[method] = traces[method][index].forced

    groups = token_groups(dense_engine, agent, contents)
    dense_probs_margin = top_margin(oracle.last_logits)
    dense_top1 = int(oracle.last_logits.argmax())
    row: dict[str, Any] = {
        "line": case.line, "agent": agent.agent_id, "prompt_tokens": oracle.kv.length,
        "shared_tokens": sum(c.num_tokens for c in contents.values()), "dense_top1_margin": dense_probs_margin,
        "dense_prepare_ms": oracle.prepare_s * 1e3, "naive_other_sources": sources, "methods": {}}
    for method, turn in turns.items():
        errors = {}
        for group, index_tensor in groups.items():
            if index_tensor.numel():
                errors[group] = relative_errors(turn.kv, oracle.kv, index_tensor)
        row["methods"][method] = {
            "kl": kl_divergence(oracle.last_logits, turn.last_logits),
            "top1_agree": int(turn.last_logits.argmax()) == dense_top1,
            "prepare_ms": turn.prepare_s * 1e3,
            "offset_ms": None if turn.offset_s is None else turn.offset_s * 1e3,
            "recomputed_tokens": turn.recomputed,
            "_errors": errors,      # per group: ([layers] K, [layers] V); folded into the summary, then dropped
        }
        if method in traces and traces[method][index].reused is not None:
            trace = traces[method][index]
            row["methods"][method].update(gate_reused=trace.reused, gate_reason=trace.reason)

    continuations = greedy_continuations(dense_engine.runner, {"oracle": oracle, **turns}, continuation)
    budget = continuation.max_new_tokens
    for method in turns:
        row["methods"][method]["greedy_match"] = matching_prefix(continuations[method], continuations["oracle"],
                                                                 budget)
    return row


def _summarize(rows: Sequence[dict[str, Any]], setting: Setting, num_layers: int) -> dict[str, Any]:
    """Per method: means over turns, the KL bootstrap CI, agreement counts, per-layer error arrays."""
    methods = {}
    budget = setting.continuation_tokens
    confident = [r for r in rows if r["dense_top1_margin"] >= CONFIDENT_MARGIN]
    for method in setting.methods:
        cells = [r["methods"][method] for r in rows]
        kls = [c["kl"] for c in cells]
        summary: dict[str, Any] = {
            "turns": len(cells),
            "kl_mean": sum(kls) / len(kls),
            "kl_ci95": list(bootstrap_ci(kls, setting.bootstrap, setting.seed)),
            "kl_median": float(torch.tensor(kls).median()),
            "top1_agree": sum(c["top1_agree"] for c in cells),
            "confident_agree": sum(r["methods"][method]["top1_agree"] for r in confident),
            "confident_turns": len(confident),
            "greedy_match_mean": sum(c["greedy_match"] for c in cells) / len(cells),
            "greedy_exact": sum(c["greedy_match"] == budget for c in cells),
            "prepare_ms_mean": sum(c["prepare_ms"] for c in cells) / len(cells),
            "recomputed_tokens_mean": sum(c["recomputed_tokens"] for c in cells) / len(cells),
        }
        by_agent: dict[str, dict[str, Any]] = {}
        for r in rows:
            entry = by_agent.setdefault(r["agent"], {"turns": 0, "kl_sum": 0.0, "top1_agree": 0})
            entry["turns"] += 1
            entry["kl_sum"] += r["methods"][method]["kl"]
            entry["top1_agree"] += r["methods"][method]["top1_agree"]
        summary["by_agent"] = {agent: {"turns": e["turns"], "kl_mean": e["kl_sum"] / e["turns"],
                                       "top1_agree": e["top1_agree"]} for agent, e in by_agent.items()}
        offsets = [c["offset_ms"] for c in cells if c["offset_ms"] is not None]
        summary["offset_ms_mean"] = sum(offsets) / len(offsets) if offsets else None
        for group in ERROR_GROUPS:
            present = [c["_errors"][group] for c in cells if group in c["_errors"]]
            if not present:
                continue
            k_layers = [sum(p[0][layer] for p in present) / len(present) for layer in range(num_layers)]
            v_layers = [sum(p[1][layer] for p in present) / len(present) for layer in range(num_layers)]
            summary[f"{group}_rel_err_k"] = k_layers
            summary[f"{group}_rel_err_v"] = v_layers
            summary[f"{group}_rel_err_k_mean"] = sum(k_layers) / num_layers
            summary[f"{group}_rel_err_v_mean"] = sum(v_layers) / num_layers
        if all("gate_reused" in c for c in cells):
            reused = [c["gate_reused"] for c in cells]
            summary["gate_reuse_rate"] = sum(reused) / len(reused)
            summary["gate_reasons"] = dict(Counter(c["gate_reason"] for c in cells))
            on_gated = [c["kl"] for c in cells if c["gate_reused"]]
            summary["kl_mean_gate_reused"] = sum(on_gated) / len(on_gated) if on_gated else None
        methods[method] = summary
    dense_ms = [r["dense_prepare_ms"] for r in rows]
    return {"methods": methods, "dense_prepare_ms_mean": sum(dense_ms) / len(dense_ms)}


WARMUP_DETAIL = {
    "jobs": "job_runner.run_job in kvcomm mode per warm-up question: generated responses, anchors from dense turns",
    "replay": "the warm-up questions' fixed dense responses replayed through engine.prepare in kvcomm mode, one "
              "pool transaction per job, the gate as in run_job (no decoding)"}


def _warmer(dense_engine: KVCommEngine, agents: Sequence[AgentTemplate], questions: Sequence[tuple[int, str]],
            setting: Setting, sampling: Sampling, progress: bool) -> Callable[[KVCommEngine, str], dict[str, Any]]:
    """A function warming one engine's pool on `questions` by `setting.warmup_mode` (replay computes the fixed
    dense responses once, here, for every pool it warms)."""
    if setting.warmup_mode == "jobs":
        return lambda engine, desc: warm_pool_with_jobs(engine, agents, questions, setting.response_tokens,
                                                        progress=progress, desc=desc)
    cases = dense_cases(dense_engine, agents, questions, sampling, progress=progress,
                        desc="dense responses (warm-up questions)") if questions else []
    return lambda engine, desc: warm_pool(engine, agents, cases, sampling, progress=progress, desc=desc)


def run(model: str = "smollm2-135m-instruct", *, setting: Setting | None = None,
        agents: Sequence[AgentTemplate] | None = None, device: str = "cpu", dtype: str | None = None,
        random_weights: bool = False,
        loaded: LoadedModel | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the fidelity benchmark; returns a JSON-able report (see the module docstring)."""
    setting = setting or Setting()
    started = time.perf_counter()
    loaded = _load(model, device, dtype, random_weights, loaded)
    runner = ModelRunner(loaded.spec, loaded.state_dict)
    reference_config = KVCommConfig.reference(pool_byte_budget=BENCH_POOL_BYTE_BUDGET)
    corrected_config = KVCommConfig(pool_byte_budget=BENCH_POOL_BYTE_BUDGET)
    corrected = _engine(runner, loaded.tokenizer, corrected_config)
    engines = _Engines(_engine(runner, loaded.tokenizer, reference_config), corrected,
                       KVCommEngine(runner, loaded.tokenizer, corrected_config.with_(tail_policy="last_token"),
                                    corrected.pool))
    agents_source = "caller" if agents is not None else "kvcomm.harness.roles.fully_connected_math_agents"
    agents = list(agents) if agents is not None else math_agents(setting.agents)
    dense_engine = engines.corrected
    sampling = Sampling(max_new_tokens=setting.response_tokens, stop_token_ids=dense_engine.stop_token_ids)
    continuation = Sampling(max_new_tokens=setting.continuation_tokens, stop_token_ids=dense_engine.stop_token_ids)

    measured_q = load_questions(setting.data, setting.questions, seed=setting.seed)
    warmup_q = load_questions(setting.data, setting.warmup, skip=setting.questions, seed=setting.seed)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    cases = dense_cases(dense_engine, agents, measured_q, sampling, progress=progress,
                        desc="dense responses (measured questions)")
    timings["dense_responses_s"] = time.perf_counter() - t
    t = time.perf_counter()
    warm = _warmer(dense_engine, agents, warmup_q, setting, sampling, progress)
    warmups = {"reference": warm(engines.reference, "warm-up, reference pool"),
               "corrected": warm(engines.corrected, "warm-up, corrected pool")}
    timings["warmup_s"] = time.perf_counter() - t

    rows: list[dict[str, Any]] = []
    diagnostics: dict[str, list[dict[str, float]]] = {"reference": [], "corrected": []}
    t = time.perf_counter()
    bar = tqdm(total=len(cases) * len(agents), desc="measure", unit="turn", disable=not progress, file=sys.stderr)
    for case in cases:
        oracles = []
        for agent in agents:
            prepared, seconds = _timed_prepare(dense_engine, TurnRequest(
                agent, {n: case.contents[n] for n in agent.placeholders()}, "dense", sampling, NAMESPACE))
            oracles.append(_turn(prepared, seconds))
        traces: dict[str, list[GateTrace]] = {}
        for method, engine_name in POOL_METHODS.items():
            if method in setting.methods:
                engine = getattr(engines, engine_name)
                traces[method] = kvcomm_turns(engine, agents, case, sampling,
                                              mode="hybrid" if method == "hybrid" else "kvcomm",
                                              trace_gate=method in GATE_TRACED)
        for index, agent in enumerate(agents):
            for pool_name in ("reference", "corrected"):
                diagnostics[pool_name].append(offset_diagnostics(
                    getattr(engines, pool_name), agent, {n: case.contents[n] for n in agent.placeholders()}))
            rows.append(_measure_turn(engines, agents, index, case, oracles[index], [o.kv for o in oracles],
                                      traces, setting, sampling, continuation))
            bar.update(1)
    bar.close()
    timings["measure_s"] = time.perf_counter() - t

    summary = _summarize(rows, setting, loaded.spec.num_layers)
    for row in rows:
        for cell in row["methods"].values():
            cell.pop("_errors")
    rendered = [dense_engine.agent_state(a).rendered for a in agents]
    offsets = {}
    for pool_name, entries in diagnostics.items():
        placeholders = sum(e["placeholders"] for e in entries)
        with_offsets = [e for e in entries if e["with_offsets"]]
        offsets[pool_name] = {
            "placeholders": placeholders, "with_offsets": sum(e["with_offsets"] for e in entries),
            "compatible_mean": sum(e["compatible"] for e in with_offsets) / max(1, len(with_offsets)),
            "effective_mean": sum(e["effective"] for e in with_offsets) / max(1, len(with_offsets))}
    prompt_tokens = [r["prompt_tokens"] for r in rows]
    shared_tokens = [r["shared_tokens"] for r in rows]
    return {
        "benchmark": "fidelity",
        "model": loaded.source, "dtype": str(loaded.dtype).replace("torch.", ""),
        "device": str(loaded.device), "threads": torch.get_num_threads(),
        "setting": {**asdict(setting), "methods": list(setting.methods), "confident_margin": CONFIDENT_MARGIN,
                    "warmup_mode_detail": WARMUP_DETAIL[setting.warmup_mode]},
        "configs": {"reference": reference_config.to_dict(), "corrected": corrected_config.to_dict()},
        "agents_source": agents_source,
        "agents": [{"id": a.agent_id, "placeholders": list(a.placeholders()),
                    "template_tokens": len(r.template_ids())} for a, r in zip(agents, rendered)],
        "questions": {"measured": [line for line, _ in measured_q], "warmup": [line for line, _ in warmup_q]},
        "turns": len(rows),
        "prompt_tokens": {"min": min(prompt_tokens), "max": max(prompt_tokens),
                          "mean": sum(prompt_tokens) / len(prompt_tokens)},
        "shared_tokens": {"min": min(shared_tokens), "max": max(shared_tokens),
                          "mean": sum(shared_tokens) / len(shared_tokens)},
        "warmup": warmups,
        "pools": {"reference": pool_summary(engines.reference.pool),
                  "corrected": pool_summary(engines.corrected.pool)},
        "offsets": offsets,
        **summary,
        "rows": rows,
        "timings": {**timings, "total_s": time.perf_counter() - started},
        "probe": PROBE,
    }


# ------------------------------------------------------------------------------------------------------------
# Anchor-count sweep
# ------------------------------------------------------------------------------------------------------------
def sweep_anchors(model: str = "smollm2-135m-instruct", *, anchors: Sequence[int] = SWEEP_ANCHORS,
                  setting: Setting | None = None, agents: Sequence[AgentTemplate] | None = None,
                  base_config: KVCommConfig | None = None, device: str = "cpu", dtype: str | None = None,
                  random_weights: bool = False,
                  loaded: LoadedModel | None = None, progress: bool = True) -> dict[str, Any]:
    """For each V in `anchors`: a fresh pool with ``max_anchors=V`` warmed on the same warm-up jobs, then on the
    measured turns the pool bytes, the gate's reuse rate, KL(dense || kvcomm) with forced reuse, and the time of
    the offset step. `base_config` defaults to the corrected config (with a byte budget that never binds)."""
    setting = setting or Setting(warmup=40, warmup_mode="replay")
    started = time.perf_counter()
    loaded = _load(model, device, dtype, random_weights, loaded)
    runner = ModelRunner(loaded.spec, loaded.state_dict)
    base_config = (base_config or KVCommConfig()).with_(pool_byte_budget=BENCH_POOL_BYTE_BUDGET)
    dense_engine = _engine(runner, loaded.tokenizer, base_config)
    agents_source = "caller" if agents is not None else "kvcomm.harness.roles.fully_connected_math_agents"
    agents = list(agents) if agents is not None else math_agents(setting.agents)
    sampling = Sampling(max_new_tokens=setting.response_tokens, stop_token_ids=dense_engine.stop_token_ids)
    measured_q = load_questions(setting.data, setting.questions, seed=setting.seed)
    warmup_q = load_questions(setting.data, setting.warmup, skip=setting.questions, seed=setting.seed)
    warm = _warmer(dense_engine, agents, warmup_q, setting, sampling, progress)
    cases = dense_cases(dense_engine, agents, measured_q, sampling, progress=progress,
                        desc="dense responses (measured questions)")
    oracle_logits = []
    for case in cases:
        for agent in agents:
            prepared = dense_engine.prepare(TurnRequest(agent, {n: case.contents[n] for n in agent.placeholders()},
                                                        "dense", sampling, NAMESPACE))
            oracle_logits.append(prepared.last_logits[-1].float())

    rows = []
    for v in anchors:
        engine = _engine(runner, loaded.tokenizer, base_config.with_(max_anchors=v))
        warm_started = time.perf_counter()
        warmup = warm(engine, f"V={v}: warm-up")
        warm_s = time.perf_counter() - warm_started
        traces = []
        for case in tqdm(cases, desc=f"V={v}: measure", unit="job", disable=not progress, file=sys.stderr):
            traces.extend(kvcomm_turns(engine, agents, case, sampling))
        kls = [kl_divergence(d, t.forced.last_logits) for d, t in zip(oracle_logits, traces)]
        agree = sum(int(d.argmax()) == int(t.forced.last_logits.argmax()) for d, t in zip(oracle_logits, traces))
        gated_kls = [k for k, t in zip(kls, traces) if t.reused]
        offsets = [t.forced.offset_s for t in traces if t.forced.offset_s is not None]
        pool = pool_summary(engine.pool)
        rows.append({
            "max_anchors": v, "pool_bytes": pool["bytes"], "anchors": pool["anchors"], "evictions": pool["evictions"],
            "warmup_reuse_rate": warmup["reused"] / max(1, warmup["turns"]),
            "gate_reuse_rate": sum(t.reused for t in traces) / len(traces),
            "gate_reasons": dict(Counter(t.reason for t in traces)),
            "kl_mean": sum(kls) / len(kls), "kl_ci95": list(bootstrap_ci(kls, setting.bootstrap, setting.seed)),
            "kl_mean_gate_reused": sum(gated_kls) / len(gated_kls) if gated_kls else None,
            "top1_agree": agree, "turns": len(traces),
            "offset_ms_mean": sum(offsets) / len(offsets) * 1e3 if offsets else None,
            "prepare_ms_mean": sum(t.forced.prepare_s for t in traces) / len(traces) * 1e3,
            "warmup_s": warm_s,
        })
    return {
        "benchmark": "anchors",
        "model": loaded.source, "dtype": str(loaded.dtype).replace("torch.", ""), "device": str(loaded.device),
        "threads": torch.get_num_threads(),
        "setting": {**asdict(setting), "methods": ["kvcomm"], "anchors": list(anchors)},
        "config": base_config.to_dict(), "config_mode": base_config.mode, "agents_source": agents_source,
        "questions": {"measured": [line for line, _ in measured_q], "warmup": [line for line, _ in warmup_q]},
        "rows": rows,
        "timings": {"total_s": time.perf_counter() - started},
    }


# ------------------------------------------------------------------------------------------------------------
# Tables and plots
# ------------------------------------------------------------------------------------------------------------
def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown_table(report: dict[str, Any]) -> str:
    """The fidelity report as markdown: one row per method, then the gate, the pools and the setting."""
    turns = report["turns"]
    budget = report["setting"]["continuation_tokens"]
    lines = [
        f"{turns} turns ({report['setting']['questions']} questions x {len(report['agents'])} agents), "
        f"{report['setting']['warmup']} warm-up questions; prompts {report['prompt_tokens']['min']}-"
        f"{report['prompt_tokens']['max']} tokens, shared {report['shared_tokens']['min']}-"
        f"{report['shared_tokens']['max']} tokens; {report['model']}, {report['dtype']}, {report['device']}.",
        "",
        f"| method | KL(dense‖m) mean [95% CI] | top-1 agree | confident (margin ≥ {CONFIDENT_MARGIN}) | "
        f"greedy {budget}: exact / mean prefix | prepare ms | offset ms | recomputed tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, m in report["methods"].items():
        lo, hi = m["kl_ci95"]
        lines.append(
            f"| {method} | {m['kl_mean']:.3f} [{_fmt(lo)}, {_fmt(hi)}] | {m['top1_agree']}/{m['turns']} | "
            f"{m['confident_agree']}/{m['confident_turns']} | {m['greedy_exact']}/{m['turns']} / "
            f"{m['greedy_match_mean']:.1f} | {m['prepare_ms_mean']:.0f} | {_fmt(m['offset_ms_mean'], '.1f')} | "
            f"{m['recomputed_tokens_mean']:.1f} |")
    lines += ["", "Relative error vs dense, mean over layers (and at the last layer), by token group:", "",
              "| method | K span | V span | V span, last layer | V question | V responses | V fixed segments |",
              "|---|---|---|---|---|---|---|"]
    for method, m in report["methods"].items():
        last_v = m["span_rel_err_v"][-1] if "span_rel_err_v" in m else None
        lines.append(
            f"| {method} | {_fmt(m.get('span_rel_err_k_mean'))} | {_fmt(m.get('span_rel_err_v_mean'))} | "
            f"{_fmt(last_v)} | {_fmt(m.get('question_rel_err_v_mean'))} | "
            f"{_fmt(m.get('responses_rel_err_v_mean'))} | {_fmt(m.get('fixed_rel_err_v_mean'))} |")
    agent_ids = list(next(iter(report["methods"].values()))["by_agent"])
    lines += ["", "By agent (agent 1 reads only the question): KL mean, top-1 agreement:", "",
              "| method | " + " | ".join(f"agent {a}" for a in agent_ids) + " |",
              "|---|" + "---|" * len(agent_ids)]
    for method, m in report["methods"].items():
        cells = [f"{m['by_agent'][a]['kl_mean']:.3f}, {m['by_agent'][a]['top1_agree']}/{m['by_agent'][a]['turns']}"
                 for a in agent_ids]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    probe = report.get("probe", {})
    if probe:
        lines += ["", "The probe (fidelity-probe.md; 48 turns of agents 2-3, its own prompts): " + "; ".join(
            f"{name} KL {p['kl']:.3f}, top-1 {p['top1'][0]}/{p['top1'][1]}, greedy exact {p['greedy_exact'][0]}/"
            f"{p['greedy_exact'][1]}" for name, p in probe.items()) + "."]
    lines += ["", f"Dense prefill (oracle) mean {report['dense_prepare_ms_mean']:.0f} ms.", "",
              "| pool | gate reuse rate on measured turns | KL on gate-reused turns | gate reasons | "
              "warm-up reuse | anchors per placeholder | pool MB | placeholders with offsets | "
              "compatible / effective anchors |",
              "|---|---|---|---|---|---|---|---|---|"]
    for method, pool_name in GATE_TRACED.items():
        if method not in report["methods"]:
            continue
        m, pool, warm, off = (report["methods"][method], report["pools"][pool_name], report["warmup"][pool_name],
                              report["offsets"][pool_name])
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(m["gate_reasons"].items()))
        anchors = ", ".join(f"{k} {v}" for k, v in pool["anchors"].items())
        lines.append(
            f"| {pool_name} | {m['gate_reuse_rate']:.0%} | {_fmt(m['kl_mean_gate_reused'])} | {reasons} | "
            f"{warm['reused']}/{warm['turns']} | {anchors} | {pool['bytes'] / 2**20:.0f} | "
            f"{off['with_offsets']}/{off['placeholders']} | {off['compatible_mean']:.1f} / "
            f"{off['effective_mean']:.1f} |")
    return "\n".join(lines)


def sweep_markdown_table(report: dict[str, Any]) -> str:
    lines = [f"Anchor sweep ({report['config_mode']} config, {report['setting']['warmup']} warm-up questions, "
             f"{report['rows'][0]['turns']} measured turns; {report['model']}, {report['dtype']}).", "",
             "| V | anchors (per placeholder) | pool MB | gate reuse | KL mean [95% CI] | KL on gate-reused | "
             "top-1 agree | offset ms | evictions |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        anchors = ", ".join(str(n) for n in r["anchors"].values())
        lo, hi = r["kl_ci95"]
        lines.append(f"| {r['max_anchors']} | {anchors} | {r['pool_bytes'] / 2**20:.0f} | {r['gate_reuse_rate']:.0%} | "
                     f"{r['kl_mean']:.3f} [{lo:.3f}, {hi:.3f}] | {_fmt(r['kl_mean_gate_reused'])} | "
                     f"{r['top1_agree']}/{r['turns']} | {_fmt(r['offset_ms_mean'], '.1f')} | "
                     f"{r['evictions']['count']} |")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str) -> None:
    """Per-layer relative V and K error over the reused span, per method, and KL with its CI."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_v, ax_k, ax_kl) = plt.subplots(1, 3, figsize=(17, 4.8))
    for method, m in report["methods"].items():
        if "span_rel_err_v" not in m or method == "dense":
            continue
        ax_v.plot(m["span_rel_err_v"], label=method)
        ax_k.plot(m["span_rel_err_k"], label=method)
    for ax, what in ((ax_v, "V"), (ax_k, "K")):
        ax.set_xlabel("layer")
        ax.set_ylabel(f"relative {what} error vs dense")
        ax.set_title(f"{what} error over the reused span")
        ax.grid(alpha=0.3)
    handles, labels = ax_v.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, max(1, len(labels))), fontsize=8)
    names = [n for n in report["methods"] if n != "dense"]
    means = [report["methods"][n]["kl_mean"] for n in names]
    errs = [[m - report["methods"][n]["kl_ci95"][0] for n, m in zip(names, means)],
            [report["methods"][n]["kl_ci95"][1] - m for n, m in zip(names, means)]]
    ax_kl.bar(range(len(names)), means, yerr=errs, capsize=4)
    ax_kl.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax_kl.set_ylabel("KL(dense ‖ method), mean, 95% CI")
    ax_kl.set_title(f"next-token KL over {report['turns']} turns")
    ax_kl.grid(alpha=0.3, axis="y")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(report: dict[str, Any], path: str) -> None:
    """KL, gate reuse rate, pool MB and offset time against V."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = report["rows"]
    v = [r["max_anchors"] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    series = [("KL(dense ‖ kvcomm)", [r["kl_mean"] for r in rows]),
              ("gate reuse rate", [r["gate_reuse_rate"] for r in rows]),
              ("pool MB", [r["pool_bytes"] / 2**20 for r in rows]),
              ("offset step ms", [r["offset_ms_mean"] or 0.0 for r in rows])]
    for ax, (label, ys) in zip(axes, series):
        ax.plot(v, ys, marker="o")
        ax.set_xscale("log")
        ax.set_xticks(v, [str(x) for x in v])
        ax.set_xlabel("V (max anchors per placeholder)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    lo = [r["kl_ci95"][0] for r in rows]
    hi = [r["kl_ci95"][1] for r in rows]
    axes[0].fill_between(v, lo, hi, alpha=0.2)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------------
def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: fp32 on CPU")
    parser.add_argument("--questions", type=int, default=Setting.questions, help="measured questions")
    parser.add_argument("--agents", type=int, default=Setting.agents)
    parser.add_argument("--response-tokens", type=int, default=Setting.response_tokens)
    parser.add_argument("--continuation-tokens", type=int, default=Setting.continuation_tokens)
    parser.add_argument("--seed", type=int, default=Setting.seed)
    parser.add_argument("--data", default=DEFAULT_DATA, help="GSM8K jsonl")
    parser.add_argument("--json", default=None, help="write the report here")
    parser.add_argument("--plot", default=None, help="write a PNG here")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (on a CPU shared with other jobs, 1 is often fastest)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `kvcomm bench fidelity`."""
    _model_arguments(parser)
    parser.add_argument("--warmup", type=int, default=Setting.warmup, help="warm-up questions (disjoint)")
    parser.add_argument("--warmup-mode", choices=WARMUP_MODES, default=Setting.warmup_mode)
    parser.add_argument("--methods", default=",".join(METHODS))


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `kvcomm bench anchors`."""
    _model_arguments(parser)
    parser.add_argument("--warmup", type=int, default=40, help="warm-up questions (disjoint)")
    parser.add_argument("--warmup-mode", choices=WARMUP_MODES, default="replay",
                        help="replay (default here: one dense pass serves every V) or jobs")
    parser.add_argument("--v", default=",".join(str(v) for v in SWEEP_ANCHORS), help="anchor counts V")
    parser.add_argument("--reference", action="store_true", help="sweep the reference config instead")


def _setting(args: argparse.Namespace, methods: Sequence[str] = METHODS) -> Setting:
    return Setting(questions=args.questions, warmup=args.warmup, agents=args.agents,
                   response_tokens=args.response_tokens, continuation_tokens=args.continuation_tokens,
                   methods=tuple(methods), seed=args.seed, data=args.data, warmup_mode=args.warmup_mode)


def _apply_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def cli_main(args: argparse.Namespace) -> int:
    """`kvcomm bench fidelity`: run, print the table, write the JSON and the plot."""
    _apply_threads(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    report = run(args.model, setting=_setting(args, methods), device=args.device, dtype=args.dtype,
                 random_weights=args.random_weights, progress=not args.quiet)
    print(markdown_table(report))
    write_json_report(args.json, report)
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def sweep_cli_main(args: argparse.Namespace) -> int:
    """`kvcomm bench anchors`: run the sweep, print the table, write the JSON and the plot."""
    _apply_threads(args)
    anchors = tuple(int(v) for v in args.v.split(","))
    report = sweep_anchors(args.model, anchors=anchors, setting=_setting(args, ("kvcomm-corrected",)),
                           base_config=KVCommConfig.reference() if args.reference else KVCommConfig(),
                           device=args.device, dtype=args.dtype, random_weights=args.random_weights,
                           progress=not args.quiet)
    print(sweep_markdown_table(report))
    write_json_report(args.json, report)
    if args.plot:
        plot_sweep(report, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvcomm.bench.fidelity")
    sub = parser.add_subparsers(dest="bench", required=True)
    add_arguments(sub.add_parser("fidelity", help="every reuse method against dense prefill"))
    add_sweep_arguments(sub.add_parser("anchors", help="anchor-count sweep"))
    args = parser.parse_args(argv)
    return cli_main(args) if args.bench == "fidelity" else sweep_cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
