"""Rotary position embeddings (HF "rotate_half" convention) and exact re-rotation of cached keys.

Keys are stored post-RoPE. Because R(a)R(b) = R(a+b), moving a cached key from position p to q is one more
rotation by q - p; values never change. All angles are computed in fp32 exactly as transformers computes them
(``inv_freq[:, None] @ positions[None, :]``), so the runner matches transformers to float rounding.
"""
from __future__ import annotations

import math

import torch

from .model_spec import ModelSpec


def inverse_frequencies(spec: ModelSpec) -> torch.Tensor:
    """[head_dim // 2] fp32 inverse frequencies, with llama3 scaling applied when the spec asks for it."""
    dim = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = spec.rope_scaling
    if scaling and scaling.get("rope_type") == "llama3":
        factor = scaling["factor"]
        low_freq_factor = scaling["low_freq_factor"]
        high_freq_factor = scaling["high_freq_factor"]
        old_context_len = scaling["original_max_position_embeddings"]
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        inv_freq = torch.where(is_medium, smoothed, inv_freq_llama)
    return inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rope:
    """RoPE tables for one model on one device."""

    def __init__(self, spec: ModelSpec, device: torch.device | str = "cpu"):
        self.spec = spec
        self.inv_freq = inverse_frequencies(spec).to(device)  # [head_dim // 2], fp32

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [len(positions), head_dim] for integer positions, computed in fp32, cast to dtype."""
        freqs = positions.to(self.inv_freq.device, torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x [..., tokens, head_dim] by per-token angles (cos/sin [tokens, head_dim])."""
        return x * cos + rotate_half(x) * sin

    def shift_keys(self, keys: torch.Tensor, delta: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Move post-RoPE keys [..., tokens, head_dim] by `delta` positions (may be negative).

        The rotation is computed in fp32 whatever the storage dtype and cast back; delta 0 returns `keys` itself.
        `out` (same shape, any dtype, not overlapping `keys`): write the result there, rounded once to its dtype
        (an fp32 `out` is written directly, without an intermediate tensor), and return it.
        """
        if delta == 0:
            return keys if out is None else out.copy_(keys)
        angle = float(delta) * self.inv_freq.double()  # fp64 angle of one constant shift: exact composition
        cos, sin = angle.cos().float(), angle.sin().float()          # [head_dim // 2]: both halves share them
        k32 = keys.float()
        half = k32.shape[-1] // 2
        first, second = k32[..., :half], k32[..., half:]
        rotated = out if out is not None and out.dtype == torch.float32 else torch.empty_like(k32)
        # (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin): rotate_half's formula, without materializing rotate_half
        torch.mul(first, cos, out=rotated[..., :half]).addcmul_(second, sin, value=-1.0)
        torch.mul(second, cos, out=rotated[..., half:]).addcmul_(first, sin)
        if out is None:
            return rotated.to(keys.dtype)
        return out if rotated is out else out.copy_(rotated)
