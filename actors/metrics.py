"""Every metric the project exports: the one registry of names, types, labels and meanings, and how they are recorded.

This module owns

* `METRICS`: each metric's `MetricDef` (name, type, labels, help, histogram buckets, the vLLM metric of the same
  meaning), for the ingress (`cluster.serve.metrics.ServiceMetrics`) and for every worker replica (below). It is
  the single source that docs/metrics.md and the Grafana dashboard's test (tests/http/test_observability.py) check.
* `MetricSet`: records observations of some of those metrics twice: into Ray's metrics API
  (`ray.util.metrics`, which each node's metrics agent exports for a Prometheus scrape) and into an in-process
  registry (`value`, `render` in the Prometheus text format), so a test or ``GET /metrics`` needs no scrape.
* `ReplicaMetrics`: one worker replica's (`actors.agent_worker.AgentWorker`) engine metrics, labelled with the
  replica and the model. The worker calls two hooks (`observe_job_turn`, `observe_chat`) with numbers it already
  has; a sampler thread reads the rest from the worker's own counters (`TurnScheduler`, `KVBudget`,
  `ContentResolver`, `RemoteAnchorPool`) every `period_s`, so nothing is measured twice.

Names: Ray deprecates ':' in metric names (a FutureWarning in Ray 2.60), so the prefix is ``kvcomm_``, as vLLM's
``vllm:`` metrics become ``vllm_`` under Ray; Ray's export adds ``ray_`` in front (``ray_kvcomm_...``) and
``_total`` to a counter without it (every counter here already ends in ``_total``). Ray exports a histogram's
``_sum`` from bucket midpoints: quantiles from ``_bucket`` are what to chart.
"""
from __future__ import annotations

import logging
import math
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping

if TYPE_CHECKING:
    from kvcomm.job_runner import TurnRecord

log = logging.getLogger(__name__)

RAY_PREFIX = "ray_"     # what Ray's Prometheus export puts in front of an application metric's name

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_GAP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
FAST_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)

REPLICA = ("replica", "model_name")          # every replica metric's labels start with these


@dataclass(frozen=True)
class MetricDef:
    """One exported metric: `name` is what Ray's API gets (Prometheus sees ``ray_`` + name from Ray's export;
    the ingress's ``GET /metrics`` shows `name` itself)."""
    name: str
    kind: str                              # counter | gauge | histogram
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    scope: str = "replica"                 # ingress | replica: the process that records it
    vllm: str | None = None                # the vLLM metric of the same meaning

    def prometheus_names(self) -> tuple[str, ...]:
        """The series names a Prometheus scrape of Ray's export holds for this metric."""
        base = RAY_PREFIX + self.name
        if self.kind == "histogram":
            return (base + "_bucket", base + "_sum", base + "_count")
        return (base,)


def _ingress(name: str, kind: str, help: str, labels: tuple[str, ...] = (), buckets: tuple[float, ...] = ()
             ) -> MetricDef:
    return MetricDef(name, kind, help, labels, buckets, scope="ingress")


def _replica(name: str, kind: str, help: str, labels: tuple[str, ...] = (), buckets: tuple[float, ...] = (),
             vllm: str | None = None) -> MetricDef:
    return MetricDef(name, kind, help, REPLICA + labels, buckets, scope="replica", vllm=vllm)


