"""Benchmark of the object-store KV path (`actors.transfer`) on a local Ray cluster; figures for the README.

Measures, for SmolLM2-135M-shaped fp32 segments (30 layers, 3 KV heads, head_dim 64; 256 and 1024 tokens):
  * put: `put_segment` from the driver (numpy payload copied into the object store), in MB/s of K+V;
  * get: `get_segment` zero-copy (a view of shared memory) and with ``copy=True`` (bytes of one's own);
  * the same bytes as torch tensors (`ray.put(KVSegment)`), which Ray copies on every get, for contrast;
  * the msgpack codec (`kvcomm.codec.encode_segment` / `decode_segment`), the path outside Ray;
  * actor to actor: a producer actor puts its segment and returns a `SegmentRef`, a consumer actor gets it
    (zero-copy) and reads one value, end-to-end from the driver; against a no-op two-actor chain and against
    passing the segment by value (torch tensors pickled through the object store).
Medians over repeats, after touching the object store's memory once. Ends with one JSON line holding every
figure (and the 1-minute load average: on a shared 2-core machine, other work skews them).

    .venv/bin/python scripts/bench_transfer.py [--repeats 15] [--object-store-mib 1024]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from actors.transfer import SegmentRef, get_segment, put_segment
from kvcomm.codec import decode_segment, encode_segment
from kvcomm.kv import KVSegment

LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64   # SmolLM2-135M
TOKEN_COUNTS = (256, 1024)


def smollm2_segment(num_tokens: int, seed: int = 0) -> KVSegment:
    generator = torch.Generator().manual_seed(seed)
    shape = (LAYERS, KV_HEADS, num_tokens, HEAD_DIM)   # [layers, kv_heads, tokens, head_dim]
    return KVSegment(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator), 0)


def median_seconds(action, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        action()
    samples = []
    for _ in range(repeats):
        begin = time.perf_counter()
        action()
        samples.append(time.perf_counter() - begin)
    return statistics.median(samples)


def warm_object_store(ray, mib: int) -> None:
    """Touch `mib` MiB of the store once, so the first measured puts do not pay its first page faults."""
    import numpy as np
    refs = [ray.put(np.ones(16 << 20, dtype=np.uint8)) for _ in range(mib // 16)]
    del refs


def megabytes_per_second(nbytes: int, seconds: float) -> float:
    return nbytes / 1e6 / seconds


def measure_driver_paths(ray, segment: KVSegment, repeats: int) -> dict[str, float]:
    nbytes = segment.nbytes
    put_s = median_seconds(lambda: put_segment(segment), repeats)          # the ref is dropped: object freed
    ref = put_segment(segment)
    get_view_s = median_seconds(lambda: get_segment(ref), repeats)
    get_copy_s = median_seconds(lambda: get_segment(ref, copy=True), repeats)
    torch_put_s = median_seconds(lambda: ray.put(segment), repeats)
    torch_ref = ray.put(segment)
    torch_get_s = median_seconds(lambda: ray.get(torch_ref), repeats)
    encoded = encode_segment(segment)
    encode_s = median_seconds(lambda: encode_segment(segment), repeats)
    decode_s = median_seconds(lambda: decode_segment(encoded), repeats)
    return {
        "nbytes": nbytes,
        "put_ms": put_s * 1e3, "put_MBps": megabytes_per_second(nbytes, put_s),
        "get_zero_copy_ms": get_view_s * 1e3, "get_zero_copy_MBps": megabytes_per_second(nbytes, get_view_s),
        "get_copy_ms": get_copy_s * 1e3, "get_copy_MBps": megabytes_per_second(nbytes, get_copy_s),
        "torch_put_ms": torch_put_s * 1e3, "torch_put_MBps": megabytes_per_second(nbytes, torch_put_s),
        "torch_get_ms": torch_get_s * 1e3, "torch_get_MBps": megabytes_per_second(nbytes, torch_get_s),
        "msgpack_encode_MBps": megabytes_per_second(nbytes, encode_s),
        "msgpack_decode_MBps": megabytes_per_second(nbytes, decode_s),
    }


def measure_actor_to_actor(ray, repeats: int) -> dict[str, float]:
    @ray.remote(num_cpus=1)
    class Producer:
        def __init__(self) -> None:
            self.segments = {n: smollm2_segment(n, seed=n) for n in TOKEN_COUNTS}

        def noop(self) -> int:
            return 0

        def publish(self, num_tokens: int) -> SegmentRef:
            return SegmentRef.put(self.segments[num_tokens])

        def publish_by_value(self, num_tokens: int) -> KVSegment:
            return self.segments[num_tokens]

    @ray.remote(num_cpus=1)
    class Consumer:
        def noop(self, value: int) -> int:
            return value

        def consume(self, handle: SegmentRef) -> float:
            segment = get_segment(handle)
            return float(segment.keys[-1, -1, -1, -1])   # read a value: the bytes are really there

        def consume_value(self, segment: KVSegment) -> float:
            return float(segment.keys[-1, -1, -1, -1])

    producer, consumer = Producer.remote(), Consumer.remote()
    ray.get([producer.noop.remote(), consumer.noop.remote(0)])   # both started
    figures = {"noop_chain_ms": 1e3 * median_seconds(
        lambda: ray.get(consumer.noop.remote(producer.noop.remote())), repeats)}
    for num_tokens in TOKEN_COUNTS:
        figures[f"by_ref_{num_tokens}_ms"] = 1e3 * median_seconds(
            lambda: ray.get(consumer.consume.remote(producer.publish.remote(num_tokens))), repeats)
        figures[f"by_value_{num_tokens}_ms"] = 1e3 * median_seconds(
            lambda: ray.get(consumer.consume_value.remote(producer.publish_by_value.remote(num_tokens))), repeats)
    for actor in (producer, consumer):
        ray.kill(actor)
    return figures


def rounded(value):
    """`value` with every float rounded to 3 decimals (for the JSON line)."""
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {key: rounded(item) for key, item in value.items()}
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--object-store-mib", type=int, default=1024)
    args = parser.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")   # a local cluster: no token authentication
    import ray
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=args.object_store_mib << 20,
             log_to_driver=False, configure_logging=False)
    try:
        warm_object_store(ray, min(512, args.object_store_mib // 2))
        results: dict[str, object] = {"shape": f"[{LAYERS}, {KV_HEADS}, T, {HEAD_DIM}] fp32", "repeats": args.repeats,
                                      "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                                      "load_average_1min": round(os.getloadavg()[0], 2)}
        for num_tokens in TOKEN_COUNTS:
            figures = measure_driver_paths(ray, smollm2_segment(num_tokens), args.repeats)
            results[f"driver_{num_tokens}"] = figures
            print(f"{num_tokens:5d} tokens, {figures['nbytes'] / 1e6:6.1f} MB K+V | "
                  f"put {figures['put_MBps']:7.0f} MB/s ({figures['put_ms']:.1f} ms) | "
                  f"get zero-copy {figures['get_zero_copy_ms']:.2f} ms | "
                  f"get copy {figures['get_copy_MBps']:6.0f} MB/s ({figures['get_copy_ms']:.1f} ms) | "
                  f"torch put/get {figures['torch_put_MBps']:5.0f}/{figures['torch_get_MBps']:5.0f} MB/s | "
                  f"msgpack enc/dec {figures['msgpack_encode_MBps']:5.0f}/{figures['msgpack_decode_MBps']:5.0f} MB/s")
        actor_figures = measure_actor_to_actor(ray, args.repeats)
        results["actor_to_actor"] = actor_figures
        print(f"actor -> actor (driver round trip): no-op chain {actor_figures['noop_chain_ms']:.1f} ms | " + " | ".join(
            f"{n} tokens by ref {actor_figures[f'by_ref_{n}_ms']:.1f} ms, by value "
            f"{actor_figures[f'by_value_{n}_ms']:.1f} ms" for n in TOKEN_COUNTS))
        print(json.dumps(rounded(results), sort_keys=True))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
