"""What a first GPU run would hit, caught on the CPU: mixed-device ops (the meta device stands in for CUDA: it
refuses to mix with CPU tensors as CUDA does, and it cannot be read back), SDPA handed a mask together with
`enable_gqa` (PyTorch's math-kernel fallback), flash-attn's kernel choice and its causal alignment (a CPU reference
of flash-attn's bottom-right causal kernel swapped in), sampling on the logits' device, one host read per decode
step, and offsets added in fp32 and rounded once."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from kvcomm.attention import FlashKernel, choose_kernel
from kvcomm.generation import DecodeBatch, Sampling
from kvcomm.kv import KVSegment
from kvcomm.model_loading import expected_shapes, load_model
from kvcomm.model_spec import PRESETS
from kvcomm.runner import BatchKV, ModelRunner
from kvcomm.sampling import RowSampling, sample_tokens

SPEC = PRESETS["tiny-llama"]     # 4 query heads over 2 KV heads: grouped-query attention


@pytest.fixture(scope="module")
def tiny():
    loaded = load_model("tiny-llama", random_weights=True, seed=11, embedded_tokenizer=False)
    return loaded, ModelRunner(loaded.spec, loaded.state_dict)


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, SPEC.vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------------------
# devices
# ------------------------------------------------------------------------------------------------------------
def test_forward_blend_prefill_decode_and_sampling_run_on_the_meta_device():
    """Every runner path on a non-CPU device: a CPU tensor meeting a device tensor raises, as on CUDA."""
    weights = {name: torch.empty(shape, device="meta", dtype=torch.bfloat16)
               for name, shape in expected_shapes(SPEC).items()}
    runner = ModelRunner(SPEC, weights)
    assert runner.device.type == "meta"
    _, kv = runner.prefill(_ids(20, 0))
    context = kv.segment()
    runner.prefill(_ids(7, 1), context=context)                       # prefill after a cached context
    runner.blend_prefill(context, _ids(20, 0), _ids(3, 2), recompute_ratio=0.3, check_layer=1)
    # nothing after the protected prefix to check: `selected` stays the empty tensor it started as
    _, _, selected = runner.blend_prefill(context, _ids(20, 0), _ids(3, 2), recompute_ratio=0.3, check_layer=1,
                                          protected_prefix=20)
    assert selected.device.type == "meta"
    buffer = BatchKV(SPEC, capacity=64, dtype=torch.bfloat16, device="meta", slots=2)
    buffer.admit(kv)
    _, shorter = runner.prefill(_ids(9, 3))
    buffer.admit(shorter)                                              # ragged lengths: the masked path
    logits = runner.decode_step([buffer], [5, 6])
    rows = [RowSampling(Sampling(temperature=0.8, top_p=0.9, seed=3), 4),
            RowSampling(Sampling(temperature=0.0, stop_token_ids=(2,), min_new_tokens=3), 1, allow_stop=False)]
    tokens = sample_tokens(logits, rows)                               # no generator on another device
    assert tokens.device.type == "meta" and tokens.shape == (2,)


class _SdpaSpy(TorchFunctionMode):
    """Records the keyword arguments of every scaled_dot_product_attention call."""

    def __init__(self):
        super().__init__()
        self.calls: list[dict] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.calls.append({"mask": kwargs.get("attn_mask") is not None, "gqa": bool(kwargs.get("enable_gqa")),
                               "heads": (args[0].shape[-3], args[1].shape[-3])})
        return func(*args, **kwargs)


def test_sdpa_never_gets_a_mask_together_with_enable_gqa(tiny):
    """With both, PyTorch falls back to its math kernel (fp32 scores: ~8 GiB per layer at 8K tokens, 8B model)."""
    loaded, runner = tiny
    spy = _SdpaSpy()
    with spy:
        _, kv = runner.prefill(_ids(30, 0))                            # causal, no mask: GQA in the kernel
        runner.prefill(_ids(9, 1), context=kv.segment())               # bottom-right mask after a context
        runner.blend_prefill(kv.segment(), _ids(30, 0), _ids(4, 2), recompute_ratio=0.2, check_layer=1)
        buffer = BatchKV(loaded.spec, capacity=64, dtype=runner.dtype, device=runner.device, slots=2)
        buffer.admit(kv)
        _, other = runner.prefill(_ids(11, 3))
        buffer.admit(other)
        runner.decode_step([buffer], [4, 5])                           # ragged: a lengths mask
    kinds = Counter((c["mask"], c["gqa"]) for c in spy.calls)
    assert kinds[(True, False)] > 0 and kinds[(False, True)] > 0       # both paths were exercised
    assert kinds[(True, True)] == 0, spy.calls
    assert all(c["heads"][0] == c["heads"][1] for c in spy.calls if c["mask"])   # KV heads expanded or folded


# ------------------------------------------------------------------------------------------------------------
# flash-attn
# ------------------------------------------------------------------------------------------------------------
def reference_flash_attn(q, k, v, causal=False, softmax_scale=None, top_left=False):
    """flash-attn's contract in plain torch: q [B, t, H, D], k/v [B, S, Hkv, D] -> [B, t, H, D]; the causal mask
    aligned bottom-right (query i sees keys j <= i + S - t), as flash-attn >= 2.1 (top-left before 2.1)."""
    t, s, heads = q.shape[1], k.shape[1], q.shape[2]
    group = heads // k.shape[2]
    qf = q.float().transpose(1, 2)                                               # [B, H, t, D]
    kf = k.float().repeat_interleave(group, dim=2).transpose(1, 2)               # [B, H, S, D]
    vf = v.float().repeat_interleave(group, dim=2).transpose(1, 2)
    scores = qf @ kf.transpose(-1, -2) * softmax_scale                           # [B, H, t, S]
    if causal:
        shift = 0 if top_left else s - t
        allowed = torch.arange(s)[None, :] <= torch.arange(t)[:, None] + shift   # [t, S]
        scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ vf).transpose(1, 2).to(q.dtype)                 # [B, t, H, D]


def _cpu_kernel(version: str = "2.6.3", top_left: bool = False) -> FlashKernel:
    return FlashKernel(lambda *a, **kw: reference_flash_attn(*a, top_left=top_left, **kw), version,
                       device_types=("cpu",))


def test_flash_reference_kernel_swapped_in_matches_the_sdpa_path_in_bf16():
    loaded = load_model("tiny-llama", random_weights=True, seed=12, dtype="bfloat16", embedded_tokenizer=False)
    sdpa = ModelRunner(loaded.spec, loaded.state_dict, attention="sdpa")
    flash = ModelRunner(loaded.spec, loaded.state_dict, attention="flash", flash_kernel=_cpu_kernel())
    early = ModelRunner(loaded.spec, loaded.state_dict, attention="auto",
                        flash_kernel=_cpu_kernel("2.6.3", top_left=True))   # what flash-attn < 2.1 computes
    assert flash.attention_backend == "flash-attn" and sdpa.attention_backend == "sdpa"
    prompt, tail = _ids(40, 0), _ids(12, 1)
    expect, kv = sdpa.prefill(prompt)
    got, flash_kv = flash.prefill(prompt)
    floor = (expect - got).abs().max().item()                           # no context: the two alignments agree
    expect_tail, _ = sdpa.prefill(tail, context=kv.segment(), all_logits=True)
    got_tail, _ = flash.prefill(tail, context=flash_kv.segment(), all_logits=True)
    wrong_tail, _ = early.prefill(tail, context=flash_kv.segment(), all_logits=True)
    scale = expect_tail.abs().max().item()
    assert (expect_tail - got_tail).abs().max().item() <= max(2 * floor, 0.02 * scale)
    assert (expect_tail - wrong_tail).abs().max().item() > 5 * max(2 * floor, 0.02 * scale)   # the test can tell


def test_flash_attn_is_chosen_only_where_it_is_right():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    good = FlashKernel(lambda *a, **k: None, "2.6.3")
    assert choose_kernel("auto", cuda, torch.bfloat16, good)[0] is good
    assert choose_kernel("auto", cuda, torch.float16, good)[0] is good
    backend, reason = choose_kernel("auto", cuda, torch.float32, good)          # flash-attn raises on fp32
    assert backend is None and "float32" in reason
    backend, reason = choose_kernel("auto", cuda, torch.bfloat16, FlashKernel(good.fn, "2.0.9"))
    assert backend is None and "top-left" in reason                            # silently wrong after a prefix
    assert choose_kernel("auto", cpu, torch.bfloat16, good)[0] is None
    assert choose_kernel("sdpa", cuda, torch.bfloat16, good)[0] is None
    with pytest.raises(RuntimeError, match="float32"):
        choose_kernel("flash", cuda, torch.float32, good)
    with pytest.raises(RuntimeError, match="not installed"):
        choose_kernel("flash", cuda, torch.bfloat16, None)
    with pytest.raises(RuntimeError, match="2.1"):
        weights = load_model("tiny-llama", random_weights=True, embedded_tokenizer=False).state_dict
        ModelRunner(SPEC, weights, attention="flash",
                    flash_kernel=FlashKernel(good.fn, "2.0.4", device_types=("cpu",), dtypes=(torch.float32,)))


# ------------------------------------------------------------------------------------------------------------
# sampling and host reads
# ------------------------------------------------------------------------------------------------------------
def test_sampling_follows_the_distribution_and_top_p():
    logits = torch.log(torch.tensor([0.40, 0.25, 0.15, 0.10, 0.06, 0.04]))
    n = 4000
    rows = [RowSampling(Sampling(temperature=1.0, seed=seed), 0) for seed in range(n)]
    counts = torch.bincount(sample_tokens(logits.expand(n, -1).contiguous(), rows), minlength=6).double()
    expected = logits.exp().double() * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.5, (counts, chi2)                       # 5 d.o.f.: p ~ 0.001
    nucleus = [RowSampling(Sampling(temperature=1.0, top_p=0.6, seed=seed), 0) for seed in range(n)]
    kept = torch.bincount(sample_tokens(logits.expand(n, -1).contiguous(), nucleus), minlength=6)
    assert kept[2:].sum() == 0 and kept[0] > kept[1] > 0     # {0.40, 0.25} reaches 0.6
    again = sample_tokens(logits.expand(5, -1).contiguous(), rows[:5])
    assert torch.equal(again, sample_tokens(logits.expand(5, -1).contiguous(), rows[:5]))   # seeded
    later = [RowSampling(r.sampling, 7) for r in rows[:50]]
    assert not torch.equal(sample_tokens(logits.expand(50, -1).contiguous(), rows[:50]),
                           sample_tokens(logits.expand(50, -1).contiguous(), later))        # per token index
    greedy = RowSampling(Sampling(stop_token_ids=(0,), min_new_tokens=2), 1, allow_stop=False)
    assert sample_tokens(logits[None], [greedy]).tolist() == [1]                             # stop masked


_HOST_READS = {"__int__", "__float__", "__bool__", "__index__", "item", "tolist", "numpy", "cpu"}


class _HostReadSpy(TorchFunctionMode):
    """Counts reads of tensor values on the host: on CUDA each is a device-to-host synchronization."""

    def __init__(self):
        super().__init__()
        self.reads: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _HOST_READS:
            self.reads[name] += 1
        return func(*args, **(kwargs or {}))


def test_one_host_read_per_decode_step_whatever_the_batch(tiny):
    loaded, runner = tiny
    samplings = [Sampling(max_new_tokens=6, min_new_tokens=6), Sampling(max_new_tokens=5, temperature=0.9, seed=1),
                 Sampling(max_new_tokens=90, temperature=0.7, top_p=0.8, seed=2),
                 Sampling(max_new_tokens=7, min_new_tokens=4, stop_token_ids=(2, 3)),
                 Sampling(max_new_tokens=4, stop_token_ids=(7,)), Sampling(max_new_tokens=200)]
    batch = DecodeBatch(runner, max_batch_size=8)
    for i, sampling in enumerate(samplings):
        logits, kv = runner.prefill(_ids(5 + 7 * i, i))
        batch.add(kv, logits[-1], sampling)
    assert len(batch._groups) >= 2                            # several capacity classes, ragged lengths
    per_step = []
    for _ in range(5):
        spy = _HostReadSpy()
        with spy:
            batch.step()
        per_step.append(sum(spy.reads.values()))
        assert set(spy.reads) == {"tolist"}, spy.reads
    assert per_step == [1] * 5


# ------------------------------------------------------------------------------------------------------------
# offsets
# ------------------------------------------------------------------------------------------------------------
def test_offsets_are_added_in_fp32_and_rounded_once():
    """bf16 has 8 significant bits: at 1.0 its ulp is 2**-7. An offset just over half an ulp must round the sum
    up; cast to bf16 first it becomes exactly half an ulp and the sum ties down to even (two roundings)."""
    base = torch.ones(1, 1, 4, 2, dtype=torch.bfloat16)
    offset = torch.full((1, 1, 4, 2), 2.0 ** -8 + 2.0 ** -20)          # fp32
    summed = KVSegment(base, base.clone()).plus(offset, offset)
    assert summed.keys.dtype == torch.bfloat16
    assert torch.all(summed.keys == 1.0 + 2.0 ** -7) and torch.all(summed.values == 1.0 + 2.0 ** -7)
    twice = base + offset.to(torch.bfloat16)                           # what adding in bf16 gives
    assert torch.all(twice == 1.0)
    small = torch.full((1, 1, 4, 2), 0.3 * 2.0 ** -8)                  # under half an ulp: vanishes either way
    assert torch.equal(KVSegment(base, base).plus(small, None).keys, base)
    assert math.isclose(float(KVSegment(base.float(), base.float()).plus(small, None).keys[0, 0, 0, 0]),
                        1.0 + 0.3 * 2.0 ** -8, rel_tol=1e-6)           # fp32 KV keeps it
