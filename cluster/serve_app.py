"""The Ray Serve application: an HTTP ingress in front of agent-worker replicas and the shared anchor pool.

This module owns the HTTP service and its configuration:

* `ServeSettings` / `ServeAppConfig`: the service's knobs (pydantic, one default each) next to the cluster's own
  `cluster.config.ClusterConfig`; `load_serve_config_file` reads a Ray Serve config file (``applications:`` with
  ``import_path: cluster.serve_app:app_builder`` and ``args: {cluster: ..., serve: ...}``) and validates it with
  Serve's own schema and these models.
* `AgentWorkerDeployment`: one model replica per Serve replica. It composes an `actors.agent_worker.AgentWorker`
  (model, engine, continuous-batching `TurnScheduler`, `RemoteAnchorPool`) and runs jobs through the oracle
  `kvcomm.job_runner.run_job` on the worker's scheduled engine view, streaming one event per finished turn; chat
  completions decode on the same model thread (`cluster.openai_api.ChatDecoder`). Resources: one placement-group
  bundle per replica (``{"CPU": k}`` or ``{"GPU": 1, "CPU": k}``) with the configured strategy; ``num_replicas``
  is the cluster's ``num_workers`` unless ``serve.autoscaling`` gives bounds. Every replica gets or creates the
  named `AnchorPoolActor` (detached: replicas come and go, the pool stays).
* `KVCommIngress`: the FastAPI ingress (one replica: it keeps the jobs it accepted in memory). Routes:
  ``POST /v1/jobs`` (``?wait=true``, ``?mode=``), ``GET /v1/jobs/{id}``, ``GET /v1/jobs/{id}/events`` (SSE),
  ``POST /v1/chat/completions`` (OpenAI, streaming too), ``GET /v1/models[/{model}]``, ``GET /healthz``,
  ``GET /metrics``.
  Auth: when API keys are configured (``serve.api_keys`` or the ``KVCOMM_API_KEY`` environment variable, comma
  separated), every route but ``/healthz`` needs ``Authorization: Bearer <key>``; only SHA-256 digests of the
  keys reach the ingress and they are compared with `hmac.compare_digest`. Anchors are namespaced per key (a hash
  of it) and per ``X-KVCOMM-Namespace`` header (or the job's own ``namespace``); a job's status, events and
  result are readable only with the key and namespace header it was submitted with. Bad input is a 4xx whose
  message starts with the offending field, in OpenAI's error shape.
  Limits (each a `ServeSettings` knob, named in the refusal): at most ``max_in_flight`` jobs and chats accepted
  and not finished, and at most ``max_in_flight_per_key`` of them per API key (beyond either: 429 with
  ``Retry-After``), ``max_jobs_kept`` finished jobs (the oldest finished are
  forgotten), ``max_body_bytes`` (413), ``max_prompt_chars``, ``max_output_tokens``, ``max_job_agents`` and
  ``max_job_turns`` (400).
* `build_app(config)` / `app_builder(args)` (for ``serve run``), and `run_server`, the body of ``kvcomm serve``
  (its command line is in `cluster.demo`, which imports this module only when a command runs).
"""
# no `from __future__ import annotations`: FastAPI must see the routes' real annotations after Serve rebinds them

import asyncio
import collections
import concurrent.futures
import functools
import hashlib
import hmac
import json
import logging
import math
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from actors.agent_worker import AgentWorker, WorkerSettings
from actors.anchor_pool_actor import get_or_create_pool_actor
from kvcomm.config import KVCommConfig
from kvcomm.engine import ContextLengthError
from kvcomm.harness.jobs import MODES, JobSpec, JobSpecError
from kvcomm.templates import TemplateError

from .config import ClusterConfig, describe_validation_error, read_yaml_mapping
from .metrics import ServiceMetrics
from .openai_api import (ChatCompletionRequest, ChatDecoder, ChatParams, ChatRequestError, chunk_body,
                         completion_body, new_completion_id, usage_body)
from .reaper import start_reaper, stop_reaper

log = logging.getLogger(__name__)

APP_IMPORT_PATH = "cluster.serve_app:app_builder"
API_KEY_ENV = "KVCOMM_API_KEY"
NAMESPACE_HEADER = "X-KVCOMM-Namespace"
_NAMESPACE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


# ------------------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------------------
class AutoscalingSettings(BaseModel):
    """Serve autoscaling bounds for the worker deployment (replaces a fixed ``num_workers``)."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0)   # jobs + chats in flight per replica before scaling up

    @model_validator(mode="after")
    def _ordered(self) -> "AutoscalingSettings":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self


class ServeSettings(BaseModel):
    """The HTTP service's knobs (the cluster's are `ClusterConfig`, the algorithm's `KVCommSettings`)."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    served_model_name: str | None = None     # the id in /v1/models and chat requests; None: the cluster's model
    api_keys: list[SecretStr] = Field(default_factory=list)   # plus KVCOMM_API_KEY; none: no auth
    max_body_bytes: int = Field(1 << 20, ge=1024)             # larger request bodies get 413
    default_max_tokens: int = Field(256, ge=1)                # chat completions without max_tokens
    max_jobs_kept: int = Field(1000, ge=1)                    # finished jobs whose results stay readable (the
                                                              # oldest finished are forgotten first)
    max_in_flight: int = Field(256, ge=1)                     # jobs + chats accepted and not finished; beyond: 429
    max_in_flight_per_key: int | None = Field(None, ge=1)     # the same per API key (None: no per-key cap)
    retry_after_s: int = Field(1, ge=1)                       # the Retry-After header of those 429s
    max_prompt_chars: int = Field(131072, ge=1)               # a chat's messages / one agent's prompt text: 400
    max_output_tokens: int = Field(4096, ge=1)                # chat max_tokens, an agent's max_new_tokens: 400
    max_job_agents: int = Field(32, ge=1)                     # agents of one job: 400 above
    max_job_turns: int = Field(128, ge=1)                     # turns of one job (rounds x agents): 400 above
    job_resubmits: int = Field(1, ge=0)                       # a job whose worker replica died runs again (on a
                                                              # live replica) up to this many times; then 502
    worker_max_ongoing_requests: int = Field(64, ge=1)        # jobs + chats one worker replica runs at once
    ingress_max_ongoing_requests: int = Field(1000, ge=1)
    autoscaling: AutoscalingSettings | None = None            # None: cluster.num_workers replicas

    @model_validator(mode="after")
    def _default_within_limit(self) -> "ServeSettings":
        if self.default_max_tokens > self.max_output_tokens:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) exceeds max_output_tokens "
                             f"({self.max_output_tokens})")
        return self


