"""The per-turn engine on the real embedded model: every mode against dense on identical tokens."""
from __future__ import annotations

import pytest
import torch

from kvcomm.anchor_pool import AnchorPool
from kvcomm.config import KVCommConfig
from kvcomm.engine import FIDELITY_GATE_REASON, ContextLengthError, KVCommEngine, TurnRequest, learn_gate_state
from kvcomm.names import MODES
from kvcomm.generation import Sampling
from kvcomm.kv import KVSegment
from kvcomm.templates import AgentTemplate, TemplateError

QUESTION = "A farmer has 12 cows and buys 7 more. Then 4 cows are sold. How many cows does the farmer have now?"
OTHER_QUESTION = "A baker bakes 30 rolls and sells 18 of them. Then she bakes 9 more. How many rolls does she have now?"
SAMPLING = Sampling(max_new_tokens=6)


def _engine(parts, config: KVCommConfig | None = None) -> KVCommEngine:
    runner, tokenizer = parts
    config = config or KVCommConfig()
    return KVCommEngine(runner, tokenizer, config, AnchorPool(config, runner.rope))


def _agent(i: int) -> AgentTemplate:
    roles = ["careful math solver", "skeptical analyst who double-checks arithmetic", "strict inspector"]
    return AgentTemplate(f"a{i}", f"You are a {roles[i]}. Reason step by step and state the final number.",
                         "Question:\n{user_question}\nGive your answer in one sentence.")


def _rel_err(x: torch.Tensor, dense: torch.Tensor) -> float:
    return ((x - dense).norm() / dense.norm()).item()


def _kl(dense_logits: torch.Tensor, logits: torch.Tensor) -> float:
    p, q = torch.log_softmax(dense_logits.float(), -1), torch.log_softmax(logits.float(), -1)
    return float((p.exp() * (p - q)).sum())


def _prepare(engine, agent, content, mode, txn=None, namespace="ns"):
    return engine.prepare(TurnRequest(agent, {"user_question": content}, mode=mode, sampling=SAMPLING,
                                      namespace=namespace, transaction=txn))


def test_an_input_that_begins_as_a_known_one_computes_only_the_rest(smollm2_engine_parts):
    """Base KV is causal: a content's first m tokens have the base of those m tokens alone. So a new input sharing its
    start with a known one takes that part of the known base and computes the rest after it, and a content that is a
    start of the known one computes nothing; both equal the base computed from scratch."""
    engine = _engine(smollm2_engine_parts)
    known = engine.make_input(QUESTION + " Show your work.")
    for text in (QUESTION + " Then 2 more are born. How many now?", QUESTION, OTHER_QUESTION):
        scratch = engine.make_input(text)
        shared = engine.make_input(text, known=lambda ids: (known.token_ids, known.base))
        assert shared.token_ids == scratch.token_ids and shared.base.start == 0
        assert shared.base.num_tokens == len(scratch.token_ids)
        for side in ("keys", "values"):
            got, want = getattr(shared.base, side), getattr(scratch.base, side)
            assert _rel_err(got.float(), want.float()) < 1e-5, (text, side)
    assert engine.make_input(QUESTION, known=lambda ids: (known.token_ids, known.base)).base.keys.data_ptr() != \
        known.base.keys.data_ptr()                  # its own storage, not a view into the known content's


def test_reuse_is_exact_when_the_prefix_is_the_isolation_prefix(smollm2_engine_parts):
    """A template whose leading segment is exactly the lead-in the base cache was computed under: every reuse
    mode must then reproduce dense (same tokens, same positions, same prefix)."""
    engine = _engine(smollm2_engine_parts)
    agent = AgentTemplate("solo", "", "{user_question}\nAnswer briefly.")
    content = engine.make_input(QUESTION)
    dense = _prepare(engine, agent, content, "dense")
    for mode in MODES:
        p = _prepare(engine, agent, content, mode)
        assert p.prompt_ids == dense.prompt_ids, mode
        diff = (p.last_logits[-1] - dense.last_logits[-1]).abs().max().item()
        assert diff < 1e-3, (mode, diff)
        assert int(p.last_logits[-1].argmax()) == int(dense.last_logits[-1].argmax()), mode


