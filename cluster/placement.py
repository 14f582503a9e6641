"""Placement groups for agent workers: one bundle per worker, created, awaited and removed here.

This module owns how workers are laid out on the cluster: `worker_bundles` ({"CPU": k} per worker on CPU,
{"GPU": g, "CPU": k} on GPU nodes), `create_worker_placement_group` (waits until the group is placed and
explains an infeasible request with what the cluster has), `bundle_strategy` (the scheduling strategy that pins
worker i to bundle i) and `remove_placement_group`; and whether the anchor pool's objects fit the object store of
the node they land on (`pool_store_problem`: each node has its own store, so the budget is checked per node, not
against the sum of all nodes).
"""
from __future__ import annotations

from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group as _remove
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .config import ClusterConfig


class PlacementError(RuntimeError):
    """The workers' placement group could not be placed on this cluster."""


def worker_bundles(config: ClusterConfig) -> list[dict[str, float]]:
    return [config.bundle() for _ in range(config.num_workers)]


def create_worker_placement_group(config: ClusterConfig, name: str = "") -> PlacementGroup:
    """A placement group with one bundle per worker, placed with `config.placement_strategy`, ready to use."""
    bundles = worker_bundles(config)
    group = placement_group(bundles, strategy=config.placement_strategy, name=name)
    ready, _ = ray.wait([group.ready()], timeout=config.placement_timeout_s)
    if not ready:
        _remove(group)
        raise PlacementError(
            f"could not place {len(bundles)} worker bundle(s) of {bundles[0]} with strategy "
            f"{config.placement_strategy} within {config.placement_timeout_s:.0f} s; the cluster has "
            f"{_describe(ray.cluster_resources())} in total and {_describe(ray.available_resources())} free. "
            f"Lower num_workers / cpus_per_worker / gpus_per_worker, or add nodes.")
    return group


def bundle_strategy(group: PlacementGroup, index: int) -> PlacementGroupSchedulingStrategy:
    """Schedule an actor into bundle `index` of `group` (its children stay out of the group)."""
    return PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=index,
                                            placement_group_capture_child_tasks=False)


def remove_placement_group(group: PlacementGroup | None) -> None:
    if group is not None:
        try:
            _remove(group)
        except Exception:  # noqa: BLE001 - already removed, or the cluster is gone
            pass


def _describe(resources: dict[str, Any]) -> str:
    keys = [k for k in ("CPU", "GPU", "memory") if k in resources]
    parts = []
    for key in keys:
        value = resources[key]
        parts.append(f"{value / 2**30:.1f} GiB memory" if key == "memory" else f"{value:g} {key}")
    return ", ".join(parts) or "no resources"


def pool_store_problem(budget_bytes: int, nodes: list[dict[str, Any]]) -> str | None:
    """Why the anchor pool's byte budget may not fit the object store of the node its actor lands on (any alive
    node: the actor asks for no CPU), or None. `nodes`: `ray.nodes()`."""
    stores = {n.get("NodeManagerAddress", "?") + ":" + str(n.get("NodeID", "?"))[:8]:
              float(n.get("Resources", {}).get("object_store_memory", 0)) for n in nodes if n.get("Alive")}
    stores = {name: size for name, size in stores.items() if size > 0}
    if not stores:
        return None
    smallest = min(stores, key=stores.get)
    if budget_bytes <= stores[smallest]:
        return None
    return (f"kvcomm.pool_byte_budget ({budget_bytes / 2**30:.2f} GiB) exceeds the object store of node {smallest} "
            f"({stores[smallest] / 2**30:.2f} GiB; every node has its own, {len(stores)} alive): anchors would "
            "spill to disk if the pool actor lands there; lower the budget or give that node a larger object store")
