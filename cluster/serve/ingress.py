"""`KVCommIngress`: the HTTP ingress of the service (a stateless Ray Serve deployment; run as many as you like).

This module owns the route table and what every route shares (authentication, errors, metrics); what each route
does lives in `cluster.serve.jobs` (jobs) and `cluster.serve.chat` (chat completions). Routes:
``POST /v1/jobs`` (``?wait=true``, ``?stream=true``, ``?mode=``), ``GET /v1/jobs/{id}``,
``DELETE /v1/jobs/{id}``, ``GET /v1/jobs/{id}/events`` (SSE, ``Last-Event-ID``), ``POST /v1/chat/completions``
(OpenAI, streaming too), ``GET /v1/models[/{model}]``, ``GET /healthz``, ``GET /metrics``.

Auth: when API keys are configured (``serve.api_keys`` or the ``KVCOMM_API_KEY`` environment variable, comma
separated), every route but ``/healthz`` needs ``Authorization: Bearer <key>``; only SHA-256 digests of the keys
reach the ingress. Anchors are namespaced per key (a hash of it) and per ``X-KVCOMM-Namespace`` header (or the
job's own ``namespace``); a job is readable only with the key and namespace header it was submitted with. Bad
input is a 4xx whose message starts with the offending field, in OpenAI's error shape. Limits (each a
`ServeSettings` knob, named in the refusal) are in `cluster.serve.http` and the services.

Stateless: jobs live in the `JobStore` actor, the anchors in the pool actor. The first ingress replica to start
creates both (detached, outside any placement group: a Serve scale-down never takes them); later replicas and
restarts join them.
"""
# no `from __future__ import annotations`: FastAPI must see the routes' real annotations after Serve rebinds them

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from ray import serve
from ray.serve.exceptions import BackPressureError

from actors.anchor_pool_actor import get_or_create_pool_actor
from kvcomm.config import KVCommConfig

from ..driver import BUSY_GIVE_UP_S, busy_pauses
from .chat import ChatService
from .config import ServeAppConfig
from .http import APIError, Caller, InFlightSlots, api, authenticate, busy_error, internal_error_message
from .job_store import get_or_create_job_store
from .jobs import JobService
from .metrics import ServiceMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngressSettings:
    """What the ingress needs (built from `ServeAppConfig` by `from_config`, where the defaults live; API keys only
    as digests)."""
    served_model: str
    api_key_digests: tuple[bytes, ...]
    max_body_bytes: int
    max_jobs_kept: int
    max_in_flight: int
    max_in_flight_per_key: int | None
    retry_after_s: int
    max_prompt_chars: int
    max_output_tokens: int
    default_max_tokens: int            # chat completions without max_tokens
    chat_mode: str                     # chat completions without kvcomm.mode
    max_job_agents: int
    max_job_turns: int
    job_retries: int
    job_lease_s: float
    job_store_name: str
    job_store_snapshot_path: str | None
    job_store_snapshot_every_s: float
    pool: Any                          # actors.anchor_pool_actor.PoolSpec | None: the app's one anchor pool
    pool_call_timeout_s: float
    ray_namespace: str
    kvcomm: KVCommConfig

    @classmethod
    def from_config(cls, config: ServeAppConfig, api_key_digests: tuple[bytes, ...]) -> "IngressSettings":
        serve_settings, cluster = config.serve, config.cluster
        snapshot = serve_settings.job_store_snapshot_path
        return cls(served_model=config.model_name, api_key_digests=api_key_digests,
                   max_body_bytes=serve_settings.max_body_bytes, max_jobs_kept=serve_settings.max_jobs_kept,
                   max_in_flight=serve_settings.max_in_flight,
                   max_in_flight_per_key=serve_settings.max_in_flight_per_key,
                   retry_after_s=serve_settings.retry_after_s, max_prompt_chars=serve_settings.max_prompt_chars,
                   max_output_tokens=serve_settings.max_output_tokens,
                   default_max_tokens=serve_settings.default_max_tokens, chat_mode=serve_settings.chat_mode,
                   max_job_agents=serve_settings.max_job_agents, max_job_turns=serve_settings.max_job_turns,
                   job_retries=cluster.job_retries, job_lease_s=serve_settings.job_lease_s,
                   job_store_name=serve_settings.job_store_name,
                   job_store_snapshot_path=str(Path(snapshot).expanduser().resolve()) if snapshot else None,
                   job_store_snapshot_every_s=serve_settings.job_store_snapshot_every_s,
                   pool=cluster.pool_spec(detached=True), pool_call_timeout_s=cluster.pool_call_timeout_s,
                   ray_namespace=cluster.ray_namespace,
                   kvcomm=cluster.kvcomm_config())