METRICS: tuple[MetricDef, ...] = (
    # ---- the ingress (cluster.serve.metrics): what clients got, per ingress replica -------------------------------
    _ingress("kvcomm_ttft_seconds", "histogram", "Time to first token of an agent turn or a chat completion, as "
             "the ingress learns it.", ("mode",), LATENCY_BUCKETS_S),
    _ingress("kvcomm_turns_total", "counter", "Agent turns, by serving mode and the engine's decision reason "
             "(reused, dense_mode, new_anchor:<gate reason>, no_compatible_anchor, ...).", ("mode", "reason")),
    _ingress("kvcomm_reuse_rate", "gauge", "Share of the mode's agent turns that skipped prefill entirely (since "
             "the ingress started).", ("mode",)),
    _ingress("kvcomm_jobs_total", "counter", "Finished multi-agent jobs, by mode and status.", ("mode", "status")),
    _ingress("kvcomm_chat_completions_total", "counter", "Finished chat completions, by finish reason.",
             ("finish_reason",)),
    _ingress("kvcomm_chat_decisions_total", "counter", "Chat completions, by serving mode and the engine's decision "
             "reason (reused, dense_mode, new_anchor:<gate reason>, no_compatible_anchor, ...).", ("mode", "reason")),
    _ingress("kvcomm_generated_tokens_total", "counter", "Generated tokens of finished turns and chats.", ("source",)),
    _ingress("kvcomm_prompt_tokens_total", "counter", "Prompt tokens of finished agent turns and chat completions.",
             ("source",)),
    _ingress("kvcomm_reused_prompt_tokens_total", "counter", "Prompt tokens of finished agent turns and chat "
             "completions whose KV was reused instead of computed.", ("source",)),
    _ingress("kvcomm_http_requests_total", "counter", "HTTP responses of the ingress, by route and status code.",
             ("route", "code")),
    _ingress("kvcomm_queue_length", "gauge", "Jobs and chat completions accepted by the ingress and not finished."),
    _ingress("kvcomm_anchor_pool_anchors", "gauge", "Anchors held by the anchor pool actor (all namespaces)."),
    _ingress("kvcomm_anchor_pool_bytes", "gauge", "Bytes of anchor tensors held by the anchor pool actor."),
    # ---- every worker replica (ReplicaMetrics): the engine ------------------------------------------------------
    _replica("kvcomm_num_requests_running", "gauge", "Sequences in the replica's decode batch (turns and chats).",
             vllm="vllm:num_requests_running"),
    _replica("kvcomm_num_requests_waiting", "gauge", "Turns and chats queued on the replica for admission to the "
             "batch.", vllm="vllm:num_requests_waiting"),
    _replica("kvcomm_kv_cache_usage_bytes", "gauge", "Decode KV bytes the replica holds (its KV budget's ledger).",
             vllm="vllm:kv_cache_usage_perc (as bytes)"),
    _replica("kvcomm_kv_cache_budget_bytes", "gauge", "The replica's decode KV budget from its memory plan."),
    _replica("kvcomm_kv_cache_usage_perc", "gauge", "Decode KV bytes held over the budget (0 to 1).",
             vllm="vllm:kv_cache_usage_perc"),
    _replica("kvcomm_time_to_first_token_seconds", "histogram", "Time to first token on the replica (a job turn: "
             "from its preparation; a chat: from reaching the replica).", ("source", "mode"), LATENCY_BUCKETS_S,
             vllm="vllm:time_to_first_token_seconds"),
    _replica("kvcomm_time_per_output_token_seconds", "histogram", "Mean time per output token after the first, "
             "per turn or chat of more than one token.", ("source", "mode"), TOKEN_GAP_BUCKETS_S,
             vllm="vllm:time_per_output_token_seconds"),
    _replica("kvcomm_e2e_request_latency_seconds", "histogram", "Time from a job turn's preparation (a chat's "
             "arrival) to its last token.", ("source", "mode"), LATENCY_BUCKETS_S,
             vllm="vllm:e2e_request_latency_seconds"),
    _replica("kvcomm_engine_prompt_tokens_total", "counter", "Prompt tokens of the turns and chats the replica ran.",
             ("source",), vllm="vllm:prompt_tokens_total"),
    _replica("kvcomm_engine_reused_prompt_tokens_total", "counter", "Prompt tokens whose KV the replica reused "
             "instead of computing (the ingress's kvcomm_reused_prompt_tokens_total, per replica).", ("source",),
             vllm="vllm:prefix_cache_hits_total"),
    _replica("kvcomm_engine_generation_tokens_total", "counter", "Tokens the replica generated for finished turns "
             "and chats.", ("source",), vllm="vllm:generation_tokens_total"),
    _replica("kvcomm_reuse_decisions_total", "counter", "Turns and chats by the engine's decision reason (reused, "
             "dense_mode, new_anchor:<gate reason>, no_compatible_anchor, ...).", ("source", "mode", "reason")),
    _replica("kvcomm_offset_seconds", "histogram", "Offset estimation time of a reused prompt (KVCOMM's anchor "
             "matching and deviation estimate).", ("source", "mode"), FAST_BUCKETS_S),
    _replica("kvcomm_alignment_seconds", "histogram", "RoPE re-alignment and assembly time of a reused prompt.",
             ("source", "mode"), FAST_BUCKETS_S),
    _replica("kvcomm_decode_step_seconds", "histogram", "One decode step of the replica's batch.", (),
             FAST_BUCKETS_S),
    _replica("kvcomm_decode_steps_total", "counter", "Decode steps of the replica's batch."),
    _replica("kvcomm_decode_step_sequences_total", "counter", "Sequences advanced, summed over decode steps (over "
             "kvcomm_decode_steps_total: the mean batch size)."),
    _replica("kvcomm_pool_call_seconds", "histogram", "Latency of the replica's snapshot calls to the anchor pool "
             "actor (the pool's anchor list, fetched tensors included).", (), FAST_BUCKETS_S),
    _replica("kvcomm_pool_calls_failed_total", "counter", "Snapshot calls to the anchor pool that failed (the turn "
             "was served from an empty pool)."),
    _replica("kvcomm_anchor_cache_hits_total", "counter", "Anchor tensor parts found in the replica's anchor cache."),
    _replica("kvcomm_anchor_cache_misses_total", "counter", "Anchor tensor parts not in the replica's anchor cache "
             "(fetched from the object store)."),
    _replica("kvcomm_anchor_cache_bytes", "gauge", "Bytes of anchor tensors in the replica's anchor cache."),
    _replica("kvcomm_anchor_fetched_bytes_total", "counter", "Anchor tensor bytes the replica fetched from the "
             "object store."),
    _replica("kvcomm_content_fetched_bytes_total", "counter", "Shared contents' KV bytes (inputs, other turns' "
             "responses) the replica fetched from the object store."),
    _replica("kvcomm_bytes_from_other_nodes_total", "counter", "Of those, bytes held on another node's object store "
             "(moved between nodes)."),
)

