"""The per-turn engine: builds one agent turn's KV cache in the requested serving mode and generates.

Modes, all on the same runner and the same token sequence:
  dense         full prefill of the whole prompt (the oracle)
  dense-prefix  exact prefix caching of the agent's leading fixed segment, prefill of the rest
  naive         reuse every placeholder's base KV and every fixed segment, positions re-rotated, no offsets
  cacheblend    naive assembly, then the worst-deviating tokens recomputed from the check layer on
  kvcomm        naive assembly plus offsets interpolated from the anchor pool, then the tokens the prompt's last
                token attends to most recomputed (`recompute_ratio`, kvcomm.corrections); two gates send a turn
                to a dense prefill that records a new anchor: the entropy gate on new content, and the turn gate
                on the turn's predicted KL (kvcomm.gate)
  hybrid        kvcomm's offsets, then CacheBlend-style recompute of the worst-matching tokens

A request may force a dense prefill (`TurnRequest.force_dense`: a judge or decision agent kept exact); in kvcomm
and hybrid modes such a turn still records deltas for the anchors its contents are staged as.

The engine owns per-process caches (each agent's fixed-segment KV, shared contents' base KV) and reads and
stages anchors through an `AnchorPool`-like object. It holds no global state: a Ray worker owns one engine.
"""
from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from .anchor_pool import AnchorPool, PoolTransaction
from .config import KVCommConfig
from .corrections import attention_mass, probe_queries, select_recompute, span_starts, token_errors
from .gate import TurnForecast, gate, predict_kl
from .generation import DecodeBatch, Sampling, SequenceState, cut_at_stop_string, result_of
from .kv import KVSegment, concat
from .memory_plan import MemoryConfig
from .offsets import OffsetEstimate, compatible_anchors, estimate_offsets, recorded_error
from .runner import ModelRunner, SequenceKV
from .templates import AgentTemplate, PromptTemplate, RenderedTemplate, TemplateError, render_template

_WEIGHT_CACHE_ENTRIES = 32    # anchor weights shared by the consumers of one content (oldest dropped)
MODES = ("dense", "dense-prefix", "naive", "cacheblend", "kvcomm", "hybrid")
POOL_MODES = ("kvcomm", "hybrid")
# A content staged as a new anchor by the entropy gate sends every consumer dense (the pool must learn all of its
# deltas); one staged by the turn gate ("predicted_kl") records only the consumers that go dense anyway.
TURN_GATE_REASON = "predicted_kl"


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
    agent: PromptTemplate                   # an AgentTemplate, or a chat's kvcomm.chat.ChatTemplate
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
class _AgentState:
    rendered: RenderedTemplate
    fixed_kv: list[KVSegment]        # each fixed segment's KV at its template positions
    probe: torch.Tensor | None       # [layers, heads, head_dim] the last template token's queries at position 0


@dataclass
class _Prepared:
    """A turn whose prompt is in its KV buffer, ready to decode."""
    request: TurnRequest
    kv: SequenceKV
    last_logits: torch.Tensor
    prompt_ids: list[int]
    reused: bool
    reason: str
    started: float
    timings: dict[str, float]
    recomputed: int
    forecast: TurnForecast | None = None


