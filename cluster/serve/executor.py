"""`ReplicaCalls`: the `cluster.driver.TurnExecutor` of the HTTP service: a job's turns on the worker deployment.

Each order is one streamed call through the worker deployment's handle, so Serve's request router
(`cluster.serve.router.KVCommRouter`) picks its replica. The call yields the KV payloads as items of their own and
the outcome last (`cluster.serve.worker`); `wait` takes the items as ObjectRefs (`_to_object_ref_gen_sync`), which
this process (the ingress replica hosting the driver) owns: KV never passes through the driver, and a turn's
output outlives the replica that produced it. A replica lost mid-call is `WorkerLost` (the driver sends the order
again; the router no longer offers the dead replica); one Serve refused for a full queue (the deployment's
``max_queued_requests``) is `WorkersBusy` (the driver sends it again after a pause). `cancel` cancels the Serve
request, which cancels the turn on its replica. Commits go to the anchor pool actor in one call per job.

Called from driver threads, never from the replica's event loop.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError

from actors.turns import ContentOrder, TurnOrder
from kvcomm.errors import first_line

from ..driver import Reply, WorkerLost, WorkersBusy

log = logging.getLogger(__name__)
REPLICA_LOST = (RayActorError, ActorDiedError, ActorUnavailableError)


@dataclass
class _ReplicaCall:
    order: TurnOrder | ContentOrder
    response: Any                  # a DeploymentResponseGenerator


class ReplicaCalls:
    """Orders to the worker deployment (`workers`: its handle); commits to `pool` (or dropped without one)."""

    def __init__(self, workers: Any, pool: Any, pool_call_timeout_s: float):
        self.workers = workers
        self.pool = pool
        self.pool_call_timeout_s = pool_call_timeout_s
        self.commits_dropped = 0

    def send(self, order: TurnOrder | ContentOrder) -> _ReplicaCall:
        method = "execute_turn" if isinstance(order, TurnOrder) else "execute_content"
        sent = order.frozen() if isinstance(order, TurnOrder) else order   # pickled later, on Serve's loop
        return _ReplicaCall(order, getattr(self.workers.options(stream=True), method).remote(sent))

    def wait(self, call: _ReplicaCall) -> Reply:
        expected = 4 if isinstance(call.order, TurnOrder) else 3
        try:
            refs = list(call.response._to_object_ref_gen_sync())
            if not refs:
                raise WorkerLost("the worker replica ended the call without an answer")
            outcome = ray.get(refs[-1])          # raises what the replica raised, or that it was lost
        except REPLICA_LOST as exc:
            raise WorkerLost(f"worker replica lost ({first_line(exc)})") from None
        except BackPressureError as exc:     # the deployment's max_queued_requests: no replica took it yet
            raise WorkersBusy(first_line(exc)) from None
        if len(refs) != expected:
            raise RuntimeError(f"the worker replica answered {len(refs)} items, expected {expected}")
        return Reply(outcome, refs[:-1])

    def cancel(self, call: _ReplicaCall) -> None:
        try:
            call.response.cancel()
        except BackPressureError:      # never assigned to a replica (Serve raises why again): nothing runs
            pass

    def commit(self, staged: list[Any]) -> None:
        if self.pool is None:
            return
        try:
            ray.get(self.pool.commit_parts.remote(*staged), timeout=self.pool_call_timeout_s)
        except Exception as exc:  # noqa: BLE001 - a lost pool loses this job's anchors, never its answers
            self.commits_dropped += 1
            log.warning("anchor pool commit dropped (%s); later jobs relearn these anchors", first_line(exc))


