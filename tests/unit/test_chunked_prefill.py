"""Chunked prefill and decode steps riding in prefills (`TurnScheduler(prefill_step_tokens=N)`,
`kvcomm.runner_hooks.PrefillBudget`): while sequences decode, a prompt is prefilled in chunks of at most N tokens, each
forward also carrying the batch's decode step, and both give the tokens one-shot prefill and lone decode steps give
(dense's oracle); a runner without hooks runs one forward.
"""
from __future__ import annotations

import time

import pytest
import torch

from actors.scheduler import TurnScheduler
from kvcomm.config import KVCommConfig
from kvcomm.engine import KVCommEngine, TurnRequest
from kvcomm.generation import Sampling
from kvcomm.model_loading import load_model
from kvcomm.runner import ModelRunner
from kvcomm.runner_hooks import PrefillBudget
from kvcomm.templates import AgentTemplate

QUESTION = "Ben has 3 cards and gets 4 more from his sister. How many cards does Ben have now? "


class RecordingRunner(ModelRunner):
    """A real runner that records, per pass over the weights, its prefill tokens and its decode rows."""

    def _run(self, requests, decode):
        decoded = sum(g.size for g in decode.groups) if decode is not None else 0
        self.forwards.append((sum(int(r.token_ids.numel()) for r in requests), decoded))
        return super()._run(requests, decode)

    def _attend_decode(self, layer_idx, q, k, v, groups, plans, attn_out):
        if layer_idx == 0 and q.shape[0] > sum(g.size for g in groups):   # decode rows riding in a prefill
            self.ridden.append(sum(g.size for g in groups))
        return super()._attend_decode(layer_idx, q, k, v, groups, plans, attn_out)

    def recompute_prefill(self, *args, **kwargs):
        ridden = len(self.ridden)
        out = super().recompute_prefill(*args, **kwargs)
        self.recomputes.append(sum(self.ridden[ridden:]))   # decode rows that rode in this recompute prefill
        return out


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    loaded = load_model(tiny_model_dir, random_weights=True, seed=4)
    runner = RecordingRunner(loaded.spec, loaded.state_dict)
    runner.forwards, runner.ridden, runner.recomputes = [], [], []
    return KVCommEngine(runner, loaded.tokenizer, KVCommConfig())


def _until_decoding(scheduler: TurnScheduler, turn) -> None:
    """Wait (bounded) until the scheduler's batch decodes `turn`, the first turn submitted."""
    deadline = time.monotonic() + 60
    while scheduler.load().active < 1:
        assert time.monotonic() < deadline and not turn.done(), "the first turn never started decoding"
        time.sleep(0.001)


def _agent(i: int) -> AgentTemplate:
    return AgentTemplate(f"agent{i}", f"You are helper number {i}.", "Question: {user_question}\nAnswer:")


