"""The HTTP service's Prometheus metrics: their names, help texts, labels and buckets, recorded twice.

This module owns `ServiceMetrics`, which the ingress replica keeps (one per replica, never shared):

* every observation goes to Ray's metrics (`ray.util.metrics` Counter / Histogram / Gauge), which Ray's metrics
  agent exports on each node's metrics port for a Prometheus scrape (Ray prefixes the names: ``ray_kvcomm_...``);
* and to an in-process registry rendered in the Prometheus text format (version 0.0.4) at ``GET /metrics`` on the
  ingress, so a scrape (or a test) does not depend on the metrics agent's export interval.

Metrics (labels in brackets):

=================================  =========  ==============================================================
kvcomm_ttft_seconds                histogram  time to first token of each agent turn or chat [mode; chats:
                                              chat-<mode>, from reaching the worker replica]
kvcomm_turns_total                 counter    agent turns by the engine's decision reason [mode, reason]
kvcomm_reuse_rate                  gauge      share of the mode's turns that skipped prefill entirely [mode]
kvcomm_jobs_total                  counter    finished jobs [mode, status]
kvcomm_chat_completions_total      counter    finished chat completions [finish_reason]
kvcomm_chat_decisions_total        counter    chat completions by the engine's decision reason [mode, reason]
kvcomm_generated_tokens_total      counter    generated tokens [source: job|chat]
kvcomm_prompt_tokens_total         counter    prompt tokens of turns and chats [source]
kvcomm_reused_prompt_tokens_total  counter    prompt tokens whose KV was reused, not computed [source]
kvcomm_http_requests_total         counter    HTTP responses [route, code]
kvcomm_queue_length                gauge      jobs and chats accepted by the ingress and not finished
kvcomm_anchor_pool_anchors         gauge      anchors in the pool actor (all namespaces)
kvcomm_anchor_pool_bytes           gauge      bytes of anchor tensors in the pool actor
=================================  =========  ==============================================================

A chat's reused prompt tokens are its ``usage.prompt_tokens_details.cached_tokens``; a turn's are its prompt tokens
less those that went through the model before its first token.
"""
from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class _Family:
    """One metric and its samples, keyed by label values (in `labels` order)."""
    name: str
    kind: str                      # counter | gauge | histogram
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    values: dict[tuple[str, ...], float] = field(default_factory=dict)                 # counter, gauge
    histograms: dict[tuple[str, ...], list[float]] = field(default_factory=dict)       # bucket counts + [sum, n]
    ray_metric: Any = None


