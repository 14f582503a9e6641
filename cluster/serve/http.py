"""The HTTP plumbing every route of the service shares: the FastAPI app, errors in OpenAI's shape, strict JSON
bodies, callers, in-flight limits and server-sent events.

This module owns what the routes (`cluster.serve.jobs`, `cluster.serve.chat`, `cluster.serve.ingress`) have in
common and nothing route-specific: `api` (the one FastAPI app the ingress class binds), `APIError` (status,
a message that starts with the offending field, OpenAI's ``param``/``type``/``code``), `parse_json_body` (400 for
anything that is not plain JSON), `Caller` (tenant and anchor namespace from the API key and the
``X-KVCOMM-Namespace`` header), `InFlightSlots` (the 429 limits), and the SSE encoder.
"""
# no `from __future__ import annotations`: FastAPI must see the routes' real annotations after Serve rebinds them

import collections
import hashlib
import hmac
import json
import logging
import math
import re
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

NAMESPACE_HEADER = "X-KVCOMM-Namespace"
_NAMESPACE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")

api = FastAPI(title="KVCOMM on Ray", description="Multi-agent jobs with KV-cache reuse, and an OpenAI-compatible "
                                                 "chat API, on Ray Serve.", docs_url=None, redoc_url=None,
              openapi_url=None)   # no unauthenticated schema route: every route but /healthz needs a key


def internal_error_message(what: str) -> str:
    """Log the exception being handled (traceback included) under a fresh error id; return what the client is
    told: the id, never the exception's text (it may hold paths, prompts or another tenant's data)."""
    error_id = uuid.uuid4().hex[:12]
    log.exception("%s failed (error id %s)", what, error_id)
    return f"internal error (error id {error_id}); the server log has the details"


def busy_error(message: str, retry_after_s: int) -> "APIError":
    """Work the server could not take now and the client may send again: a 503 with ``Retry-After`` and OpenAI's
    ``server_busy`` code (OpenAI's clients wait and retry)."""
    return APIError(503, f"{message}; retry after {retry_after_s} s", code="server_busy",
                    headers={"Retry-After": str(retry_after_s)})


class APIError(Exception):
    """An error response: HTTP status, a message starting with the offending field, OpenAI's ``param``."""

    def __init__(self, status: int, message: str, param: str | None = None, error_type: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.error_type = error_type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        """OpenAI's error object (also the data of a stream's error chunk)."""
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}

    def response(self, extra: dict[str, Any] | None = None) -> JSONResponse:
        body = self.body()
        body.update(extra or {})
        return JSONResponse(body, status_code=self.status, headers=self.headers)


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


class ClosingStreamingResponse(StreamingResponse):
    """A `StreamingResponse` that closes its body (an async generator) however the response ends. Starlette's
    leaves the generator suspended at its ``yield`` when the response is cancelled in the middle of a send (the
    client went away), so the generator's ``finally`` (cancel the job, stop the chat's decoding, give back the
    in-flight slot) would wait for garbage collection: seconds, or never under load."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()


def sse(data: Any, event: str | None = None, event_id: int | None = None) -> bytes:
    """One server-sent event (``id:`` lets a client resume with ``Last-Event-ID``)."""
    head = (f"id: {event_id}\n" if event_id is not None else "") + (f"event: {event}\n" if event else "")
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"{head}data: {payload}\n\n".encode()


def query_flag(request: Request, name: str) -> bool:
    value = request.query_params.get(name)
    if value is None:
        return False
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on", ""):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise APIError(400, f"{name}: expected true or false, got {value!r}", param=name)


def field_path(loc: tuple[Any, ...]) -> str:
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


INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1


def limit_error(param: str, what: str, knob: str, limit: int | str) -> "APIError":
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

    def take(self, tenant: str | None, force: bool = False) -> None:
        """Count one more, or refuse (429); `force` counts it whatever the limits (a job taken over from a lost
        replica is already accepted)."""
        retry = self.retry_after_s
        headers = {"Retry-After": str(retry)}
        if force:
            pass
        elif self.total >= self.limit:
            raise APIError(429, f"server busy: {self.total} jobs and chat completions are in flight, the limit "
                                f"(serve.max_in_flight = {self.limit}); retry after {retry} s",
                           error_type="rate_limit_error", code="server_busy", headers=headers)
        elif tenant is not None and self.per_key is not None and self._by_tenant[tenant] >= self.per_key:
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


def authenticate(request: Request, digests: tuple[bytes, ...]) -> Caller:
    """The caller of `request`: with API keys configured (`digests`), ``Authorization: Bearer <key>`` must match
    one (else 401); the ``X-KVCOMM-Namespace`` header, when sent, must be a valid name (else 400)."""
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


async def read_json(request: Request, limit: int) -> Any:
    """The request's body as JSON (see `parse_json_body`); 413 beyond `limit` bytes (``serve.max_body_bytes``),
    declared or streamed."""
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