BY_NAME: dict[str, MetricDef] = {m.name: m for m in METRICS}


def exported_prometheus_names() -> frozenset[str]:
    """Every series name Prometheus gets from Ray's export of this project's metrics."""
    return frozenset(n for m in METRICS for n in m.prometheus_names())


def reused_prompt_tokens(prompt_tokens: int, recomputed_tokens: int) -> int:
    """Prompt tokens whose KV was reused: those that did not go through the model before the first token (a chat's
    ``cached_tokens``). The one definition the ingress and the replicas both count."""
    return max(0, prompt_tokens - recomputed_tokens)


# ------------------------------------------------------------------------------------------------------------
# recording
# ------------------------------------------------------------------------------------------------------------
@dataclass
class _Family:
    """One metric and its samples in this process, keyed by label values (in `spec.labels` order)."""
    spec: MetricDef
    values: dict[tuple[str, ...], float] = field(default_factory=dict)                 # counter, gauge
    histograms: dict[tuple[str, ...], list[float]] = field(default_factory=dict)       # bucket counts + [sum, n]
    ray_metric: Any = None


class MetricSet:
    """Some metrics of the registry, recorded into Ray's metrics API and an in-process registry at once.

    `constant` labels (e.g. the replica) are given once; every observation names the rest."""

    def __init__(self, names: Iterable[str], *, export_to_ray: bool = True,
                 constant: Mapping[str, str] | None = None):
        self._lock = threading.Lock()
        self._families = {name: _Family(BY_NAME[name]) for name in names}
        self.constant = dict(constant or {})
        if export_to_ray:
            self._attach_ray_metrics()

    def _attach_ray_metrics(self) -> None:
        try:
            from ray.util import metrics as ray_metrics
            for family in self._families.values():
                spec = family.spec
                if spec.kind == "counter":
                    metric = ray_metrics.Counter(spec.name, spec.help, tag_keys=spec.labels)
                elif spec.kind == "gauge":
                    metric = ray_metrics.Gauge(spec.name, spec.help, tag_keys=spec.labels)
                else:
                    metric = ray_metrics.Histogram(spec.name, spec.help, boundaries=list(spec.buckets),
                                                   tag_keys=spec.labels)
                defaults = {k: v for k, v in self.constant.items() if k in spec.labels}
                family.ray_metric = metric.set_default_tags(defaults) if defaults else metric
        except Exception as exc:  # noqa: BLE001 - outside a Ray worker: the in-process registry still works
            log.warning("Ray metrics unavailable (%s); only the in-process registry records", exc)
            for family in self._families.values():
                family.ray_metric = None

    def record(self, name: str, value: float, labels: Mapping[str, str] | None = None, *, how: str) -> None:
        """`how`: inc (counter), set (gauge) or observe (histogram)."""
        family = self._families[name]
        labels = {**self.constant, **(labels or {})}
        key = tuple(str(labels.get(label, "")) for label in family.spec.labels)
        with self._lock:
            if how == "inc":
                family.values[key] = family.values.get(key, 0.0) + value
            elif how == "set":
                family.values[key] = float(value)
            else:
                counts = family.histograms.setdefault(key, [0.0] * (len(family.spec.buckets) + 2))
                for index, bound in enumerate(family.spec.buckets):
                    if value <= bound:
                        counts[index] += 1
                counts[-2] += value
                counts[-1] += 1
        if family.ray_metric is not None:
            tags = {k: v for k, v in zip(family.spec.labels, key) if k not in self.constant} or None
            try:
                if how == "inc":
                    family.ray_metric.inc(value, tags=tags)
                elif how == "set":
                    family.ray_metric.set(value, tags=tags)
                else:
                    family.ray_metric.observe(value, tags=tags)
            except Exception as exc:  # noqa: BLE001 - export trouble never fails a request
                log.debug("Ray metric %s not recorded: %s", name, exc)

    def value(self, name: str, **labels: str) -> float:
        """A counter's or gauge's current value, a histogram's count (0 when never recorded)."""
        family = self._families[name]
        labels = {**self.constant, **labels}
        key = tuple(str(labels.get(label, "")) for label in family.spec.labels)
        with self._lock:
            if family.spec.kind == "histogram":
                return family.histograms.get(key, [0.0])[-1]
            return family.values.get(key, 0.0)

    def samples(self, name: str) -> dict[tuple[str, ...], float]:
        """Every label combination recorded for a counter or gauge (a histogram: its counts)."""
        family = self._families[name]
        with self._lock:
            if family.spec.kind == "histogram":
                return {key: counts[-1] for key, counts in family.histograms.items()}
            return dict(family.values)

    def render(self) -> str:
        """Every family in the Prometheus text exposition format (0.0.4), under the names given to Ray."""
        lines: list[str] = []
        with self._lock:
            for family in self._families.values():
                name, spec = family.spec.name, family.spec
                lines.append(f"# HELP {name} {_escape_help(spec.help)}")
                lines.append(f"# TYPE {name} {spec.kind}")
                if spec.kind == "histogram":
                    for key, counts in sorted(family.histograms.items()):
                        base = list(zip(spec.labels, key))
                        for bound, count in zip(spec.buckets, counts):
                            lines.append(f"{name}_bucket{_labels(base + [('le', _number(bound))])} {_number(count)}")
                        lines.append(f"{name}_bucket{_labels(base + [('le', '+Inf')])} {_number(counts[-1])}")
                        lines.append(f"{name}_sum{_labels(base)} {_number(counts[-2])}")
                        lines.append(f"{name}_count{_labels(base)} {_number(counts[-1])}")
                else:
                    samples = sorted(family.values.items())
                    if not samples and not spec.labels:
                        samples = [((), 0.0)]
                    for key, value in samples:
                        lines.append(f"{name}{_labels(list(zip(spec.labels, key)))} {_number(value)}")
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


