"""Attention for the model runner: which kernel runs a prefill's attention, and how a masked call is made.

Two kernels serve a prefill (or a tail prefill after a cached context):

* flash-attn, when the runner asks for it (or "auto") *and* it can be right: the model is on a device the kernel
  supports, in a dtype it supports (fp16/bf16), and its version aligns the causal mask bottom-right when the
  queries are fewer than the keys (flash-attn >= 2.1; before that the mask was top-left aligned, silently wrong
  after a cached prefix). A `FlashKernel` describes such a function; `installed_flash_kernel` finds the real one,
  and tests swap in a CPU reference of the same contract.
* torch SDPA otherwise. Without a mask, grouped-query attention goes to the kernel as is (``enable_gqa``); with a
  mask the KV heads are expanded first, because SDPA given both a mask and ``enable_gqa`` falls back to its math
  kernel, which materializes fp32 scores (about 8 GiB per layer at 8K tokens for an 8B model). Every SDPA call in
  the runner goes through `sdpa`, which enforces that.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

FLASH_MIN_VERSION = (2, 1)    # flash-attn < 2.1 aligns the causal mask top-left when q is shorter than k
FLASH_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class FlashKernel:
    """A flash-attn style function and what it supports.

    ``fn(q [B, t, H, D], k [B, S, Hkv, D], v [B, S, Hkv, D], causal=bool, softmax_scale=float) -> [B, t, H, D]``,
    with the causal mask aligned bottom-right (query i sees keys j <= i + S - t), as flash-attn >= 2.1 does."""
    fn: Callable[..., torch.Tensor]
    version: str
    device_types: tuple[str, ...] = ("cuda",)
    dtypes: tuple[torch.dtype, ...] = FLASH_DTYPES

    def unusable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why this kernel must not run a model on `device` in `dtype`, or None when it may."""
        if device.type not in self.device_types:
            return f"flash-attn runs on {'/'.join(self.device_types)}, the model is on {device}"
        if dtype not in self.dtypes:
            return f"flash-attn supports {', '.join(str(d).removeprefix('torch.') for d in self.dtypes)}, " \
                   f"the model is {str(dtype).removeprefix('torch.')}"
        if version_tuple(self.version) < FLASH_MIN_VERSION:
            return (f"flash-attn {self.version} is older than 2.1: its causal mask is top-left aligned, wrong after "
                    "a cached prefix")
        return None


def version_tuple(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as "2.6.3" or "2.0.0.post1"; (0,) when unreadable."""
    parts = re.findall(r"\d+", version)[:2]
    return tuple(int(p) for p in parts) if parts else (0,)


def installed_flash_kernel() -> FlashKernel | None:
    """flash-attn's `flash_attn_func` as a `FlashKernel` when the package imports, else None (imported lazily)."""
    try:
        import flash_attn  # type: ignore[import-not-found]
        from flash_attn import flash_attn_func  # type: ignore[import-not-found]
    except Exception:  # not installed, or built for another CUDA/torch
        return None
    return FlashKernel(flash_attn_func, str(getattr(flash_attn, "__version__", "0")))


def choose_kernel(requested: str, device: torch.device, dtype: torch.dtype,
                  flash: FlashKernel | None) -> tuple[FlashKernel | None, str]:
    """(the flash kernel to use or None for SDPA, why) for a runner asking for `requested` ("auto", "sdpa",
    "flash"). "auto" takes flash-attn only where it is right; "flash" raises naming why it cannot be used."""
    if requested not in ("auto", "sdpa", "flash"):
        raise ValueError(f"attention must be 'auto', 'sdpa' or 'flash', got {requested!r}")
    if requested == "sdpa":
        return None, "sdpa requested"
    reason = "flash-attn is not installed" if flash is None else flash.unusable_reason(device, dtype)
    if reason is None:
        return flash, f"flash-attn {flash.version}"
    if requested == "flash":
        raise RuntimeError(f"attention='flash' cannot be used: {reason}")
    return None, reason


def sdpa(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, *, mask: torch.Tensor | None = None,
         causal: bool = False, scale: float) -> torch.Tensor:
    """Scaled dot-product attention of q [..., H, t, D] over keys/values [..., Hkv, S, D] -> [..., H, t, D].

    Grouped-query attention: without a mask SDPA groups the heads itself (``enable_gqa``); with a mask the KV
    heads are expanded to H (a copy of this layer's K and V) so SDPA can take a fused kernel."""
    heads, kv_heads = q.shape[-3], keys.shape[-3]
    if mask is not None and heads != kv_heads:
        group = heads // kv_heads
        keys = keys.repeat_interleave(group, dim=-3)                            # [..., H, S, D]
        values = values.repeat_interleave(group, dim=-3)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal, scale=scale,
                                          enable_gqa=mask is None and heads != kv_heads)
