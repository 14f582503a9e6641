"""The jobs API of one ingress replica, and the job drivers it hosts.

This module owns what ``POST /v1/jobs``, ``GET /v1/jobs/{id}``, ``DELETE /v1/jobs/{id}`` and
``GET /v1/jobs/{id}/events`` do (`JobService`); the routes themselves are declared in `cluster.serve.ingress`.

* A job is validated here (its limits, the model's context), stored in the `JobStore` actor, and driven by this
  replica: `cluster.driver.DagJob` in a driver thread, every turn sent to the worker deployment through Serve's
  router (`ReplicaCalls`). Each finished turn becomes an event in the store; the result or error ends the job.
* Nothing about a job lives only here. Any ingress replica answers for any job from the store; this replica
  renews its leases every second (learning which of its jobs were cancelled elsewhere) and claims jobs whose
  driving replica stopped renewing (`JobStore.claim_orphans`), running them again from their spec.
* ``?wait=true`` answers with the finished job; ``?stream=true`` answers with its events as server-sent events;
  either client disconnecting cancels the job. ``GET .../events`` resumes after ``Last-Event-ID`` (or ``?after=``)
  and never cancels (it is for watching).
* A cancelled job's turns in flight are cancelled on their replicas (they leave the decode batch at the next
  step) and nothing of it is committed to the anchor pool.
"""
# no `from __future__ import annotations`: kept consistent with the routes' modules

import asyncio
import concurrent.futures
import logging
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from ray.exceptions import RayTaskError

from actors.metrics import reused_prompt_tokens
from kvcomm.engine import ContextLengthError
from kvcomm.harness.jobs import JobSpec, JobSpecError
from kvcomm.job_runner import TurnRecord
from kvcomm.memory_plan import KVBudgetError
from kvcomm.names import MODES
from kvcomm.templates import TemplateError

from ..driver import BUSY_GIVE_UP_S, DagJob, JobCancelled, WorkerLost, WorkersBusy
from .executor import ReplicaCalls
from .http import (INT64_MAX, INT64_MIN, APIError, Caller, ClosingStreamingResponse, InFlightSlots,
                   internal_error_message, limit_error, query_flag, read_json, sse)
from .job_events import RetryEvent, TurnEvent
from .job_store import FINISHED
from .metrics import ServiceMetrics
from .tracing import end_job_span, start_job_span, traced

log = logging.getLogger(__name__)

RENEW_EVERY_S = 1.0           # lease renewal (and cancellation pickup) period of a driving replica
EVENTS_POLL_S = 15.0          # an events stream sends a keep-alive comment when nothing happened this long
STREAM_LIVENESS_S = 1.0       # ... and a job's own stream (?stream=true) this often: a write is how a client that
                              # went away is noticed, and that client's job must stop soon, not at its next turn
DISCONNECT_POLL_S = 0.5       # a ?wait=true request checks this often whether its client went away


