"""The Ray actors of the cluster, on top of `kvcomm`: agent workers (one model replica each, continuous batching),
the anchor-pool actor and its client, object-store KV transfer, and the metric registry.

Not here: deployment knobs and drivers (`cluster`), the algorithm (`kvcomm`). Names below are imported from their
home on first use, so ``import actors.turns`` does not start Ray machinery it does not need.
"""
from __future__ import annotations

from kvcomm.lazy_exports import exporter

_HOMES = {
    "AgentWorker": "agent_worker", "WorkerSettings": "agent_worker", "start_agent_worker": "agent_worker",
    "TurnScheduler": "scheduler", "ScheduledEngine": "scheduler",
    "AnchorPoolActor": "anchor_pool_actor", "PoolSpec": "anchor_pool_actor",
    "get_or_create_pool_actor": "anchor_pool_actor", "RemoteAnchorPool": "pool_client",
    "TurnOrder": "turns", "ContentOrder": "turns", "ContentHandle": "turns", "TurnOutcome": "turns",
    "SegmentRef": "transfer", "put_segment": "transfer", "get_segment": "transfer",
    "ReplicaMetrics": "metrics", "WorkerLoad": "worker_load", "SchedulerLoad": "worker_load",
}
__all__ = sorted(_HOMES)
__getattr__ = exporter(__name__, _HOMES, globals())