# ------------------------------------------------------------------------------------------------------------
# one worker replica
# ------------------------------------------------------------------------------------------------------------
class ReplicaMetrics:
    """A worker replica's engine metrics (every ``scope="replica"`` metric), labelled with `replica` and `model`.

    Hooks: `observe_job_turn` and `observe_chat`, called by the worker with numbers it has. `start(worker)` runs a
    sampler thread that, every `period_s`, sets the gauges and adds the growth of the worker's own counters (it
    holds the worker weakly and ends with it); `sample(worker)` does one round (tests)."""

    def __init__(self, replica: str, model: str, *, export_to_ray: bool = True):
        self.metrics = MetricSet([m.name for m in METRICS if m.scope == "replica"], export_to_ray=export_to_ray,
                                 constant={"replica": replica, "model_name": model})
        self._seen: dict[str, float] = {}        # cumulative worker counter -> the value already added
        self._marks: dict[str, int] = {}         # Latencies -> durations already observed
        self._stop = threading.Event()
        self._sample_lock = threading.Lock()

    # ---- hooks ---------------------------------------------------------------------------------------------------
    def observe_job_turn(self, mode: str, record: TurnRecord) -> None:
        """A finished job turn."""
        self._observe("job", mode, record.reason, record.prompt_tokens, record.recomputed_tokens,
                      len(record.token_ids), record.ttft_s, record.total_s, record.timings)

    def observe_chat(self, turn: Any, ttft_s: float, e2e_s: float) -> None:
        """A finished chat: its engine `TurnResult` and its times from reaching the replica."""
        self._observe("chat", turn.mode, turn.reason, len(turn.prompt_ids), turn.recomputed_tokens,
                      len(turn.token_ids), ttft_s, e2e_s, turn.timings)

    def _observe(self, source: str, mode: str, reason: str, prompt_tokens: int, recomputed_tokens: int,
                 generated: int, ttft_s: float, e2e_s: float, timings: Mapping[str, float]) -> None:
        record, kind = self.metrics.record, {"source": source, "mode": mode}
        record("kvcomm_reuse_decisions_total", 1, {**kind, "reason": reason}, how="inc")
        record("kvcomm_engine_prompt_tokens_total", prompt_tokens, {"source": source}, how="inc")
        record("kvcomm_engine_reused_prompt_tokens_total", reused_prompt_tokens(prompt_tokens, recomputed_tokens),
               {"source": source}, how="inc")
        record("kvcomm_engine_generation_tokens_total", generated, {"source": source}, how="inc")
        record("kvcomm_time_to_first_token_seconds", ttft_s, kind, how="observe")
        record("kvcomm_e2e_request_latency_seconds", e2e_s, kind, how="observe")
        if generated > 1 and "decode" in timings:
            record("kvcomm_time_per_output_token_seconds", timings["decode"] / (generated - 1), kind, how="observe")
        if "offset" in timings:              # only a reused prompt is aligned and offset
            record("kvcomm_offset_seconds", timings["offset"], kind, how="observe")
        if "align" in timings:
            record("kvcomm_alignment_seconds", timings["align"], kind, how="observe")

    # ---- sampling the worker's own counters ---------------------------------------------------------------------
    def sample(self, worker: Any) -> None:
        """One round: gauges from the worker's state, counters by the growth of its cumulative counters."""
        with self._sample_lock:
            record = self.metrics.record
            scheduler, pool = worker.scheduler, worker.pool
            load = scheduler.load()
            record("kvcomm_num_requests_running", load.active, how="set")
            record("kvcomm_num_requests_waiting", load.queued, how="set")
            budget = worker.engine.runner.kv_budget
            capacity = budget.capacity if budget.capacity is not None else worker.memory_plan.kv_bytes
            record("kvcomm_kv_cache_usage_bytes", budget.used, how="set")
            record("kvcomm_kv_cache_budget_bytes", capacity, how="set")
            record("kvcomm_kv_cache_usage_perc", budget.used / capacity if capacity else 0.0, how="set")
            pool_stats, contents = pool.stats(), worker.contents.stats()
            record("kvcomm_anchor_cache_bytes", pool_stats["cache_bytes"], how="set")
            for name, total in (("kvcomm_decode_steps_total", scheduler.steps),
                                ("kvcomm_decode_step_sequences_total", scheduler.step_sequences),
                                ("kvcomm_pool_calls_failed_total", pool_stats["snapshots_failed"]),
                                ("kvcomm_anchor_cache_hits_total", pool_stats["cache_hits"]),
                                ("kvcomm_anchor_cache_misses_total", pool_stats["cache_misses"]),
                                ("kvcomm_anchor_fetched_bytes_total", pool_stats["fetched_bytes"]),
                                ("kvcomm_content_fetched_bytes_total", contents["fetched_bytes"]),
                                ("kvcomm_bytes_from_other_nodes_total", contents["bytes_from_other_nodes"])):
                grown = total - self._seen.get(name, 0)
                if grown > 0:
                    record(name, grown, how="inc")
                    self._seen[name] = total
            for name, latencies in (("kvcomm_decode_step_seconds", scheduler.step_times),
                                    ("kvcomm_pool_call_seconds", _pool_call_latencies(pool))):
                if latencies is None:
                    continue
                values, self._marks[name] = latencies.since(self._marks.get(name, 0))
                for seconds in values:
                    record(name, seconds, how="observe")

    def start(self, worker: Any, period_s: float = 2.0) -> "ReplicaMetrics":
        """Sample `worker` every `period_s` on a daemon thread until `stop()` or until the worker is gone."""
        ref = weakref.ref(worker)
        name = f"kvcomm-metrics-{self.metrics.constant['replica']}"

        def loop() -> None:
            while not self._stop.wait(period_s):
                target = ref()
                if target is None:
                    return
                try:
                    self.sample(target)
                except Exception as exc:  # noqa: BLE001 - metrics never take a replica down
                    log.debug("replica metrics sample failed: %s", exc)
                del target

        threading.Thread(target=loop, name=name, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()


def _pool_call_latencies(pool: Any) -> Any:
    """The pool client's recent snapshot-call durations (`RemoteAnchorPool.call_latencies`; None for a pool
    without them)."""
    return getattr(pool, "call_latencies", None)
