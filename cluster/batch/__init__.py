"""Batch jobs without Serve: `ClusterRunner` (worker actors in a placement group, driven by `cluster.driver`) and
`kvcomm submit` (a file of jobs, resumable results; on a local runner, or against a running deployment with
``--url``)."""
from __future__ import annotations

from kvcomm.lazy_exports import exporter

_HOMES = {"ClusterRunner": "runner", "JobTicket": "runner", "read_jobs": "submit", "run_over_http": "submit"}
__all__ = sorted(_HOMES)
__getattr__ = exporter(__name__, _HOMES, globals())
