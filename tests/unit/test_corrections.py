"""Corrections and the per-agent dense policy: selective recompute is exact where it must be, the query-driven
choice lowers KL on the embedded model on a question the pool never saw, and a forced-dense agent is dense."""
from __future__ import annotations

import math

import pytest
import torch

from kvcomm.config import KVCommConfig
from kvcomm.corrections import attention_mass, select_recompute, span_starts, token_errors
from kvcomm.engine import KVCommEngine, TurnRequest
from kvcomm.generation import Sampling
from kvcomm.harness.jobs import AgentSpec, GenerationParams, JobSpec, JobSpecError
from kvcomm.job_runner import run_job
from kvcomm.kv import KVSegment
from kvcomm.model_loading import load_model
from kvcomm.runner import ModelRunner
from kvcomm.templates import AgentTemplate, PromptLayout

SAMPLING = Sampling(max_new_tokens=4)


@pytest.fixture(scope="module")
def tiny_runner(tiny_model_dir):
    loaded = load_model(tiny_model_dir, random_weights=True, seed=5)
    return ModelRunner(loaded.spec, loaded.state_dict), loaded.tokenizer


def test_recompute_prefill_is_prefill_without_indices_and_dense_when_everything_is_recomputed(tiny_runner):
    runner, _ = tiny_runner
    ids = torch.randint(10, 40000, (40,), generator=torch.Generator().manual_seed(1))
    dense_logits, dense_kv = runner.prefill(ids)
    cached = dense_kv.segment(0, 32)
    logits, kv, queries = runner.recompute_prefill(cached, ids[:32], ids[32:], torch.empty(0, dtype=torch.int64),
                                                   keep_queries=True)
    assert torch.allclose(logits[-1], dense_logits[-1], atol=1e-4)
    assert queries.shape == (runner.spec.num_layers, runner.spec.num_heads, runner.spec.head_dim)
    noise = torch.Generator().manual_seed(2)
    wrong = KVSegment(cached.keys + torch.randn(cached.keys.shape, generator=noise),
                      cached.values + torch.randn(cached.values.shape, generator=noise), 0)
    stale, _, _ = runner.recompute_prefill(wrong, ids[:32], ids[32:], torch.empty(0, dtype=torch.int64))
    fixed, kv, _ = runner.recompute_prefill(wrong, ids[:32], ids[32:], torch.arange(32))
    assert (stale[-1] - dense_logits[-1]).abs().max() > 1e-2                    # the noise matters ...
    assert torch.allclose(fixed[-1], dense_logits[-1], atol=1e-4)               # ... and recomputing all undoes it
    assert torch.allclose(kv.segment(0, 40).values, dense_kv.segment(0, 40).values, atol=1e-4)
    with pytest.raises(IndexError):
        runner.recompute_prefill(cached, ids[:32], ids[32:], torch.tensor([32]))


def test_recompute_prefill_in_place_on_the_turn_s_buffer_equals_the_copying_call(tiny_runner):
    """A reused turn assembles its cache in its own buffer and the recompute extends that buffer in place; the
    logits and KV must be those of the call that copies the cache into a new buffer, bit for bit."""
    runner, _ = tiny_runner
    ids = torch.randint(10, 40000, (40,), generator=torch.Generator().manual_seed(3))
    _, dense_kv = runner.prefill(ids)
    noise = torch.Generator().manual_seed(4)
    cached = KVSegment(dense_kv.keys[:, :, :32] + 0.1 * torch.randn(dense_kv.keys[:, :, :32].shape, generator=noise),
                       dense_kv.values[:, :, :32], 0)
    chosen = torch.tensor([3, 17, 30])
    want_logits, want_kv, _ = runner.recompute_prefill(cached, ids[:32], ids[32:], chosen, extra_capacity=5)
    buffer = runner.new_kv(cached, extra_capacity=8 + 5)
    logits, kv, _ = runner.recompute_prefill(buffer, ids[:32], ids[32:], chosen, extra_capacity=5)
    assert kv is buffer and kv.length == 40 and kv.capacity >= 45
    assert torch.equal(logits, want_logits)
    assert torch.equal(kv.segment().keys, want_kv.segment().keys)
    assert torch.equal(kv.segment().values, want_kv.segment().values)


