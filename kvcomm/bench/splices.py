"""Diagnostic splices of the fidelity benchmark, and its per-token-group KV errors.

This module owns the caches that exist only to explain errors, never to serve: "naive-other" (each placeholder's
KV as it sat in another agent's dense prompt), the oracle splices (the dense KV itself for the placeholders, or for
the fixed segments), the offset diagnostics (compatible and effective anchors per turn), and the relative K/V error
of a cache against dense per token group (the reused span, its placeholders, question, responses, fixed segments).
"""
from __future__ import annotations

import time
from typing import Sequence

import torch

from ..engine import KVCommEngine, SharedContent
from ..generation import Sampling
from ..kv import KVSegment, concat
from ..offsets import compatible_anchors, estimate_offsets
from ..runner import SequenceKV
from ..templates import AgentTemplate
from .turns import NAMESPACE, Case, PreparedTurn


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


def oracle_placeholders(engine: KVCommEngine, agent: AgentTemplate, contents: dict[str, SharedContent],
                         dense_kv: SequenceKV) -> dict[str, KVSegment]:
    """Every placeholder's KV exactly as dense prefill computed it in this very prompt."""
    rendered = engine.agent_state(agent).rendered
    layout = rendered.layout([contents[n].num_tokens for n in rendered.placeholders])
    return {name: _copy(dense_kv.segment(*span)) for name, span in zip(rendered.placeholders,
                                                                       layout.placeholder_spans)}


def oracle_fixed(engine: KVCommEngine, agent: AgentTemplate, contents: dict[str, SharedContent],
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


