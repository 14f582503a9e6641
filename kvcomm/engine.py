"""The per-turn engine: builds one agent turn's KV cache in the requested serving mode and generates.

Modes, all on the same runner and the same token sequence:
  dense         full prefill of the whole prompt (the oracle)
  dense-prefix  exact prefix caching of the agent's leading fixed segment, prefill of the rest
  naive         reuse every placeholder's base KV and every fixed segment, positions re-rotated, no offsets
  cacheblend    naive assembly, then the worst-deviating tokens recomputed from the check layer on
  kvcomm        naive assembly plus offsets interpolated from the anchor pool, then the tokens the prompt's last
                token attends to most recomputed (`recompute_ratio`, kvcomm.corrections); two gates send a turn
                to a dense prefill that records a new anchor: the entropy gate on new content, and the turn gate
                on the turn's predicted KL (kvcomm.gate); after the reused prefill, the fidelity gate sends a turn
                whose first token is fragile (top-1/top-2 margin below `gate_min_margin`) dense too
  hybrid        kvcomm's offsets, then CacheBlend-style recompute of the worst-matching tokens

A request may force a dense prefill (`TurnRequest.force_dense`: a judge or decision agent kept exact); in kvcomm
and hybrid modes such a turn still records deltas for the anchors its contents are staged as. Every dense prefill
outside `dense` mode (a forced one, a gate's fallback, dense-prefix) starts from the agent's own leading fixed
segment, whose KV is exact (computed once from position 0): a turn a reuse mode sends dense never costs more than
dense-prefix's.

A first read (`FIRST_READ_REASON`): in the modes that assemble from base KV, a turn whose contents have no base KV
yet (a chat's new messages) is prefilled like dense-prefix, and each content's KV in that very prompt becomes its
base (as a response's KV in its producer's prompt is); only then, in kvcomm and hybrid modes, is it offered to the
entropy gate and, as a new anchor, given this consumer's deltas. Its first reader gets its first token as soon as
a prefix cache would, and exactly; no isolated prefill is ever run for it.

The engine orchestrates: it picks the path (the gates, dense or reuse) and times its stages (`kvcomm.stages`).
The work is elsewhere: base caches in `kvcomm.base_cache`, alignment and offsets in `kvcomm.alignment`, what a
reused turn still prefills in `kvcomm.tail_prefill`; anchors are read and staged through an `AnchorPool`-like
object. It holds no global state: a Ray worker owns one engine.
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from .alignment import align_and_offset, record_deltas
from .anchor_pool import AnchorPool, PoolTransaction
from .base_cache import AgentCache, AgentState, InputEncoder
from .calibration import resolve as resolve_calibration
from .config import KVCommConfig
from .gate import TurnForecast, first_token_margin, gate
from .generation import DecodeBatch, Sampling, SequenceState, cut_at_stop_string, result_of
from .kv import KVSegment
from .memory_plan import MemoryConfig
from .model_loading import load_model
from .names import BASE_MODES, DENSE_MODES, EMBEDDED_MODEL, FIRST_READ_REASON, MODES, POOL_MODES
from .offsets import compatible_anchors
from .runner import ModelRunner, SequenceKV
from .stages import StageListener, StageTimes
from .tail_prefill import plan_correction, prefill_rest, tail_length
from .templates import AgentTemplate, PromptTemplate, TemplateError

# A content staged as a new anchor by the entropy gate sends every consumer dense (the pool must learn all of its
# deltas); one staged by the turn gate ("predicted_kl") or the fidelity gate ("low_margin") records only the
# consumers that go dense anyway.
TURN_GATE_REASON = "predicted_kl"
FIDELITY_GATE_REASON = "low_margin"

log = logging.getLogger(__name__)


def learn_gate_state(anchor_ids: dict[str, str], gate_reason: dict[str, str], turn_anchor_ids: Mapping[str, str],
                     turn_reasons: Mapping[str, str]) -> list[str]:
    """Merge what one turn reports of a content's gate state (its anchor per placeholder name and the gate's reasons,
    as the turn left them) into what a job or a chat store keeps of it, in place; returns the names whose anchor is
    new. An anchor and the reason it was made for travel together; a reason without a new anchor only fills a name
    nothing is known for. Turns that read a content concurrently each report the state they started from, so a
    plain update would let one turn's stale reason ("matched") overwrite the reason another turn gave with its
    anchor ("low_margin"), and every later consumer would take the content for the entropy gate's new anchor."""
    new = [name for name, anchor in turn_anchor_ids.items() if anchor_ids.get(name) != anchor]
    for name in new:
        anchor_ids[name] = turn_anchor_ids[name]
        if name in turn_reasons:
            gate_reason[name] = turn_reasons[name]
    for name, reason in turn_reasons.items():
        gate_reason.setdefault(name, reason)
    return new


