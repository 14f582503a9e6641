"""The msgpack codec and the numpy views: every dtype round-trips bit for bit; bad bytes are named errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kvcomm.codec import (CodecError, decode_segment, decode_tensor, encode_segment, encode_tensor, numpy_to_tensor,
                          pack, tensor_to_numpy, unpack)
from kvcomm.kv import KVSegment

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool]


def _sample(dtype: torch.dtype, shape=(2, 3, 5)) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(0, 100, shape, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tensor_round_trip_every_dtype(dtype):
    t = _sample(dtype)
    back = decode_tensor(encode_tensor(t))
    assert back.dtype == dtype and back.shape == t.shape and torch.equal(back, t)
    empty = torch.empty(3, 0, 4, dtype=dtype)
    assert decode_tensor(encode_tensor(empty)).shape == (3, 0, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_segment_round_trip_bit_exact_including_empty(dtype):
    seg = KVSegment(_sample(dtype, (4, 2, 7, 8)), _sample(dtype, (4, 2, 7, 8)) * 2, start=17)
    back = decode_segment(encode_segment(seg))
    assert back.start == 17 and torch.equal(back.keys, seg.keys) and torch.equal(back.values, seg.values)
    empty = KVSegment.empty(4, 2, 8, dtype=dtype)
    assert decode_segment(encode_segment(empty)).num_tokens == 0


def test_nested_objects():
    seg = KVSegment(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), 3)
    obj = {"id": "a1", "counts": [1, 2], "seg": seg, "t": torch.arange(5), "deep": [{"x": torch.ones(2)}]}
    back = unpack(pack(obj))
    assert back["id"] == "a1" and back["counts"] == [1, 2] and back["seg"].start == 3
    assert torch.equal(back["t"], torch.arange(5)) and torch.equal(back["deep"][0]["x"], torch.ones(2))


def test_corrupt_inputs_are_named_errors():
    good = encode_tensor(torch.ones(4, 4))
    with pytest.raises(CodecError, match="msgpack"):
        unpack(b"\xc1garbage")
    with pytest.raises(CodecError):
        unpack(good[: len(good) // 2])
    import msgpack
    with pytest.raises(CodecError, match="magic"):
        unpack(msgpack.packb({"hello": 1}))
    with pytest.raises(CodecError, match="version"):
        unpack(msgpack.packb({"magic": "kvcomm", "version": 99, "body": None}))
    bad_shape = msgpack.packb({"magic": "kvcomm", "version": 1,
                               "body": {"__tensor__": ["float32", [4, 4], b"\x00" * 12]}}, use_bin_type=True)
    with pytest.raises(CodecError, match="needs 64 bytes"):
        unpack(bad_shape)
    with pytest.raises(CodecError, match="not a KV segment"):
        decode_segment(good)


def test_numpy_views_share_memory_when_asked():
    t = _sample(torch.bfloat16, (3, 4))
    arr = tensor_to_numpy(t)
    assert arr.dtype == np.int16
    arr.flags.writeable = False                      # as an object-store get returns it
    view = numpy_to_tensor(arr, "bfloat16", copy=False)
    assert torch.equal(view, t) and view.data_ptr() == arr.ctypes.data
    copied = numpy_to_tensor(arr, "bfloat16")
    assert torch.equal(copied, t) and copied.data_ptr() != arr.ctypes.data
