"""The service's own trace spans (OpenTelemetry) on top of Ray Serve's tracing: one per job, one per order of it.

Ray Serve's tracing hook (Ray >= 2.5x: ``tracing_config`` in the Serve config file or ``serve.start``, or the
``RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH`` environment variable) installs an OpenTelemetry tracer provider in every
Serve process and opens a span per request it proxies, routes and runs. This module adds, in the ingress replica:

* `start_job_span`: ``kvcomm.job``, a child of the request that submitted the job (job id, mode, namespace, agents;
  at its end the status, turns and replicas used); `end_job_span` closes it.
* `TracedCalls`: a job's `cluster.driver.TurnExecutor` with a span per order, from its sending to its reply:
  ``kvcomm.turn`` (agent, round, namespace, routing cost in tokens, the replica and node that ran it, the engine's
  decision and the gate's reason for each content it read) or ``kvcomm.content`` (a user input's base KV and the
  gate's reasons for it). The span is current while the order is sent, so Serve's handle call and the worker
  replica's request span are its children: a trace shows job -> turn -> Serve's routing -> the replica.
* `chat_span`: ``kvcomm.chat``, the replica and the engine's decision of a chat completion.

Off by default: without Serve's tracing the OpenTelemetry API's tracer is a no-op (spans record nothing and cost
next to nothing). opentelemetry-api and -sdk come with ``ray[serve]``; without them every call here does nothing.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator, Mapping

from actors.turns import TurnOrder

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.trace import Status, StatusCode
except ImportError:  # pragma: no cover - ray[serve] installs them
    trace = None

TRACER_NAME = "kvcomm.serve"


def _tracer() -> Any:
    return None if trace is None else trace.get_tracer(TRACER_NAME)


def start_job_span(job_id: str, mode: str, namespace: str, agents: int) -> Any:
    """The ``kvcomm.job`` span, a child of the current context (the submitting request's span); None without
    OpenTelemetry."""
    tracer = _tracer()
    if tracer is None:
        return None
    return tracer.start_span("kvcomm.job", attributes={"kvcomm.job.id": job_id, "kvcomm.mode": mode,
                                                        "kvcomm.namespace": namespace, "kvcomm.job.agents": agents})


def end_job_span(span: Any, status: str, result: Mapping[str, Any] | None, error: Any = None) -> None:
    if span is None:
        return
    span.set_attribute("kvcomm.job.status", status)
    if result is not None:
        span.set_attribute("kvcomm.job.turns", len(result.get("turns", ())))
        span.set_attribute("kvcomm.job.replicas", [str(w) for w in result.get("workers", ())])
    if status == "failed":
        span.set_status(Status(StatusCode.ERROR, str(error)[:300] if error else "failed"))
    span.end()


class _TracedCall:
    """One order in flight and its span (ended once: by its reply, its error or its cancellation)."""

    def __init__(self, inner: Any, span: Any):
        self.inner, self.span = inner, span
        self._ended = threading.Lock()
        self._open = True

    def end(self) -> None:
        with self._ended:
            if self._open:
                self._open = False
                self.span.end()


class TracedCalls:
    """A `TurnExecutor` (`inner`) whose orders each get a span under `job_span` (see the module docstring)."""

    def __init__(self, inner: Any, job_span: Any):
        self.inner, self.job_span = inner, job_span

    def send(self, order: Any) -> _TracedCall:
        parent = trace.set_span_in_context(self.job_span)
        hint = order.routing_hint()
        if isinstance(order, TurnOrder):
            span = _tracer().start_span("kvcomm.turn", context=parent, attributes={
                "kvcomm.agent": str(order.agent.get("id", "")), "kvcomm.round": order.round,
                "kvcomm.mode": order.mode, "kvcomm.namespace": order.namespace,
                "kvcomm.route.cost_tokens": hint.cost_tokens,
                "kvcomm.route.kv_bytes_by_node": [f"{node}={n}" for node, n in hint.bytes_by_node.items()]})
        else:
            span = _tracer().start_span("kvcomm.content", context=parent, attributes={
                "kvcomm.content.kind": order.kind, "kvcomm.namespace": order.namespace,
                "kvcomm.route.cost_tokens": hint.cost_tokens})
        try:
            with in_span(span):                     # Serve's handle call becomes a child
                return _TracedCall(self.inner.send(order), span)
        except BaseException as exc:
            span.record_exception(exc)
            span.end()
            raise

    def wait(self, call: _TracedCall) -> Any:
        try:
            reply = self.inner.wait(call.inner)
        except BaseException as exc:
            call.span.set_attribute("kvcomm.error", type(exc).__name__)
            call.span.set_status(Status(StatusCode.ERROR, str(exc)[:300]))
            call.end()
            raise
        _describe(call.span, reply.outcome)
        call.end()
        return reply

    def cancel(self, call: _TracedCall) -> None:
        call.span.set_attribute("kvcomm.cancelled", True)
        try:
            self.inner.cancel(call.inner)
        finally:
            call.end()

    def commit(self, staged: list[Any]) -> None:
        with _tracer().start_as_current_span("kvcomm.commit", context=trace.set_span_in_context(self.job_span),
                                             attributes={"kvcomm.commit.parts": len(staged)}):
            self.inner.commit(staged)


def traced(executor: Any, job_span: Any) -> Any:
    """`executor` with a span per order when there is a job span (else `executor` itself)."""
    if job_span is None or not job_span.is_recording():
        return executor
    return TracedCalls(executor, job_span)


def _describe(span: Any, outcome: Any) -> None:
    """The route the order took and the gate's decision, from the worker's `TurnOutcome`."""
    span.set_attribute("kvcomm.replica", str(outcome.worker))
    if outcome.node_id:
        span.set_attribute("kvcomm.node_id", str(outcome.node_id))
    record = outcome.record
    if record is not None:
        span.set_attribute("kvcomm.decision", str(record.reason))
        span.set_attribute("kvcomm.reused", bool(record.reused))
        span.set_attribute("kvcomm.ttft_s", float(record.ttft_s))
        span.set_attribute("kvcomm.prompt_tokens", int(record.prompt_tokens))
        span.set_attribute("kvcomm.recomputed_tokens", int(record.recomputed_tokens))
    gate = {name: reasons for name, (_, reasons) in outcome.gate_state.items()}
    if outcome.produced is not None:
        gate.setdefault("(produced)", outcome.produced.gate_reason or {})
    reasons = sorted(f"{name}:{placeholder}={reason}" for name, by in gate.items() for placeholder, reason in by.items())
    if reasons:
        span.set_attribute("kvcomm.gate.reasons", reasons)


@contextlib.contextmanager
def in_span(span: Any) -> Iterator[None]:
    """Make `span` current in this block (calls made in it, e.g. Serve handle calls, become its children)."""
    if span is None:
        yield
        return
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        yield
    finally:
        otel_context.detach(token)


def chat_span(model: str, namespace: str | None) -> Any:
    """A ``kvcomm.chat`` span, current from here on in the caller's context; None without OpenTelemetry."""
    tracer = _tracer()
    if tracer is None:
        return None
    return tracer.start_span("kvcomm.chat", attributes={"kvcomm.model": model, "kvcomm.namespace": namespace or ""})


def end_chat_span(span: Any, worker: str | None, done: Mapping[str, Any] | None, error: str | None = None) -> None:
    if span is None:
        return
    if worker:
        span.set_attribute("kvcomm.replica", worker)
    if done is not None:
        span.set_attribute("kvcomm.mode", str(done["mode"]))
        span.set_attribute("kvcomm.decision", str(done["reason"]))
        span.set_attribute("kvcomm.reused", bool(done["reused"]))
        span.set_attribute("kvcomm.ttft_s", float(done["ttft_s"]))
        span.set_attribute("kvcomm.prompt_tokens", int(done["prompt_tokens"]))
        span.set_attribute("kvcomm.cached_tokens", int(done["cached_tokens"]))
        span.set_attribute("kvcomm.finish_reason", str(done["finish_reason"]))
    if error:
        span.set_status(Status(StatusCode.ERROR, error[:300]))
    span.end()