class ServiceMetrics:
    """The service's metrics: `observe_*` / `set_*` record into Ray's metrics and the in-process registry."""

    def __init__(self, export_to_ray: bool = True):
        self._lock = threading.Lock()
        self._families: dict[str, _Family] = {}
        self._reuse: dict[str, list[int]] = {}      # mode -> [reused turns, turns]
        for family in (
            _Family("kvcomm_ttft_seconds", "histogram", "Time to first token of an agent turn or a chat completion.",
                    ("mode",), TTFT_BUCKETS_S),
            _Family("kvcomm_turns_total", "counter", "Agent turns, by serving mode and the engine's decision reason "
                    "(reused, dense_mode, new_anchor:<gate reason>, no_compatible_anchor, ...).", ("mode", "reason")),
            _Family("kvcomm_reuse_rate", "gauge", "Share of the mode's agent turns that skipped prefill entirely "
                    "(since the ingress started).", ("mode",)),
            _Family("kvcomm_jobs_total", "counter", "Finished multi-agent jobs, by mode and status.",
                    ("mode", "status")),
            _Family("kvcomm_chat_completions_total", "counter", "Finished chat completions, by finish reason.",
                    ("finish_reason",)),
            _Family("kvcomm_chat_decisions_total", "counter", "Chat completions, by serving mode and the engine's "
                    "decision reason (reused, dense_mode, new_anchor:<gate reason>, no_compatible_anchor, ...).",
                    ("mode", "reason")),
            _Family("kvcomm_generated_tokens_total", "counter", "Generated tokens.", ("source",)),
            _Family("kvcomm_prompt_tokens_total", "counter", "Prompt tokens of agent turns and chat completions.",
                    ("source",)),
            _Family("kvcomm_reused_prompt_tokens_total", "counter", "Prompt tokens of agent turns and chat "
                    "completions whose KV was reused instead of computed.", ("source",)),
            _Family("kvcomm_http_requests_total", "counter", "HTTP responses of the ingress, by route and status code.",
                    ("route", "code")),
            _Family("kvcomm_queue_length", "gauge", "Jobs and chat completions accepted by the ingress and not finished."),
            _Family("kvcomm_anchor_pool_anchors", "gauge", "Anchors held by the anchor pool actor (all namespaces)."),
            _Family("kvcomm_anchor_pool_bytes", "gauge", "Bytes of anchor tensors held by the anchor pool actor."),
        ):
            self._families[family.name] = family
        if export_to_ray:
            self._attach_ray_metrics()

    def _attach_ray_metrics(self) -> None:
        try:
            from ray.util import metrics as ray_metrics
            for family in self._families.values():
                if family.kind == "counter":
                    family.ray_metric = ray_metrics.Counter(family.name, family.help, tag_keys=family.labels)
                elif family.kind == "gauge":
                    family.ray_metric = ray_metrics.Gauge(family.name, family.help, tag_keys=family.labels)
                else:
                    family.ray_metric = ray_metrics.Histogram(family.name, family.help, boundaries=list(family.buckets),
                                                              tag_keys=family.labels)
        except Exception as exc:  # noqa: BLE001 - outside a Ray worker: the in-process registry still works
            log.warning("Ray metrics unavailable (%s); only GET /metrics reports", exc)
            for family in self._families.values():
                family.ray_metric = None

    # ---- recording ----------------------------------------------------------------------------------------------
    def _record(self, name: str, value: float, labels: dict[str, str] | None = None, *, how: str) -> None:
        family = self._families[name]
        labels = labels or {}
        key = tuple(str(labels.get(label, "")) for label in family.labels)
        with self._lock:
            if how == "inc":
                family.values[key] = family.values.get(key, 0.0) + value
            elif how == "set":
                family.values[key] = float(value)
            else:
                counts = family.histograms.setdefault(key, [0.0] * (len(family.buckets) + 2))
                for index, bound in enumerate(family.buckets):
                    if value <= bound:
                        counts[index] += 1
                counts[-2] += value
                counts[-1] += 1
        if family.ray_metric is not None:
            tags = dict(zip(family.labels, key)) or None
            try:
                if how == "inc":
                    family.ray_metric.inc(value, tags=tags)
                elif how == "set":
                    family.ray_metric.set(value, tags=tags)
                else:
                    family.ray_metric.observe(value, tags=tags)
            except Exception as exc:  # noqa: BLE001 - export trouble never fails a request
                log.debug("Ray metric %s not recorded: %s", name, exc)

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
        family = self._families[name]
        key = tuple(str(labels.get(label, "")) for label in family.labels)
        with self._lock:
            if family.kind == "histogram":
                return family.histograms.get(key, [0.0])[-1]
            return family.values.get(key, 0.0)

    def render(self) -> str:
        """Every family in the Prometheus text exposition format (0.0.4)."""
        lines: list[str] = []
        with self._lock:
            for family in self._families.values():
                lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
                lines.append(f"# TYPE {family.name} {family.kind}")
                if family.kind == "histogram":
                    for key, counts in sorted(family.histograms.items()):
                        base = list(zip(family.labels, key))
                        for bound, count in zip(family.buckets, counts):
                            lines.append(f"{family.name}_bucket{_labels(base + [('le', _number(bound))])} "
                                         f"{_number(count)}")
                        lines.append(f"{family.name}_bucket{_labels(base + [('le', '+Inf')])} {_number(counts[-1])}")
                        lines.append(f"{family.name}_sum{_labels(base)} {_number(counts[-2])}")
                        lines.append(f"{family.name}_count{_labels(base)} {_number(counts[-1])}")
                else:
                    samples = sorted(family.values.items())
                    if not samples and not family.labels:
                        samples = [((), 0.0)]
                    for key, value in samples:
                        lines.append(f"{family.name}{_labels(list(zip(family.labels, key)))} {_number(value)}")
        return "\n".join(lines) + "\n"


def _labels(pairs: list[tuple[str, str]]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{name}="{_escape_label(value)}"' for name, value in pairs) + "}"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))
