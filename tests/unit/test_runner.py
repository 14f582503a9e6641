"""The model runner against transformers' own model (the oracle), RoPE re-rotation, and batched decode."""
from __future__ import annotations

import pytest
import torch

from kvcomm.generation import DecodeBatch, Sampling, generate_from_ids, result_of
from kvcomm.kv import KVSegment, concat
from kvcomm.model_loading import build_hf_model, load_model
from kvcomm.runner import ModelRunner


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-qwen2"])
def tiny(request):
    loaded = load_model(request.param, random_weights=True, seed=3)
    return loaded, ModelRunner(loaded.spec, loaded.state_dict), build_hf_model(loaded)


def _hf_logits(hf_model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(ids[None]).logits[0].float()


def test_tiny_logits_match_transformers(tiny):
    loaded, runner, hf = tiny
    ids = torch.randint(0, loaded.spec.vocab_size, (300,), generator=torch.Generator().manual_seed(0))
    logits, _ = runner.prefill(ids, all_logits=True)
    assert (logits - _hf_logits(hf, ids)).abs().max().item() < 1e-4


def test_prefill_in_two_parts_equals_one(tiny):
    loaded, runner, _ = tiny
    ids = torch.randint(0, loaded.spec.vocab_size, (120,), generator=torch.Generator().manual_seed(1))
    whole, kv_whole = runner.prefill(ids, all_logits=True)
    _, kv_a = runner.prefill(ids[:70])
    part_b, kv_ab = runner.prefill(ids[70:], context=kv_a.segment(), all_logits=True)
    assert (part_b - whole[70:]).abs().max().item() < 1e-4
    assert (kv_ab.segment().keys - kv_whole.segment().keys).abs().max().item() < 1e-5


def test_smollm2_logits_and_greedy_generation_match_transformers(smollm2, smollm2_hf):
    tok = smollm2.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "Name three colors of the rainbow."}],
                                   tokenize=False, add_generation_prompt=True)
    ids = torch.tensor(tok.encode(text))
    runner = ModelRunner(smollm2.spec, smollm2.state_dict)
    logits, _ = runner.prefill(ids, all_logits=True)
    assert (logits - _hf_logits(smollm2_hf, ids)).abs().max().item() < 1e-4

    # transformers masks its EOS ids until min_new_tokens; ours does the same with the same stop ids
    stop = tuple(sorted(set(smollm2.spec.eos_token_ids) | {tok.eos_token_id}))
    ours = generate_from_ids(runner, ids, Sampling(max_new_tokens=32, min_new_tokens=32, stop_token_ids=stop))
    with torch.no_grad():
        theirs = smollm2_hf.generate(ids[None], max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert ours.token_ids == theirs[0, ids.numel():].tolist()
    # every generated token's KV is kept, including the last one
    assert ours.kv.length == ids.numel() + 32


def test_rope_shift_matches_direct_computation(smollm2):
    runner = ModelRunner(smollm2.spec, smollm2.state_dict)
    rope = runner.rope
    ids = smollm2.tokenizer.encode("The quick brown fox jumps over the lazy dog near the river bank.")
    _, kv_at_0 = runner.prefill(ids, start=0)
    _, kv_at_500 = runner.prefill(ids, start=500)
    # layer 0 depends only on token and position, so a re-rotated layer-0 key must equal the direct one
    moved = kv_at_0.segment().shifted(rope, 500)
    direct = kv_at_500.segment()
    rel = (moved.keys[0] - direct.keys[0]).norm() / direct.keys[0].norm()
    assert rel.item() < 3e-4
    assert torch.equal(moved.values[0], direct.values[0])
    # round trip p -> q -> p, and a shift of 0 is the identity
    seg = kv_at_0.segment()
    back = seg.shifted(rope, 1234).shifted(rope, 0)
    assert ((back.keys - seg.keys).norm() / seg.keys.norm()).item() < 1e-5
    assert seg.shifted(rope, 0) is seg


def test_layer0_keys_identical_across_prefixes(smollm2):
    runner = ModelRunner(smollm2.spec, smollm2.state_dict)
    tok = smollm2.tokenizer
    shared = tok.encode(" shared text about apples and pears", add_special_tokens=False)
    a = tok.encode("First prefix, quite long here.", add_special_tokens=False)
    b = tok.encode("Another one", add_special_tokens=False)
    b = b + [b[-1]] * (len(a) - len(b))   # same length, different tokens: same positions for the shared text
    _, kv_a = runner.prefill(a + shared)
    _, kv_b = runner.prefill(b + shared)
    sa, sb = kv_a.segment(len(a)), kv_b.segment(len(b))
    assert torch.equal(sa.keys[0], sb.keys[0]) and torch.equal(sa.values[0], sb.values[0])
    assert not torch.equal(sa.keys[5], sb.keys[5])   # deeper layers do see the prefix


def test_batched_decode_matches_decoding_alone(smollm2):
    runner = ModelRunner(smollm2.spec, smollm2.state_dict)
    tok = smollm2.tokenizer
    prompts = ["What is 2 + 2?", "Write one sentence about the sea and its many moods over the seasons.",
               "List two primes.", "Why is the sky blue? Answer briefly, in plain words, for a child of five."]
    sampling = Sampling(max_new_tokens=12)
    alone = [generate_from_ids(runner, tok.encode(p), sampling).token_ids for p in prompts]
    batch = DecodeBatch(runner)
    states = []
    for p in prompts:
        logits, kv = runner.prefill(tok.encode(p), extra_capacity=16)
        states.append(batch.add(kv, logits[-1], sampling))
    batch.run_until_done()
    assert [result_of(s).token_ids for s in states] == alone
    assert len({len(tok.encode(p)) for p in prompts}) == 4   # really different lengths


def test_concat_requires_contiguous_positions():
    z = torch.zeros(2, 1, 3, 4)
    concat([KVSegment(z, z, 0), KVSegment(z, z, 3)])
    with pytest.raises(ValueError, match="not contiguous"):
        concat([KVSegment(z, z, 0), KVSegment(z, z, 5)])


def test_blend_prefill_with_full_ratio_equals_dense(tiny):
    loaded, runner, _ = tiny
    ids = torch.randint(0, loaded.spec.vocab_size, (80,), generator=torch.Generator().manual_seed(2))
    dense_logits, dense_kv = runner.prefill(ids, all_logits=True)
    exact = dense_kv.segment(0, 70)
    noisy = KVSegment(exact.keys + 0.5, exact.values - 0.5, 0)
    logits, kv, selected = runner.blend_prefill(noisy, ids[:70], ids[70:], recompute_ratio=1.0, check_layer=0)
    assert selected.numel() == 70
    assert (logits[-1] - dense_logits[-1]).abs().max().item() < 1e-4
    # with nothing recomputed the wrong cache shows in the output
    logits0, _, none = runner.blend_prefill(noisy, ids[:70], ids[70:], recompute_ratio=0.0, check_layer=1)
    assert none.numel() == 0 and (logits0[-1] - dense_logits[-1]).abs().max().item() > 1e-3
