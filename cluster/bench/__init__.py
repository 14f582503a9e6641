"""The cluster's benchmarks (kept apart from product code): `throughput` (batching, workers, KV transfer),
`reliability` (faults, memory, and the HTTP drills of `http`, with the corpus of `fuzz`), `serve` (jobs over HTTP
on 1 and N replicas), `scale` (agents by replicas on several nodes simulated with `simcluster`)."""