def _pool_with_one_anchor(engine, agent, content, value_delta: float) -> None:
    """Commit one anchor for `content` at {user_question} whose deltas for `agent` are exactly `value_delta` on every
    value (keys unchanged): what a dense prefill would have recorded if the prefix had shifted values that much."""
    rope, state = engine.runner.rope, engine.agent_state(agent)
    layout = state.rendered.layout([content.num_tokens])
    (ph_start, _), (pf_start, _) = layout.placeholder_spans[0], layout.fixed_spans[1]
    ph_base = content.base.shifted(rope, ph_start)
    pf_base = state.fixed_kv[1].shifted(rope, pf_start)
    txn = engine.pool.begin("ns")
    anchor = txn.add_anchor("user_question", content.base)
    txn.add_deltas(anchor, state.rendered.key,
                   ph_real=KVSegment(ph_base.keys, ph_base.values + value_delta, ph_start), ph_base_rotated=ph_base,
                   pf_real=KVSegment(pf_base.keys, pf_base.values + value_delta, pf_start), pf_base=pf_base)
    engine.pool.commit(txn)


def test_zero_offset_equals_naive_bit_for_bit(smollm2_engine_parts):
    """With a compatible anchor whose deltas are all zero, kvcomm must be naive exactly; the same anchor with a
    value delta of 0.01 must move exactly the placeholder's values of layers >= 1 by 0.01 (so the anchor is used,
    and the offset lands where it belongs). A wrong span, a forgotten layer-0 reset or a scaled weight fails."""
    agent = _agent(1)
    zero = _engine(smollm2_engine_parts, KVCommConfig(tail_policy="last_token", kvcomm_tail="last_token"))
    content = zero.make_input(QUESTION)
    _pool_with_one_anchor(zero, agent, content, 0.0)
    naive = _prepare(zero, agent, content, "naive")
    kvcomm = _prepare(zero, agent, content, "kvcomm", txn=None)   # forced reuse with the zero-delta anchor
    assert naive.reused and kvcomm.reused
    n = naive.kv.length
    assert torch.equal(naive.kv.segment(0, n).keys, kvcomm.kv.segment(0, n).keys)
    assert torch.equal(naive.kv.segment(0, n).values, kvcomm.kv.segment(0, n).values)
    assert torch.equal(naive.last_logits, kvcomm.last_logits)

    shifted = _engine(smollm2_engine_parts, KVCommConfig(tail_policy="last_token", kvcomm_tail="last_token"))
    _pool_with_one_anchor(shifted, agent, content, 0.01)
    moved = _prepare(shifted, agent, content, "kvcomm", txn=None)
    layout = shifted.agent_state(agent).rendered.layout([content.num_tokens])
    (ph_start, ph_end), (pf_start, pf_end) = layout.placeholder_spans[0], layout.fixed_spans[1]
    delta = moved.kv.segment(0, n - 1).values - naive.kv.segment(0, n - 1).values   # the last token is recomputed
    assert torch.equal(moved.kv.segment(0, n - 1).keys, naive.kv.segment(0, n - 1).keys)   # no key delta
    assert delta[0].abs().max().item() == 0.0                                  # layer 0 is never offset
    assert delta[:, :, :ph_start].abs().max().item() == 0.0                    # the leading segment is exact
    assert torch.allclose(delta[1:, :, ph_start:n - 1], torch.full_like(delta[1:, :, ph_start:n - 1], 0.01),
                          atol=1e-5)                                           # placeholder + following segment
    assert (ph_end, pf_end) == (pf_start, n)


@pytest.mark.parametrize("config", [KVCommConfig(tail_policy="last_token", kvcomm_tail="last_token"),
                                    KVCommConfig.reference()],
                         ids=["corrected-lasttoken", "reference"])
