"""bf16 end to end on the CPU, on tiny random-weight models: the runner against transformers in bf16, the six
serving modes against dense, decoding, the anchor pool's commit and snapshot, and the object-store path.

No tolerance here is picked by hand: each is derived from the oracle's own bf16 noise, measured on the same
weights. bf16 weights are exact in fp32, so the fp32 twin of a bf16 model computes the same function with
negligible rounding; transformers' (or dense mode's) bf16 result minus its fp32 twin's is the noise floor
`noise`. Our bf16 path may then err by at most 2 x noise against the fp32 twin (each of the two paths carries
its own rounding; the triangle inequality gives the 2), and a reuse mode's gap to dense in bf16 may exceed its
gap in fp32 by at most its own bf16 error plus dense's (<= 3 x noise).
"""
from __future__ import annotations

import pytest
import torch

from actors.pool_state import AnchorPoolState, transaction_payload
from actors.transfer import SegmentRef, get_segment
from kvcomm.anchor_pool import AnchorPool
from kvcomm.codec import tensor_to_numpy
from kvcomm.config import KVCommConfig
from kvcomm.engine import KVCommEngine, TurnRequest
from kvcomm.names import MODES
from kvcomm.generation import DecodeBatch, Sampling, generate_from_ids
from kvcomm.model_loading import LoadedModel, build_hf_model, load_model
from kvcomm.runner import ModelRunner
from kvcomm.templates import AgentTemplate

QUESTION = "A baker sells 14 loaves in the morning and 9 in the afternoon. How many loaves are sold in all?"
NAMESPACE = "bf16"


def fp32_twin(loaded: LoadedModel) -> LoadedModel:
    """The same (bf16) weights held in fp32; tied tensors stay tied."""
    twins: dict[int, torch.Tensor] = {}
    state = {name: twins.setdefault(id(t), t.float()) for name, t in loaded.state_dict.items()}
    return LoadedModel(loaded.spec, state, loaded.tokenizer, loaded.source, torch.float32, loaded.device)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# ------------------------------------------------------------------------------------------------------------
# the runner against transformers
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2"])
def test_bf16_runner_matches_transformers_within_its_own_bf16_noise(preset):
    loaded = load_model(preset, random_weights=True, seed=9, dtype="bfloat16", embedded_tokenizer=False)
    twin = fp32_twin(loaded)
    ours = ModelRunner(loaded.spec, loaded.state_dict)
    hf16, hf32 = build_hf_model(loaded), build_hf_model(twin)
    ids = torch.randint(3, loaded.spec.vocab_size, (96,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = hf32(ids[None]).logits[0].float()                  # [160, vocab]
        theirs = hf16(ids[None]).logits[0].float()
    noise = max_abs(theirs, reference)
    assert 0 < noise < 0.05 * reference.abs().max().item()            # bf16 rounding, not a broken model
    whole, kv = ours.prefill(ids, all_logits=True)
    assert whole.dtype == torch.float32 and kv.keys.dtype == torch.bfloat16
    assert max_abs(whole, reference) <= 2 * noise
    _, first = ours.prefill(ids[:60])                                 # a tail prefill after a cached context
    tail, _ = ours.prefill(ids[60:], context=first.segment(), all_logits=True)
    assert max_abs(tail, reference[60:]) <= 2 * noise

    # greedy 32: equal to transformers' bf16 tokens, or parting only where fp32's top-2 margin is within noise
    steps, prompt = 32, ids[:40]
    stops = loaded.spec.eos_token_ids                                  # masked until min_new_tokens, as HF does
    got = generate_from_ids(ours, prompt, Sampling(max_new_tokens=steps, min_new_tokens=steps,
                                                   stop_token_ids=stops)).token_ids
    with torch.no_grad():
        want = hf16.generate(prompt[None], max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             pad_token_id=0)[0, 40:].tolist()
    agree = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), steps)
    if agree < steps:
        with torch.no_grad():
            top2 = hf32(torch.tensor([prompt.tolist() + want[:agree]])).logits[0, -1].topk(2).values
        assert (top2[0] - top2[1]).item() <= 2 * noise, (agree, got, want)


