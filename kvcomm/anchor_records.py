"""Anchor records: one observed placeholder content (`Anchor`: its base KV at positions 0..T-1) and the KV offsets each
consumer saw for it (`ConsumerDeltas`). Immutable values of tensors, with a flat (metadata, tensors) form for stores
that keep tensors apart (`Anchor.to_state` / `Anchor.from_state`). The pool that holds them is `kvcomm.anchor_pool`.

Key deltas are stored de-rotated to position 0 (``config.rerotate_deltas``, the corrected mode: rotation is linear, so
de-rotating a difference is exact) or as observed (reference mode, together with the writer's rotated base key; the last
writer of an anchor overwrites it, exactly like the reference's ``ph_key_embedding``).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from types import MappingProxyType
from typing import Any, Mapping

import torch


def tensor_bytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


@dataclass(frozen=True, eq=False)
class ConsumerDeltas:
    """What one consumer agent observed for one anchor in its dense prefill: real KV minus base KV.

    ph_key, ph_value: [layers, kv_heads, T, head_dim], the placeholder's delta (T = the anchor's length).
    pf_key, pf_value: [layers, kv_heads, S, head_dim], the delta of the consumer's fixed segment right after it.
    ph_start, pf_start: the positions at which the placeholder and the following segment were observed.
    keys_canonical: True when ph_key/pf_key were de-rotated to start at position 0 (corrected mode); False when
      they are stored as observed, rotated for ph_start.. / pf_start.. (reference mode).
    rotated_base_key: [layers, kv_heads, T, head_dim], the anchor's base keys rotated to ph_start (reference mode
      only, and only on the anchor's last writer; None otherwise).
    offset_error: the relative V error the pool's offsets had on this very observation when it was recorded
      (`kvcomm.offsets.recorded_error`, estimated from the other anchors): the pool's track record for this
      placeholder kind and consumer, read by the turn gate; None when not measured.
    """
    ph_key: torch.Tensor
    ph_value: torch.Tensor
    pf_key: torch.Tensor
    pf_value: torch.Tensor
    ph_start: int
    pf_start: int
    rotated_base_key: torch.Tensor | None = None
    keys_canonical: bool = True
    offset_error: float | None = None

    @property
    def ph_tokens(self) -> int:
        return self.ph_key.shape[2]

    @property
    def pf_tokens(self) -> int:
        return self.pf_key.shape[2]

    @property
    def nbytes(self) -> int:
        return sum(tensor_bytes(t) for t in (self.ph_key, self.ph_value, self.pf_key, self.pf_value,
                                               self.rotated_base_key))


@dataclass(frozen=True, eq=False)
class Anchor:
    """One observed content of a placeholder kind: its base KV and, per consumer agent id, the observed deltas.

    base_keys, base_values: [layers, kv_heads, T, head_dim], keys rotated for positions 0..T-1.
    inserted_seq: the pool-wide insertion order (eviction looks at the oldest first).
    last_writer: the consumer whose deltas were recorded last (reference mode reads its rotated base key).
    Equality is identity: anchors hold tensors.
    """
    anchor_id: str
    placeholder: str
    base_keys: torch.Tensor
    base_values: torch.Tensor
    deltas: Mapping[str, ConsumerDeltas] = field(default_factory=lambda: MappingProxyType({}))
    activation_count: int = 0
    inserted_seq: int = -1
    last_writer: str | None = None

    @property
    def num_tokens(self) -> int:
        return self.base_keys.shape[2]

    @cached_property
    def nbytes(self) -> int:
        """Bytes of every tensor this anchor holds (base and all consumers' deltas)."""
        return (tensor_bytes(self.base_keys) + tensor_bytes(self.base_values)
                + sum(d.nbytes for d in self.deltas.values()))

    @property
    def reference_base_key(self) -> torch.Tensor | None:
        """[layers, kv_heads, T, head_dim]: the last writer's rotated base key (reference mode), else None."""
        if self.last_writer is None:
            return None
        return self.deltas[self.last_writer].rotated_base_key

    # ---- tensors separable from metadata ----------------------------------------------------------------------
    def to_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(metadata, tensors): plain-Python metadata and a flat dict of named tensors; see `from_state`."""
        tensors: dict[str, torch.Tensor] = {"base_keys": self.base_keys, "base_values": self.base_values}
        consumers = []
        for index, (consumer, d) in enumerate(self.deltas.items()):
            prefix = f"deltas.{index}."
            tensors[prefix + "ph_key"] = d.ph_key
            tensors[prefix + "ph_value"] = d.ph_value
            tensors[prefix + "pf_key"] = d.pf_key
            tensors[prefix + "pf_value"] = d.pf_value
            if d.rotated_base_key is not None:
                tensors[prefix + "rotated_base_key"] = d.rotated_base_key
            consumers.append({"consumer": consumer, "ph_start": d.ph_start, "pf_start": d.pf_start,
                              "keys_canonical": d.keys_canonical,
                              "has_rotated_base_key": d.rotated_base_key is not None,
                              "offset_error": d.offset_error})
        metadata = {"anchor_id": self.anchor_id, "placeholder": self.placeholder,
                    "activation_count": self.activation_count, "inserted_seq": self.inserted_seq,
                    "last_writer": self.last_writer, "consumers": consumers}
        return metadata, tensors

    @classmethod
    def from_state(cls, metadata: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> "Anchor":
        deltas: dict[str, ConsumerDeltas] = {}
        for index, entry in enumerate(metadata["consumers"]):
            prefix = f"deltas.{index}."
            deltas[entry["consumer"]] = ConsumerDeltas(
                ph_key=tensors[prefix + "ph_key"], ph_value=tensors[prefix + "ph_value"],
                pf_key=tensors[prefix + "pf_key"], pf_value=tensors[prefix + "pf_value"],
                ph_start=int(entry["ph_start"]), pf_start=int(entry["pf_start"]),
                rotated_base_key=tensors[prefix + "rotated_base_key"] if entry["has_rotated_base_key"] else None,
                keys_canonical=bool(entry["keys_canonical"]), offset_error=entry.get("offset_error"))
        return cls(anchor_id=metadata["anchor_id"], placeholder=metadata["placeholder"],
                   base_keys=tensors["base_keys"], base_values=tensors["base_values"],
                   deltas=MappingProxyType(deltas), activation_count=int(metadata["activation_count"]),
                   inserted_seq=int(metadata["inserted_seq"]), last_writer=metadata["last_writer"])


def with_consumer_deltas(anchor: Anchor, consumer: str, new: ConsumerDeltas) -> Anchor:
    """A copy of `anchor` with `consumer`'s deltas set (replacing any earlier ones) and it as the last writer.

    In reference mode only the last writer keeps its rotated base key (the reference overwrites one
    ``ph_key_embedding``); earlier writers' copies are dropped so the pool does not pay for them.
    """
    merged: dict[str, ConsumerDeltas] = {}
    for name, old in anchor.deltas.items():
        if name == consumer:
            continue
        merged[name] = replace(old, rotated_base_key=None) if new.rotated_base_key is not None else old
    merged[consumer] = new
    return replace(anchor, deltas=MappingProxyType(merged), last_writer=consumer)


__all__ = ["Anchor", "ConsumerDeltas", "tensor_bytes", "with_consumer_deltas"]