class ContextLengthError(ValueError):
    """A prompt plus its output budget does not fit the model's context."""


@dataclass
class SharedContent:
    """A placeholder's content: its tokens and its base KV at positions 0..n-1 (computed once, shared)."""
    kind: str                          # "input" | "response" | "condition"
    token_ids: tuple[int, ...]
    base: KVSegment | None = None      # [layers, kv_heads, n, head_dim] at positions 0..n-1
    content_key: str = ""              # hash of (kind, tokens): identifies the content within a namespace
    anchor_ids: dict[str, str] = field(default_factory=dict)  # placeholder name -> anchor staged for it
    gate_reason: dict[str, str] = field(default_factory=dict)  # placeholder name -> gate decision reason

    def __post_init__(self) -> None:
        if not self.content_key:
            self.content_key = hashlib.sha256(repr((self.kind, self.token_ids)).encode()).hexdigest()[:20]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class TurnRequest:
    agent: PromptTemplate                   # an AgentTemplate, or a chat's kvcomm.chat_template.ChatTemplate
    contents: Mapping[str, SharedContent]   # placeholder name -> content
    mode: str = "kvcomm"
    sampling: Sampling = field(default_factory=Sampling)
    namespace: str = "default"
    transaction: PoolTransaction | None = None   # the job's staged pool updates (kvcomm and hybrid modes)
    force_dense: bool = False    # per-agent policy: a dense prefill whatever the mode (judges, decision agents)
    on_token: Callable[[int], None] | None = None  # told each generated token as it is sampled (streaming)


@dataclass
class TurnResult:
    agent_id: str
    mode: str
    token_ids: list[int]
    text: str
    first_logits: torch.Tensor       # [vocab] fp32
    reused: bool                     # skipped the prefill of every placeholder and fixed segment
    reason: str                      # why: "reused", "dense_mode", "new_anchor:<gate reason>", ...
    prompt_ids: list[int]
    ttft_s: float
    total_s: float
    timings: dict[str, float]        # fetch, align, offset, prefill (tail or full), decode
    recomputed_tokens: int           # prompt tokens that went through the model before the first token
    response: SharedContent | None = None
    finish_reason: str = ""
    predicted_kl: float | None = None  # the turn gate's forecast (kvcomm/hybrid turns it saw), else None


@dataclass
class PreparedPrompt:
    """A turn whose prompt is in its KV buffer, ready to decode (what `KVCommEngine.prepare` returns)."""
    request: TurnRequest
    kv: SequenceKV
    last_logits: torch.Tensor        # [prompt positions run, vocab]; the last row is the first token's logits
    prompt_ids: list[int]
    reused: bool
    reason: str
    started: float                   # time.perf_counter() when prepare began
    timings: dict[str, float]        # seconds per stage (kvcomm.stages), becomes TurnResult.timings
    recomputed: int
    forecast: TurnForecast | None = None
    first_read: tuple[str, ...] = ()  # placeholders whose content has no base KV yet: this prefill makes it


