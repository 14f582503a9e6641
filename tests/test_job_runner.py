"""Multi-agent jobs on one in-process engine: every topology runs, the pool learns, reuse kicks in."""
from __future__ import annotations

from kvcomm.anchor_pool import AnchorPool
from kvcomm.config import KVCommConfig
from kvcomm.engine import KVCommEngine
from kvcomm.harness.jobs import GenerationParams, load_jobs
from kvcomm.harness.topologies import build_job
from kvcomm.job_runner import run_job

QUESTIONS = ["Ann has 4 red balls and 9 blue balls. How many balls does she have?",
             "A shop sells 6 pens a day for 5 days. How many pens does it sell?",
             "Ben reads 12 pages on Monday and 15 on Tuesday. How many pages did he read?",
             "There are 30 students and 12 go home. How many students stay?"]
GEN = GenerationParams(max_new_tokens=8)


def _engine(parts, **overrides) -> KVCommEngine:
    runner, tokenizer = parts
    config = KVCommConfig(**overrides)
    return KVCommEngine(runner, tokenizer, config, AnchorPool(config, runner.rope))


def test_kvcomm_learns_anchors_then_reuses(smollm2_engine_parts):
    # gamma=1 (as the reference TTFT script): once two anchors exist, the entropy rule never asks for more
    engine = _engine(smollm2_engine_parts, gamma=1.0)
    results = [run_job(engine, build_job("math", q, num_agents=3, generation=GEN, job_id=f"q{i}", mode="kvcomm"))
               for i, q in enumerate(QUESTIONS)]
    assert results[0].reuse_rate == 0.0                      # cold pool: every turn prefills and records
    assert all("cold_pool" in t.reason for t in results[0].turns)
    assert results[-1].reuse_rate > 0.0                       # warm pool: turns skip prefill
    reused = [t for t in results[-1].turns if t.reused]
    assert all(t.recomputed_tokens < t.prompt_tokens for t in reused)
    stats = engine.pool.stats()
    assert stats["version"] >= len(QUESTIONS) - 1 and stats["total_bytes"] > 0


def test_dense_job_is_deterministic_and_equals_dense_prefix(smollm2_engine_parts):
    engine = _engine(smollm2_engine_parts)
    job = build_job("math", QUESTIONS[0], num_agents=3, generation=GEN, mode="dense")
    first, second = run_job(engine, job), run_job(engine, job)
    prefix = run_job(engine, job, mode="dense-prefix")
    assert [t.token_ids for t in first.turns] == [t.token_ids for t in second.turns]
    assert [t.token_ids for t in prefix.turns] == [t.token_ids for t in first.turns]
    assert all(p.recomputed_tokens < d.recomputed_tokens for p, d in zip(prefix.turns, first.turns))


def test_debate_job_with_rounds_and_decision_agent(smollm2_engine_parts):
    engine = _engine(smollm2_engine_parts)
    (shipped,) = load_jobs("examples/job_debate.yaml")   # the shipped example parses and validates
    assert shipped.rounds == 2 and shipped.decision_agent
    job = build_job("math", QUESTIONS[1], num_agents=2, topology="debate", rounds=2, decision=True,
                    generation=GenerationParams(max_new_tokens=4))
    result = run_job(engine, job, mode="kvcomm")
    turns = [(t.agent_id, t.round) for t in result.turns]
    assert turns == [("1", 0), ("2", 0), ("1", 1), ("2", 1), (job.decision_agent, 1)]
    assert result.final_answer == result.turns[-1].text
