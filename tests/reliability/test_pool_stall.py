"""Decode is not stalled by the anchor pool: 32 clients hammer the pool with snapshots and 100 MB commits follow
one another while a worker decodes a sequence and serves small pooled orders (a user input offered to the gate,
which reads the pool) in between its decode steps.

The worker reads the pool on its job threads only (`RemoteAnchorPool` in prefetch mode): its stats show no actor
call made on the model thread (on main every one of those reads ran there, between two decode steps), while the
pool was busy (the clients' snapshots and the commits went on) and the small orders were served.

The issue's figure, the largest gap between two decode steps over the median step, is reported (``[reliability]
pool_stall``, with the machine's own noise next to it: the slowest decode step over the median one) but not
asserted: on the shared 2-core machine it does not hold robustly. In every run reported in the README the largest
gap held a single engine call of the small orders (`largest_gap` in the report; with chunked prefill on, of one
prefill token), i.e. one small forward; how long it takes depends on how the oversubscribed cores are shared: the
decode steps themselves, which hold no pool call and no prefill, vary as much (slowest step 3 to 8 times the median).
``kvcomm bench pool-stall`` prints it before/after (cluster/bench/pool_stall.py).
"""
from __future__ import annotations

from cluster.bench.pool_stall import run

from .conftest import report


def test_a_busy_pool_never_stalls_a_decoding_worker(ray_cluster) -> None:
    figures = run(model="smollm2-135m-instruct", clients=32, commit_mb=100, decode_tokens=64)
    report("pool_stall", figures)
    calls = figures["worker_pool_calls_by_thread"]
    assert not [name for name in calls if name.startswith("kvcomm-model")], calls   # never on the model thread
    assert sum(n for name, n in calls.items() if name.startswith("kvcomm-job")) >= figures["small_orders"] > 0
    assert figures["commits"] >= 1 and figures["client_snapshots"] >= 32     # the pool was busy meanwhile
    assert figures["decode_tokens"] == 64