class KVCommEngine:
    """One model, one process: agent templates, shared contents, and turns in any mode."""

    def __init__(self, runner: ModelRunner, tokenizer: Any, config: KVCommConfig | None = None,
                 pool: AnchorPool | None = None, *, agent_cache_bytes: int = MemoryConfig.agent_cache_bytes):
        self.runner = runner
        self.tokenizer = tokenizer
        self.config = (config or KVCommConfig()).with_calibration()   # knobs no calibration set: uncalibrated
        self.pool = pool if pool is not None else AnchorPool(self.config, runner.rope)
        self.spec = runner.spec
        self._agents: OrderedDict[AgentTemplate, _AgentState] = OrderedDict()  # LRU
        self._agent_bytes = 0                   # fixed-segment KV held by self._agents
        self.agent_cache_bytes = agent_cache_bytes
        self._lead_in = self._input_lead_in()
        self._lead_in_kv: KVSegment | None = None
        self._weight_cache: OrderedDict = OrderedDict()   # see kvcomm.offsets: anchors combined once per content

    # ---- templates and contents ---------------------------------------------------------------------------
    def _input_lead_in(self) -> tuple[int, ...]:
        """Tokens prepended when computing an input's base KV in isolation (then dropped): a user-turn header,
        so the content's first token is not the attention sink."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            marker = "\u2063KVCOMM\u2063"
            text = tok.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
            head = text.split(marker)[0]
            return tuple(tok.encode(head, add_special_tokens=False))
        bos = getattr(tok, "bos_token_id", None)
        return (bos,) if bos is not None else ()

    def agent_state(self, template: AgentTemplate) -> _AgentState:
        """The agent's rendered template and fixed-segment KV, computed once per template (by content).

        The most recently used templates are kept while their KV fits `agent_cache_bytes` (the one just used
        always), so memory stays bounded when many distinct templates pass through one engine."""
        state = self._agents.get(template)
        if state is not None:
            self._agents.move_to_end(template)
            return state
        rendered = render_template(template, self.tokenizer)
        ids = rendered.template_ids()
        self._check_fits(len(ids), 0, template.agent_id)
        _, kv = self.runner.prefill(ids)
        segments, cursor = [], 0
        spans = [len(rendered.fixed[0])]
        for marker, fixed in zip(rendered.marker_ids, rendered.fixed[1:]):
            spans += [len(marker), len(fixed)]
        for i, n in enumerate(spans):
            if i % 2 == 0:  # fixed segment (odd entries are placeholder markers)
                segments.append(_copy(kv.segment(cursor, cursor + n)))   # copied out of the buffer
            cursor += n
        probe = probe_queries(self.runner, ids, kv) if rendered.placeholders and len(ids) > 1 else None
        state = _AgentState(rendered, segments, probe)
        self._agents[template] = state
        self._agent_bytes += sum(seg.nbytes for seg in segments)
        while self._agent_bytes > self.agent_cache_bytes and len(self._agents) > 1:
            _, evicted = self._agents.popitem(last=False)
            self._agent_bytes -= sum(seg.nbytes for seg in evicted.fixed_kv)
        return state

    def encode(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer.encode(text, add_special_tokens=False))

    def make_input(self, text_or_ids: str | Sequence[int], kind: str = "input") -> SharedContent:
        """A user input or condition: its base KV computed once in isolation (after the lead-in, dropped)."""
        ids = self.encode(text_or_ids) if isinstance(text_or_ids, str) else tuple(int(t) for t in text_or_ids)
        content = SharedContent(kind=kind, token_ids=ids)
        if ids:
            self._check_fits(len(self._lead_in) + len(ids), 0, f"{kind} content")
            context = self._lead_in_cache()
            _, kv = self.runner.prefill(ids, context=context)
            seg = kv.segment(len(self._lead_in))
            content.base = KVSegment(seg.keys.clone(), seg.values.clone(), seg.start).shifted(self.runner.rope, 0)
        else:
            content.base = KVSegment.empty(self.spec.num_layers, self.spec.num_kv_heads, self.spec.head_dim,
                                           dtype=self.runner.dtype, device=self.runner.device)
        return content

    def _lead_in_cache(self) -> KVSegment | None:
        if not self._lead_in:
            return None
        if self._lead_in_kv is None:
            _, kv = self.runner.prefill(self._lead_in)
            seg = kv.segment()
            self._lead_in_kv = KVSegment(seg.keys.clone(), seg.values.clone(), 0)
        return self._lead_in_kv

    def _check_fits(self, prompt_len: int, new_tokens: int, what: str) -> None:
        limit = self.spec.max_position_embeddings
        if prompt_len + new_tokens > limit:
            raise ContextLengthError(f"{what}: {prompt_len} prompt tokens + {new_tokens} new tokens exceed the "
                                     f"model's context of {limit}")

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

    def prepare(self, request: TurnRequest) -> _Prepared:
        """Build the turn's KV cache up to the first token's logits, in the request's mode."""
        if request.mode not in MODES:
            raise ValueError(f"unknown mode {request.mode!r}; modes: {', '.join(MODES)}")
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
        if request.force_dense and mode not in ("dense", "dense-prefix"):
            return self._dense(request, state, contents, prompt_ids, started, "forced_dense",
                               record=mode in POOL_MODES)
        if mode in POOL_MODES:
            dense_reason = self._needs_dense(request, state, contents)
            if dense_reason is not None:
                return self._dense(request, state, contents, prompt_ids, started, dense_reason, record=True)
        if mode == "dense":
            return self._dense(request, state, contents, prompt_ids, started, "dense_mode", record=False)
        if mode == "dense-prefix":
            return self._dense(request, state, contents, prompt_ids, started, "dense_prefix_mode", record=False,
                               reuse_prefix=True)
        return self._reuse(request, state, contents, prompt_ids, started)

    def _needs_dense(self, request: TurnRequest, state: _AgentState,
                     contents: Sequence[SharedContent]) -> str | None:
        """Why this kvcomm turn must prefill densely (and record anchors), or None when it can reuse."""
        if request.transaction is None:
            return None
        for name, content in zip(state.rendered.placeholders, contents):
            reason = content.gate_reason.get(name, "gate")
            if name in content.anchor_ids and reason != TURN_GATE_REASON:
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

    def _dense(self, request: TurnRequest, state: _AgentState, contents: Sequence[SharedContent],
               prompt_ids: list[int], started: float, reason: str, *, record: bool,
               reuse_prefix: bool = False) -> _Prepared:
        t0 = time.perf_counter()
        n_prefix = len(state.rendered.fixed[0]) if reuse_prefix else 0
        if n_prefix and n_prefix < len(prompt_ids):
            logits, kv = self.runner.prefill(prompt_ids[n_prefix:], context=state.fixed_kv[0],
                                             extra_capacity=request.sampling.max_new_tokens + 1)
        else:
            n_prefix = 0
            logits, kv = self.runner.prefill(prompt_ids, extra_capacity=request.sampling.max_new_tokens + 1)
        timings = {"prefill": time.perf_counter() - t0}
        if record and request.transaction is not None:
            t1 = time.perf_counter()
            self._record_deltas(request, state, contents, kv)
            timings["record"] = time.perf_counter() - t1
        return _Prepared(request, kv, logits, prompt_ids, False, reason, started, timings,
                         len(prompt_ids) - n_prefix)

    def _record_deltas(self, request: TurnRequest, state: _AgentState, contents: Sequence[SharedContent],
                       kv: SequenceKV) -> None:
        """Stage real-minus-base deltas for every placeholder of this turn that is a new anchor, each with the
        error the pool's other anchors would have made on it (`ConsumerDeltas.offset_error`)."""
        rope = self.runner.rope
        layout = state.rendered.layout([c.num_tokens for c in contents])
        snapshot = self.pool.snapshot(request.namespace)
        for i, (name, content) in enumerate(zip(state.rendered.placeholders, contents)):
            anchor_id = content.anchor_ids.get(name)
            if anchor_id is None or content.num_tokens == 0:
                continue
            ph_start, ph_end = layout.placeholder_spans[i]
            pf_start, pf_end = layout.fixed_spans[i + 1]
            ph_real, pf_real = _copy(kv.segment(ph_start, ph_end)), _copy(kv.segment(pf_start, pf_end))
            ph_base = content.base.shifted(rope, ph_start)
            pf_base = state.fixed_kv[i + 1].shifted(rope, pf_start)
            others = [a for a in snapshot.anchors(name) if a.anchor_id != anchor_id]
            estimate = estimate_offsets(ph_base, pf_base, others, state.rendered.key, rope, self.config)
            request.transaction.add_deltas(
                anchor_id, state.rendered.key, ph_real=ph_real, ph_base_rotated=ph_base, pf_real=pf_real,
                pf_base=pf_base, offset_error=recorded_error(estimate, ph_real, ph_base, pf_real, pf_base))

    def _reuse(self, request: TurnRequest, state: _AgentState, contents: Sequence[SharedContent],
               prompt_ids: list[int], started: float) -> _Prepared:
        rope, cfg, mode = self.runner.rope, self.config, request.mode
        rendered = state.rendered
        layout = rendered.layout([c.num_tokens for c in contents])
        timings = {"fetch": 0.0, "align": 0.0, "offset": 0.0}
        t = time.perf_counter()
        bases = [c.base for c in contents]   # in-process: already here (Ray workers time their fetch)
        timings["fetch"] += time.perf_counter() - t
        snapshot = self.pool.snapshot(request.namespace) if mode in POOL_MODES else None

        pieces: list[KVSegment] = [state.fixed_kv[0]]
        errors: list[float | None] = []      # per placeholder: its anchors' recorded offset error
        for i, (name, content) in enumerate(zip(rendered.placeholders, contents)):
            t = time.perf_counter()
            ph = bases[i].shifted(rope, layout.placeholder_spans[i][0])
            pf = state.fixed_kv[i + 1].shifted(rope, layout.fixed_spans[i + 1][0])
            timings["align"] += time.perf_counter() - t
            errors.append(None)
            if snapshot is not None and content.num_tokens:
                t = time.perf_counter()
                estimate = estimate_offsets(ph, pf, snapshot.anchors(name), rendered.key, rope, cfg,
                                            weight_cache=self._weight_cache, content_key=content.content_key)
                if estimate is not None:
                    ph = ph.plus(estimate.ph_key, estimate.ph_value)
                    pf = pf.plus(estimate.pf_key, estimate.pf_value)
                errors[-1] = self._anchor_error(snapshot.anchors(name), estimate, rendered.key)
                timings["offset"] += time.perf_counter() - t
            pieces += [ph, pf]
        while len(self._weight_cache) > _WEIGHT_CACHE_ENTRIES:
            self._weight_cache.popitem(last=False)

        t = time.perf_counter()
        tail_len = self._tail_length(rendered, len(prompt_ids))
        whole = concat([p for p in pieces if p.num_tokens])                       # [L, H, prompt, D]
        assembled = whole.slice(0, len(prompt_ids) - tail_len)
        tail_ids = torch.tensor(prompt_ids[len(prompt_ids) - tail_len:], dtype=torch.int64)
        timings["align"] += time.perf_counter() - t

        forecast, chosen = None, torch.empty(0, dtype=torch.int64)
        if snapshot is not None and state.probe is not None:
            t = time.perf_counter()
            forecast, chosen = self._plan_correction(mode, state, layout, whole, errors, tail_len)
            timings["select"] = time.perf_counter() - t
            if mode == "kvcomm" and forecast.dense and request.transaction is not None:
                return self._turn_gate_fallback(request, state, contents, prompt_ids, started, forecast)

        t = time.perf_counter()
        extra = request.sampling.max_new_tokens + 1
        if mode in ("cacheblend", "hybrid"):
            ratio = cfg.blend_recompute_ratio if mode == "cacheblend" else cfg.hybrid_recompute_ratio
            logits, kv, selected = self.runner.blend_prefill(
                assembled, torch.tensor(prompt_ids[:assembled.num_tokens]), tail_ids, recompute_ratio=ratio,
                check_layer=min(cfg.blend_check_layer, self.spec.num_layers - 1),
                protected_prefix=len(rendered.fixed[0]), extra_capacity=extra)
            recomputed = tail_len + int(selected.numel())
        elif chosen.numel():
            logits, kv, _ = self.runner.recompute_prefill(
                assembled, torch.tensor(prompt_ids[:assembled.num_tokens]), tail_ids, chosen, extra_capacity=extra)
            recomputed = tail_len + int(chosen.numel())
        else:
            logits, kv = self.runner.prefill(tail_ids, context=assembled, extra_capacity=extra)
            recomputed = tail_len
        timings["prefill"] = time.perf_counter() - t
        return _Prepared(request, kv, logits, prompt_ids, True, "reused", started, timings, recomputed, forecast)

    def _anchor_error(self, anchors: Sequence[Any], estimate: OffsetEstimate | None, consumer: str) -> float:
        """The mean recorded offset error of the anchors an estimate used (`unknown_anchor_error` where an anchor
        recorded none, or when there was no estimate at all)."""
        if estimate is None:
            return self.config.unknown_anchor_error
        by_id = {a.anchor_id: a for a in anchors}
        recorded = [by_id[i].deltas[consumer].offset_error for i in estimate.anchor_ids]
        known = [self.config.unknown_anchor_error if e is None else e for e in recorded]
        return sum(known) / len(known)

    def _plan_correction(self, mode: str, state: _AgentState, layout: Any, whole: KVSegment,
                         errors: Sequence[float | None], tail_len: int) -> tuple[TurnForecast, torch.Tensor]:
        """For a reused kvcomm/hybrid turn: the cached tokens kvcomm recomputes (query-driven, plus span starts)
        and the turn gate's forecast for what is left reused (hybrid: for its offsets and tail alone; its
        CacheBlend selection happens later)."""
        cfg = self.config
        length = whole.num_tokens                                    # prompt tokens; the last one is recomputed
        attention = attention_mass(state.probe, whole.keys[:, :, :length - 1], length - 1, self.runner.rope,
                                   1.0 / math.sqrt(self.spec.head_dim))                             # [length - 1]
        begin, end = len(state.rendered.fixed[0]), length - tail_len
        chosen = torch.empty(0, dtype=torch.int64)
        if mode == "kvcomm":
            starts = span_starts(layout, cfg.recompute_span_starts, end) if cfg.recompute_span_starts else ()
            chosen = select_recompute(attention, begin, end, cfg.recompute_ratio,
                                      [t for t in starts if t >= begin])
        forecast = predict_kl(attention, token_errors(layout, errors, length - 1),
                              torch.cat([chosen, torch.arange(end, length - 1)]), cfg.kl_scale, cfg.gate_max_kl)
        return forecast, chosen

    def _turn_gate_fallback(self, request: TurnRequest, state: _AgentState, contents: Sequence[SharedContent],
                            prompt_ids: list[int], started: float, forecast: TurnForecast) -> _Prepared:
        """The turn gate predicted too high a KL: prefill densely, and let the pool learn from it (every content
        of the turn not yet staged becomes an anchor holding this consumer's deltas)."""
        for name, content in zip(state.rendered.placeholders, contents):
            if content.num_tokens and name not in content.anchor_ids:
                content.anchor_ids[name] = request.transaction.add_anchor(name, content.base)
                content.gate_reason[name] = TURN_GATE_REASON
        prepared = self._dense(request, state, contents, prompt_ids, started, "new_anchor:" + TURN_GATE_REASON,
                               record=True)
        prepared.forecast = forecast
        return prepared

    def _tail_length(self, rendered: RenderedTemplate, prompt_len: int) -> int:
        """How many trailing prompt tokens are recomputed instead of reused (at least one)."""
        if self.config.tail_policy == "last_segment" and rendered.placeholders:
            return max(1, min(len(rendered.fixed[-1]), prompt_len))
        return 1

    def finish(self, prepared: _Prepared, state: SequenceState, decode_s: float) -> TurnResult:
        gen = result_of(state)
        request = prepared.request
        # A stop string ends the text; the response keeps the tokens wholly before it (and their KV).
        text, keep = cut_at_stop_string(gen.token_ids, request.sampling.stop, self.detokenize)
        gen.token_ids = gen.token_ids[:keep]
        response = None
        if gen.token_ids:
            seg = gen.kv.segment(gen.prompt_len, gen.prompt_len + len(gen.token_ids))
            base = KVSegment(seg.keys.clone(), seg.values.clone(), seg.start).shifted(self.runner.rope, 0)
            response = SharedContent(kind="response", token_ids=tuple(gen.token_ids), base=base)
        timings = dict(prepared.timings)
        timings["decode"] = gen.total_s - gen.ttft_s
        return TurnResult(
            agent_id=request.agent.agent_id, mode=request.mode, token_ids=gen.token_ids, text=text,
            first_logits=gen.first_logits, reused=prepared.reused, reason=prepared.reason,
            prompt_ids=prepared.prompt_ids, ttft_s=gen.ttft_s, total_s=gen.total_s, timings=timings,
            recomputed_tokens=prepared.recomputed, response=response, finish_reason=gen.finish_reason,
            predicted_kl=None if prepared.forecast is None else prepared.forecast.predicted_kl)


def _copy(segment: KVSegment) -> KVSegment:
    return KVSegment(segment.keys.clone(), segment.values.clone(), segment.start)