class KVCommEngine:
    """One model, one process: agent templates, shared contents, and turns in any mode.

    `stage_listener`, when set, is told ``(stage, seconds)`` as each timed stage of a turn's preparation ends
    (fetch, align, offset, select, prefill, record: the keys of `TurnResult.timings`)."""

    def __init__(self, runner: ModelRunner, tokenizer: Any, config: KVCommConfig | None = None,
                 pool: AnchorPool | None = None, *, agent_cache_bytes: int = MemoryConfig.agent_cache_bytes,
                 max_prompt_tokens: int | None = None):
        """`max_prompt_tokens`: the longest prompt this engine's replica admits (its memory plan's, which sizes the
        prefill scratch); None: the model's context. A template, an input or a prompt longer than it is refused
        before its KV is computed."""
        self.runner = runner
        self.max_prompt_tokens = max_prompt_tokens
        self.tokenizer = tokenizer
        self.config = (config or KVCommConfig()).with_calibration()   # knobs no calibration set: uncalibrated
        self.pool = pool if pool is not None else AnchorPool(self.config, runner.rope)
        self.spec = runner.spec
        self.agents = AgentCache(runner, tokenizer, agent_cache_bytes, self._check_fits)
        self.inputs = InputEncoder(runner, tokenizer)
        self.stage_listener: StageListener | None = None
        self._weight_cache: OrderedDict = OrderedDict()   # see kvcomm.offsets: anchors combined once per content

    # ---- templates and contents ---------------------------------------------------------------------------
    @property
    def agent_cache_bytes(self) -> int:
        return self.agents.budget_bytes

    @agent_cache_bytes.setter
    def agent_cache_bytes(self, value: int) -> None:
        self.agents.budget_bytes = value

    def agent_state(self, template: AgentTemplate) -> AgentState:
        """The agent's rendered template and fixed-segment KV, computed once per template (`AgentCache`)."""
        return self.agents.get(template)

    def encode(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer.encode(text, add_special_tokens=False))

    def make_input(self, text_or_ids: str | Sequence[int], kind: str = "input",
                   known: Callable[[Sequence[int]], tuple[Sequence[int], KVSegment] | None] | None = None
                   ) -> SharedContent:
        """A user input or condition: its base KV computed once in isolation (`InputEncoder`). `known`, given the
        content's token ids, may name another input's ids and base KV whose shared start need not be computed."""
        ids = self.encode(text_or_ids) if isinstance(text_or_ids, str) else tuple(int(t) for t in text_or_ids)
        if ids:
            self._check_fits(len(ids), 0, f"{kind} content", lead_in=len(self.inputs.lead_in))
        return SharedContent(kind=kind, token_ids=ids,
                             base=self.inputs.base(ids, known(ids) if known is not None and ids else None))

    def _check_fits(self, prompt_len: int, new_tokens: int, what: str, lead_in: int = 0) -> None:
        """`ContextLengthError` unless `prompt_len` tokens fit a prompt this replica admits and, after `lead_in`
        tokens that are in no prompt (an input's isolated prefill), with `new_tokens` more, the model's context."""
        if self.max_prompt_tokens is not None and prompt_len > self.max_prompt_tokens:
            raise ContextLengthError(f"{what}: {prompt_len} tokens; this replica admits prompts of at most "
                                     f"memory.max_prompt_tokens = {self.max_prompt_tokens}")
        limit = self.spec.max_position_embeddings
        if lead_in + prompt_len + new_tokens > limit:
            raise ContextLengthError(f"{what}: {lead_in + prompt_len} prompt tokens + {new_tokens} new tokens exceed "
                                     f"the model's context of {limit}")

    # ---- anchors: the gate on new content -----------------------------------------------------------------
    def offer_content(self, namespace: str, placeholder: str, content: SharedContent,
                      txn: PoolTransaction | None) -> str:
        """Run the entropy gate on new content for `placeholder`; stage a new anchor when it says so.

        Returns the gate's reason. Content flagged as a new anchor sends every consumer to a dense prefill.
        """
        if txn is None or content.base is None or content.num_tokens == 0:
            return "no_pool"
        snapshot = self.pool.snapshot(namespace)
        decision = gate(content.base, snapshot.anchors(placeholder), self.config)
        content.gate_reason[placeholder] = decision.reason
        if decision.new_anchor:
            content.anchor_ids[placeholder] = txn.add_anchor(placeholder, content.base)
        elif decision.activated_ids:
            txn.activate(decision.activated_ids)
        return decision.reason

    # ---- turns --------------------------------------------------------------------------------------------
    def run_turn(self, request: TurnRequest) -> TurnResult:
        return self.run_turns([request])[0]

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """The model's end-of-sequence tokens: the model config's and the tokenizer's, sorted."""
        stops = set(self.spec.eos_token_ids)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is not None:
            stops.add(int(eos))
        return tuple(sorted(stops))

    def detokenize(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def decode_batch(self, max_batch_size: int) -> DecodeBatch:
        """A continuous-batching decode loop on this engine's runner that can honour stop strings."""
        return DecodeBatch(self.runner, max_batch_size=max_batch_size, detokenize=self.detokenize)

    def run_turns(self, requests: Sequence[TurnRequest]) -> list[TurnResult]:
        """Prepare every turn's cache (one after another), then decode them together in one batch."""
        batch = self.decode_batch(max(1, len(requests)))
        prepared, states = [], []
        for request in requests:
            p = self.prepare(request)
            prepared.append(p)
            states.append(batch.add(p.kv, p.last_logits[-1], request.sampling, on_token=request.on_token,
                                    started_at=p.started))
        decode_start = time.perf_counter()
        batch.run_until_done()
        decode_s = time.perf_counter() - decode_start
        return [self.finish(p, s, decode_s) for p, s in zip(prepared, states)]

    def prepare(self, request: TurnRequest, *, force_reuse: bool = False) -> PreparedPrompt:
        """Build the turn's KV cache up to the first token's logits, in the request's mode.

        `force_reuse` (naive, cacheblend, kvcomm, hybrid only) holds both gates open: the turn is assembled from
        whatever the pool's snapshot offers, never sent to a dense prefill, and nothing is staged in the request's
        transaction; the turn gate's forecast is still computed. Benchmarks use it to measure the reuse path of
        turns a job would have prefilled densely."""
        if request.mode not in MODES:
            raise ValueError(f"unknown mode {request.mode!r}; modes: {', '.join(MODES)}")
        if force_reuse and (request.mode in DENSE_MODES or request.force_dense):
            raise ValueError(f"force_reuse needs a reuse mode without force_dense; got mode {request.mode!r}"
                             f"{' with force_dense' if request.force_dense else ''}")
        started = time.perf_counter()
        state = self.agent_state(request.agent)
        rendered = state.rendered
        missing = [p for p in rendered.placeholders if p not in request.contents]
        if missing:
            raise TemplateError(f"agent {request.agent.agent_id!r}: no content for placeholder(s) "
                                f"{', '.join(missing)}")
        contents = [request.contents[p] for p in rendered.placeholders]
        prompt_ids = rendered.fill({p: c.token_ids for p, c in zip(rendered.placeholders, contents)})
        self._check_fits(len(prompt_ids), request.sampling.max_new_tokens, f"agent {request.agent.agent_id!r}")

        mode = request.mode
        first_read = self._first_read(request, state, contents)
        if first_read and force_reuse:
            raise ValueError(f"force_reuse needs every content's base KV; placeholder(s) {', '.join(first_read)} "
                             "have none")
        if first_read:
            return self._dense(request, state, contents, prompt_ids, started,
                               "forced_dense" if request.force_dense else FIRST_READ_REASON, record=False,
                               first_read=first_read)
        if request.force_dense and mode not in DENSE_MODES:
            return self._dense(request, state, contents, prompt_ids, started, "forced_dense",
                               record=mode in POOL_MODES)
        if mode in POOL_MODES and not force_reuse:
            dense_reason = self._needs_dense(request, state, contents)
            if dense_reason is not None:
                return self._dense(request, state, contents, prompt_ids, started, dense_reason, record=True)
        if mode == "dense":
            return self._dense(request, state, contents, prompt_ids, started, "dense_mode", record=False,
                               reuse_prefix=False)
        if mode == "dense-prefix":
            return self._dense(request, state, contents, prompt_ids, started, "dense_prefix_mode", record=False)
        return self._reuse(request, state, contents, prompt_ids, started, gated=not force_reuse)

    @staticmethod
    def _first_read(request: TurnRequest, state: AgentState, contents: Sequence[SharedContent]) -> tuple[str, ...]:
        """The placeholders whose content has no base KV yet, in the modes that assemble from it: every one that
        holds tokens, or none (a turn cannot reuse some contents and read the others for the first time)."""
        if request.mode not in BASE_MODES:
            return ()
        names = state.rendered.placeholders
        missing = tuple(name for name, c in zip(names, contents) if c.base is None)
        known = [name for name, c in zip(names, contents) if c.base is not None and c.num_tokens]
        if missing and known:
            raise ValueError(f"agent {request.agent.agent_id!r}: placeholder(s) {', '.join(missing)} have no base KV "
                             f"while {', '.join(known)} have: a turn reads all its contents for the first time or none")
        return missing

    def _needs_dense(self, request: TurnRequest, state: AgentState,
                     contents: Sequence[SharedContent]) -> str | None:
        """Why this kvcomm turn must prefill densely (and record anchors), or None when it can reuse."""
        if request.transaction is None:
            return None
        for name, content in zip(state.rendered.placeholders, contents):
            reason = content.gate_reason.get(name, "gate")
            if name in content.anchor_ids and reason not in (TURN_GATE_REASON, FIDELITY_GATE_REASON):
                return "new_anchor:" + reason
        if not self.config.rerotate_deltas:
            return None   # reference mode: a placeholder without compatible anchors is reused naively
        snapshot = self.pool.snapshot(request.namespace)
        consumer = state.rendered.key
        for i, (name, content) in enumerate(zip(state.rendered.placeholders, contents)):
            if content.num_tokens == 0:
                continue
            usable = compatible_anchors(snapshot.anchors(name), consumer, content.num_tokens,
                                        len(state.rendered.fixed[i + 1]), self.config.min_anchor_coverage)
            if not usable:
                if name not in content.anchor_ids:
                    # promote the content to an anchor so this consumer's deltas get learned
                    content.anchor_ids[name] = request.transaction.add_anchor(name, content.base)
                    content.gate_reason[name] = "no_compatible_anchor"
                return "no_compatible_anchor"
        return None

    def _dense(self, request: TurnRequest, state: AgentState, contents: Sequence[SharedContent],
               prompt_ids: list[int], started: float, reason: str, *, record: bool,
               reuse_prefix: bool = True, first_read: tuple[str, ...] = ()) -> PreparedPrompt:
        """Prefill the whole prompt exactly: after the agent's leading fixed segment's KV (`reuse_prefix`), or all
        of it (dense mode, the oracle); with `record`, stage the deltas of the turn's new anchors; `first_read`:
        the placeholders whose base KV `finish` takes from this prefill."""
        times = StageTimes(listener=self.stage_listener)
        n_prefix = len(state.rendered.fixed[0]) if reuse_prefix else 0
        with times.stage("prefill"):
            if n_prefix and n_prefix < len(prompt_ids):
                logits, kv = self.runner.prefill(prompt_ids[n_prefix:], context=state.fixed_kv[0],
                                                 extra_capacity=request.sampling.max_new_tokens + 1)
            else:
                n_prefix = 0
                logits, kv = self.runner.prefill(prompt_ids, extra_capacity=request.sampling.max_new_tokens + 1)
        if record and request.transaction is not None:
            with times.stage("record"):
                record_deltas(state, contents, kv, self.pool.snapshot(request.namespace), request.transaction,
                              self.runner.rope, self.config)
        return PreparedPrompt(request, kv, logits, prompt_ids, False, reason, started, times.seconds,
                              len(prompt_ids) - n_prefix, first_read=first_read)

    def _reuse(self, request: TurnRequest, state: AgentState, contents: Sequence[SharedContent],
               prompt_ids: list[int], started: float, *, gated: bool = True) -> PreparedPrompt:
        """Assemble the prompt from cached KV (aligned, offset in kvcomm/hybrid), then prefill what is left;
        `gated`: a kvcomm turn whose forecast is too high, or whose first token is fragile, falls back to dense
        (needs a transaction)."""
        mode, rendered = request.mode, state.rendered
        layout = rendered.layout([c.num_tokens for c in contents])
        times = StageTimes(("fetch", "align", "offset"), listener=self.stage_listener)
        with times.stage("fetch"):
            bases = [c.base for c in contents]   # in-process: already here (Ray workers time their fetch)
        snapshot = self.pool.snapshot(request.namespace) if mode in POOL_MODES else None
        # the turn's own buffer: the cache is assembled in it and the tail prefill and the decode extend it
        kv = self.runner.new_kv(None, extra_capacity=len(prompt_ids) + request.sampling.max_new_tokens + 1)
        errors = align_and_offset(state, layout, contents, bases, snapshot, self.runner.rope, self.config,
                                  self._weight_cache, times, into=kv)
        tail_len = tail_length(mode, rendered, len(prompt_ids), self.config)
        whole = kv.segment()                                                        # [L, H, prompt, D]
        tail_ids = torch.tensor(prompt_ids[len(prompt_ids) - tail_len:], dtype=torch.int64)

        forecast, chosen = None, torch.empty(0, dtype=torch.int64)
        if snapshot is not None and state.probe is not None:
            with times.stage("select"):
                forecast, chosen = plan_correction(mode, state, layout, whole, errors, tail_len, self.runner,
                                                   self.config)
            if gated and mode == "kvcomm" and forecast.dense and request.transaction is not None:
                return self._turn_gate_fallback(request, state, contents, prompt_ids, started, forecast,
                                                TURN_GATE_REASON)

        with times.stage("prefill"):
            logits, kv, recomputed = prefill_rest(mode, self.runner, self.config, rendered, kv, prompt_ids, tail_ids,
                                                  chosen, request.sampling.max_new_tokens + 1)
        if (gated and mode == "kvcomm" and request.transaction is not None
                and first_token_margin(logits[-1]) < self.config.gate_min_margin):
            return self._turn_gate_fallback(request, state, contents, prompt_ids, started, forecast,
                                            FIDELITY_GATE_REASON)
        return PreparedPrompt(request, kv, logits, prompt_ids, True, "reused", started, times.seconds, recomputed,
                              forecast)

    def _turn_gate_fallback(self, request: TurnRequest, state: AgentState, contents: Sequence[SharedContent],
                            prompt_ids: list[int], started: float, forecast: TurnForecast | None,
                            reason: str) -> PreparedPrompt:
        """The turn gate predicted too high a KL, or the fidelity gate found the first token fragile (`reason`):
        prefill densely, and let the pool learn from it (every content of the turn not yet staged becomes an anchor
        holding this consumer's deltas). The forecast stays reported."""
        for name, content in zip(state.rendered.placeholders, contents):
            if content.num_tokens and name not in content.anchor_ids:
                content.anchor_ids[name] = request.transaction.add_anchor(name, content.base)
                content.gate_reason[name] = reason
        prepared = self._dense(request, state, contents, prompt_ids, started, "new_anchor:" + reason, record=True)
        prepared.forecast = forecast
        return prepared

    def finish(self, prepared: PreparedPrompt, state: SequenceState, decode_s: float) -> TurnResult:
        gen = result_of(state)
        request = prepared.request
        # A stop string ends the text; the response keeps the tokens wholly before it (and their KV).
        text, keep = cut_at_stop_string(gen.token_ids, request.sampling.stop, self.detokenize)
        gen.token_ids = gen.token_ids[:keep]
        response = None
        if gen.token_ids:
            response = SharedContent(kind="response", token_ids=tuple(gen.token_ids),
                                     base=self._base_from(gen.kv, gen.prompt_len, gen.prompt_len + len(gen.token_ids)))
        timings = dict(prepared.timings)
        if prepared.first_read:
            times = StageTimes(listener=self.stage_listener)
            try:
                with times.stage("record"):
                    self._learn_first_read(prepared, gen.kv)
            except Exception:  # noqa: BLE001 - the answer stands: what was learned is only ever reused later
                log.exception("agent %r: learning from a first read failed; its contents get base KV when next "
                              "read", request.agent.agent_id)
                for name in prepared.first_read:     # read first again next time; no gate state kept
                    content = request.contents[name]
                    content.base = None
                    content.anchor_ids.pop(name, None)
                    content.gate_reason.pop(name, None)
            timings["record"] = timings.get("record", 0.0) + times.seconds["record"]
        timings["decode"] = gen.total_s - gen.ttft_s
        return TurnResult(
            agent_id=request.agent.agent_id, mode=request.mode, token_ids=gen.token_ids, text=text,
            first_logits=gen.first_logits, reused=prepared.reused, reason=prepared.reason,
            prompt_ids=prepared.prompt_ids, ttft_s=gen.ttft_s, total_s=gen.total_s, timings=timings,
            recomputed_tokens=prepared.recomputed, response=response, finish_reason=gen.finish_reason,
            predicted_kl=None if prepared.forecast is None else prepared.forecast.predicted_kl)

    def _base_from(self, kv: SequenceKV, begin: int, end: int) -> KVSegment:
        """[layers, kv_heads, end - begin, head_dim]: a copy of the turn's KV of tokens [begin, end), keys
        re-rotated to start at position 0 (a content's base KV taken from the prompt it was read or made in)."""
        seg = kv.segment(begin, end)
        return KVSegment(seg.keys.clone(), seg.values.clone(), seg.start).shifted(self.runner.rope, 0)

    def _learn_first_read(self, prepared: PreparedPrompt, kv: SequenceKV) -> None:
        """A first read's contents take their KV in this exact prompt as their base; in the pool modes each is then
        offered to the entropy gate and, as a new anchor, gets this consumer's deltas (`record_deltas`)."""
        request = prepared.request
        state = self.agent_state(request.agent)
        contents = [request.contents[p] for p in state.rendered.placeholders]
        layout = state.rendered.layout([c.num_tokens for c in contents])
        for name, (begin, end) in zip(state.rendered.placeholders, layout.placeholder_spans):
            if name in prepared.first_read:
                request.contents[name].base = self._base_from(kv, begin, end)
        if request.mode not in POOL_MODES or request.transaction is None:
            return
        for name in prepared.first_read:
            self.offer_content(request.namespace, name, request.contents[name], request.transaction)
        record_deltas(state, contents, kv, self.pool.snapshot(request.namespace), request.transaction,
                      self.runner.rope, self.config)


def build_engine(model: str = EMBEDDED_MODEL, *, device: str = "cpu", dtype: str | None = None,
                 random_weights: bool = False, config: KVCommConfig | None = None,
                 pool: AnchorPool | None = None) -> KVCommEngine:
    """One call from a model name to a ready engine: load the weights, build the runner, the pool and the engine with
    the model's calibration applied (`kvcomm.calibration.resolve`, which warns when the model has none)."""
    loaded = load_model(model, device=device, dtype=dtype, random_weights=random_weights)
    if loaded.tokenizer is None:
        raise ValueError(f"{model}: no tokenizer available; agent templates need one")
    runner = ModelRunner(loaded.spec, loaded.state_dict)
    config, _ = resolve_calibration(config or KVCommConfig(), model)
    return KVCommEngine(runner, loaded.tokenizer, config, pool if pool is not None else AnchorPool(config, runner.rope))
