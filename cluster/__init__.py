"""Everything a deployment needs, on top of `kvcomm` (the algorithm) and `actors` (the Ray actors).

  config.py     ClusterConfig: the deployment's knobs (the algorithm's derived from kvcomm.config.KVCommConfig)
  placement.py  one placement-group bundle per worker
  driver.py     DagJob: the one cluster job driver (the oracle's level loop, turns on any TurnExecutor)
  runtime.py    joining or starting Ray, and stopping what was started (with reaper.py)
  batch/        ClusterRunner (worker actors, no Serve) and `kvcomm submit`
  serve/        the HTTP service on Ray Serve (ingress, worker replicas, request router, job store)
  bench/        the cluster's benchmarks
  cli.py, demo.py   the `kvcomm` command line and `kvcomm demo`
"""
from __future__ import annotations

from kvcomm.lazy_exports import exporter

_HOMES = {
    "ClusterConfig": "config", "DagJob": "driver", "TurnExecutor": "driver", "WorkerLost": "driver",
    "RayRuntime": "runtime", "create_worker_placement_group": "placement",
}
__all__ = sorted(_HOMES)
__getattr__ = exporter(__name__, _HOMES, globals())
