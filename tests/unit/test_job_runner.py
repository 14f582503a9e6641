"""Multi-agent jobs on one in-process engine: every topology runs, the pool learns, reuse kicks in."""
from __future__ import annotations

from kvcomm.anchor_pool import AnchorPool
from kvcomm.config import KVCommConfig
from kvcomm.engine import KVCommEngine
from kvcomm.harness.job_files import load_jobs
from kvcomm.harness.jobs import GenerationParams
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


def test_cut_at_stop_string_keeps_the_tokens_before_the_earliest_stop(smollm2_engine_parts):
    from kvcomm.generation import cut_at_stop_string
    _, tokenizer = smollm2_engine_parts
    detok = lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True)   # noqa: E731
    ids = tokenizer.encode("The answer is 5.END\nQ: next", add_special_tokens=False)
    text, keep = cut_at_stop_string(ids, ("\nQ:", "END"), detok)
    assert text == "The answer is 5."                      # the earliest stop string wins
    assert keep < len(ids) and text.startswith(detok(ids[:keep]))        # wholly before the stop string
    assert not text.startswith(detok(ids[:keep + 1]))                    # and no token more
    assert cut_at_stop_string(ids, ("absent",), detok) == (detok(ids), len(ids))


def test_a_stop_string_of_multi_byte_characters_is_seen_when_its_last_token_comes(smollm2_engine_parts):
    """A CJK character or an emoji is several byte-level tokens: the decoding step sees the stop string complete
    at its last token (a window counted in characters missed it, and decoding ran on to max_new_tokens)."""
    from kvcomm.generation import _ends_in_stop
    _, tokenizer = smollm2_engine_parts
    detok = lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True)   # noqa: E731
    for stop in ("观察：", "답변:", "🛑🛑", "END"):
        ids = tokenizer.encode(f"Thought: fine. {stop} more", add_special_tokens=False)
        seen = [n for n in range(1, len(ids) + 1) if _ends_in_stop(ids[:n], (stop,), detok)]
        assert seen and stop in detok(ids[:seen[0]]) and stop not in detok(ids[:seen[0] - 1]), stop


def test_stop_strings_end_decoding_and_cut_what_downstream_agents_read(smollm2_engine_parts):
    engine = _engine(smollm2_engine_parts)
    gen = GenerationParams(max_new_tokens=24)
    full = run_job(engine, build_job("math", QUESTIONS[0], num_agents=2, generation=gen, mode="dense"))
    first = full.turns[0].text
    words = first.split()
    assert len(words) >= 4, first
    stop = " " + words[2]                                  # a stop string that occurs mid-answer
    cut = first[:first.find(stop)]
    stopped_gen = GenerationParams(max_new_tokens=24, stop=(stop,))
    for mode in ("dense", "kvcomm"):
        stopped = run_job(engine, build_job("math", QUESTIONS[0], num_agents=2, generation=stopped_gen, mode=mode))
        head = stopped.turns[0]
        assert head.text == cut and stop not in head.text
        assert len(head.token_ids) < len(full.turns[0].token_ids)
        assert engine.detokenize(head.token_ids) == cut[:len(engine.detokenize(head.token_ids))]
        # agent 2 reads the cut response: its prompt is shorter than when it read the whole answer
        assert stopped.turns[1].prompt_tokens < full.turns[1].prompt_tokens


def test_decode_batch_refuses_stop_strings_without_a_detokenizer(smollm2_engine_parts):
    import pytest
    import torch
    from kvcomm.generation import DecodeBatch, Sampling
    runner, _ = smollm2_engine_parts
    logits, kv = runner.prefill(torch.tensor([1, 2, 3]), extra_capacity=4)
    with pytest.raises(ValueError, match="detokenize"):
        DecodeBatch(runner).add(kv, logits[-1], Sampling(max_new_tokens=2, stop=("x",)))
