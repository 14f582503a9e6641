"""The cluster's benchmarks (kept apart from product code): `throughput` (batching, workers, KV transfer) and
`reliability` (faults, memory, and the HTTP drills of `http`)."""