def test_attention_mass_selection_span_starts_and_token_errors(tiny_runner):
    runner, _ = tiny_runner
    spec = runner.spec
    keys = torch.randn(spec.num_layers, spec.num_kv_heads, 20, spec.head_dim)
    queries = torch.randn(spec.num_layers, spec.num_heads, spec.head_dim)
    mass = attention_mass(queries, keys, 20, runner.rope, spec.head_dim ** -0.5)
    assert mass.shape == (20,) and torch.isclose(mass.sum(), torch.tensor(1.0), atol=1e-5)
    mass = torch.arange(20, dtype=torch.float32)                                # token t gets mass t
    assert select_recompute(mass, 5, 15, 0.3).tolist() == [12, 13, 14]         # ceil(0.3 * 10) heaviest in [5, 15)
    assert select_recompute(mass, 5, 15, 0.0, extra=[6]).tolist() == [6]
    # the bound counts the span starts first, then the most attended
    assert select_recompute(mass, 5, 15, 0.3, extra=[6], max_count=2).tolist() == [6, 14]
    assert select_recompute(mass, 5, 15, 0.3, extra=[6, 9, 10], max_count=2).tolist() == [6, 9]
    assert select_recompute(mass, 5, 15, 1.0, max_count=math.inf).tolist() == list(range(5, 15))
    layout = PromptLayout(fixed_spans=((0, 3), (7, 9), (12, 14)), placeholder_spans=((3, 7), (9, 12)), length=14)
    assert span_starts(layout, 2, end=13) == [3, 4, 9, 10]
    errors = token_errors(layout, [0.2, None], 14)
    assert errors[:3].sum() == 0 and torch.all(errors[3:9] == 0.2) and errors[9:].sum() == 0


def _engine(parts, **knobs) -> KVCommEngine:
    runner, tokenizer = parts
    return KVCommEngine(runner, tokenizer, KVCommConfig(calibration="none", **knobs).with_calibration())


def _solver() -> AgentTemplate:
    return AgentTemplate("solver", "You are a careful math solver. Reason step by step, then give the number.",
                         "Question:\n{user_question}\nWhat is the answer? Answer with one number.")


def _kl(dense: torch.Tensor, other: torch.Tensor) -> float:
    log_p, log_q = torch.log_softmax(dense.double(), -1), torch.log_softmax(other.double(), -1)
    return float((log_p.exp() * (log_p - log_q)).sum())


def test_query_driven_recompute_lowers_kl_on_an_unseen_question(smollm2_engine_parts):
    recorder = _engine(smollm2_engine_parts)
    txn = recorder.pool.begin("ns")
    for question in ("A baker makes 24 rolls and sells 9 of them. How many rolls are left?",
                     "Each of 5 boxes holds 8 pens. How many pens are there in all?"):
        content = recorder.make_input(question)
        recorder.offer_content("ns", "user_question", content, txn)
        recorder.prepare(TurnRequest(_solver(), {"user_question": content}, "kvcomm", SAMPLING, "ns", txn))
    recorder.pool.commit(txn)
    unseen = recorder.make_input("Lena runs 3 miles every morning and 2 miles every evening. How far in a week?")
    request = TurnRequest(_solver(), {"user_question": unseen}, "kvcomm", SAMPLING, "ns")
    dense = recorder.prepare(TurnRequest(_solver(), {"user_question": unseen}, "dense", SAMPLING, "ns"))
    kls = {}
    for ratio in (0.0, 0.3, 1.0):
        engine = KVCommEngine(*smollm2_engine_parts, recorder.config.with_(recompute_ratio=ratio), recorder.pool)
        prepared = engine.prepare(request)
        assert prepared.reused and prepared.forecast is not None
        kls[ratio] = _kl(dense.last_logits[-1], prepared.last_logits[-1])
    assert kls[0.3] < 0.5 * kls[0.0], kls
    assert kls[1.0] < 1e-6, kls                # everything after the leading segment recomputed: dense again

    # the last-token tail: kvcomm reuses the last fixed segment with its offsets, and its tokens are the query's to
    # choose like any reused token's; naive (tail_policy) still recomputes that segment whole
    state = recorder.agent_state(_solver())
    layout = state.rendered.layout([unseen.num_tokens])
    leading, last_segment = len(state.rendered.fixed[0]), len(state.rendered.fixed[-1])
    prompt = layout.fixed_spans[-1][1]
    tails = {}
    for ratio, starts in ((0.0, 0), (0.3, 0), (0.0, 2), (1.0, 0)):
        engine = KVCommEngine(*smollm2_engine_parts, recorder.config.with_(
            recompute_ratio=ratio, recompute_span_starts=starts, kvcomm_tail="last_token"), recorder.pool)
        prepared = engine.prepare(request)
        tails[ratio, starts] = (prepared.recomputed, _kl(dense.last_logits[-1], prepared.last_logits[-1]))
        naive = engine.prepare(TurnRequest(_solver(), {"user_question": unseen}, "naive", SAMPLING, "ns"))
        assert naive.recomputed == last_segment
    reusable = prompt - 1 - leading                     # what the query chooses from: all but the leading and last
    assert tails[0.0, 0][0] == 1                                               # the last token alone
    assert tails[0.3, 0][0] == 1 + math.ceil(0.3 * reusable), tails
    assert tails[0.0, 2][0] == 1 + 2 * len(layout.placeholder_spans)           # each placeholder's first two
    assert tails[1.0, 0][0] == prompt - leading and tails[1.0, 0][1] < 1e-6, tails   # dense again
    for count, expected in ((4, 4), (10 ** 6, last_segment)):                  # the last N, at most the segment
        engine = KVCommEngine(*smollm2_engine_parts, recorder.config.with_(
            recompute_ratio=0.0, recompute_span_starts=0, kvcomm_tail=count), recorder.pool)
        assert engine.prepare(request).recomputed == expected
    for bad in (0, True, "everything"):
        with pytest.raises(ValueError, match="kvcomm_tail must be"):
            KVCommConfig(kvcomm_tail=bad)

    # the recipe's bound: a share of a long content recomputes no more than recompute_max_tokens cached tokens
    for starts, bound, expected in ((2, 5, 1 + 5), (0, 5, 1 + 5), (0, math.inf, 1 + math.ceil(0.3 * reusable))):
        engine = KVCommEngine(*smollm2_engine_parts, recorder.config.with_(
            recompute_ratio=0.3, recompute_span_starts=starts, kvcomm_tail="last_token", recompute_max_tokens=bound),
            recorder.pool)
        assert engine.prepare(request).recomputed == expected, (starts, bound)
    for bad in (-1, 2.5, float("nan")):
        with pytest.raises(ValueError, match="recompute_max_tokens must be"):
            KVCommConfig(recompute_max_tokens=bad)