class JobService:
    """One ingress replica's side of the jobs API (see the module docstring)."""

    def __init__(self, replica_id: str, settings: Any, workers: Any, store: Any, pool: Any,
                 metrics: ServiceMetrics, slots: InFlightSlots, model_info: Callable[[], Awaitable[dict]]):
        self.replica_id = replica_id
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.slots = slots
        self.model_info = model_info
        self.calls = ReplicaCalls(workers, pool, settings.pool_call_timeout_s)
        self._drivers: dict[str, DagJob] = {}            # jobs this replica drives now
        self._threads = concurrent.futures.ThreadPoolExecutor(max_workers=settings.max_in_flight + 4,
                                                              thread_name_prefix="kvcomm-job-driver")
        self._maintainer: asyncio.Task | None = None

    # ---- routes -------------------------------------------------------------------------------------------------
    async def create(self, request: Request, caller: Caller) -> Response:
        wait, stream = query_flag(request, "wait"), query_flag(request, "stream")
        mode = request.query_params.get("mode")
        if mode is not None and mode not in MODES:
            raise APIError(400, f"mode: unknown mode {mode!r}; valid modes: {', '.join(MODES)}", param="mode")
        self.slots.take(caller.tenant)             # before the body is read: a busy server answers at once
        self.metrics.set_queue_length(self.slots.total)
        try:
            job_id = f"job-{uuid.uuid4().hex[:16]}"
            spec = await self._job_spec(request, caller, job_id)
            record = {"id": job_id, "owner": list(caller.owner), "spec": spec.to_dict(), "spec_id": spec.id,
                      "mode": mode or spec.mode, "namespace": spec.namespace, "created_at": time.time()}
            await self.store.create.remote(record, self.replica_id, self.settings.job_lease_s)
        except BaseException:
            self._release(caller.tenant)
            raise
        done = self._drive(record, spec)                 # releases the slot when the job ends
        if stream:                                       # the job first (its id), then its events
            intro = sse(public(await self.store.get.remote(job_id)), event="job")
            return ClosingStreamingResponse(self._event_stream(job_id, 0, cancel_on_disconnect=True, intro=intro),
                                            media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        if not wait:
            return JSONResponse(public(await self.store.get.remote(job_id)), status_code=202,
                                headers={"Location": f"/v1/jobs/{job_id}"})
        try:
            while not done.done():
                await asyncio.wait({done}, timeout=DISCONNECT_POLL_S)
                if not done.done() and await request.is_disconnected():
                    raise asyncio.CancelledError
            record = await self.store.get.remote(job_id)
            while record is not None and record["status"] not in FINISHED:   # driven elsewhere now: it ends there
                if await request.is_disconnected():
                    raise asyncio.CancelledError
                await asyncio.sleep(DISCONNECT_POLL_S)
                record = await self.store.get.remote(job_id)
        except asyncio.CancelledError:                   # the client went away: its job ends with it
            asyncio.ensure_future(self._cancel(job_id))
            raise
        if record is None:
            raise APIError(503, f"job_id: job {job_id!r} was lost: the job store restarted before saving it; submit "
                                "it again", param="job_id", error_type="server_error", code="job_lost")
        return job_response(record)

    async def read(self, request: Request, caller: Caller) -> Response:
        return JSONResponse(public(await self._readable(request, caller)))

    async def cancel(self, request: Request, caller: Caller) -> Response:
        record = await self._readable(request, caller)
        if record["status"] in ("succeeded", "failed"):
            raise APIError(409, f"job_id: job {record['id']!r} already {record['status']}; only a running job can "
                                "be cancelled", param="job_id", code="job_finished")
        return JSONResponse(public(await self._cancel(record["id"])))

    async def events(self, request: Request, caller: Caller) -> Response:
        record = await self._readable(request, caller)
        after = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
        if not (after.strip().isascii() and after.strip().isdigit()):
            raise APIError(400, f"Last-Event-ID: expected an event number, got {after[:40]!r}", param="Last-Event-ID")
        return ClosingStreamingResponse(self._event_stream(record["id"], int(after)), media_type="text/event-stream",
                                        headers={"Cache-Control": "no-cache"})

    # ---- reading and cancelling ---------------------------------------------------------------------------------
    async def _readable(self, request: Request, caller: Caller) -> dict[str, Any]:
        job_id = request.path_params["job_id"]
        record = await self.store.get.remote(job_id)
        if record is None or tuple(record["owner"]) != caller.owner:   # someone else's job does not exist for you
            raise APIError(404, f"job_id: no job {job_id!r} (jobs are visible only to the API key and "
                                "X-KVCOMM-Namespace that submitted them)", param="job_id", code="job_not_found")
        return record

    async def _cancel(self, job_id: str) -> dict[str, Any]:
        record = await self.store.cancel.remote(job_id)
        driver = self._drivers.get(job_id)
        if driver is not None:
            driver.cancel()                              # else its replica learns it from its next lease renewal
        return record

    async def _event_stream(self, job_id: str, after: int, cancel_on_disconnect: bool = False,
                            intro: bytes | None = None) -> AsyncIterator[bytes]:
        """`intro` (when given), the job's events numbered above `after` as they come (each with its ``id:``),
        then ``event: done`` with the job."""
        finished = False
        try:
            if intro is not None:
                yield intro
            while True:
                batch = await self.store.events.remote(job_id, after,
                                                       STREAM_LIVENESS_S if cancel_on_disconnect else EVENTS_POLL_S)
                if batch is None:
                    return
                for number, name, data in batch["events"]:
                    yield sse(data, event=name, event_id=number)
                    after = number
                if batch["done"]:
                    finished = True
                    yield sse(public(await self.store.get.remote(job_id)), event="done")
                    return
                if not batch["events"]:
                    yield b": keep-alive\n\n"
        finally:
            if cancel_on_disconnect and not finished:    # a streaming client that went away cancels its job
                asyncio.ensure_future(self._cancel(job_id))

    # ---- driving ------------------------------------------------------------------------------------------------
    def _drive(self, record: dict[str, Any], spec: JobSpec) -> asyncio.Future:
        """Run the job on a driver thread; publish its turns; record its end; give back its in-flight slot."""
        loop = asyncio.get_running_loop()
        job_id, mode, tenant = record["id"], record["mode"], record["owner"][0]
        events: asyncio.Queue[TurnEvent | RetryEvent | None] = asyncio.Queue()   # None: the job ended

        def on_turn(turn: TurnRecord) -> None:             # on the driver thread
            loop.call_soon_threadsafe(events.put_nowait, TurnEvent(job=job_id, turn=turn))

        def on_retry(reason: str) -> None:                 # one lost turn sent again
            loop.call_soon_threadsafe(events.put_nowait, RetryEvent(job=job_id, reason=reason))

        span = start_job_span(job_id, mode, spec.namespace, len(spec.agents))   # no-op unless Serve traces
        dag = DagJob(spec, mode, traced(self.calls, span), retries=self.settings.job_retries, on_turn=on_turn,
                     on_retry=on_retry)
        self._drivers[job_id] = dag

        async def publish() -> None:                       # one writer per job keeps its events in order
            while True:
                event = await events.get()
                if event is None:
                    return
                if isinstance(event, TurnEvent):
                    turn = event.turn
                    self.metrics.observe_turn(mode, turn.reason, turn.ttft_s, turn.reused,
                                              turn.prompt_tokens, len(turn.token_ids),
                                              reused_prompt_tokens(turn.prompt_tokens, turn.recomputed_tokens))
                await self.store.append.remote(job_id, self.replica_id, event.kind, event.to_dict())

        async def run() -> None:
            publisher = asyncio.ensure_future(publish())
            status, result, error = "failed", None, None
            try:
                result = await loop.run_in_executor(self._threads, dag.run)
                status = "succeeded"
            except JobCancelled:
                status = "cancelled"
            except BaseException as exc:  # noqa: BLE001 - the job's failure, reported as its error
                error = job_error(job_id, exc)
            finally:
                try:
                    events.put_nowait(None)
                    try:
                        await publisher
                    finally:               # the job's end is recorded even when an event could not be
                        if status != "cancelled":
                            await self.store.finish.remote(job_id, self.replica_id, status, result, error)
                    self.metrics.observe_job(mode, status)
                    end_job_span(span, status, result, error)
                finally:                   # never left renewing a lease for a job no one drives, nor its slot taken
                    self._drivers.pop(job_id, None)
                    self._release(tenant)

        return asyncio.ensure_future(run())

    def _release(self, tenant: str | None) -> None:
        self.slots.give_back(tenant)
        self.metrics.set_queue_length(self.slots.total)

    def start_maintenance(self) -> None:
        """Start the lease renewal and adoption loop (`_maintain`) unless it runs."""
        if self._maintainer is None or self._maintainer.done():
            self._maintainer = asyncio.ensure_future(self._maintain())

    async def _maintain(self) -> None:
        """Renew this replica's leases (stopping the jobs cancelled elsewhere) and adopt orphaned jobs."""
        lease = self.settings.job_lease_s
        while True:
            try:
                stop = await self.store.renew.remote(self.replica_id, list(self._drivers), lease)
                for job_id in stop:
                    driver = self._drivers.get(job_id)
                    if driver is not None:
                        driver.cancel()
                room = self.slots.limit - self.slots.total
                if room > 0:
                    for record in await self.store.claim_orphans.remote(self.replica_id, lease, min(room, 8)):
                        await self._adopt(record)
            except Exception as exc:  # noqa: BLE001 - the store restarting: try again next period
                log.warning("job store unavailable for lease renewal: %s", exc)
            await asyncio.sleep(RENEW_EVERY_S)

    async def _adopt(self, record: dict[str, Any]) -> None:
        """Drive an orphaned job this replica claimed; one whose stored spec no longer reads (a replica of another
        version wrote it) fails with its error, holding no slot."""
        log.warning("job %s: taken over from a replica that stopped answering", record["id"])
        try:
            spec = JobSpec.from_dict(record["spec"])
        except Exception as exc:  # noqa: BLE001 - reported as the job's error
            await self.store.finish.remote(record["id"], self.replica_id, "failed", None, job_error(record["id"], exc))
            return
        self.slots.take(record["owner"][0], force=True)
        self._drive(record, spec)

    # ---- validation ---------------------------------------------------------------------------------------------
    async def _job_spec(self, request: Request, caller: Caller, default_id: str) -> JobSpec:
        """The request's job (its ``id`` defaults to `default_id`), validated, within the job limits
        (`max_job_agents`, `max_job_turns`, `max_prompt_chars`, `max_output_tokens`) and the model's context;
        `APIError` 400 naming the field else."""
        settings = self.settings
        body = await read_json(request, settings.max_body_bytes)
        if not isinstance(body, dict):
            raise APIError(400, f"body: expected a JSON object (a job spec), got {type(body).__name__}", param="body")
        agents, edges = body.get("agents"), body.get("edges")
        if isinstance(agents, list) and len(agents) > settings.max_job_agents:   # before validating them all
            raise limit_error("agents", f"{len(agents)} agents", "max_job_agents", settings.max_job_agents)
        if isinstance(edges, list) and len(edges) > settings.max_job_agents ** 2:
            raise limit_error("edges", f"{len(edges)} edges", "max_job_agents, squared", settings.max_job_agents ** 2)
        job = dict(body)
        job.setdefault("id", default_id)
        job["namespace"] = caller.anchor_namespace(job.get("namespace"))
        try:
            spec = JobSpec.from_dict(job)
        except JobSpecError as exc:
            raise APIError(400, str(exc), param=exc.field or "body") from None
        except (TypeError, ValueError) as exc:
            raise APIError(400, f"body: {exc}", param="body") from None
        workers = len(spec.workers())
        turns = spec.rounds * workers + (spec.decision_agent is not None)
        if turns > settings.max_job_turns:
            raise limit_error("rounds" if spec.rounds > 1 else "agents",
                              f"{turns} turns ({spec.rounds} round(s) of {workers} agent(s)"
                              f"{' and the decision agent' if spec.decision_agent is not None else ''})",
                              "max_job_turns", settings.max_job_turns)
        if len(spec.task) > settings.max_prompt_chars:
            raise limit_error("task", f"{len(spec.task)} characters", "max_prompt_chars", settings.max_prompt_chars)
        for index, agent in enumerate(spec.agents):
            chars = (len(spec.task) + len(agent.system_prompt) + len(agent.assistant_prefix)
                     + max(len(agent.user_template), len(agent.first_round_template or "")))
            if chars > settings.max_prompt_chars:
                raise limit_error(f"agents[{index}]", f"a prompt of {chars} characters (task, system_prompt, "
                                                      "user_template, assistant_prefix)",
                                  "max_prompt_chars", settings.max_prompt_chars)
            generation = agent.generation
            field_path = f"agents[{index}].generation"
            if generation.max_new_tokens > settings.max_output_tokens:
                raise limit_error(f"{field_path}.max_new_tokens", f"{generation.max_new_tokens} new tokens",
                                  "max_output_tokens", settings.max_output_tokens)
            if generation.seed is not None and not INT64_MIN <= generation.seed <= INT64_MAX:
                raise APIError(400, f"{field_path}.seed: must be a 64-bit integer, got {generation.seed}",
                               param=f"{field_path}.seed")
        context = (await self.model_info())["context_length"]
        for index, agent in enumerate(spec.agents):
            if agent.generation.max_new_tokens >= context:
                field_path = f"agents[{index}].generation.max_new_tokens"
                raise APIError(400, f"{field_path}: {agent.generation.max_new_tokens} new tokens do not fit the "
                                    f"model's context of {context} tokens", param=field_path)
        return spec


# ---- the job as the client sees it ------------------------------------------------------------------------------
def public(record: dict[str, Any], with_result: bool = True) -> dict[str, Any]:
    """A stored job as the API shows it."""
    body: dict[str, Any] = {"id": record["id"], "object": "kvcomm.job", "job_id": record["spec_id"],
                            "status": record["status"], "mode": record["mode"], "namespace": record["namespace"],
                            "created_at": record["created_at"], "finished_at": record["finished_at"],
                            "turns_done": record["turns_done"], "attempts": record["attempts"],
                            "events": f"/v1/jobs/{record['id']}/events"}
    if with_result and record.get("result") is not None:
        body["result"] = record["result"]
    error = record.get("error")
    if error is not None:
        body["error"] = {"message": error["message"], "type": error["type"], "param": error["param"]}
    return body


def job_response(record: dict[str, Any]) -> Response:
    """A finished job: 200 with it, or its error's status and body (with the job's id and status)."""
    error = record.get("error")
    if error is not None:
        return APIError(error["status"], error["message"], param=error["param"], error_type=error["type"],
                        code=error.get("code")).response(extra={"id": record["id"], "status": record["status"]})
    return JSONResponse(public(record))


def job_error(job_id: str, exc: BaseException) -> dict[str, Any]:
    """What the client is told of a failed job (call inside the `except` block: a 500 logs the traceback)."""
    cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc
    if isinstance(cause, (JobSpecError, ContextLengthError, TemplateError, KVBudgetError)):
        # the job asks what no replica serves (a bad spec, a prompt over the model's or the memory plan's limit)
        error = APIError(400, f"{type(cause).__name__}: {cause}", param=getattr(cause, "field", None) or "job")
    elif isinstance(cause, WorkerLost):
        error = APIError(502, f"job: {cause}; the job's retries are used up (cluster.job_retries)")
    elif isinstance(cause, WorkersBusy):
        error = APIError(503, f"job: no worker replica took a turn for {BUSY_GIVE_UP_S:.0f} s ({cause})",
                         code="server_busy")
    else:
        error = APIError(500, internal_error_message(f"job {job_id}"))
    return {"status": error.status, "message": error.message, "type": error.error_type, "param": error.param,
            "code": error.code}


__all__ = ["JobService", "public", "job_response", "job_error", "FINISHED"]
