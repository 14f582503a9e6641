"""KV segments: the unit of KV that KVCOMM stores, shifts, offsets and ships.

A `KVSegment` is one contiguous K and one V tensor of shape ``[layers, kv_heads, tokens, head_dim]`` plus the
absolute position of its first token. Keys are post-RoPE, rotated for positions ``start .. start + tokens - 1``.
Every operation here is a pure function returning a new segment; tensors are never modified in place.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .rope import Rope


@dataclass(frozen=True)
class KVSegment:
    keys: torch.Tensor    # [layers, kv_heads, tokens, head_dim], post-RoPE at positions start..start+tokens-1
    values: torch.Tensor  # [layers, kv_heads, tokens, head_dim]
    start: int = 0

    def __post_init__(self) -> None:
        if self.keys.shape != self.values.shape or self.keys.dim() != 4:
            raise ValueError(f"K and V must share one 4-d shape [layers, kv_heads, tokens, head_dim]; "
                             f"got {tuple(self.keys.shape)} and {tuple(self.values.shape)}")

    # ---- shape ----------------------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self.keys.shape[2]

    def __len__(self) -> int:
        return self.num_tokens

    @property
    def end(self) -> int:
        """One past the position of the last token."""
        return self.start + self.num_tokens

    @property
    def num_layers(self) -> int:
        return self.keys.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys.dtype

    @property
    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2

    # ---- pure operations ------------------------------------------------------------------------------------
    def slice(self, begin: int, end: int | None = None) -> "KVSegment":
        """Tokens [begin, end) of this segment (indices relative to the segment), keeping their positions."""
        end = self.num_tokens if end is None else end
        if not 0 <= begin <= end <= self.num_tokens:
            raise IndexError(f"slice [{begin}, {end}) out of range for a segment of {self.num_tokens} tokens")
        return KVSegment(self.keys[:, :, begin:end], self.values[:, :, begin:end], self.start + begin)

    def shifted(self, rope: Rope, new_start: int) -> "KVSegment":
        """The same tokens re-rotated to start at `new_start` (values untouched; identity when unchanged)."""
        delta = new_start - self.start
        if delta == 0:
            return self
        return KVSegment(rope.shift_keys(self.keys, delta), self.values, new_start)

    def plus(self, key_offset: torch.Tensor | None, value_offset: torch.Tensor | None) -> "KVSegment":
        """Add offsets (same shape as K/V) to keys and values; None leaves that side unchanged.

        The sum is taken in fp32 and rounded once to the segment's dtype: a bf16 offset cast first and then
        added in bf16 would be rounded twice, and offsets under half a bf16 ulp of the KV would vanish."""
        def add(kv: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
            return kv if offset is None else (kv.float() + offset.float()).to(kv.dtype)
        return KVSegment(add(self.keys, key_offset), add(self.values, value_offset), self.start)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "KVSegment":
        return KVSegment(self.keys.to(device=device, dtype=dtype), self.values.to(device=device, dtype=dtype),
                         self.start)

    @staticmethod
    def empty(num_layers: int, num_kv_heads: int, head_dim: int, start: int = 0,
              dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> "KVSegment":
        z = torch.empty(num_layers, num_kv_heads, 0, head_dim, dtype=dtype, device=device)
        return KVSegment(z, z.clone(), start)


def concat(segments: Sequence[KVSegment]) -> KVSegment:
    """Concatenate segments whose positions follow each other (each starts where the previous ends)."""
    if not segments:
        raise ValueError("concat needs at least one segment")
    for left, right in zip(segments, segments[1:]):
        if left.end != right.start:
            raise ValueError(f"segments are not contiguous: one ends at {left.end}, the next starts at {right.start}")
    if len(segments) == 1:
        return segments[0]
    return KVSegment(torch.cat([s.keys for s in segments], dim=2), torch.cat([s.values for s in segments], dim=2),
                     segments[0].start)
