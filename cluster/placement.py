"""Placement groups for agent workers: one bundle per worker, created, awaited and removed here.

This module owns how workers are laid out on the cluster: `worker_bundles` ({"CPU": k} per worker on CPU,
{"GPU": g, "CPU": k} on GPU nodes), `create_worker_placement_group` (waits until the group is placed and
explains an infeasible request with what the cluster has), `bundle_strategy` (the scheduling strategy that pins
worker i to bundle i) and `remove_placement_group`.
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
