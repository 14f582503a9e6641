"""The object-store KV path (`actors.transfer`) on a real local Ray cluster: bit-exact, zero-copy, routable handles."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.transfer import (SegmentPayload, SegmentRef, get_segment, payload_to_segment, put_segment,
                             segment_to_payload)
from kvcomm.kv import KVSegment


SHAPE = (4, 3, 16, 8)   # [layers, kv_heads, tokens, head_dim]


def make_segment(dtype: torch.dtype, start: int = 5, shape=SHAPE) -> KVSegment:
    generator = torch.Generator().manual_seed(7)
    keys = torch.randn(shape, generator=generator).to(dtype)
    values = torch.randn(shape, generator=generator).to(dtype)
    return KVSegment(keys, values, start)


def assert_bit_exact(got: KVSegment, want: KVSegment) -> None:
    assert got.start == want.start and got.dtype == want.dtype and got.keys.shape == want.keys.shape
    assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)


def test_payload_without_ray_is_a_view_of_the_segment() -> None:
    segment = make_segment(torch.bfloat16)
    payload = segment_to_payload(segment)
    assert payload.dtype == "bfloat16" and payload.keys.dtype == np.int16 and payload.nbytes == segment.nbytes
    assert payload.keys.ctypes.data == segment.keys.data_ptr()          # no copy on the way in
    assert_bit_exact(payload_to_segment(payload), segment)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_put_get_round_trip_is_bit_exact(ray_cluster, dtype) -> None:
    segment = make_segment(dtype)
    assert_bit_exact(get_segment(put_segment(segment)), segment)
    handle = SegmentRef.put(segment)
    assert (handle.num_tokens, handle.nbytes, handle.dtype, handle.start, handle.end, handle.shape) == (
        16, segment.nbytes, str(dtype).removeprefix("torch."), 5, 21, SHAPE)
    assert_bit_exact(get_segment(handle), segment)
    middle = segment.slice(3, 11)                                       # a non-contiguous view travels too
    assert_bit_exact(get_segment(put_segment(middle)), middle)
    empty = KVSegment.empty(4, 3, 8, start=9, dtype=dtype)               # [4, 3, 0, 8]
    assert_bit_exact(get_segment(SegmentRef.put(empty)), empty)


def test_get_is_zero_copy_and_copy_on_request(ray_cluster) -> None:
    ray = ray_cluster
    segment = make_segment(torch.float32, shape=(2, 3, 1024, 64))      # 3 MiB: well above Ray's inline limit
    payload = ray.get(put_segment(segment))
    assert isinstance(payload, SegmentPayload)
    assert payload.keys.flags.writeable is False and payload.values.flags.writeable is False
    shared = get_segment(payload)
    assert shared.keys.data_ptr() == payload.keys.ctypes.data           # the tensor is the object-store memory
    assert_bit_exact(shared, segment)
    owned = get_segment(payload, copy=True)
    assert owned.keys.data_ptr() != payload.keys.ctypes.data
    owned.keys.add_(1.0)                                                # ours to write; the stored one is intact
    assert_bit_exact(shared, segment)


def test_segment_ref_crosses_tasks_and_actors_by_reference(ray_cluster) -> None:
    ray = ray_cluster
    import hashlib

    def checksum(segment: KVSegment) -> str:
        digest = hashlib.sha256(f"{segment.start}/{segment.dtype}/{tuple(segment.keys.shape)}".encode())
        for tensor in (segment.keys, segment.values):
            digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    @ray.remote(num_cpus=0)
    def checksum_of(handle: SegmentRef) -> tuple[bool, str]:
        # a SegmentRef is not resolved by Ray: the task sees the handle and fetches only if it wants the bytes
        return isinstance(handle.object_ref, ray.ObjectRef), checksum(get_segment(handle))

    @ray.remote(num_cpus=0)
    def checksum_of_resolved(payload: SegmentPayload) -> str:
        return checksum(get_segment(payload))   # a top-level ObjectRef argument arrives as its payload

    @ray.remote(num_cpus=0)
    class Holder:
        def publish(self, dtype: torch.dtype) -> SegmentRef:
            self.segment = make_bf16_or_fp32(dtype)   # kept alive here, as a worker keeps the KV it recorded
            return SegmentRef.put(self.segment)

        def checksum_of(self, handle: SegmentRef) -> str:
            return checksum(get_segment(handle))

    def make_bf16_or_fp32(dtype: torch.dtype) -> KVSegment:
        generator = torch.Generator().manual_seed(11)
        return KVSegment(torch.randn(2, 3, 40, 8, generator=generator).to(dtype),
                         torch.randn(2, 3, 40, 8, generator=generator).to(dtype), 3)

    holder = Holder.remote()
    try:
        for dtype in (torch.float32, torch.bfloat16):
            local = make_bf16_or_fp32(dtype)
            expected = checksum(local)
            handle = SegmentRef.put(local)
            unresolved, remote_sum = ray.get(checksum_of.remote(handle))
            assert unresolved and remote_sum == expected
            assert ray.get(checksum_of_resolved.remote(handle.object_ref)) == expected
            assert ray.get(holder.checksum_of.remote(handle)) == expected            # driver -> actor
            published = ray.get(holder.publish.remote(dtype))                       # actor puts, driver routes
            assert (published.num_tokens, published.dtype) == (40, str(dtype).removeprefix("torch."))
            assert ray.get(checksum_of.remote(published))[1] == expected             # actor -> task
            assert checksum(get_segment(published)) == expected                     # actor -> driver
    finally:
        ray.kill(holder)
    assert checksum(make_bf16_or_fp32(torch.float32)) != checksum(make_bf16_or_fp32(torch.bfloat16))


def test_get_segment_rejects_what_is_not_a_segment(ray_cluster) -> None:
    ray = ray_cluster
    with pytest.raises(TypeError, match="not a SegmentPayload"):
        get_segment(ray.put({"keys": np.zeros(3)}))
    with pytest.raises(TypeError, match="SegmentRef, an ObjectRef or a SegmentPayload"):
        get_segment(make_segment(torch.float32))
