"""The HTTP service's ingress metrics, recorded twice (their names, help texts, labels and buckets live in the
project's one registry, `actors.metrics.METRICS`; the worker replicas' engine metrics are `actors.metrics.ReplicaMetrics`).

This module owns `ServiceMetrics`, which the ingress replica keeps (one per replica, never shared):

* every observation goes to Ray's metrics (`ray.util.metrics` Counter / Histogram / Gauge), which Ray's metrics
  agent exports on each node's metrics port for a Prometheus scrape (Ray prefixes the names: ``ray_kvcomm_...``);
* and to an in-process registry rendered in the Prometheus text format (version 0.0.4) at ``GET /metrics`` on the
  ingress, so a scrape (or a test) does not depend on the metrics agent's export interval.

The metrics, their labels and meanings: `actors.metrics.METRICS` (``scope="ingress"``), listed in docs/metrics.md.

A chat's reused prompt tokens are its ``usage.prompt_tokens_details.cached_tokens``; a turn's are its prompt tokens
less those that went through the model before its first token (`actors.metrics.reused_prompt_tokens`, the
definition each worker replica's ``kvcomm_engine_reused_prompt_tokens_total`` counts too: the ingress counts what
clients received, the replicas every turn they ran, retried and cancelled ones included).
"""
from __future__ import annotations

import threading
from typing import Any

from actors.metrics import METRICS, MetricSet


class ServiceMetrics:
    """The service's metrics: `observe_*` / `set_*` record into Ray's metrics and the in-process registry."""

    def __init__(self, export_to_ray: bool = True):
        self._lock = threading.Lock()
        self._reuse: dict[str, list[int]] = {}      # mode -> [reused turns, turns]
        self._set = MetricSet([m.name for m in METRICS if m.scope == "ingress"], export_to_ray=export_to_ray)
        self._record = self._set.record

    def observe_turn(self, mode: str, reason: str, ttft_s: float, reused: bool, prompt_tokens: int,
                     generated_tokens: int, reused_tokens: int = 0) -> None:
        self._record("kvcomm_ttft_seconds", ttft_s, {"mode": mode}, how="observe")
        self._record("kvcomm_turns_total", 1, {"mode": mode, "reason": reason}, how="inc")
        self._record("kvcomm_prompt_tokens_total", prompt_tokens, {"source": "job"}, how="inc")
        self._record("kvcomm_reused_prompt_tokens_total", reused_tokens, {"source": "job"}, how="inc")
        self._record("kvcomm_generated_tokens_total", generated_tokens, {"source": "job"}, how="inc")
        with self._lock:
            counts = self._reuse.setdefault(mode, [0, 0])
            counts[0] += int(bool(reused))
            counts[1] += 1
            rate = counts[0] / counts[1]
        self._record("kvcomm_reuse_rate", rate, {"mode": mode}, how="set")

    def observe_job(self, mode: str, status: str) -> None:
        self._record("kvcomm_jobs_total", 1, {"mode": mode, "status": status}, how="inc")

    def observe_chat(self, done: dict[str, Any]) -> None:
        """A finished chat completion (a worker's ``done`` event, `cluster.serve.worker`)."""
        mode = done["mode"]
        self._record("kvcomm_ttft_seconds", done["ttft_s"], {"mode": f"chat-{mode}"}, how="observe")
        self._record("kvcomm_chat_completions_total", 1, {"finish_reason": done["finish_reason"]}, how="inc")
        self._record("kvcomm_chat_decisions_total", 1, {"mode": mode, "reason": done["reason"]}, how="inc")
        self._record("kvcomm_prompt_tokens_total", done["prompt_tokens"], {"source": "chat"}, how="inc")
        self._record("kvcomm_reused_prompt_tokens_total", done["cached_tokens"], {"source": "chat"}, how="inc")
        self._record("kvcomm_generated_tokens_total", done["completion_tokens"], {"source": "chat"}, how="inc")

    def observe_response(self, route: str, code: int) -> None:
        self._record("kvcomm_http_requests_total", 1, {"route": route, "code": str(code)}, how="inc")

    def set_queue_length(self, length: int) -> None:
        self._record("kvcomm_queue_length", length, how="set")

    def set_pool(self, anchors: int, nbytes: int) -> None:
        self._record("kvcomm_anchor_pool_anchors", anchors, how="set")
        self._record("kvcomm_anchor_pool_bytes", nbytes, how="set")

    # ---- reading ------------------------------------------------------------------------------------------------
    def value(self, name: str, **labels: str) -> float:
        """A counter's or gauge's current value (0 when never recorded), for tests and summaries."""
        return self._set.value(name, **labels)

    def render(self) -> str:
        """Every family in the Prometheus text exposition format (0.0.4)."""
        return self._set.render()
