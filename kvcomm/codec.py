"""Tensors and KV segments as bytes: a msgpack codec, and the numpy views the Ray object store wants.

Wire format (msgpack): ``{"magic": "kvcomm", "version": 1, "body": OBJ}``, where every tensor inside OBJ is a
map ``{"__tensor__": [dtype name, shape, raw bytes]}`` and every KV segment
``{"__kvsegment__": [start, keys tensor, values tensor]}``. Raw bytes are the tensor's memory in C order;
bfloat16 (which numpy lacks) travels as its 16-bit patterns. This serves every path outside Ray: pool
snapshots on disk and HTTP export. `pack_stream` / `unpack_stream` write and read a payload whose body is a
mapping ending in one long list, one list item at a time (a pool snapshot never sits whole in memory); what they
write is an ordinary payload, which `unpack` reads too. Inside Ray, `tensor_to_numpy` / `numpy_to_tensor` move
tensors as numpy arrays, which the object store shares zero-copy between processes on one node.
"""
from __future__ import annotations

from typing import IO, Any, Iterable, Iterator, Mapping

import msgpack
import numpy as np
import torch

from .kv import KVSegment

MAGIC = "kvcomm"
FORMAT_VERSION = 1

_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in (
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")}
_RAW_16_BIT = {torch.bfloat16: torch.int16}   # dtypes numpy lacks, shipped as bit patterns of this dtype


class CodecError(ValueError):
    """Bytes that are not a valid kvcomm payload; the message names what is wrong."""


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise CodecError(f"unsupported dtype {name!r}; supported: {', '.join(_DTYPES)}")
    return name


def _torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise CodecError(f"unsupported dtype {name!r}; supported: {', '.join(_DTYPES)}") from None


# ---- numpy views (the Ray object-store path) --------------------------------------------------------------
def tensor_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A contiguous CPU numpy array holding the tensor's bytes (bfloat16 as int16 bit patterns)."""
    tensor = tensor.detach().contiguous().cpu()
    if tensor.dtype in _RAW_16_BIT:
        tensor = tensor.view(_RAW_16_BIT[tensor.dtype])
    return tensor.numpy()


def numpy_to_tensor(array: np.ndarray, dtype: str, device: torch.device | str = "cpu", *,
                    copy: bool = True) -> torch.Tensor:
    """The tensor `array` stands for, as `dtype`, on `device`.

    With ``copy=False`` the tensor shares the array's memory: object-store arrays are read-only, so such a
    tensor must never be written (every `KVSegment` operation is pure, so segments built on it are safe).
    """
    target = _torch_dtype(dtype)
    if copy:
        tensor = torch.from_numpy(np.array(array, copy=True))
    else:
        # DLPack shares read-only memory without torch's non-writable warning (and without touching the
        # process-wide warning filters, which other threads share)
        tensor = torch.from_dlpack(np.ascontiguousarray(array))
    if target in _RAW_16_BIT:
        tensor = tensor.view(target)
    elif tensor.dtype != target:
        raise CodecError(f"array of dtype {array.dtype} does not hold {dtype} tensors")
    return tensor.to(device)


# ---- msgpack ----------------------------------------------------------------------------------------------
def _encode_tensor_fields(tensor: torch.Tensor) -> list[Any]:
    return [dtype_name(tensor.dtype), list(tensor.shape), tensor_to_numpy(tensor).tobytes()]


def _decode_tensor_fields(fields: Any, device: torch.device | str) -> torch.Tensor:
    if not (isinstance(fields, list) and len(fields) == 3):
        raise CodecError("a tensor entry must be [dtype, shape, bytes]")
    name, shape, raw = fields
    dtype = _torch_dtype(name)
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise CodecError(f"bad tensor shape {shape!r}")
    if not isinstance(raw, (bytes, bytearray)):
        raise CodecError("tensor bytes missing")
    wire_dtype = _RAW_16_BIT.get(dtype, dtype)
    count = int(np.prod(shape)) if shape else 1
    itemsize = torch.empty(0, dtype=wire_dtype).element_size()
    if len(raw) != count * itemsize:
        raise CodecError(f"tensor of dtype {name} and shape {shape} needs {count * itemsize} bytes, got {len(raw)}")
    if count == 0:
        return torch.empty(shape, dtype=dtype, device=device)
    array = np.frombuffer(raw, dtype=torch.empty(0, dtype=wire_dtype).numpy().dtype).reshape(shape)
    return numpy_to_tensor(array, name, device)


def _to_wire(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return {"__tensor__": _encode_tensor_fields(obj)}
    if isinstance(obj, KVSegment):
        return {"__kvsegment__": [obj.start, _encode_tensor_fields(obj.keys), _encode_tensor_fields(obj.values)]}
    if isinstance(obj, dict):
        return {k: _to_wire(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_wire(v) for v in obj]
    return obj


def _from_wire(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return _decode_tensor_fields(obj["__tensor__"], device)
        if "__kvsegment__" in obj:
            fields = obj["__kvsegment__"]
            if not (isinstance(fields, list) and len(fields) == 3 and isinstance(fields[0], int)):
                raise CodecError("a KV segment entry must be [start, keys, values]")
            keys = _decode_tensor_fields(fields[1], device)
            values = _decode_tensor_fields(fields[2], device)
            try:
                return KVSegment(keys, values, fields[0])
            except ValueError as exc:
                raise CodecError(f"bad KV segment: {exc}") from None
        return {k: _from_wire(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_wire(v, device) for v in obj]
    return obj


def pack(obj: Any) -> bytes:
    """Serialize nested dicts/lists of plain values, tensors and KV segments."""
    return msgpack.packb({"magic": MAGIC, "version": FORMAT_VERSION, "body": _to_wire(obj)}, use_bin_type=True)


def unpack(data: bytes, device: torch.device | str = "cpu") -> Any:
    """The object `pack` serialized; `CodecError` naming the problem for anything else."""
    try:
        envelope = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several types for truncated or garbage input
        raise CodecError(f"not a msgpack payload ({type(exc).__name__}: {exc})") from None
    if not isinstance(envelope, dict) or envelope.get("magic") != MAGIC:
        raise CodecError("not a kvcomm payload (magic missing)")
    if envelope.get("version") != FORMAT_VERSION:
        raise CodecError(f"unsupported format version {envelope.get('version')!r}; this build reads "
                         f"{FORMAT_VERSION}")
    return _from_wire(envelope.get("body"), device)


def pack_stream(file: IO[bytes], head: Mapping[str, Any], items: Iterable[Any], *, count: int,
                items_key: str = "items") -> int:
    """Write the payload of ``{**head, items_key: list(items)}`` to `file`, packing one item at a time.

    `count` is the number of items (msgpack writes a list's length first); a different number raises
    `CodecError`, after part of the payload was written (write to a temporary file). Returns the bytes written.
    """
    if items_key in head:
        raise CodecError(f"pack_stream: head already has the key {items_key!r}")
    packer = msgpack.Packer(use_bin_type=True)
    written = 0

    def put(chunk: bytes) -> None:
        nonlocal written
        file.write(chunk)
        written += len(chunk)

    put(packer.pack_map_header(3))
    for key, value in (("magic", MAGIC), ("version", FORMAT_VERSION)):
        put(packer.pack(key) + packer.pack(value))
    put(packer.pack("body") + packer.pack_map_header(len(head) + 1))
    for key, value in head.items():
        put(packer.pack(key) + packer.pack(_to_wire(value)))
    put(packer.pack(items_key) + packer.pack_array_header(count))
    done = 0
    for item in items:
        if done == count:
            raise CodecError(f"pack_stream: more than the {count} items announced")
        put(packer.pack(_to_wire(item)))
        done += 1
    if done != count:
        raise CodecError(f"pack_stream: {done} items written, {count} announced")
    return written


def unpack_stream(file: IO[bytes], device: torch.device | str = "cpu", *,
                  items_key: str = "items") -> tuple[dict[str, Any], int, Iterator[Any]]:
    """Read what `pack_stream` wrote: (head, number of items, an iterator decoding one item at a time).

    Every problem (not a kvcomm payload, another format version, truncated or garbage bytes, the items list
    missing or not last) is a `CodecError`, raised here or while iterating."""
    unpacker = msgpack.Unpacker(file, raw=False, strict_map_key=False, max_buffer_size=0)

    def read(what: Any) -> Any:
        try:
            return what()
        except CodecError:
            raise
        except Exception as exc:  # msgpack raises several types for truncated or garbage input
            raise CodecError(f"not a complete msgpack payload ({type(exc).__name__}: {exc})") from None

    envelope: dict[str, Any] = {}
    for _ in range(read(unpacker.read_map_header)):
        key = read(unpacker.unpack)
        if key == "body":
            break
        envelope[key] = read(unpacker.unpack)
    else:
        raise CodecError("not a kvcomm payload (body missing)")
    if envelope.get("magic") != MAGIC:
        raise CodecError("not a kvcomm payload (magic missing)")
    if envelope.get("version") != FORMAT_VERSION:
        raise CodecError(f"unsupported format version {envelope.get('version')!r}; this build reads "
                         f"{FORMAT_VERSION}")
    head: dict[str, Any] = {}
    for _ in range(read(unpacker.read_map_header)):
        key = read(unpacker.unpack)
        if key == items_key:
            break
        head[key] = _from_wire(read(unpacker.unpack), device)
    else:
        raise CodecError(f"payload has no {items_key!r} list")
    count = read(unpacker.read_array_header)

    def items() -> Iterator[Any]:
        for _ in range(count):
            yield _from_wire(read(unpacker.unpack), device)

    return head, count, items()


def encode_tensor(tensor: torch.Tensor) -> bytes:
    return pack(tensor)


def decode_tensor(data: bytes, device: torch.device | str = "cpu") -> torch.Tensor:
    obj = unpack(data, device)
    if not isinstance(obj, torch.Tensor):
        raise CodecError(f"payload holds a {type(obj).__name__}, not a tensor")
    return obj


def encode_segment(segment: KVSegment) -> bytes:
    return pack(segment)


def decode_segment(data: bytes, device: torch.device | str = "cpu") -> KVSegment:
    obj = unpack(data, device)
    if not isinstance(obj, KVSegment):
        raise CodecError(f"payload holds a {type(obj).__name__}, not a KV segment")
    return obj
