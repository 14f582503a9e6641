"""The object-store path for KV segments: put a `KVSegment` into Ray once, read it anywhere on the node zero-copy.

This module owns how one KV segment crosses Ray:

* `SegmentPayload`: what is stored. K and V as numpy arrays (bfloat16 as int16 bit patterns, see `kvcomm.codec`),
  the dtype's name and the start position. Ray serializes numpy arrays out-of-band, so `ray.get` of a payload
  maps the arrays straight from shared memory: read-only views, no copy, whatever the segment's size.
  (A torch tensor, by contrast, is copied on every get.)
* `put_segment` / `get_segment`: segment -> ObjectRef -> segment. `get_segment` also accepts a `SegmentRef` or a
  payload Ray has already resolved (an ObjectRef passed as a top-level task argument arrives resolved).
* `SegmentRef`: a small picklable handle, the ObjectRef plus metadata (tokens, bytes, dtype, start, shape), so a
  job runner or router decides where work goes without fetching a byte. An ObjectRef nested in a dataclass is
  not resolved by Ray when passed to a task, so handing a `SegmentRef` around moves only the handle.

Segments read zero-copy share the object-store buffer: they must not be written in place (every `KVSegment`
operation is pure) and they keep the object pinned while alive; pass ``copy=True`` for memory of one's own.
An object lives as long as its owner (the process that put it): a segment put by a worker is lost with it.
Ray is imported inside the functions that need it, so importing this module costs nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import numpy as np
import torch

from kvcomm.codec import dtype_name, numpy_to_tensor, tensor_to_numpy
from kvcomm.kv import KVSegment

if TYPE_CHECKING:
    import ray


@dataclass(frozen=True)
class SegmentPayload:
    """A KV segment as the object store holds it (numpy arrays, so reads are zero-copy)."""
    keys: np.ndarray     # [layers, kv_heads, tokens, head_dim]; bfloat16 as int16 bit patterns
    values: np.ndarray   # [layers, kv_heads, tokens, head_dim]
    dtype: str           # the segment's torch dtype name, e.g. "float32", "bfloat16"
    start: int           # absolute position of the first token

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


@dataclass(frozen=True)
class SegmentRef:
    """A handle on a segment in the object store: route by its metadata, fetch with `get_segment`."""
    object_ref: "ray.ObjectRef"            # -> SegmentPayload
    num_tokens: int
    nbytes: int                            # K + V bytes
    dtype: str
    start: int
    shape: tuple[int, int, int, int]       # [layers, kv_heads, tokens, head_dim] of K (and of V)

    @property
    def end(self) -> int:
        """One past the position of the last token."""
        return self.start + self.num_tokens

    @classmethod
    def put(cls, segment: KVSegment) -> "SegmentRef":
        """Store `segment` (see `put_segment`) and return its handle."""
        return cls.describe(segment, put_segment(segment))

    @classmethod
    def describe(cls, segment: KVSegment, object_ref: "ray.ObjectRef") -> "SegmentRef":
        """The handle for `object_ref`, which holds `segment`'s payload."""
        return cls(object_ref=object_ref, num_tokens=segment.num_tokens, nbytes=segment.nbytes,
                   dtype=dtype_name(segment.dtype), start=int(segment.start),
                   shape=tuple(int(d) for d in segment.keys.shape))


def segment_to_payload(segment: KVSegment) -> SegmentPayload:
    """The payload for `segment` (no copy when K and V are contiguous CPU tensors)."""
    return SegmentPayload(keys=tensor_to_numpy(segment.keys), values=tensor_to_numpy(segment.values),
                          dtype=dtype_name(segment.dtype), start=int(segment.start))


def payload_to_segment(payload: SegmentPayload, device: torch.device | str = "cpu",
                       copy: bool = False) -> KVSegment:
    """The segment a payload holds, on `device`; shares the arrays' memory on CPU unless ``copy=True``."""
    keys = numpy_to_tensor(payload.keys, payload.dtype, device, copy=copy)
    values = numpy_to_tensor(payload.values, payload.dtype, device, copy=copy)
    return KVSegment(keys, values, payload.start)


def put_segment(segment: KVSegment) -> "ray.ObjectRef":
    """Put `segment` into the object store as a `SegmentPayload`; the caller's process owns the object."""
    import ray
    return ray.put(segment_to_payload(segment))


SegmentSource = Union[SegmentRef, "ray.ObjectRef", SegmentPayload]


def get_segment(source: SegmentSource, device: torch.device | str = "cpu", copy: bool = False,
                timeout: float | None = None) -> KVSegment:
    """The segment behind a `SegmentRef`, an ObjectRef from `put_segment`, or an already-fetched payload.

    On CPU without ``copy`` the tensors are read-only views of the object store (see the module docstring).
    """
    if isinstance(source, SegmentRef):
        source = source.object_ref
    if not isinstance(source, SegmentPayload):
        import ray
        if not isinstance(source, ray.ObjectRef):
            raise TypeError(f"get_segment takes a SegmentRef, an ObjectRef or a SegmentPayload, "
                            f"not {type(source).__name__}")
        source = ray.get(source, timeout=timeout)
        if not isinstance(source, SegmentPayload):
            raise TypeError(f"the object holds a {type(source).__name__}, not a SegmentPayload")
    return payload_to_segment(source, device, copy=copy)
