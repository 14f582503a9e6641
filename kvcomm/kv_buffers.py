"""The runner's KV buffers: one sequence's growable buffer (`SequenceKV`) and a decode batch's slots (`BatchKV`).

`SequenceKV` holds one sequence's KV while it is prefilled or read. `BatchKV` holds the sequences a decode batch
advances together, one per slot of a [layers, slots, kv_heads, capacity, head_dim] buffer, so one decode step
attends over all of them with one call per layer. A sequence's KV lives in exactly one of the two at a time: a
slot takes it over (`SequenceKV.move_to`, which frees the sequence's own storage: the buffer reads as empty while
its tokens sit in the slot) and hands it back, into the same `SequenceKV` object, in storage of exactly its length
when it leaves (`BatchKV.release`).

A `BatchKV` never grows (the decode batch allocates another one when a class is full) and charges its bytes to a
`kvcomm.memory_plan.KVBudget` for as long as it lives, so the ledger always equals the memory really held.
The slot-size policy (`kvcomm.memory_plan.capacity_class`): a sequence needing n tokens gets a slot of 64, 96,
128, 192, 256, ... tokens.
"""
from __future__ import annotations

import weakref

import torch

from .kv import KVSegment
from .memory_plan import KVBudget
from .model_spec import ModelSpec


def kv_bytes_per_token(spec: ModelSpec, dtype: torch.dtype) -> int:
    """Bytes of K and V one token takes in every layer."""
    return spec.kv_bytes_per_token_per_dtype_byte * torch.empty(0, dtype=dtype).element_size()


