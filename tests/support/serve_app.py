"""Starting a test's Serve app: a free loopback port, the tiny random-weight app's arguments, and `running_app`,
which starts Serve on that port, runs the app and, on leaving, shuts Serve down and removes the app's service actors
(the anchor pool, the job store). Used by the module- and package-scoped app fixtures of tests/http and
tests/reliability; each keeps its own arguments (model name, keys, limits)."""
from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tiny_app_args(model_dir: str, pool_prefix: str, serve: dict[str, Any], *, gamma: float = 1.0,
                  namespace: str = "kvcomm-test", num_workers: int = 1) -> dict[str, Any]:
    """``serve run`` arguments for the tiny random-weight model on `num_workers` worker replicas of half a CPU and
    one thread each, with an anchor pool of its own (``<pool_prefix>-<random>``)."""
    return {"cluster": {"model": model_dir, "random_weights": True, "num_workers": num_workers,
                        "cpus_per_worker": 0.5, "threads_per_worker": 1,
                        "pool_actor_name": f"{pool_prefix}-{uuid.uuid4().hex[:8]}", "ray_namespace": namespace,
                        "kvcomm": {"gamma": gamma}},
            "serve": serve}


@contextmanager
def running_app(args: dict[str, Any], name: str, *, deployments: dict[str, dict[str, Any]] | None = None,
                **start: Any) -> Iterator[str]:
    """Serve the app of `args` (built as ``serve run`` builds it; `deployments` as a config file's ``deployments:``)
    at ``/`` on a free port; yields its base URL. `start` goes to ``serve.start`` (e.g. ``tracing_config``)."""
    from ray import serve

    from cluster.serve.app import build_app, kill_service_actors
    from cluster.serve.config import ServeAppConfig
    config = ServeAppConfig.from_args(args)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, **start)
    serve.run(build_app(config, deployments=deployments), name=name, route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        kill_service_actors(config)
