"""A Ray cluster of several nodes simulated on one machine (`ray.cluster_utils.Cluster`), for the multi-node tests
and `kvcomm bench scale`.

`SimulatedCluster` starts a head node without CPUs (nothing but Ray's own services and CPU-less actors runs there
unless pinned) and worker nodes with CPUs, fake GPUs (``num_gpus``: Ray schedules GPU bundles on them; the model
runs on the CPU with ``ClusterConfig.simulate_gpus``) and an object store each; nodes are added and removed while
it runs (`remove(node, graceful=False)` is a node lost without warning). The nodes' processes are real: each has
its own raylet and object store, so objects stored on a removed node are gone. Ray binds the machine's own
address, not 127.0.0.1 (its test cluster does not run on loopback alone), so nothing leaves this machine.
"""
from __future__ import annotations

import os
from typing import Any


class SimulatedCluster:
    """Head + worker nodes on this machine; a context manager that connects this process (`ray.init`)."""

    def __init__(self, worker_nodes: int = 2, *, cpus_per_node: float = 2, gpus_per_node: int = 2,
                 object_store_mb: int = 256, namespace: str | None = None):
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        from ray.cluster_utils import Cluster
        self.cpus_per_node, self.gpus_per_node, self.object_store_mb = cpus_per_node, gpus_per_node, object_store_mb
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "num_gpus": 0, "object_store_memory": object_store_mb << 20, "include_dashboard": False,
            # a lost node is declared dead in ~1.5 s (Ray's default is ~15 s): drills see its loss while they run
            "_system_config": {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                               "health_check_failure_threshold": 3}})
        self.nodes: list[Any] = []
        for _ in range(worker_nodes):
            self.add()
        self.namespace = namespace

    def add(self, **overrides: Any) -> Any:
        """One more worker node (Ray's node object); it is up when this returns."""
        args = {"num_cpus": self.cpus_per_node, "num_gpus": self.gpus_per_node,
                "object_store_memory": self.object_store_mb << 20, **overrides}
        node = self.cluster.add_node(**args)
        self.nodes.append(node)
        return node

    def remove(self, node: Any, graceful: bool = False, timeout_s: float = 60.0) -> None:
        """Take a worker node away; without `graceful`, its processes are killed at once (a node lost). Returns
        once Ray has declared it dead."""
        import time

        import ray
        self.cluster.remove_node(node, allow_graceful=graceful)
        self.nodes.remove(node)
        deadline = time.monotonic() + timeout_s
        while any(n["NodeID"] == node.node_id and n["Alive"] for n in ray.nodes()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {node.node_id[:8]} still alive {timeout_s:.0f} s after its removal")
            time.sleep(0.2)

    def node_of(self, node_id: str) -> Any:
        return next(node for node in self.nodes if node.node_id == node_id)

    @property
    def address(self) -> str:
        return self.cluster.address

    def __enter__(self) -> "SimulatedCluster":
        import ray
        ray.init(address=self.address, log_to_driver=False, namespace=self.namespace)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        import ray
        if "ray.serve" in __import__("sys").modules:
            try:
                __import__("ray.serve").serve.shutdown()
            except Exception:  # noqa: BLE001 - Serve was not started
                pass
        ray.shutdown()
        self.cluster.shutdown()


def actor_node(handle: Any) -> str:
    """The node an actor runs on."""
    import ray
    return ray.get(handle.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()), timeout=60)