# ------------------------------------------------------------------------------------------------------------
# the engine: six modes, the pool, decoding
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    """(bf16 engine, fp32 engine) over the same weights, each with its own pool, sharing the tokenizer."""
    loaded = load_model(tiny_model_dir, random_weights=True, seed=7, dtype="bfloat16")
    twin = fp32_twin(loaded)
    out = []
    for model in (loaded, twin):
        runner = ModelRunner(model.spec, model.state_dict)
        config = KVCommConfig()
        out.append(KVCommEngine(runner, model.tokenizer, config, AnchorPool(config, runner.rope)))
    return tuple(out)


def _agent(i: int) -> AgentTemplate:
    return AgentTemplate(f"a{i}", f"You are solver {i}. Think step by step.", "Question:\n{user_question}\nAnswer:")


def _first_logits(engine: KVCommEngine, agent: AgentTemplate, content, mode: str, txn=None):
    prepared = engine.prepare(TurnRequest(agent, {"user_question": content}, mode=mode,
                                          sampling=Sampling(max_new_tokens=4), namespace=NAMESPACE,
                                          transaction=txn))
    return prepared


def test_bf16_every_mode_stays_within_the_bf16_noise_of_dense(engines):
    """A pool holding one anchor recorded for this very agent (so kvcomm and hybrid reuse with offsets), then
    every mode on identical tokens in bf16 and in fp32. KV, anchors and offsets stay bf16 in the bf16 engine."""
    agent = _agent(1)
    prepared = {}
    for engine in engines:
        content = engine.make_input(QUESTION)
        txn = engine.pool.begin(NAMESPACE)
        engine.offer_content(NAMESPACE, "user_question", content, txn)
        recorded = _first_logits(engine, agent, content, "kvcomm", txn)
        assert not recorded.reused                                       # a cold pool records an anchor
        engine.pool.commit(txn)
        prepared[engine.runner.dtype] = {mode: _first_logits(engine, agent, content, mode) for mode in MODES}
    bf16, fp32 = prepared[torch.bfloat16], prepared[torch.float32]
    anchor = engines[0].pool.snapshot(NAMESPACE).anchors("user_question")[0]
    assert {t.dtype for t in anchor.to_state()[1].values()} == {torch.bfloat16}
    assert bf16["kvcomm"].reused and bf16["hybrid"].reused and bf16["kvcomm"].kv.keys.dtype == torch.bfloat16

    noise = max_abs(bf16["dense"].last_logits[-1], fp32["dense"].last_logits[-1])
    assert noise > 0
    for mode in MODES:
        assert bf16[mode].prompt_ids == fp32[mode].prompt_ids == bf16["dense"].prompt_ids, mode
        own = max_abs(bf16[mode].last_logits[-1], fp32[mode].last_logits[-1])
        assert own <= 2 * noise, (mode, own, noise)                     # reuse does not amplify bf16 rounding
        gap16 = max_abs(bf16[mode].last_logits[-1], bf16["dense"].last_logits[-1])
        gap32 = max_abs(fp32[mode].last_logits[-1], fp32["dense"].last_logits[-1])
        assert gap16 <= gap32 + 3 * noise, (mode, gap16, gap32, noise)
    # the anchor recorded for this agent reconstructs dense (in fp32 to ~1e-4, test_engine); bf16 keeps most of it
    naive_gap = max_abs(bf16["naive"].last_logits[-1], bf16["dense"].last_logits[-1])
    assert max_abs(bf16["kvcomm"].last_logits[-1], bf16["dense"].last_logits[-1]) < naive_gap