class SequenceKV:
    """A growable, contiguous KV buffer for one sequence: K and V of shape [layers, kv_heads, capacity, head_dim].

    Tokens ``0 .. length-1`` are valid; token i sits at absolute position ``start + i`` (positions inside one
    buffer are contiguous). The runner appends to it in place during a forward pass; everything else reads it.
    """

    def __init__(self, spec: ModelSpec, *, dtype: torch.dtype, device: torch.device | str, capacity: int = 256,
                 start: int = 0):
        shape = (spec.num_layers, spec.num_kv_heads, max(capacity, 1), spec.head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0
        self.start = start

    @classmethod
    def from_segment(cls, spec: ModelSpec, segment: KVSegment | None, *, extra_capacity: int, dtype: torch.dtype,
                     device: torch.device | str, start: int = 0) -> "SequenceKV":
        """A buffer holding `segment` (copied once) with room for `extra_capacity` more tokens."""
        n = 0 if segment is None else segment.num_tokens
        buf = cls(spec, dtype=dtype, device=device, capacity=n + extra_capacity,
                  start=start if segment is None else segment.start)
        if n:
            buf.keys[:, :, :n] = segment.keys
            buf.values[:, :, :n] = segment.values
            buf.length = n
        return buf

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    @property
    def next_position(self) -> int:
        return self.start + self.length

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    def reserve(self, extra: int) -> None:
        """Make room for `extra` more tokens (grows geometrically)."""
        need = self.length + extra
        if need <= self.capacity:
            return
        new_cap = max(need, int(self.capacity * 1.5) + 16)
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = torch.empty(old.shape[:2] + (new_cap,) + old.shape[3:], dtype=old.dtype, device=old.device)
            new[:, :, :self.length] = old[:, :, :self.length]
            setattr(self, name, new)

    def segment(self, begin: int = 0, end: int | None = None) -> KVSegment:
        """Tokens [begin, end) as a KVSegment (a view: copy it if it must outlive later writes)."""
        end = self.length if end is None else end
        if not 0 <= begin <= end <= self.length:
            raise IndexError(f"[{begin}, {end}) is outside the {self.length} valid tokens")
        return KVSegment(self.keys[:, :, begin:end], self.values[:, :, begin:end], self.start + begin)

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise IndexError(f"cannot truncate a buffer of {self.length} tokens to {length}")
        self.length = length

    @torch.inference_mode()   # the buffer may hold inference tensors (prefilled under inference mode)
    def move_to(self, batch: "BatchKV") -> int:
        """Copy the valid tokens into a free slot of `batch` and free this buffer's storage; return the slot.

        Afterwards this buffer is empty (capacity 0): the tokens live in the slot only."""
        slot = batch.admit(self)
        empty = self.keys.new_empty(self.keys.shape[:2] + (0,) + self.keys.shape[3:])
        self.keys, self.values, self.length = empty, empty, 0
        return slot


class BatchKV:
    """The KV of a group of decoding sequences: K and V of shape [layers, slots, kv_heads, capacity, head_dim].

    Used slots are ``0 .. size-1`` (kept dense: releasing a slot moves the last used one into it). Slot i holds
    ``lengths[i]`` valid tokens, token j at absolute position ``starts[i] + j``. `ModelRunner.decode_step`
    appends one token to every used slot in place and attends over all of them with one attention call per layer.
    The slot count is fixed at construction; the bytes are charged to `budget` (when given) until the buffer is
    garbage collected.
    """

    def __init__(self, spec: ModelSpec, *, capacity: int, dtype: torch.dtype, device: torch.device | str,
                 slots: int = 1, budget: KVBudget | None = None):
        self.spec = spec
        # zeros, not empty: padding past a slot's length is masked out of attention, and a masked score is
        # (q . k) + (-inf), which is NaN if the padding holds NaN or inf
        shape = (spec.num_layers, max(slots, 1), spec.num_kv_heads, capacity, spec.head_dim)
        nbytes = kv_bytes_per_token(spec, dtype) * max(slots, 1) * capacity
        if budget is not None:
            budget.charge(nbytes, f"a decode buffer of {max(slots, 1)} slot(s) x {capacity} tokens")
            weakref.finalize(self, budget.refund, nbytes)
        # (should an allocation fail, the finalizer refunds the charge when this half-built object goes away)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths: list[int] = []
        self.starts: list[int] = []

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    @property
    def slots(self) -> int:
        return self.keys.shape[1]

    @property
    def size(self) -> int:
        return len(self.lengths)

    @property
    def free_slots(self) -> int:
        return self.slots - self.size

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    @torch.inference_mode()   # the sequence's KV may be an inference tensor (prefilled under inference mode)
    def admit(self, kv: SequenceKV) -> int:
        """Copy `kv`'s valid tokens into the next free slot; return the slot. `kv` itself is left as it was."""
        n = kv.length
        if n >= self.capacity:
            raise ValueError(f"a sequence of {n} tokens does not fit a decode buffer of capacity {self.capacity}")
        if not self.free_slots:
            raise ValueError(f"the decode buffer's {self.slots} slot(s) are all used")
        slot = self.size
        self.keys[:, slot, :, :n] = kv.keys[:, :, :n]
        self.values[:, slot, :, :n] = kv.values[:, :, :n]
        self.lengths.append(n)
        self.starts.append(kv.start)
        return slot

    @torch.inference_mode()
    def move(self, slot: int, into: "BatchKV") -> int:
        """Move the sequence in `slot` into a free slot of `into` (same capacity); return its new slot there."""
        if into.capacity != self.capacity or not into.free_slots:
            raise ValueError("a slot moves only into a free slot of a buffer of the same capacity")
        n, target = self.lengths[slot], into.size
        into.keys[:, target, :, :n] = self.keys[:, slot, :, :n]
        into.values[:, target, :, :n] = self.values[:, slot, :, :n]
        into.lengths.append(n)
        into.starts.append(self.starts[slot])
        self._drop(slot)
        return target

    @torch.inference_mode()
    def release(self, slot: int, into: SequenceKV | None = None) -> SequenceKV | None:
        """Free `slot` and hand its tokens back: into `into` (its storage replaced by exactly these tokens), or a
        new `SequenceKV` when `into` is None. The last used slot (if another) moves into the freed one: what sat at
        index ``size - 1`` is at `slot` now."""
        n = self.lengths[slot]
        out = SequenceKV(self.spec, dtype=self.keys.dtype, device=self.keys.device, capacity=n,
                         start=self.starts[slot])
        out.keys[:, :, :n] = self.keys[:, slot, :, :n]
        out.values[:, :, :n] = self.values[:, slot, :, :n]
        out.length = n
        if into is not None:
            into.keys, into.values, into.length, into.start = out.keys, out.values, n, out.start
            out = into
        self._drop(slot)
        return out

    def drop(self, slot: int) -> None:
        """Free `slot` without handing its tokens back."""
        self._drop(slot)

    def _drop(self, slot: int) -> None:
        last = self.size - 1
        if slot != last:
            m = self.lengths[last]
            self.keys[:, slot, :, :m] = self.keys[:, last, :, :m]
            self.values[:, slot, :, :m] = self.values[:, last, :, :m]
            self.lengths[slot], self.starts[slot] = m, self.starts[last]
        self.lengths.pop()
        self.starts.pop()
