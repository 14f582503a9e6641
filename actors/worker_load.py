"""`WorkerLoad`: what an agent worker reports of its load (`AgentWorker.load()`), read by routers, drivers, the
metrics sampler and the reliability drills by attribute. `to_dict()` is its wire form, for edges that need a dict.

Not here: how a router weighs it (`cluster.serve.router`), the scheduler that owns the queue (`actors.scheduler`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class SchedulerLoad:
    """The continuous-batching scheduler's queue now (`TurnScheduler.load()`)."""
    queued: int             # turns waiting for a slot in the batch
    active: int             # turns in the batch (prefilling or decoding)
    calls: int              # calls waiting for the model thread (prefills, content builds)


@dataclass(frozen=True)
class WorkerLoad:
    """One worker's load now: its scheduler's queue plus the orders it holds and their routing cost."""
    worker: str             # the worker's id (``worker-0``, ``replica-...``)
    node_id: str | None     # the Ray node it runs on
    queued: int             # as `SchedulerLoad`
    active: int
    calls: int
    orders: int             # orders (turns, user inputs) in flight on this worker
    tokens: int             # their routing cost in tokens
    max_batch_size: int     # the worker's configured batch limit (`WorkerSettings.max_batch_size`)
    chats: int = 0          # chat completions decoding here (a Serve replica; 0 for a batch worker)

    @classmethod
    def of(cls, scheduler: SchedulerLoad, **fields: Any) -> "WorkerLoad":
        return cls(queued=scheduler.queued, active=scheduler.active, calls=scheduler.calls, **fields)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