def test_bf16_decode_batch_matches_decoding_alone(engines):
    """Four ragged sequences decoded together equal each decoded alone: the same tokens, or tokens that part only
    where the fp32 twin's top-2 margin is within the bf16 noise there (a different batch shape may round a
    matmul differently); their KV agrees up to the parting point."""
    runner16, runner32 = engines[0].runner, engines[1].runner
    prompts = [torch.randint(3, 49152, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 30, 19, 52)]
    sampling = Sampling(max_new_tokens=12, min_new_tokens=12)
    alone = [generate_from_ids(runner16, p, sampling) for p in prompts]
    batch = DecodeBatch(runner16, max_batch_size=4)
    states = []
    for p in prompts:
        logits, kv = runner16.prefill(p)
        states.append(batch.add(kv, logits[-1], sampling))
    batch.run_until_done()
    parted = 0
    for prompt, state, ref in zip(prompts, states, alone):
        assert state.kv.keys.dtype == torch.bfloat16 and state.kv.length == ref.kv.length
        agree = next((i for i, (a, b) in enumerate(zip(state.tokens, ref.token_ids)) if a != b), 12)
        if agree < 12:
            parted += 1
            prefix = torch.cat([prompt, torch.tensor(ref.token_ids[:agree])])
            exact = runner32.prefill(prefix)[0][-1]
            noise = max_abs(runner16.prefill(prefix)[0][-1], exact)
            top2 = exact.topk(2).values
            assert (top2[0] - top2[1]).item() <= 2 * noise, (agree, state.tokens, ref.token_ids)
        # KV of the tokens both saw: equal up to one bf16 rounding of its size
        n = prompt.numel() + agree
        scale = ref.kv.segment(0, n).keys.float().abs().max().item()
        assert max_abs(state.kv.segment(0, n).keys, ref.kv.segment(0, n).keys) <= 2 ** -7 * scale
    assert parted <= 1


def _arrays(wire: dict) -> list[tuple[str, bytes]]:
    out = []
    for entries in wire["lists"].values():
        for entry in entries:
            parts = [entry["parts"]["base"], *entry["parts"]["deltas"].values(), *entry["parts"]["rbk"].values()]
            out += [(part.dtype, array.tobytes()) for part in parts for array in part.ref.values()]
    return sorted(out)


def test_bf16_pool_commit_snapshot_and_object_store_keep_every_bit(engines, ray_cluster, tmp_path):
    engine = engines[0]
    content = engine.make_input(QUESTION + " Show the sum.")
    txn = engine.pool.begin("bf16-snapshot")
    engine.offer_content("bf16-snapshot", "user_question", content, txn)
    _first_logits(engine, _agent(2), content, "kvcomm", txn)
    payload = transaction_payload(txn)
    engine.pool.commit(txn)
    anchor = engine.pool.snapshot("bf16-snapshot").anchors("user_question")[0]
    tensors = anchor.to_state()[1]
    expected = sorted(("bfloat16", tensor_to_numpy(t).tobytes()) for t in tensors.values())
    assert len(expected) >= 6 and all(t.dtype == torch.bfloat16 for t in tensors.values())

    config = engine.config
    state = AnchorPoolState(config, put=lambda arrays: arrays)          # the pool actor's state, in process
    state.commit(ray_cluster.get(ray_cluster.put(payload)))             # through the object store
    assert _arrays(state.snapshot("bf16-snapshot")) == expected
    path = tmp_path / "pool.snapshot"
    state.save(path, tag="bf16")
    restored = AnchorPoolState(config, put=lambda arrays: arrays)
    assert restored.load(path, tag="bf16")["loaded"]
    assert _arrays(restored.snapshot("bf16-snapshot")) == expected

    segment = content.base                                              # a content's base KV, bf16
    back = get_segment(SegmentRef.put(segment))
    assert back.dtype == torch.bfloat16 and torch.equal(back.keys, segment.keys)
    assert torch.equal(back.values, segment.values) and back.start == segment.start