def test_one_anchor_from_another_question_brings_the_following_segment_toward_dense(smollm2_engine_parts, config):
    """An anchor recorded on one question corrects another question's cache: the fixed segment after the
    placeholder (reused here, with the last-token tail) lands far closer to dense than naive's, and so does the
    first token's distribution. A missing or mis-rotated prefix offset fails this. (With the default
    last-segment tail that segment is recomputed, and one other question's placeholder delta alone does not
    help: the many-anchor case is tests/unit/test_kvcomm_claim.py.)"""
    engine = _engine(smollm2_engine_parts, config)
    agent = _agent(2)
    recorded, other = engine.make_input(OTHER_QUESTION), engine.make_input(QUESTION)
    assert recorded.num_tokens >= other.num_tokens   # the anchor must be long enough to vouch for `other`
    txn = engine.pool.begin("ns")
    assert engine.offer_content("ns", "user_question", recorded, txn) == "cold_pool"
    first = _prepare(engine, agent, recorded, "kvcomm", txn=txn)
    assert not first.reused and first.reason.startswith("new_anchor")
    engine.pool.commit(txn)
    anchor = engine.pool.snapshot("ns").anchors("user_question")[0]
    deltas = next(iter(anchor.deltas.values()))
    # layer 0 depends only on token and position: its delta is ~0 (K within RoPE rounding, V exactly)
    assert deltas.ph_value[0].abs().max().item() < 1e-5
    assert deltas.ph_key[0].abs().max().item() < 1e-4
    assert deltas.ph_value[5].abs().max().item() > 1e-3   # deeper layers do differ

    rebuilt = _prepare(engine, agent, recorded, "kvcomm", txn=None)   # its own anchor: the delta comes back exactly
    dense_recorded = _prepare(engine, agent, recorded, "dense")
    n = rebuilt.kv.length
    assert _rel_err(rebuilt.kv.segment(0, n).keys, dense_recorded.kv.segment(0, n).keys) < 1e-4

    dense = _prepare(engine, agent, other, "dense")
    naive = _prepare(engine, agent, other, "naive")
    kvcomm = _prepare(engine, agent, other, "kvcomm", txn=None)
    assert kvcomm.reused and naive.reused
    begin, end = engine.agent_state(agent).rendered.layout([other.num_tokens]).fixed_spans[1]
    end -= 1   # the last token is recomputed by both
    for side in ("keys", "values"):
        err = {name: _rel_err(getattr(p.kv.segment(begin, end), side)[1:],
                              getattr(dense.kv.segment(begin, end), side)[1:]) for name, p in
               (("naive", naive), ("kvcomm", kvcomm))}
        assert err["kvcomm"] < 0.5 * err["naive"], (side, err)
    assert _kl(dense.last_logits[-1], kvcomm.last_logits[-1]) < 0.5 * _kl(dense.last_logits[-1], naive.last_logits[-1])


def test_cold_namespace_falls_back_to_dense_and_namespaces_stay_apart(smollm2_engine_parts):
    engine = _engine(smollm2_engine_parts)
    content = engine.make_input(QUESTION)
    txn = engine.pool.begin("tenant-a")
    engine.offer_content("tenant-a", "user_question", content, txn)
    _prepare(engine, _agent(0), content, "kvcomm", txn=txn, namespace="tenant-a")
    engine.pool.commit(txn)
    assert len(engine.pool.snapshot("tenant-a").anchors("user_question")) == 1
    assert engine.pool.snapshot("tenant-b").anchors("user_question") == []
    other = engine.make_input(QUESTION)
    txn_b = engine.pool.begin("tenant-b")
    assert engine.offer_content("tenant-b", "user_question", other, txn_b) == "cold_pool"
    p = _prepare(engine, _agent(0), other, "kvcomm", txn=txn_b, namespace="tenant-b")
    assert not p.reused and "cold_pool" in p.reason


