"""The per-turn engine on the real embedded model: every mode against dense on identical tokens."""
from __future__ import annotations

import pytest
import torch

from kvcomm.anchor_pool import AnchorPool
from kvcomm.config import KVCommConfig
from kvcomm.engine import MODES, ContextLengthError, KVCommEngine, TurnRequest
from kvcomm.generation import Sampling
from kvcomm.templates import AgentTemplate, TemplateError

QUESTION = "A farmer has 12 cows and buys 7 more. Then 4 cows are sold. How many cows does the farmer have now?"
SAMPLING = Sampling(max_new_tokens=6)


def _engine(parts, config: KVCommConfig | None = None) -> KVCommEngine:
    runner, tokenizer = parts
    config = config or KVCommConfig()
    return KVCommEngine(runner, tokenizer, config, AnchorPool(config, runner.rope))


def _agent(i: int) -> AgentTemplate:
    roles = ["careful math solver", "skeptical analyst who double-checks arithmetic", "strict inspector"]
    return AgentTemplate(f"a{i}", f"You are a {roles[i]}. Reason step by step and state the final number.",
                         "Question:\n{user_question}\nGive your answer in one sentence.")


def _prepare(engine, agent, content, mode, txn=None, namespace="ns"):
    return engine.prepare(TurnRequest(agent, {"user_question": content}, mode=mode, sampling=SAMPLING,
                                      namespace=namespace, transaction=txn))


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


def test_zero_offset_equals_naive_bit_for_bit(smollm2_engine_parts):
    engine = _engine(smollm2_engine_parts)   # empty pool: kvcomm has no anchors to offset with
    content = engine.make_input(QUESTION)
    naive = _prepare(engine, _agent(1), content, "naive")
    kvcomm = _prepare(engine, _agent(1), content, "kvcomm", txn=None)
    assert naive.reused and kvcomm.reused
    assert torch.equal(naive.kv.segment().keys, kvcomm.kv.segment().keys)
    assert torch.equal(naive.last_logits, kvcomm.last_logits)


@pytest.mark.parametrize("config", [KVCommConfig(), KVCommConfig.reference()], ids=["corrected", "reference"])
def test_single_self_anchor_reconstructs_dense(smollm2_engine_parts, config):
    engine = _engine(smollm2_engine_parts, config)
    agent = _agent(2)
    content = engine.make_input(QUESTION)
    txn = engine.pool.begin("ns")
    assert engine.offer_content("ns", "user_question", content, txn) == "cold_pool"
    recorded = _prepare(engine, agent, content, "kvcomm", txn=txn)
    assert not recorded.reused and recorded.reason.startswith("new_anchor")
    engine.pool.commit(txn)
    anchor = engine.pool.snapshot("ns").anchors("user_question")[0]
    deltas = next(iter(anchor.deltas.values()))
    # layer 0 depends only on token and position: its delta is ~0 (K within RoPE rounding, V exactly)
    assert deltas.ph_value[0].abs().max().item() < 1e-5
    assert deltas.ph_key[0].abs().max().item() < 1e-4
    assert deltas.ph_value[5].abs().max().item() > 1e-3   # deeper layers do differ

    rebuilt = _prepare(engine, agent, content, "kvcomm", txn=None)   # reuse with exactly this anchor
    assert rebuilt.reused
    dense = _prepare(engine, agent, content, "dense")
    n = rebuilt.kv.length
    rel = ((rebuilt.kv.segment().keys - dense.kv.segment(0, n).keys).norm()
           / dense.kv.segment(0, n).keys.norm()).item()
    assert rel < 1e-4
    assert int(rebuilt.last_logits[-1].argmax()) == int(dense.last_logits[-1].argmax())
    naive = _prepare(engine, agent, content, "naive")
    err_naive = (naive.last_logits[-1] - dense.last_logits[-1]).abs().max().item()
    err_kvcomm = (rebuilt.last_logits[-1] - dense.last_logits[-1]).abs().max().item()
    assert err_kvcomm < 1e-2 < err_naive


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
