"""The OpenAI chat completions API of one ingress replica (``POST /v1/chat/completions``, streamed or not).

This module owns what the route does (`ChatService`; the route is declared in `cluster.serve.ingress`): validate the
body (`cluster.serve.openai_api.ChatCompletionRequest`, errors naming the field), check the limits and the model,
settle the chat's serving mode (the body's ``kvcomm.mode``, else ``serve.chat_mode``) and anchor namespace (the
``X-KVCOMM-Namespace`` header, else the body's ``kvcomm.namespace``, else ``default``; per API key), send it to a
worker replica through our router (the namespace's home replica wins ties: it keeps the namespace's contents), and
answer in OpenAI's shapes, ``usage.prompt_tokens_details.cached_tokens`` counting the reused prompt tokens. A
streaming client that goes away stops the worker's decoding of its chat.
"""
# no `from __future__ import annotations`: kept consistent with the routes' modules

import time
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from ..config import describe_validation_error
from .http import (APIError, Caller, ClosingStreamingResponse, InFlightSlots, busy_error, field_path, read_json,
                   sse)
from .metrics import ServiceMetrics
from .openai_api import (ChatCompletionRequest, ChatRequestError, chunk_body, completion_body, kvcomm_body,
                         new_completion_id, usage_body)
from .tracing import chat_span, end_chat_span, in_span


class ChatService:
    """One ingress replica's side of the chat completions API."""

    def __init__(self, settings: Any, workers: Any, metrics: ServiceMetrics, slots: InFlightSlots):
        self.settings = settings
        self.workers = workers
        self.metrics = metrics
        self.slots = slots

    def _take(self, tenant: str | None) -> None:
        self.slots.take(tenant)
        self.metrics.set_queue_length(self.slots.total)

    def _release(self, tenant: str | None) -> None:
        self.slots.give_back(tenant)
        self.metrics.set_queue_length(self.slots.total)

    async def create(self, request: Request, caller: Caller) -> Response:
        self._take(caller.tenant)             # before the body is read: a busy server answers at once
        handed_off = False                       # the streaming response releases the slot itself
        try:
            body = await read_json(request, self.settings.max_body_bytes)
            if not isinstance(body, dict):
                raise APIError(400, f"body: expected a JSON object, got {type(body).__name__}", param="body")
            try:
                chat = ChatCompletionRequest.model_validate(body)
            except ValidationError as exc:
                first = exc.errors()[0]
                param = field_path(first["loc"])
                more = (f" (and {len(exc.errors()) - 1} more problems: {describe_validation_error(exc)})"
                        if len(exc.errors()) > 1 else "")
                message = first["msg"].removeprefix("Value error, ")
                raise APIError(400, f"{param}: {message}{more}", param=param) from None
            try:
                chat.check_limits(self.settings.max_prompt_chars, self.settings.max_output_tokens)
            except ChatRequestError as exc:
                raise APIError(400, str(exc), param=exc.param, code="limit_exceeded") from None
            if chat.model != self.settings.served_model:
                raise APIError(404, f"model: the model {chat.model!r} does not exist; this server serves "
                                    f"{self.settings.served_model!r}", param="model", code="model_not_found")
            params = chat.params(default_mode=self.settings.chat_mode,
                                 namespace=caller.anchor_namespace(chat.kvcomm.namespace),
                                 default_max_tokens=self.settings.default_max_tokens)
            span = chat_span(self.settings.served_model, params.routing_hint().namespace)   # no-op unless traced
            with in_span(span):                   # Serve's handle call and the replica's span are its children
                stream = self.workers.options(stream=True).chat.remote(params)
            try:
                first = await stream.__anext__()
                if first["event"] == "error":
                    raise _event_error(first)
            except BaseException as exc:
                _cancel(stream)
                end_chat_span(span, None, None, error=f"{type(exc).__name__}: {exc}")
                unserved = _unserved(exc, self.settings.retry_after_s)
                if unserved is not None:
                    raise unserved from None
                raise
            completion_id, created = new_completion_id(), int(time.time())
            if chat.stream:
                include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
                chunks = self._chat_chunks(stream, completion_id, created, include_usage, chat.kvcomm.details,
                                           caller.tenant, span, first.get("worker"))
                await chunks.__anext__()   # started: its `finally` runs however the response ends (even unsent)
                handed_off = True
                return ClosingStreamingResponse(chunks, media_type="text/event-stream",
                                                headers={"Cache-Control": "no-cache"})
            parts, done = [], None
            try:
                async for event in stream:
                    if event["event"] == "delta":
                        parts.append(event["text"])
                    elif event["event"] == "done":
                        done = event
                    elif event["event"] == "error":          # failed while decoding: no answer, its error
                        raise _event_error(event)
            except APIError:
                raise
            except Exception as exc:  # noqa: BLE001 - the worker replica was lost mid-completion (a RayActorError...)
                raise APIError(502, f"the worker replica was lost mid-completion ({type(exc).__name__})") from None
            except BaseException:
                _cancel(stream)        # the client went away: the worker stops decoding this chat
                raise
            finally:
                end_chat_span(span, first.get("worker"), done, None if done else "ended without finishing")
        finally:
            if not handed_off:
                self._release(caller.tenant)
        if done is None:
            raise APIError(502, "the worker ended the completion without finishing it")
        self.metrics.observe_chat(done)
        return JSONResponse(completion_body(completion_id, self.settings.served_model, created, "".join(parts), done,
                                            chat.kvcomm.details))

    async def _chat_chunks(self, stream: Any, completion_id: str, created: int, include_usage: bool, details: bool,
                           tenant: str | None, span: Any = None, worker: str | None = None) -> AsyncIterator[bytes]:
        """The SSE chunks of a streaming chat; the first item (empty) is taken by `_chat` to start it. Ends the
        worker's decoding if the client goes away, and releases the chat's in-flight slot. A chat that fails after
        its first token (the worker's ``error`` event, a lost worker replica, a stream that ends without ``done``)
        ends with an error chunk (OpenAI's error object, which OpenAI clients raise) and no ``[DONE]``: the text
        sent so far is not an answer."""
        model = self.settings.served_model
        finished, done = False, None
        try:
            yield b""
            yield sse(chunk_body(completion_id, model, created, {"role": "assistant", "content": ""}))
            failure = APIError(502, "the worker ended the completion without finishing it")
            try:
                async for event in stream:
                    if event["event"] == "delta":
                        yield sse(chunk_body(completion_id, model, created, {"content": event["text"]}))
                    elif event["event"] == "error":
                        failure = _event_error(event)
                    elif event["event"] == "done":
                        finished, done = True, event
                        self.metrics.observe_chat(event)
                        yield sse(chunk_body(completion_id, model, created, {}, finish_reason=event["finish_reason"],
                                             kvcomm=kvcomm_body(event, details)))
                        if include_usage:
                            yield sse(chunk_body(completion_id, model, created, {}, with_choice=False,
                                                  usage=usage_body(event["prompt_tokens"], event["completion_tokens"],
                                                                   event["cached_tokens"])))
            except Exception as exc:  # noqa: BLE001 - the worker replica was lost mid-stream (a RayActorError...)
                failure = APIError(502, f"the worker replica was lost mid-completion ({type(exc).__name__})")
            yield sse("[DONE]" if finished else failure.body())
        finally:
            if not finished:
                _cancel(stream)            # the client went away: the worker stops decoding this chat
            end_chat_span(span, worker, done, None if finished else "the client went away")
            self._release(tenant)