def test_a_prompt_prefilled_in_chunks_gives_the_one_shot_logits_and_greedy_tokens(engine) -> None:
    runner = engine.runner
    ids = torch.as_tensor(engine.encode(QUESTION * 4))
    whole, whole_kv = runner.prefill(ids)
    runner.forwards.clear()
    runner.prefill_budget = PrefillBudget(lambda: 7, lambda tokens: None)
    try:
        chunked, kv = runner.prefill(ids, extra_capacity=4)
    finally:
        runner.prefill_budget = None
    steps = [p for p, _ in runner.forwards]
    assert len(ids) > 40 and steps == [7] * (len(ids) // 7) + ([len(ids) % 7] if len(ids) % 7 else [])
    assert kv.segment().num_tokens == len(ids)
    torch.testing.assert_close(kv.segment().keys, whole_kv.segment().keys, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(kv.segment().values, whole_kv.segment().values, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=1e-4)
    assert int(chunked[-1].argmax()) == int(whole[-1].argmax())


def test_a_long_prompt_admitted_while_another_decodes_is_prefilled_in_chunks_with_the_oracle_s_tokens(engine) -> None:
    runner = engine.runner
    short = TurnRequest(_agent(1), {"user_question": engine.make_input("Hi.")}, mode="dense",
                        sampling=Sampling(max_new_tokens=300, min_new_tokens=300))
    long = TurnRequest(_agent(2), {"user_question": engine.make_input(QUESTION * 6)}, mode="dense",
                       sampling=Sampling(max_new_tokens=24, min_new_tokens=24))
    oracle = [engine.run_turn(r).token_ids for r in (short, long)]        # one-shot prefill, alone
    prompt = len(engine.prepare(long).prompt_ids)
    scheduler = TurnScheduler(engine, max_batch_size=4, prefill_step_tokens=8).start()
    try:
        first = scheduler.turn(short)
        _until_decoding(scheduler, first)
        runner.forwards.clear()
        second = scheduler.turn(long)
        tokens = [second.result(timeout=120).token_ids, first.result(timeout=120).token_ids]
        forwards = list(runner.forwards)
        stats = scheduler.stats()
    finally:
        scheduler.stop()
        runner.prefill_budget = None
    assert tokens == [oracle[1], oracle[0]]                               # chunked: the oracle's tokens
    chunks = [(p, d) for p, d in forwards if p]                           # the forwards of the long prefill
    assert prompt > 80 and sum(p for p, _ in chunks) >= prompt // 2 and max(p for p, _ in chunks) <= 8
    assert all(d == 1 for _, d in chunks)                 # every chunk carried the short turn's decode step
    assert stats["steps_riding"] >= len(chunks) and stats["steps_between_chunks"] == 0   # no step of its own


def test_a_decode_step_rides_in_an_unchunked_prefill_and_keeps_the_oracle_s_tokens(engine) -> None:
    """Without chunking, an admission's whole prefill still carries the decoding sequences' next step."""
    runner = engine.runner
    turns = [TurnRequest(_agent(i), {"user_question": engine.make_input(f"{QUESTION} ({i})")}, mode="dense",
                         sampling=Sampling(max_new_tokens=12, min_new_tokens=12)) for i in range(3)]
    oracle = [engine.run_turn(r).token_ids for r in turns]
    scheduler = TurnScheduler(engine, max_batch_size=4).start()
    try:
        first = scheduler.turn(turns[0])
        _until_decoding(scheduler, first)
        runner.forwards.clear()
        rest = [scheduler.turn(r) for r in turns[1:]]
        tokens = [f.result(timeout=120).token_ids for f in [first, *rest]]
        forwards = list(runner.forwards)
        stats = scheduler.stats()
    finally:
        scheduler.stop()
        runner.prefill_budget = None
    assert tokens == oracle
    mixed = [(p, d) for p, d in forwards if p > 8 and d]                   # a prompt's prefill with decode rows
    assert mixed and stats["steps_riding"] >= len(mixed) and stats["steps_between_chunks"] == 0


def test_the_prefill_budget_has_one_home_in_the_cluster_config() -> None:
    from cluster.config import ClusterConfig
    assert ClusterConfig().worker_settings().prefill_step_tokens == 0                        # off by default
    assert ClusterConfig(prefill_step_tokens=16).worker_settings().prefill_step_tokens == 16
    with pytest.raises(ValueError, match="prefill_step_tokens"):
        ClusterConfig(prefill_step_tokens=-1)


def test_a_reused_turn_s_tail_prefill_carries_the_decode_step_and_keeps_the_oracle_s_tokens(engine) -> None:
    """A naive (reused) turn's tail goes through `recompute_prefill`, whose own layer loop also takes the decoding
    sequences' step: both turns' tokens equal their lone runs'."""
    runner = engine.runner
    first = TurnRequest(_agent(1), {"user_question": engine.make_input("Hi there.")}, mode="dense",
                        sampling=Sampling(max_new_tokens=60, min_new_tokens=60))
    reused = TurnRequest(_agent(2), {"user_question": engine.make_input(QUESTION * 2)}, mode="naive",
                         sampling=Sampling(max_new_tokens=8, min_new_tokens=8))
    oracle = [engine.run_turn(r).token_ids for r in (first, reused)]
    scheduler = TurnScheduler(engine, max_batch_size=4).start()
    try:
        decoding = scheduler.turn(first)
        _until_decoding(scheduler, decoding)
        runner.recomputes.clear()
        second = scheduler.turn(reused)
        tokens = [decoding.result(timeout=120).token_ids, second.result(timeout=120).token_ids]
        recomputes = list(runner.recomputes)
    finally:
        scheduler.stop()
        runner.prefill_budget = None
    assert tokens == oracle
    assert recomputes and all(d == 1 for d in recomputes)   # the tail prefill carried the first turn's step