class ServeAppConfig(BaseModel):
    """The ``args`` of one Serve application: ``cluster`` (ClusterConfig) and ``serve`` (ServeSettings)."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    serve: ServeSettings = Field(default_factory=ServeSettings)

    @classmethod
    def from_args(cls, args: Any, source: str = "application args") -> "ServeAppConfig":
        """Validate ``args``; errors name the field (``cluster.num_workers: ...``)."""
        if isinstance(args, ServeAppConfig):
            return args
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise ValueError(f"{source}: expected a mapping with 'cluster' and 'serve', got {type(args).__name__}")
        try:
            return cls.model_validate(args)
        except ValidationError as exc:
            raise ValueError(f"{source}: {describe_validation_error(exc)}") from None

    @property
    def model_name(self) -> str:
        return self.serve.served_model_name or self.cluster.model


@dataclass(frozen=True)
class ServeApplication:
    """One application of a Serve config file that this module builds."""
    name: str
    route_prefix: str
    config: ServeAppConfig


@dataclass(frozen=True)
class ServeConfigFile:
    host: str
    port: int
    applications: list[ServeApplication]
    raw: dict[str, Any]


def load_serve_config_file(path: str | Path) -> ServeConfigFile:
    """Read a Serve config file, validate it with Serve's `ServeDeploySchema` and each of this module's
    applications' ``args`` with `ServeAppConfig`. Errors name the file and the field."""
    from ray.serve.schema import ServeDeploySchema
    raw = read_yaml_mapping(path, "serve config", "a mapping (a Ray Serve config file)")
    try:
        schema = ServeDeploySchema.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(f"serve config {path}: {describe_validation_error(exc)}") from None
    apps = []
    for index, app in enumerate(schema.applications):
        if app.import_path != APP_IMPORT_PATH:
            continue
        config = ServeAppConfig.from_args(app.args, f"serve config {path}: applications[{index}].args")
        apps.append(ServeApplication(app.name, app.route_prefix or "/", config))
    if not apps:
        raise ValueError(f"serve config {path}: no application with import_path {APP_IMPORT_PATH!r}")
    http = schema.http_options
    return ServeConfigFile(host=http.host or "127.0.0.1", port=int(http.port or 8000), applications=apps, raw=raw)


def api_key_digests(settings: ServeSettings, environ: dict[str, str] | None = None) -> tuple[bytes, ...]:
    """SHA-256 digests of the configured keys and those in KVCOMM_API_KEY (comma separated); the keys themselves
    go no further than this function."""
    environ = os.environ if environ is None else environ
    keys = [k.get_secret_value() for k in settings.api_keys]
    keys += [k.strip() for k in environ.get(API_KEY_ENV, "").split(",") if k.strip()]
    return tuple(hashlib.sha256(k.encode()).digest() for k in dict.fromkeys(keys))


