"""The decode batch's persistent batched KV buffers: batched decode equals decoding each sequence alone."""
from __future__ import annotations

import pytest
import torch

from kvcomm.generation import DecodeBatch, Sampling, generate_from_ids, result_of
from kvcomm.memory_plan import capacity_class
from kvcomm.model_loading import load_model
from kvcomm.runner import BatchKV, ForwardRequest, ModelRunner


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-qwen2"])
def tiny(request):
    loaded = load_model(request.param, random_weights=True, seed=5)
    return loaded, ModelRunner(loaded.spec, loaded.state_dict)


def test_capacity_classes():
    assert [capacity_class(n) for n in (1, 64, 65, 96, 97, 161, 193, 257, 385)] == [64, 64, 96, 96, 128, 192,
                                                                                      256, 384, 512]


def test_decode_step_matches_forward_on_ragged_slots(tiny):
    loaded, runner = tiny
    gen = torch.Generator().manual_seed(0)
    lengths, starts = [7, 30, 19, 30, 1], [0, 0, 100, 5, 0]
    alone, batched = [], BatchKV(loaded.spec, capacity=64, dtype=runner.dtype, device=runner.device, slots=5)
    for n, start in zip(lengths, starts):
        ids = torch.randint(0, loaded.spec.vocab_size, (n,), generator=gen)
        _, kv = runner.prefill(ids, start=start, extra_capacity=4)
        assert batched.admit(kv) == len(alone)
        alone.append(kv)
    with pytest.raises(ValueError, match="slot"):   # a buffer never grows: the decode batch adds another one
        batched.admit(alone[0])
    for _ in range(3):
        tokens = torch.randint(0, loaded.spec.vocab_size, (len(lengths),), generator=gen)
        expect = runner.forward([ForwardRequest(kv, tokens[i:i + 1]) for i, kv in enumerate(alone)])
        got = runner.decode_step([batched], tokens)
        assert (got - torch.cat(expect)).abs().max().item() < 1e-4
    assert batched.lengths == [n + 3 for n in lengths]
    # releasing hands the slot's tokens back in a buffer of exactly their length and keeps the used slots dense
    for slot in (1, 0):
        moved_length = batched.lengths[-1]
        into = batched.release(slot)
        assert into.length == into.capacity == lengths[slot] + 3 and into.start == starts[slot]
        assert (into.segment().keys - alone[slot].segment().keys).abs().max().item() < 1e-5
        assert (into.segment().values - alone[slot].segment().values).abs().max().item() < 1e-5
        assert batched.lengths[slot] == moved_length
    assert batched.size == 3


def test_two_groups_in_one_step(tiny):
    loaded, runner = tiny
    gen = torch.Generator().manual_seed(1)
    small = BatchKV(loaded.spec, capacity=64, dtype=runner.dtype, device=runner.device, slots=2)
    large = BatchKV(loaded.spec, capacity=256, dtype=runner.dtype, device=runner.device)
    alone = []
    for n, group in ((10, small), (200, large), (12, small)):
        _, kv = runner.prefill(torch.randint(0, loaded.spec.vocab_size, (n,), generator=gen), extra_capacity=2)
        group.admit(kv)
        alone.append(kv)
    tokens = torch.tensor([3, 4, 5])   # group order: small (slots 0, 1), then large
    got = runner.decode_step([small, large], tokens)
    expect = runner.forward([ForwardRequest(alone[0], tokens[:1]), ForwardRequest(alone[2], tokens[1:2]),
                             ForwardRequest(alone[1], tokens[2:])])
    assert (got - torch.cat(expect)).abs().max().item() < 1e-4


def _prompts(tok):
    return ["What is 2 + 2?", "Write one sentence about the sea and its many moods over the seasons.",
            "List two primes.", "Why is the sky blue? Answer briefly, in plain words, for a child of five.",
            "Name a color.", "Say hello in French, Spanish and German, one word each, separated by commas please."]


def test_continuous_batching_equals_decoding_alone(smollm2):
    """Sequences join mid-way, with different budgets (so different capacity classes), and leave at different
    steps; a later one reuses a freed slot. Tokens and every generated token's KV match decoding alone."""
    runner = ModelRunner(smollm2.spec, smollm2.state_dict)
    tok = smollm2.tokenizer
    prompts = _prompts(tok)
    budgets = [6, 100, 3, 12, 9, 20]
    alone = [generate_from_ids(runner, tok.encode(p), Sampling(max_new_tokens=m, min_new_tokens=m))
             for p, m in zip(prompts, budgets)]
    batch = DecodeBatch(runner, max_batch_size=4)
    states = []

    def add(i):
        logits, kv = runner.prefill(tok.encode(prompts[i]))
        states.append(batch.add(kv, logits[-1], Sampling(max_new_tokens=budgets[i], min_new_tokens=budgets[i])))

    for i in range(3):
        add(i)
    for _ in range(4):
        batch.step()
    for i in range(3, 6):        # the 6th waits: max_batch_size is 4
        add(i)
    batch.step()
    assert sorted(batch._groups) == [64, 128]   # slots are taken on joining, per capacity class
    batch.run_until_done()
    assert not batch._groups     # every buffer was dropped
    for state, ref in zip(states, alone):
        got = result_of(state)
        assert got.token_ids == ref.token_ids
        assert got.kv.length == ref.kv.length == got.prompt_len + len(got.token_ids)
        assert (got.response_kv.keys - ref.response_kv.keys).abs().max().item() < 1e-4
        assert (got.response_kv.values - ref.response_kv.values).abs().max().item() < 1e-4


def test_removing_a_sequence_from_active_frees_its_slot(smollm2):
    runner = ModelRunner(smollm2.spec, smollm2.state_dict)
    tok = smollm2.tokenizer
    prompts = _prompts(tok)[:3]
    sampling = Sampling(max_new_tokens=10, min_new_tokens=10)
    alone = [generate_from_ids(runner, tok.encode(p), sampling) for p in prompts]
    batch = DecodeBatch(runner)
    states = []
    for p in prompts:
        logits, kv = runner.prefill(tok.encode(p))
        states.append(batch.add(kv, logits[-1], sampling))
    for _ in range(3):
        batch.step()
    gone = states[1]
    batch.active = [s for s in batch.active if s is not gone]   # as the HTTP API cancels a chat
    assert gone._group is None
    # its buffer got the KV of every token generated so far except the last (not yet run through the model)
    assert gone.kv.length == gone.prompt_len + len(gone.tokens) - 1 == gone.prompt_len + 3
    assert gone.tokens == alone[1].token_ids[:4]
    batch.active = []             # as a failed step does: every slot is freed at once
    assert not batch._groups and all(s._group is None for s in states) and batch.kv_bytes == 0
    assert states[0].kv.length == states[0].prompt_len + 3