def test_a_forced_dense_agent_is_dense_in_every_reuse_mode(smollm2_engine_parts):
    engine = _engine(smollm2_engine_parts)
    content = engine.make_input("A farmer has 12 cows and buys 7 more. How many cows?")
    dense = engine.prepare(TurnRequest(_solver(), {"user_question": content}, "dense", SAMPLING, "ns"))
    prefix = engine.prepare(TurnRequest(_solver(), {"user_question": content}, "dense-prefix", SAMPLING, "ns"))
    for mode in ("naive", "cacheblend", "kvcomm", "hybrid"):
        txn = engine.pool.begin("ns")
        forced = engine.prepare(TurnRequest(_solver(), {"user_question": content}, mode, SAMPLING, "ns", txn,
                                            force_dense=True))
        assert not forced.reused and forced.reason == "forced_dense", mode
        # exact: dense-prefix's computation (the agent's own prefix KV, the rest prefilled), dense's but for rounding
        assert torch.equal(forced.last_logits, prefix.last_logits), mode
        assert torch.equal(forced.kv.segment().keys, prefix.kv.segment().keys), mode
        assert (forced.last_logits - dense.last_logits).abs().max() < 1e-3, mode
        assert torch.equal(forced.last_logits.argmax(-1), dense.last_logits.argmax(-1)), mode
        engine.pool.abort(txn)


def test_force_dense_from_the_job_spec(tiny_runner):
    runner, tokenizer = tiny_runner
    engine = KVCommEngine(runner, tokenizer, KVCommConfig(calibration="none", gamma=10.0).with_calibration())
    generation = GenerationParams(max_new_tokens=4)
    agents = (AgentSpec("1", "solver", "Solve it.", "Q: {user_question}", generation=generation),
              AgentSpec("2", "judge", "Judge it.", "Q: {user_question}\nA: {agent_1_current}\nVerdict:",
                        generation=generation, force_dense=True))
    job = JobSpec(id="j", task="What is 2 + 3?", agents=agents, mode="kvcomm", namespace="policy")
    assert JobSpec.from_dict(job.to_dict()).agents[1].force_dense
    with pytest.raises(JobSpecError, match=r"agents\[1\]\.force_dense"):
        JobSpec.from_dict({**job.to_dict(), "agents": [agents[0].to_dict(), {**agents[1].to_dict(),
                                                                             "force_dense": "yes"}]})
    for _ in range(3):                              # the pool learns; the judge never reuses
        result = run_job(engine, job)
        assert result.turns[1].reason == "forced_dense" and not result.turns[1].reused
    assert result.turns[0].reused                   # the solver does, by now