@serve.ingress(api)   # at import, in every process: Serve binds the routes below to the replica's instance
class KVCommIngress:
    """The HTTP API (see the module docstring); its deployment options are applied in `cluster.serve.app`."""

    def __init__(self, workers: Any, settings: IngressSettings):
        try:
            replica_id = f"ingress-{serve.get_replica_context().replica_id.unique_id}"
        except Exception:  # noqa: BLE001 - outside Serve
            replica_id = f"ingress-{uuid.uuid4().hex[:8]}"
        self.replica_id = replica_id
        self._workers = workers
        self._settings = settings
        self._metrics = ServiceMetrics(export_to_ray=True)
        self._slots = InFlightSlots(settings.max_in_flight, settings.max_in_flight_per_key, settings.retry_after_s)
        self._model_info: dict[str, Any] | None = None
        self._model_info_lock = asyncio.Lock()
        self._started = int(time.time())
        self._pool = None
        if settings.pool is not None:   # outside this replica's placement group; the workers join the same spec
            self._pool, _ = get_or_create_pool_actor(settings.pool)
        self._store = get_or_create_job_store(settings.job_store_name, settings.ray_namespace,
                                              max_jobs_kept=settings.max_jobs_kept,
                                              snapshot_path=settings.job_store_snapshot_path,
                                              snapshot_every_s=settings.job_store_snapshot_every_s)
        self.jobs = JobService(replica_id, settings, workers, self._store, self._pool, self._metrics, self._slots,
                               self._worker_model)
        self.chats = ChatService(settings, workers, self._metrics, self._slots)

    async def check_health(self) -> None:
        """Serve's periodic health check; it also starts this replica's lease renewal and job adoption loop, so a
        replica that gets no request still takes over the jobs of a lost one."""
        self.jobs.start_maintenance()

    # ---- plumbing -----------------------------------------------------------------------------------------------
    async def _handle(self, route: str, request: Request, handler: Any, *, auth: bool = True) -> Response:
        """Authenticate, run the route, turn `APIError` into its response, count the response."""
        self.jobs.start_maintenance()
        try:
            caller = authenticate(request, self._settings.api_key_digests) if auth else Caller(None, None)
            response = await handler(request, caller)
        except APIError as exc:
            response = exc.response()
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a bug is a 500, never a dropped connection
            response = APIError(500, internal_error_message(route)).response()
        self._metrics.observe_response(route, response.status_code)
        return response

    async def _worker_model(self) -> dict[str, Any]:
        """The served model's facts, asked of a worker replica once (concurrent first callers share the call). A
        call Serve refuses for a full worker queue is asked again after a pause, as a job's turn is
        (`cluster.driver.busy_pauses`); past the last, a 503 with Retry-After."""
        deadline = time.monotonic() + BUSY_GIVE_UP_S       # from the caller's arrival, the wait for the lock too
        async with self._model_info_lock:
            pauses = busy_pauses()
            while self._model_info is None:
                try:
                    self._model_info = await self._workers.model_info.remote()
                except BackPressureError:
                    pause = next(pauses, None)
                    if pause is None or time.monotonic() >= deadline:
                        raise busy_error(f"model: every worker replica stayed busy for {BUSY_GIVE_UP_S:.0f} s",
                                         self._settings.retry_after_s) from None
                    await asyncio.sleep(pause)
        return self._model_info

    # ---- routes: health, models, metrics ------------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self, request: Request) -> Response:
        async def handler(_: Request, __: Caller) -> Response:
            return JSONResponse({"status": "ok", "model": self._settings.served_model, "replica": self.replica_id,
                                 "jobs_in_flight": self._slots.total, "max_in_flight": self._settings.max_in_flight})
        return await self._handle("/healthz", request, handler, auth=False)

    async def _model_card(self) -> dict[str, Any]:
        info = await self._worker_model()
        return {"id": self._settings.served_model, "object": "model", "created": self._started, "owned_by": "kvcomm",
                "root": info["source"], "max_model_len": info["context_length"]}

    @api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        async def handler(_: Request, __: Caller) -> Response:
            return JSONResponse({"object": "list", "data": [await self._model_card()]})
        return await self._handle("/v1/models", request, handler)

    @api.get("/v1/models/{model:path}")
    async def model(self, request: Request) -> Response:
        async def handler(req: Request, __: Caller) -> Response:
            name = req.path_params["model"]
            if name != self._settings.served_model:
                raise APIError(404, f"model: the model {name!r} does not exist; this server serves "
                                    f"{self._settings.served_model!r}", param="model", code="model_not_found")
            return JSONResponse(await self._model_card())
        return await self._handle("/v1/models/{model}", request, handler)

    @api.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        async def handler(_: Request, __: Caller) -> Response:
            await self._refresh_pool_metrics()
            return PlainTextResponse(self._metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
        return await self._handle("/metrics", request, handler)

    async def _refresh_pool_metrics(self) -> None:
        if self._pool is None:
            return
        try:
            stats = await asyncio.wait_for(self._pool.stats.remote(), timeout=2.0)
        except Exception as exc:  # noqa: BLE001 - a lost pool leaves the last values
            log.warning("anchor pool stats unavailable: %s", exc)
            return
        anchors = sum(entry["anchors"] for lists in stats.get("namespaces", {}).values() for entry in lists.values())
        self._metrics.set_pool(anchors, int(stats.get("total_bytes", 0)))

    # ---- routes: jobs (cluster.serve.jobs) ----------------------------------------------------------------------
    @api.post("/v1/jobs")
    async def create_job(self, request: Request) -> Response:
        return await self._handle("/v1/jobs", request, self.jobs.create)

    @api.get("/v1/jobs/{job_id}")
    async def get_job(self, request: Request) -> Response:
        return await self._handle("/v1/jobs/{id}", request, self.jobs.read)

    @api.delete("/v1/jobs/{job_id}")
    async def cancel_job(self, request: Request) -> Response:
        return await self._handle("DELETE /v1/jobs/{id}", request, self.jobs.cancel)

    @api.get("/v1/jobs/{job_id}/events")
    async def job_events(self, request: Request) -> Response:
        return await self._handle("/v1/jobs/{id}/events", request, self.jobs.events)

    # ---- routes: OpenAI chat (cluster.serve.chat) ---------------------------------------------------------------
    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._handle("/v1/chat/completions", request, self.chats.create)