def test_bad_inputs_are_clear_errors(smollm2_engine_parts):
    engine = _engine(smollm2_engine_parts)
    content = engine.make_input(QUESTION)
    with pytest.raises(TemplateError, match="unknown placeholder"):
        _prepare(engine, AgentTemplate("x", "sys", "{user_question} {agent_b_latest}"), content, "dense")
    with pytest.raises(TemplateError, match="no content for placeholder"):
        engine.prepare(TurnRequest(AgentTemplate("y", "sys", "{agent_b_current}"), {"user_question": content},
                                   mode="dense", sampling=SAMPLING))
    with pytest.raises(ValueError, match="unknown mode"):
        _prepare(engine, _agent(0), content, "turbo")
    limit = engine.spec.max_position_embeddings
    with pytest.raises(ContextLengthError, match="exceed the model's context"):
        engine.make_input(list(range(100, 100 + limit)))
    with pytest.raises(ContextLengthError, match="exceed the model's context"):
        engine.prepare(TurnRequest(_agent(0), {"user_question": content}, mode="kvcomm",
                                   sampling=Sampling(max_new_tokens=limit)))


def test_run_turns_batches_several_agents_and_reports_timings(smollm2_engine_parts):
    engine = _engine(smollm2_engine_parts)
    content = engine.make_input(QUESTION)
    requests = [TurnRequest(_agent(i), {"user_question": content}, mode="naive", sampling=SAMPLING) for i in range(3)]
    batched = engine.run_turns(requests)
    alone = [engine.run_turn(r) for r in requests]
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    for r in batched:
        assert r.reused and r.ttft_s > 0 and {"fetch", "align", "offset", "prefill", "decode"} <= set(r.timings)
        assert r.response is not None and r.response.base.num_tokens == len(r.token_ids)
        assert r.response.base.start == 0


def test_stop_token_ids_are_the_model_configs_and_the_tokenizers_end_of_sequence(smollm2_engine_parts):
    engine = _engine(smollm2_engine_parts)
    stops = engine.stop_token_ids
    assert engine.tokenizer.eos_token_id in stops and set(engine.spec.eos_token_ids) <= set(stops)
    assert list(stops) == sorted(set(stops))
    assert engine.tokenizer.decode([stops[0]]) in {"<|im_end|>", "<|endoftext|>"}


def test_concurrent_turns_gate_reports_merge_without_a_stale_reason_overwriting_an_anchor_s():
    """Two turns of one round read a content the entropy gate matched: one falls back at the fidelity gate and
    promotes it to an anchor ("low_margin"), the other reuses and reports the state it started from. In either
    order the job keeps the anchor with its own reason (a later consumer reuses, as in one process); with a plain
    update the stale "matched" won and sent every later consumer dense as the entropy gate's new anchor (the
    reliability benchmark's pool drill: one job in eight differed from its in-process replay)."""
    promoted = ({"user_question": "anchor-1"}, {"user_question": FIDELITY_GATE_REASON, "agent_1_current": "matched"})
    stale = ({}, {"user_question": "matched"})
    for reports in ((promoted, stale), (stale, promoted)):
        anchors, reasons = {}, {"user_question": "matched"}
        new = [learn_gate_state(anchors, reasons, *report) for report in reports]
        assert anchors == {"user_question": "anchor-1"}, reports
        assert reasons == {"user_question": FIDELITY_GATE_REASON, "agent_1_current": "matched"}, reports
        assert sorted(sum(new, [])) == ["user_question"]                   # the anchor is new once
    # a different anchor replaces the known one, its reason with it; a reason alone fills only unknown names
    anchors, reasons = {"user_question": "anchor-1"}, {"user_question": FIDELITY_GATE_REASON}
    assert learn_gate_state(anchors, reasons, {"user_question": "anchor-2"},
                            {"user_question": "no_compatible_anchor"}) == ["user_question"]
    assert (anchors, reasons) == ({"user_question": "anchor-2"}, {"user_question": "no_compatible_anchor"})
    assert learn_gate_state(anchors, reasons, {}, {"user_question": "matched", "x": "high_entropy"}) == []
    assert reasons == {"user_question": "no_compatible_anchor", "x": "high_entropy"}
