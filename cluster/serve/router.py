"""`KVCommRouter`: the Ray Serve request router of the worker deployment (set through ``request_router_config``).

Every request to a worker replica (a job's turn, a user input's base KV, a chat completion) is routed on:

1. **load first**, in tokens, not requests (a turn that reads 2,000 tokens and writes 512 is not the same load as
   a one-line chat): a replica's load is the larger of what it last reported (`record_routing_stats`: the
   routing cost of the orders it holds, every ``routing_stats_period_s``) and what this router sent it that has
   not completed yet (fresher, but blind to other routers). A request's cost counts against its first-ranked
   replica from the moment it is ranked, not from Serve's acceptance: a level's 16 turns are all ranked before the
   first acceptance comes back, and would otherwise all see the same loads and pick the same replica. Replicas
   within ``slack_tokens`` of the least loaded are candidates;
2. among those, the replica on the **node that holds most of the KV the turn reads** (its `RoutingHint`), so KV
   crosses a node boundary only when load forces it;
3. then the namespace's **home replica**, chosen by rendezvous hashing over the live replicas: every ingress
   replica's router agrees on it without talking to the others, and a scale-up or a lost replica moves only the
   namespaces that hashed to it. Its anchor cache is warm for the namespace;
4. then the least loaded.

The ranking goes back to Serve one replica per rank, so Serve's own machinery (queue-length probes, a replica at
``max_ongoing_requests`` rejecting, backoff, dead replicas dropped) picks the best one that accepts. Requests that
carry no hint (model info, stats) go to the least loaded replica.
"""
from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

log = logging.getLogger(__name__)


def routing_hint_of(pending: PendingRequest | None) -> Any:
    """The `RoutingHint` of a request's first argument (a `TurnOrder`, `ContentOrder` or `ChatParams`), or None."""
    if pending is None or not pending.args:
        return None
    hint = getattr(pending.args[0], "routing_hint", None)
    return hint() if callable(hint) else None


def home_replica(namespace: str, replica_ids: list[str]) -> str | None:
    """Rendezvous hashing: the replica id with the highest hash of (namespace, id)."""
    if not replica_ids:
        return None
    return max(replica_ids, key=lambda rid: hashlib.blake2b(f"{namespace}\0{rid}".encode(), digest_size=8).digest())


def rank_replicas(loads: dict[str, float], nodes: dict[str, str | None], *, cost_bytes_by_node: dict[str, int],
                  namespace: str | None, slack_tokens: float) -> list[str]:
    """Replica ids, best first (see the module docstring). `loads`: replica id -> tokens; `nodes`: replica id ->
    node id. A pure function, so the policy is tested without a cluster."""
    if not loads:
        return []
    least = min(loads.values())
    near = [rid for rid in loads if loads[rid] <= least + slack_tokens]
    far = sorted((rid for rid in loads if rid not in near), key=lambda rid: (loads[rid], rid))
    home = home_replica(namespace, sorted(loads)) if namespace is not None else None

    def preference(rid: str) -> tuple:
        local_bytes = cost_bytes_by_node.get(nodes.get(rid) or "", 0)
        return (-local_bytes, rid != home, loads[rid], rid)

    return sorted(near, key=preference) + far


class KVCommRouter(FIFOMixin, RequestRouter):
    """Load in tokens first, then KV locality by node, then the namespace's home replica (module docstring)."""

    #: a reservation that Serve never confirmed nor completed (a request cancelled while queued) expires after this
    RESERVATION_TTL_S = 60.0

    def initialize_state(self, slack_tokens: float = 0.0, **_: Any) -> None:
        self.slack_tokens = float(slack_tokens)
        # internal request id -> (replica, cost, reserved at or None once Serve confirmed the replica)
        self._sent: dict[str, tuple[ReplicaID, int, float | None]] = {}
        self._sent_tokens: dict[ReplicaID, int] = {}

    def _load(self, replica: RunningReplica) -> float:
        # routing_stats: Ray's dict, from the replica's `WorkerLoad` (`AgentWorkerDeployment.record_routing_stats`)
        reported = float((replica.routing_stats or {}).get("tokens", 0))
        return max(reported, float(self._sent_tokens.get(replica.replica_id, 0)))

    def _add(self, request_id: str, replica: ReplicaID, cost: int, reserved_at: float | None) -> None:
        self._release(request_id)
        self._sent[request_id] = (replica, cost, reserved_at)
        self._sent_tokens[replica] = self._sent_tokens.get(replica, 0) + cost

    def _release(self, request_id: str) -> None:
        sent = self._sent.pop(request_id, None)
        if sent is None:
            return
        replica, cost, _ = sent
        left = self._sent_tokens.get(replica, 0) - cost
        if left > 0:
            self._sent_tokens[replica] = left
        else:
            self._sent_tokens.pop(replica, None)

    def _expire_reservations(self, now: float) -> None:
        for request_id in [k for k, (_, _, at) in self._sent.items() if at is not None
                           and now - at > self.RESERVATION_TTL_S]:
            self._release(request_id)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        now = time.monotonic()
        self._expire_reservations(now)
        hint = routing_hint_of(pending_request)
        if pending_request is not None:      # a retry after a rejection ranks again without its own reservation
            self._release(pending_request.metadata.internal_request_id)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        loads = {rid: self._load(r) for rid, r in by_id.items()}
        nodes = {rid: r.node_id for rid, r in by_id.items()}
        ranked = rank_replicas(loads, nodes, cost_bytes_by_node=dict(hint.bytes_by_node) if hint else {},
                               namespace=hint.namespace if hint else None, slack_tokens=self.slack_tokens)
        if hint is not None and pending_request is not None and ranked:
            self._add(pending_request.metadata.internal_request_id, by_id[ranked[0]].replica_id,
                      int(hint.cost_tokens), now)
        return [[by_id[rid]] for rid in ranked]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        hint = routing_hint_of(pending_request)
        cost = int(hint.cost_tokens) if hint is not None else 0
        self._add(pending_request.metadata.internal_request_id, replica_id, cost, None)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._release(internal_request_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._sent_tokens.pop(replica_id, None)
        for key in [k for k, (rid, _, _) in self._sent.items() if rid == replica_id]:
            del self._sent[key]