def _cancel(stream: Any) -> None:
    """Cancel a chat's call to its worker; a call never assigned to a replica (Serve's handle then raises why, as
    `BackPressureError`) has nothing to cancel."""
    try:
        stream.cancel()
    except Exception:  # noqa: BLE001 - the assignment's own error, already handled where the call was awaited
        pass


def _unserved(exc: BaseException, retry_after_s: int) -> APIError | None:
    """A chat no worker replica took up: Serve's queue for the workers is full (`BackPressureError`, with the
    deployment's ``max_queued_requests``), or the replica it went to is unreachable. The client may send it again: a
    503 with ``Retry-After`` (OpenAI's clients wait and retry), not a 500. A replica that died before the chat's
    first token (its prefill included: the chat may be what killed it) is a 502, without an invitation to retry.
    None for anything else."""
    from ray.exceptions import ActorUnavailableError, RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
    if isinstance(exc, StopAsyncIteration):
        return APIError(502, "the worker ended the completion before its first token")
    if isinstance(exc, BackPressureError):
        why = "every worker replica is busy and the queue for them is full"
    elif isinstance(exc, (ActorUnavailableError, ReplicaUnavailableError, DeploymentUnavailableError)):
        why = f"the worker replica it was sent to is unreachable ({type(exc).__name__})"
    elif isinstance(exc, RayActorError):
        return APIError(502, f"the worker replica was lost before the chat's first token ({type(exc).__name__})")
    else:
        return None
    return busy_error(f"the chat was not served: {why}", retry_after_s)


def _event_error(event: dict[str, Any]) -> APIError:
    """A worker's ``error`` event as the error response: its status, message, field and OpenAI error code."""
    return APIError(event["status"], event["message"], param=event.get("param"), code=event.get("code"))