# ------------------------------------------------------------------------------------------------------------
# The worker deployment
# ------------------------------------------------------------------------------------------------------------
class AgentWorkerDeployment:
    """One model replica: an `AgentWorker` (composed) serving jobs (streamed turn by turn) and chat completions."""

    def __init__(self, settings: WorkerSettings, default_max_tokens: int):
        try:
            worker_id = f"replica-{serve.get_replica_context().replica_id.unique_id}"
        except Exception:  # noqa: BLE001 - outside Serve (direct construction)
            worker_id = f"replica-{uuid.uuid4().hex[:8]}"
        if settings.pool_actor_name is not None:
            get_or_create_pool_actor(settings.kvcomm, name=settings.pool_actor_name, namespace=settings.ray_namespace,
                                     detached=True, max_restarts=-1, snapshot=settings.pool_snapshot)
        self.worker_id = worker_id
        self.worker = AgentWorker(settings, worker_id)
        self.chats = ChatDecoder(self.worker.scheduler, self.worker.engine, settings.max_batch_size,
                                 default_max_tokens)
        self._job_threads = concurrent.futures.ThreadPoolExecutor(
            max_workers=settings.max_queued_turns, thread_name_prefix=f"kvcomm-serve-job-{worker_id}")

    async def run_job_events(self, job: dict[str, Any], mode: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """Run a job; yield ``{"event": "turn", "turn": ...}`` per finished turn, then ``{"event": "result"}`` or
        ``{"event": "error", "status": 4xx/5xx, "message": ...}``."""
        from kvcomm.job_runner import run_job
        try:
            spec = JobSpec.from_dict(job)
        except JobSpecError as exc:
            yield {"event": "error", "status": 400, "param": exc.field, "message": str(exc)}
            return
        loop = asyncio.get_running_loop()
        turns: asyncio.Queue = asyncio.Queue()

        def on_turn(record: Any) -> None:       # on the job thread
            loop.call_soon_threadsafe(turns.put_nowait, record.to_dict())

        running = loop.run_in_executor(self._job_threads,
                                       functools.partial(run_job, self.worker.view, spec, mode=mode or spec.mode,
                                                         on_turn=on_turn))
        while True:
            getter = asyncio.ensure_future(turns.get())
            await asyncio.wait({getter, running}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield {"event": "turn", "turn": getter.result(), "worker": self.worker_id}
                continue
            getter.cancel()
            break
        while not turns.empty():                  # turns reported just before the job ended
            yield {"event": "turn", "turn": turns.get_nowait(), "worker": self.worker_id}
        try:
            result = running.result()
        except (JobSpecError, ContextLengthError, TemplateError) as exc:
            yield {"event": "error", "status": 400, "param": getattr(exc, "field", None) or "job",
                   "message": f"{type(exc).__name__}: {exc}"}
            return
        except Exception:  # noqa: BLE001 - reported to the client as the job's error
            yield {"event": "error", "status": 500, "param": None,
                   "message": internal_error_message(f"job {spec.id}")}
            return
        out = result.to_dict()
        out["worker"] = self.worker_id
        yield {"event": "result", "result": out}

    async def chat(self, params: ChatParams) -> AsyncIterator[dict[str, Any]]:
        """One chat completion: ``{"event": "start", "prompt_tokens"}`` (or an error event), ``delta`` events, and
        a final ``done`` event with the finish reason and token counts."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        admitted, sequence = self.chats.start(params, lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        try:
            try:
                prompt_tokens = await asyncio.wrap_future(admitted)
            except ChatRequestError as exc:
                yield {"event": "error", "status": 400, "param": exc.param, "message": str(exc)}
                return
            yield {"event": "start", "prompt_tokens": prompt_tokens, "worker": self.worker_id}
            while True:
                event = await events.get()
                yield event
                if event["event"] == "done":
                    return
        finally:
            if not sequence.finished:
                self.chats.cancel(sequence)

    async def model_info(self) -> dict[str, Any]:
        spec = self.worker.engine.spec
        return {"source": self.worker.model_source, "context_length": int(spec.max_position_embeddings),
                "vocab_size": int(spec.vocab_size), "worker": self.worker_id}

    async def load(self) -> dict[str, Any]:
        """The worker's queued and decoding turns and running jobs, plus the chats it is decoding."""
        load = await self.worker.load()
        load["chats"] = self.chats.running
        return load

    async def stats(self) -> dict[str, Any]:
        return await self.worker.stats()

    async def check_health(self) -> None:
        await self.worker.ping()


# ------------------------------------------------------------------------------------------------------------
# The ingress
# ------------------------------------------------------------------------------------------------------------
api = FastAPI(title="KVCOMM on Ray", description="Multi-agent jobs with KV-cache reuse, and an OpenAI-compatible "
                                                 "chat API, on Ray Serve.", docs_url=None, redoc_url=None)


def internal_error_message(what: str) -> str:
    """Log the exception being handled (traceback included) under a fresh error id; return what the client is
    told: the id, never the exception's text (it may hold paths, prompts or another tenant's data)."""
    error_id = uuid.uuid4().hex[:12]
    log.exception("%s failed (error id %s)", what, error_id)
    return f"internal error (error id {error_id}); the server log has the details"


class APIError(Exception):
    """An error response: HTTP status, a message starting with the offending field, OpenAI's ``param``."""

    def __init__(self, status: int, message: str, param: str | None = None, error_type: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.error_type = error_type or ("invalid_request_error" if status < 500 else "server_error")

    def response(self, extra: dict[str, Any] | None = None) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}
        body.update(extra or {})
        return JSONResponse(body, status_code=self.status, headers=self.headers)


@dataclass(frozen=True)
class IngressSettings:
    """What the ingress needs (built from `ServeAppConfig` by `from_config`, where the defaults live in
    `ServeSettings`; API keys only as digests)."""
    served_model: str
    api_key_digests: tuple[bytes, ...]
    max_body_bytes: int
    max_jobs_kept: int
    pool_actor_name: str | None
    ray_namespace: str
    kvcomm: KVCommConfig
    max_in_flight: int
    retry_after_s: int
    max_prompt_chars: int
    max_output_tokens: int
    max_job_agents: int
    max_job_turns: int
    job_resubmits: int = 1
    max_in_flight_per_key: int | None = None

    @classmethod
    def from_config(cls, config: ServeAppConfig, api_key_digests: tuple[bytes, ...]) -> "IngressSettings":
        serve_settings, cluster = config.serve, config.cluster
        return cls(served_model=config.model_name, api_key_digests=api_key_digests,
                   max_body_bytes=serve_settings.max_body_bytes, max_jobs_kept=serve_settings.max_jobs_kept,
                   pool_actor_name=cluster.pool_actor_name, ray_namespace=cluster.ray_namespace,
                   kvcomm=cluster.kvcomm.to_kvcomm(), max_in_flight=serve_settings.max_in_flight,
                   retry_after_s=serve_settings.retry_after_s, max_prompt_chars=serve_settings.max_prompt_chars,
                   max_output_tokens=serve_settings.max_output_tokens,
                   max_job_agents=serve_settings.max_job_agents, max_job_turns=serve_settings.max_job_turns,
                   job_resubmits=serve_settings.job_resubmits,
                   max_in_flight_per_key=serve_settings.max_in_flight_per_key)


@dataclass(frozen=True)
class Caller:
    """Who is calling: the tenant (a hash of the API key; None without auth) and the namespace header."""
    tenant: str | None
    namespace_header: str | None

    def anchor_namespace(self, requested: Any) -> Any:
        """The anchor namespace of a job: the header, else the job's own, per tenant."""
        name = self.namespace_header or (requested if requested is not None else "default")
        if self.tenant is None or not isinstance(name, str):
            return name                      # a non-string is reported by JobSpec as `namespace`
        return f"{self.tenant}.{name}"

    @property
    def owner(self) -> tuple[str | None, str | None]:
        return (self.tenant, self.namespace_header)


@dataclass
class JobRecord:
    """A job the ingress accepted: its status, its events so far, and its result or error."""
    id: str
    owner: tuple[str | None, str | None]
    spec_id: str
    mode: str
    namespace: str
    created_at: float = field(default_factory=time.time)
    status: str = "queued"                # queued | running | succeeded | failed
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    result: dict[str, Any] | None = None
    error: APIError | None = None
    finished_at: float | None = None
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    task: asyncio.Task | None = None

    @property
    def done(self) -> bool:
        return self.status in ("succeeded", "failed")

    async def publish(self, event: str, data: dict[str, Any]) -> None:
        async with self.changed:
            self.events.append((event, data))
            self.changed.notify_all()

    async def finish(self, result: dict[str, Any] | None, error: APIError | None) -> None:
        async with self.changed:
            self.result, self.error = result, error
            self.status = "succeeded" if error is None else "failed"
            self.finished_at = time.time()
            self.changed.notify_all()

    def public(self, with_result: bool = True) -> dict[str, Any]:
        body: dict[str, Any] = {"id": self.id, "object": "kvcomm.job", "job_id": self.spec_id, "status": self.status,
                                "mode": self.mode, "namespace": self.namespace, "created_at": self.created_at,
                                "finished_at": self.finished_at,
                                "turns_done": self.turns_done,
                                "events": f"/v1/jobs/{self.id}/events"}
        if with_result and self.result is not None:
            body["result"] = self.result
        if self.error is not None:
            body["error"] = {"message": self.error.message, "type": self.error.error_type, "param": self.error.param}
        return body

    @property
    def turns_done(self) -> int:
        """Turns finished by the job's current run (a ``retry`` event starts it again)."""
        done = 0
        for name, _ in self.events:
            done = 0 if name == "retry" else done + (name == "turn")
        return done

    def final_event(self) -> dict[str, Any]:
        return self.public(with_result=True)


def _first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message, first line, cut to `limit` characters ("" for an empty message)."""
    return (str(exc).splitlines() or [""])[0][:limit]


def _sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"{head}data: {payload}\n\n".encode()


def _query_flag(request: Request, name: str) -> bool:
    value = request.query_params.get(name)
    if value is None:
        return False
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on", ""):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise APIError(400, f"{name}: expected true or false, got {value!r}", param=name)


def _loc(loc: tuple[Any, ...]) -> str:
    """A pydantic error location as a field path: ``messages[0].role``."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in ("str", "list[TextPart]", "literal['text']") or str(part).startswith(("function-", "list[")):
            continue                   # union-branch names, not fields
        else:
            path += f".{part}" if path else str(part)
    return path or "body"


_INT64_MIN, _INT64_MAX = -(2 ** 63), 2 ** 63 - 1


def _limit_error(param: str, what: str, knob: str, limit: int | str) -> "APIError":
    """400 for a request beyond one of the service's limits: names the field, the limit and its knob."""
    return APIError(400, f"{param}: {what}, over the limit of {limit} (serve.{knob})", param=param,
                    code="limit_exceeded")


MAX_JSON_DEPTH = 64     # nesting of arrays and objects in a request body (deeper: 400; no spec needs more than 5)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _check_json_value(value: Any) -> None:
    """Raise ValueError for nesting beyond MAX_JSON_DEPTH or a string (or key) that is not valid Unicode (an
    unpaired surrogate from a ``\\ud800`` escape): such values would fail deep inside a worker instead."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                item.encode("utf-8")             # UnicodeEncodeError (a ValueError) on a lone surrogate
            continue
        if not isinstance(item, (dict, list)):
            continue
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, dict):
            stack.extend((key, depth) for key in item)
            stack.extend((child, depth + 1) for child in item.values())
        else:
            stack.extend((child, depth + 1) for child in item)


def parse_json_body(body: bytes) -> Any:
    """A request body as JSON, or `APIError` 400 (``body``): malformed JSON with line and column, NaN and
    Infinity (not JSON), numbers out of range, integers of more than 4300 digits, nesting deeper than
    MAX_JSON_DEPTH, unpaired surrogates."""
    if not body.strip():
        raise APIError(400, "body: empty; expected a JSON object", param="body")
    try:
        value = json.loads(body, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise APIError(400, f"body: invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})",
                       param="body") from None
    except UnicodeDecodeError:
        raise APIError(400, "body: invalid JSON (not UTF-8)", param="body") from None
    except RecursionError:
        raise APIError(400, f"body: invalid JSON (nested deeper than {MAX_JSON_DEPTH} levels)", param="body") from None
    except ValueError as exc:                    # NaN, 1e999, an integer of more than 4300 digits
        raise APIError(400, f"body: invalid JSON ({str(exc)[:200]})", param="body") from None
    try:
        _check_json_value(value)
    except ValueError as exc:
        reason = "a string is not valid Unicode (unpaired surrogate)" if isinstance(exc, UnicodeError) else str(exc)
        raise APIError(400, f"body: invalid JSON ({reason})", param="body") from None
    return value


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """Unknown routes (404) and methods (405) in the same OpenAI error shape as every other error."""
    if exc.status_code == 404:
        message = f"path: no route {request.method} {request.url.path[:200]}"
    elif exc.status_code == 405:
        message = f"method: {request.method} is not allowed on {request.url.path[:200]}"
    else:
        message = str(exc.detail)
    return APIError(exc.status_code, message, param="method" if exc.status_code == 405 else "path",
                    code="not_found" if exc.status_code == 404 else None,
                    headers=dict(exc.headers or {})).response()


class InFlightSlots:
    """Jobs and chats accepted and not finished: at most `limit` in all and `per_key` per tenant (API key
    digest; requests without auth share the global limit only). `take` refuses with 429 + Retry-After, naming the
    knob; whoever ends the work calls `give_back` once. Used from the ingress's event loop only (no awaits
    between check and take, so two requests cannot both take the last slot)."""

    def __init__(self, limit: int, per_key: int | None, retry_after_s: int):
        self.limit, self.per_key, self.retry_after_s = limit, per_key, retry_after_s
        self.total = 0
        self._by_tenant: collections.Counter[str] = collections.Counter()

    def of(self, tenant: str | None) -> int:
        return self._by_tenant[tenant] if tenant is not None else self.total

    def take(self, tenant: str | None) -> None:
        retry = self.retry_after_s
        headers = {"Retry-After": str(retry)}
        if self.total >= self.limit:
            raise APIError(429, f"server busy: {self.total} jobs and chat completions are in flight, the limit "
                                f"(serve.max_in_flight = {self.limit}); retry after {retry} s",
                           error_type="rate_limit_error", code="server_busy", headers=headers)
        if tenant is not None and self.per_key is not None and self._by_tenant[tenant] >= self.per_key:
            raise APIError(429, f"too many requests for this API key: {self._by_tenant[tenant]} jobs and chat "
                                f"completions in flight, the per-key limit (serve.max_in_flight_per_key = "
                                f"{self.per_key}); retry after {retry} s",
                           error_type="rate_limit_error", code="key_busy", headers=headers)
        self.total += 1
        if tenant is not None:
            self._by_tenant[tenant] += 1

    def give_back(self, tenant: str | None) -> None:
        self.total -= 1
        if tenant is not None:
            self._by_tenant[tenant] -= 1
            if not self._by_tenant[tenant]:
                del self._by_tenant[tenant]


@serve.ingress(api)   # at import, in every process: Serve binds the routes below to the replica's instance
class KVCommIngress:
    """The HTTP API (see the module docstring); its deployment options are applied in `build_app`."""

    def __init__(self, workers: Any, settings: IngressSettings):
        self._workers = workers
        self._settings = settings
        self._metrics = ServiceMetrics(export_to_ray=True)
        self._jobs: dict[str, JobRecord] = {}                   # every job accepted and not yet forgotten
        self._finished: collections.OrderedDict[str, None] = collections.OrderedDict()   # finished, in order
        self._slots = InFlightSlots(settings.max_in_flight, settings.max_in_flight_per_key, settings.retry_after_s)
        self._model_info: dict[str, Any] | None = None
        self._started = int(time.time())
        self._pool = None
        if settings.pool_actor_name is not None:
            self._pool, _ = get_or_create_pool_actor(settings.kvcomm, name=settings.pool_actor_name,
                                                     namespace=settings.ray_namespace, detached=True, max_restarts=-1)

    # ---- plumbing -----------------------------------------------------------------------------------------------
    async def _handle(self, route: str, request: Request, handler: Any, *, authenticate: bool = True) -> Response:
        """Authenticate, run the route, turn `APIError` into its response, count the response."""
        try:
            caller = self._authenticate(request) if authenticate else Caller(None, None)
            response = await handler(request, caller)
        except APIError as exc:
            response = exc.response()
        except Exception:  # noqa: BLE001 - a bug is a 500, never a dropped connection
            response = APIError(500, internal_error_message(route)).response()
        self._metrics.observe_response(route, response.status_code)
        return response

    def _authenticate(self, request: Request) -> Caller:
        digests = self._settings.api_key_digests
        tenant = None
        if digests:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                raise APIError(401, "Authorization: missing API key; send 'Authorization: Bearer <key>'",
                               param="Authorization", error_type="authentication_error", code="invalid_api_key",
                               headers={"WWW-Authenticate": "Bearer"})
            presented = hashlib.sha256(token.encode()).digest()
            matched = None
            for known in digests:            # every key compared: the time taken does not tell which matched
                if hmac.compare_digest(presented, known):
                    matched = known
            if matched is None:
                raise APIError(401, "Authorization: invalid API key", param="Authorization",
                               error_type="authentication_error", code="invalid_api_key",
                               headers={"WWW-Authenticate": "Bearer"})
            tenant = "k" + matched.hex()[:16]
        header = request.headers.get(NAMESPACE_HEADER)
        if header is not None and not _NAMESPACE_PATTERN.fullmatch(header):
            raise APIError(400, f"{NAMESPACE_HEADER}: must be 1-64 characters of letters, digits and . _ : - "
                                f"(starting with a letter or digit), got {header[:80]!r}", param=NAMESPACE_HEADER)
        return Caller(tenant, header)

    async def _read_json(self, request: Request) -> Any:
        limit = self._settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"body: {declared} bytes exceed the limit of {limit} bytes (serve.max_body_bytes)",
                           param="body", code="body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"body: more than {limit} bytes (serve.max_body_bytes)", param="body",
                               code="body_too_large")
            chunks.append(chunk)
        return parse_json_body(b"".join(chunks))

    async def _worker_model(self) -> dict[str, Any]:
        if self._model_info is None:
            self._model_info = await self._workers.model_info.remote()
        return self._model_info

    def _reserve(self, tenant: str | None) -> None:
        """Take an in-flight slot for a job or chat (`_release`d by whoever ends it), or refuse with 429."""
        self._slots.take(tenant)
        self._metrics.set_queue_length(self._slots.total)

    def _release(self, tenant: str | None) -> None:
        self._slots.give_back(tenant)
        self._metrics.set_queue_length(self._slots.total)

    # ---- routes: health, models, metrics ------------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self, request: Request) -> Response:
        async def handler(_: Request, __: Caller) -> Response:
            return JSONResponse({"status": "ok", "model": self._settings.served_model, "jobs_in_flight": self._slots.total,
                                 "max_in_flight": self._settings.max_in_flight})
        return await self._handle("/healthz", request, handler, authenticate=False)

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

    # ---- routes: jobs -------------------------------------------------------------------------------------------
    @api.post("/v1/jobs")
    async def create_job(self, request: Request) -> Response:
        return await self._handle("/v1/jobs", request, self._create_job)

    async def _create_job(self, request: Request, caller: Caller) -> Response:
        wait = _query_flag(request, "wait")
        mode = request.query_params.get("mode")
        if mode is not None and mode not in MODES:
            raise APIError(400, f"mode: unknown mode {mode!r}; valid modes: {', '.join(MODES)}", param="mode")
        self._reserve(caller.tenant)             # before the body is read: a busy server answers at once
        try:
            record_id = f"job-{uuid.uuid4().hex[:16]}"
            spec = await self._job_spec(request, caller, record_id)
            record = JobRecord(record_id, caller.owner, spec.id, mode or spec.mode, spec.namespace)
            self._jobs[record.id] = record
        except BaseException:
            self._release(caller.tenant)
            raise
        record.task = asyncio.ensure_future(self._run_job(record, spec.to_dict(), record.mode))   # it releases
        if not wait:
            return JSONResponse(record.public(), status_code=202, headers={"Location": f"/v1/jobs/{record.id}"})
        await asyncio.shield(record.task)
        return self._job_response(record)

    async def _job_spec(self, request: Request, caller: Caller, default_id: str) -> JobSpec:
        """The request's job (its ``id`` defaults to `default_id`), validated, within the job limits (`max_job_agents`, `max_job_turns`,
        `max_prompt_chars`, `max_output_tokens`) and the model's context; `APIError` 400 naming the field else."""
        settings = self._settings
        body = await self._read_json(request)
        if not isinstance(body, dict):
            raise APIError(400, f"body: expected a JSON object (a job spec), got {type(body).__name__}", param="body")
        agents, edges = body.get("agents"), body.get("edges")
        if isinstance(agents, list) and len(agents) > settings.max_job_agents:   # before validating them all
            raise _limit_error("agents", f"{len(agents)} agents", "max_job_agents", settings.max_job_agents)
        if isinstance(edges, list) and len(edges) > settings.max_job_agents ** 2:
            raise _limit_error("edges", f"{len(edges)} edges", "max_job_agents, squared",
                               settings.max_job_agents ** 2)
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
            raise _limit_error("rounds" if spec.rounds > 1 else "agents",
                               f"{turns} turns ({spec.rounds} round(s) of {workers} agent(s)"
                               f"{' and the decision agent' if spec.decision_agent is not None else ''})",
                               "max_job_turns", settings.max_job_turns)
        if len(spec.task) > settings.max_prompt_chars:
            raise _limit_error("task", f"{len(spec.task)} characters", "max_prompt_chars", settings.max_prompt_chars)
        for index, agent in enumerate(spec.agents):
            chars = (len(spec.task) + len(agent.system_prompt) + len(agent.assistant_prefix)
                     + max(len(agent.user_template), len(agent.first_round_template or "")))
            if chars > settings.max_prompt_chars:
                raise _limit_error(f"agents[{index}]", f"a prompt of {chars} characters (task, system_prompt, "
                                                       "user_template, assistant_prefix)",
                                   "max_prompt_chars", settings.max_prompt_chars)
            generation = agent.generation
            field_path = f"agents[{index}].generation"
            if generation.max_new_tokens > settings.max_output_tokens:
                raise _limit_error(f"{field_path}.max_new_tokens", f"{generation.max_new_tokens} new tokens",
                                   "max_output_tokens", settings.max_output_tokens)
            if not _INT64_MIN <= generation.seed <= _INT64_MAX:
                raise APIError(400, f"{field_path}.seed: must be a 64-bit integer, got {generation.seed}",
                               param=f"{field_path}.seed")
        context = (await self._worker_model())["context_length"]
        for index, agent in enumerate(spec.agents):
            if agent.generation.max_new_tokens >= context:
                field_path = f"agents[{index}].generation.max_new_tokens"
                raise APIError(400, f"{field_path}: {agent.generation.max_new_tokens} new tokens do not fit the "
                                    f"model's context of {context} tokens", param=field_path)
        return spec

    def _forget_old_jobs(self, record: JobRecord) -> None:
        """`record` just finished: keep it readable, forgetting the oldest finished jobs beyond `max_jobs_kept`
        (jobs still running are bounded by `max_in_flight`)."""
        self._finished[record.id] = None
        while len(self._finished) > self._settings.max_jobs_kept:
            oldest, _ = self._finished.popitem(last=False)
            self._jobs.pop(oldest, None)

    def _job_response(self, record: JobRecord) -> Response:
        if record.error is not None:
            return record.error.response(extra={"id": record.id, "status": record.status})
        return JSONResponse(record.public())

    async def _run_job(self, record: JobRecord, job: dict[str, Any], mode: str) -> None:
        """Run the job on a worker replica, publishing its turns; a replica that dies mid-job (its actor lost)
        costs a rerun from the start on a live replica (Serve's router picks one; a restarted one is waited for),
        announced by a ``retry`` event, up to `job_resubmits` times; then, or on any other failure, 502."""
        from ray.exceptions import ActorUnavailableError, RayActorError
        record.status = "running"
        result, error = None, None
        try:
            for attempt in range(self._settings.job_resubmits + 1):
                try:
                    result, error = await self._run_job_once(record, job, mode)
                    break
                except (RayActorError, ActorUnavailableError) as exc:
                    if attempt == self._settings.job_resubmits:
                        raise
                    reason = f"{type(exc).__name__}: {_first_line(exc)}"
                    log.warning("job %s: its worker replica was lost (%s); running it again on a live replica",
                                record.id, reason)
                    await record.publish("retry", {"job": record.id, "attempt": attempt + 2,
                                                   "reason": f"worker replica lost: {reason}"})
        except Exception as exc:  # noqa: BLE001 - a lost worker fails this job, not the server
            log.warning("job %s: worker call failed: %s", record.id, exc)
            error = APIError(502, f"job: worker failed: {type(exc).__name__}: {_first_line(exc)}")
        finally:
            await record.finish(result, error)
            self._forget_old_jobs(record)
            self._metrics.observe_job(mode, record.status)
            self._release(record.owner[0])        # the slot `_create_job` reserved

    async def _run_job_once(self, record: JobRecord, job: dict[str, Any],
                            mode: str) -> tuple[dict[str, Any] | None, "APIError | None"]:
        """One run of the job on a worker replica: (result, None) or (None, the error the worker reported)."""
        result, error = None, None
        stream = self._workers.options(stream=True).run_job_events.remote(job, mode)
        async for event in stream:
            kind = event["event"]
            if kind == "turn":
                turn = event["turn"]
                self._metrics.observe_turn(mode, turn["reason"], turn["ttft_s"], turn["reused"],
                                           turn["prompt_tokens"], len(turn["token_ids"]))
                await record.publish("turn", {**turn, "job": record.id, "worker": event["worker"]})
            elif kind == "result":
                result = event["result"]
            elif kind == "error":
                error = APIError(event["status"], event["message"], param=event.get("param"))
        if result is None and error is None:
            error = APIError(502, "job: the worker ended without a result")
        return result, error

    def _readable_job(self, request: Request, caller: Caller) -> JobRecord:
        job_id = request.path_params["job_id"]
        record = self._jobs.get(job_id)
        if record is None or record.owner != caller.owner:      # someone else's job does not exist for you
            raise APIError(404, f"job_id: no job {job_id!r} (jobs are visible only to the API key and "
                                f"{NAMESPACE_HEADER} that submitted them)", param="job_id", code="job_not_found")
        return record

    @api.get("/v1/jobs/{job_id}")
    async def get_job(self, request: Request) -> Response:
        async def handler(req: Request, caller: Caller) -> Response:
            return JSONResponse(self._readable_job(req, caller).public())
        return await self._handle("/v1/jobs/{id}", request, handler)

    @api.get("/v1/jobs/{job_id}/events")
    async def job_events(self, request: Request) -> Response:
        async def handler(req: Request, caller: Caller) -> Response:
            record = self._readable_job(req, caller)
            return StreamingResponse(self._job_event_stream(record), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await self._handle("/v1/jobs/{id}/events", request, handler)

    async def _job_event_stream(self, record: JobRecord) -> AsyncIterator[bytes]:
        """Every turn event so far and as they come (``event: turn``), then ``event: done`` with the job."""
        sent = 0
        while True:
            async with record.changed:
                while sent >= len(record.events) and not record.done:
                    await record.changed.wait()
                pending = record.events[sent:]
                sent += len(pending)
                finished = record.done and sent >= len(record.events)
            for name, data in pending:
                yield _sse(data, event=name)
            if finished:
                yield _sse(record.final_event(), event="done")
                return

    # ---- routes: OpenAI chat ------------------------------------------------------------------------------------
    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._handle("/v1/chat/completions", request, self._chat)

    async def _chat(self, request: Request, caller: Caller) -> Response:
        self._reserve(caller.tenant)             # before the body is read: a busy server answers at once
        handed_off = False                       # the streaming response releases the slot itself
        try:
            body = await self._read_json(request)
            if not isinstance(body, dict):
                raise APIError(400, f"body: expected a JSON object, got {type(body).__name__}", param="body")
            try:
                chat = ChatCompletionRequest.model_validate(body)
            except ValidationError as exc:
                first = exc.errors()[0]
                param = _loc(first["loc"])
                more = (f" (and {len(exc.errors()) - 1} more problems: {describe_validation_error(exc)})"
                        if len(exc.errors()) > 1 else "")
                raise APIError(400, f"{param}: {first['msg']}{more}", param=param) from None
            try:
                chat.check_limits(self._settings.max_prompt_chars, self._settings.max_output_tokens)
            except ChatRequestError as exc:
                raise APIError(400, str(exc), param=exc.param, code="limit_exceeded") from None
            if chat.model != self._settings.served_model:
                raise APIError(404, f"model: the model {chat.model!r} does not exist; this server serves "
                                    f"{self._settings.served_model!r}", param="model", code="model_not_found")
            stream = self._workers.options(stream=True).chat.remote(chat.params())
            try:
                first = await stream.__anext__()
                if first["event"] == "error":
                    raise APIError(first["status"], first["message"], param=first.get("param"))
            except BaseException:
                stream.cancel()
                raise
            completion_id, created = new_completion_id(), int(time.time())
            if chat.stream:
                include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
                chunks = self._chat_chunks(stream, completion_id, created, first["prompt_tokens"], include_usage,
                                           caller.tenant)
                await chunks.__anext__()   # started: its `finally` now runs however the response ends (even unsent)
                handed_off = True
                return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            parts, done = [], None
            async for event in stream:
                if event["event"] == "delta":
                    parts.append(event["text"])
                elif event["event"] == "done":
                    done = event
        finally:
            if not handed_off:
                self._release(caller.tenant)
        if done is None:
            raise APIError(502, "the worker ended the completion without finishing it")
        self._metrics.observe_chat(done["ttft_s"], done["prompt_tokens"], done["completion_tokens"],
                                   done["finish_reason"])
        return JSONResponse(completion_body(completion_id, self._settings.served_model, created, "".join(parts),
                                            done["finish_reason"], done["prompt_tokens"], done["completion_tokens"]))

    async def _chat_chunks(self, stream: Any, completion_id: str, created: int, prompt_tokens: int,
                           include_usage: bool, tenant: str | None) -> AsyncIterator[bytes]:
        """The SSE chunks of a streaming chat; the first item (empty) is taken by `_chat` to start it. Ends the
        worker's decoding if the client goes away, and releases the chat's in-flight slot."""
        model = self._settings.served_model
        finished = False
        try:
            yield b""
            yield _sse(chunk_body(completion_id, model, created, {"role": "assistant", "content": ""}))
            async for event in stream:
                if event["event"] == "delta":
                    yield _sse(chunk_body(completion_id, model, created, {"content": event["text"]}))
                elif event["event"] == "done":
                    finished = True
                    self._metrics.observe_chat(event["ttft_s"], event["prompt_tokens"], event["completion_tokens"],
                                               event["finish_reason"])
                    yield _sse(chunk_body(completion_id, model, created, {}, finish_reason=event["finish_reason"]))
                    if include_usage:
                        yield _sse(chunk_body(completion_id, model, created, {}, with_choice=False,
                                              usage=usage_body(event["prompt_tokens"], event["completion_tokens"])))
            yield _sse("[DONE]")
        finally:
            if not finished:
                stream.cancel()            # the client went away: the worker stops decoding this chat
            self._release(tenant)


# ------------------------------------------------------------------------------------------------------------
# Building the application
# ------------------------------------------------------------------------------------------------------------
def build_app(config: ServeAppConfig, *, environ: dict[str, str] | None = None) -> Any:
    """The Serve `Application`: the ingress bound to the worker deployment (see the module docstring)."""
    cluster = config.cluster
    settings = cluster.worker_settings()
    worker_options: dict[str, Any] = dict(
        name="AgentWorkerDeployment",
        ray_actor_options={"num_cpus": cluster.cpus_per_worker, "num_gpus": cluster.gpus_per_worker},
        placement_group_bundles=[cluster.bundle()], placement_group_strategy=cluster.placement_strategy,
        max_ongoing_requests=config.serve.worker_max_ongoing_requests,
        health_check_period_s=10.0, health_check_timeout_s=60.0, graceful_shutdown_timeout_s=30.0)
    scaling = config.serve.autoscaling
    if scaling is None:
        worker_options["num_replicas"] = cluster.num_workers
    else:
        worker_options["autoscaling_config"] = {"min_replicas": scaling.min_replicas,
                                                "max_replicas": scaling.max_replicas,
                                                "target_ongoing_requests": scaling.target_ongoing_requests}
    workers = serve.deployment(**worker_options)(AgentWorkerDeployment).bind(settings,
                                                                              config.serve.default_max_tokens)
    ingress_settings = IngressSettings.from_config(config, api_key_digests(config.serve, environ))
    ingress = serve.deployment(name="KVCommIngress", num_replicas=1, ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=config.serve.ingress_max_ongoing_requests)(KVCommIngress)
    return ingress.bind(workers, ingress_settings)


def app_builder(args: dict[str, Any] | None = None) -> Any:
    """The ``import_path`` target of a Serve config file: ``args`` are a `ServeAppConfig` as a mapping."""
    return build_app(ServeAppConfig.from_args(args))


def kill_pool_actor(config: ServeAppConfig) -> None:
    """Remove the (detached) anchor pool actor of `config`, if it exists."""
    import ray
    try:
        ray.kill(ray.get_actor(config.cluster.pool_actor_name, namespace=config.cluster.ray_namespace))
    except ValueError:
        pass


# ------------------------------------------------------------------------------------------------------------
# `kvcomm serve`
# ------------------------------------------------------------------------------------------------------------
def start_local_ray(address: str | None, num_cpus: int | None = None) -> subprocess.Popen | None:
    """Connect to `address` (``auto``, ``ray://...``) or start a local cluster. For a cluster this process starts,
    the `cluster.reaper` that kills it if this process dies (``stop_reaper`` it after ``ray.shutdown()``);
    otherwise None."""
    import ray
    if ray.is_initialized():
        return None
    if address:
        ray.init(address=address, log_to_driver=False)
        return None
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")   # a local cluster on this machine only
    reaper = start_reaper()
    try:
        ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
                 object_store_memory=2560 << 20)
    except BaseException:
        stop_reaper(reaper)
        raise
    return reaper


def run_server(config: str | Path | ServeConfigFile, *, host: str | None = None, port: int | None = None,
               address: str | None = None, num_cpus: int | None = None, ready: Any = None) -> int:
    """Start Ray (or connect), Serve on host:port, every application of the config file; serve until Ctrl-C
    (or until `ready(urls)` returns, for callers that drive the server themselves: its int is the exit status);
    then shut down Serve, the anchor pool actor and a Ray cluster this call started.

    Ctrl-C is a normal way to stop (exit status 0 while serving; 130 when it interrupts the start or `ready`): it
    prints one line and shuts down, without a traceback; a second Ctrl-C during the shutdown skips waiting for
    Serve's graceful shutdown. SIGTERM (what `docker stop`, Kubernetes and systemd send) does the same as Ctrl-C
    when this runs in the main thread."""
    import ray
    spec = config if isinstance(config, ServeConfigFile) else load_serve_config_file(config)
    host, port = host or spec.host, port or spec.port
    owned = address is None and not ray.is_initialized()      # this call starts (and stops) a local cluster
    code = 0
    previous_sigterm = reaper = None
    try:
        reaper = start_local_ray(address, num_cpus)
        previous_sigterm = _stop_on_sigterm()         # after ray.init, which installs its own handler
        serve.start(http_options={"host": host, "port": port})
        urls = []
        for app in spec.applications:
            print(f"[serve] deploying {app.name!r} ({app.config.cluster.num_workers} worker(s) of "
                  f"{app.config.cluster.model}) ...", flush=True)
            serve.run(build_app(app.config), name=app.name, route_prefix=app.route_prefix)
            urls.append(f"http://{host}:{port}{app.route_prefix.rstrip('/')}")
        for url in urls:
            print(f"[serve] ready at {url}  (POST /v1/jobs, /v1/chat/completions; GET /v1/models, /healthz, "
                  "/metrics)", flush=True)
        if ready is not None:
            outcome = ready(urls)
            code = outcome if isinstance(outcome, int) else 0
        else:
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt as stop:
                why = "SIGTERM: " if isinstance(stop, _Terminated) else ""
                print(f"\n[serve] {why}shutting down ...", flush=True)
    except KeyboardInterrupt:
        print("\n[serve] interrupted: shutting down ...", flush=True)
        code = 130
    finally:
        try:
            _shut_down(spec, owned)
        finally:
            if reaper is not None:
                stop_reaper(reaper)
            if previous_sigterm is not None:
                signal.signal(signal.SIGTERM, previous_sigterm)
    return code


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, so that it unwinds through the same path as Ctrl-C."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated()


def _stop_on_sigterm() -> Any:
    """Make SIGTERM stop the server as Ctrl-C does; the previous handler (None off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


# Ray's own line when `serve.shutdown()` ends its controller while the driver still waits on it (harmless: the
# controller is meant to go); every other line passes.
_SHUTDOWN_NOISE = ("ServeController.graceful_shutdown failed",)


class _FilteredStream:
    """A text stream that drops whole lines containing one of `noise` and passes everything else on."""

    def __init__(self, stream: Any, noise: tuple[str, ...]):
        self._stream, self._noise, self._pending = stream, noise, ""

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            if not any(n in line for n in self._noise):
                self._stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self._pending and not any(n in self._pending for n in self._noise):
            self._stream.write(self._pending)
        self._pending = ""
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _shut_down(spec: ServeConfigFile, owned: bool) -> None:
    """Serve, the applications' anchor pool actors and (when `owned`) the local Ray cluster. A Ctrl-C (or SIGTERM)
    during Serve's graceful shutdown skips the rest of it; none is taken while the Ray cluster stops."""
    import sys

    import ray
    streams = sys.stdout, sys.stderr                 # Ray prints its error messages to stdout
    sys.stdout, sys.stderr = (_FilteredStream(stream, _SHUTDOWN_NOISE) for stream in streams)
    try:
        try:
            if ray.is_initialized():
                serve.shutdown()
                for app in spec.applications:
                    kill_pool_actor(app.config)
        except KeyboardInterrupt:
            print("[serve] interrupted again: not waiting for Serve's graceful shutdown"
                  + ("" if owned else " (`serve shutdown` stops what is left on the cluster)"), flush=True)
        if owned and ray.is_initialized():
            in_main = threading.current_thread() is threading.main_thread()
            previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)} \
                if in_main else {}
            try:
                ray.shutdown()
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = streams
