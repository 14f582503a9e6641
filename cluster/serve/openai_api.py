"""The OpenAI-compatible chat surface: request validation, what a worker is sent, and the response shapes.

This module owns:

* `ChatCompletionRequest`: the body of ``POST /v1/chat/completions`` (pydantic; null means a field's default;
  unsupported values of fields that would change the answer are rejected naming the field: ``n`` > 1, ``tools``
  or a ``tool_choice`` that needs them, ``logprobs``, penalties, ``logit_bias``, a non-text ``response_format``,
  an assistant message's ``tool_calls``; other unknown fields are ignored). Our own options ride in the body's
  ``kvcomm`` object (the OpenAI clients' ``extra_body``): ``mode`` (any engine mode; the server's default is
  ``serve.chat_mode``), ``namespace`` (the anchor namespace, unless the ``X-KVCOMM-Namespace`` header names one)
  and ``details`` (the prompt and completion token ids, the first token's log-probabilities and the TTFT in the
  response, for fidelity checks), ``force_dense`` (this agent's prompt prefilled densely whatever the mode: a
  judge kept exact; in a pool mode its turn still teaches the anchor pool).
* `ChatParams`: what a worker replica is sent, a `kvcomm.chat.ChatRequest` (the chat as the engine runs it) and
  its routing hint: the namespace (its home replica wins ties) and the cost in tokens.
* `completion_body` / `chunk_body` / `usage_body` / `kvcomm_body`: OpenAI's ``chat.completion`` and
  ``chat.completion.chunk`` shapes; ``usage.prompt_tokens_details.cached_tokens`` counts the prompt tokens whose
  KV was reused, and a ``kvcomm`` object says how the prompt was served.

How a chat runs on a worker (a turn of the replica's one continuous batch, its contents reused across requests)
is `kvcomm.chat`'s and `cluster.serve.worker`'s business.
"""
from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from actors.turns import RoutingHint
from kvcomm.chat import ChatRequest
from kvcomm.chat_template import ChatMessage, ChatRequestError
from kvcomm.names import MODES

__all__ = ["ChatCompletionRequest", "ChatParams", "ChatRequestError", "chunk_body", "completion_body",
           "kvcomm_body", "new_completion_id", "usage_body"]

# fields this server does not act on, refused unless they keep their default: field -> why
UNSUPPORTED = {"logprobs": "logprobs are not supported", "top_logprobs": "logprobs are not supported",
               "tools": "tools are not supported", "functions": "tools are not supported",
               "logit_bias": "logit_bias is not supported"}
DEFAULT_CHAT_COST_TOKENS = 256   # a chat without max_tokens counts this many output tokens when routed
NAMESPACE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"   # as the X-KVCOMM-Namespace header


# ------------------------------------------------------------------------------------------------------------
# Requests
# ------------------------------------------------------------------------------------------------------------
class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class MessageBody(BaseModel):
    """One message of ``messages``: a tool result (``role: tool``) may sit in the history; an assistant's own
    ``tool_calls`` may not (this server offers no tools, so it never produced any)."""
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[Any] | None = None

    @field_validator("tool_calls")
    @classmethod
    def _no_tool_calls(cls, tool_calls: list[Any] | None) -> list[Any] | None:
        if tool_calls:
            raise ValueError("assistant tool calls are not supported in the history (this server offers no tools)")
        return tool_calls

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def to_message(self) -> ChatMessage:
        role = "system" if self.role == "developer" else self.role
        return ChatMessage(role, self.text(), self.name or self.tool_call_id or "")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class KVCommOptions(BaseModel):
    """The body's ``kvcomm`` object (``extra_body={"kvcomm": {...}}`` in OpenAI clients)."""
    model_config = ConfigDict(extra="forbid")
    mode: str | None = None                   # None: serve.chat_mode
    namespace: str | None = Field(None, pattern=NAMESPACE_PATTERN)
    details: bool = False
    force_dense: bool = False                 # this agent's prompt prefilled densely whatever the mode (a judge)

    @field_validator("mode")
    @classmethod
    def _known_mode(cls, mode: str | None) -> str | None:
        if mode is not None and mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; modes: {', '.join(MODES)}")
        return mode


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``. A field sent as null means its default, as OpenAI's spec has it. Fields that
    would change the answer and that this server does not act on are accepted at their default (``n=1``, no tools,
    no logprobs, penalties 0, no logit bias, text responses) and rejected naming the field otherwise; other
    unknown fields (``user``, ``metadata``, ``store``, ...) are ignored."""
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[MessageBody] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2 ** 63), le=2 ** 63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    n: int = 1
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[Any] | None = None           # the deprecated form of tools
    function_call: str | dict[str, Any] | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    kvcomm: KVCommOptions = Field(default_factory=KVCommOptions)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, body: Any) -> Any:
        if isinstance(body, dict):
            return {key: value for key, value in body.items() if value is not None or key in ("model", "messages")}
        return body

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"only n=1 is supported, got {n}: one choice per request (send {n} requests for "
                             f"{n} answers)" if n > 1 else f"must be 1, got {n}")
        return n

    @field_validator(*UNSUPPORTED)
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        if value:                                     # anything but its default (None, False, 0, empty)
            raise ValueError(UNSUPPORTED[info.field_name])
        return value

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_choice(cls, choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if choice not in (None, "none", "auto"):
            raise ValueError(f"only 'none' or 'auto' is supported (this server offers no tools), got {choice!r}")
        return choice

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, penalty: float) -> float:
        if penalty != 0:
            raise ValueError(f"penalties are not supported: must be 0, got {penalty}")
        return penalty

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, response_format: dict[str, Any] | None) -> dict[str, Any] | None:
        if response_format is not None and response_format.get("type") != "text":
            raise ValueError(f"only {{'type': 'text'}} is supported (no JSON mode or structured outputs), got "
                             f"type {response_format.get('type')!r}")
        return response_format

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("at most 4 non-empty stop strings")
        return stop

    def check_limits(self, max_prompt_chars: int, max_output_tokens: int) -> None:
        """Raise `ChatRequestError` naming the field when the request is beyond the server's limits (the knobs
        ``serve.max_prompt_chars``: the messages' roles, names and contents together, and
        ``serve.max_output_tokens``: max_tokens / max_completion_tokens)."""
        chars = sum(len(m.role) + len(m.name or "") + len(m.text()) for m in self.messages)
        if chars > max_prompt_chars:
            raise ChatRequestError("messages", f"{chars} characters (roles, names and contents), over the limit "
                                               f"of {max_prompt_chars} (serve.max_prompt_chars)")
        for name in ("max_tokens", "max_completion_tokens"):
            value = getattr(self, name)
            if value is not None and value > max_output_tokens:
                raise ChatRequestError(name, f"{value} tokens, over the limit of {max_output_tokens} "
                                             "(serve.max_output_tokens)")

    def params(self, *, default_mode: str, namespace: str, default_max_tokens: int) -> "ChatParams":
        """What the worker runs: `namespace` is the caller's anchor namespace (tenant and name, see
        `cluster.serve.http.Caller`)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        request = ChatRequest(
            messages=tuple(m.to_message() for m in self.messages), mode=self.kvcomm.mode or default_mode,
            namespace=namespace, max_tokens=self.max_completion_tokens or self.max_tokens,
            default_max_tokens=default_max_tokens, temperature=self.temperature, top_p=self.top_p,
            seed=self.seed if self.seed is not None else uuid.uuid4().int % (2**31), stop=tuple(stops),
            max_tokens_param="max_completion_tokens" if self.max_completion_tokens else "max_tokens",
            force_dense=self.kvcomm.force_dense)
        return ChatParams(request, details=self.kvcomm.details)


@dataclass(frozen=True)
class ChatParams:
    """What a worker replica is sent for one chat completion (plain data: crosses Ray as is)."""
    request: ChatRequest
    details: bool = False

    def routing_hint(self) -> RoutingHint:
        """The namespace (its home replica holds its contents) and the cost: the prompt (~4 characters per token)
        and the output budget."""
        request = self.request
        prompt = sum(len(m.content) for m in request.messages) // 4
        return RoutingHint(request.namespace, prompt + (request.max_tokens or DEFAULT_CHAT_COST_TOKENS), {})


# ------------------------------------------------------------------------------------------------------------
# Response shapes
# ------------------------------------------------------------------------------------------------------------
def usage_body(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def kvcomm_body(done: dict[str, Any], details: bool) -> dict[str, Any]:
    """How the prompt was served (a worker's ``done`` event): mode, whether every content was reused, the engine's
    reason, reused tokens; with `details`, the token ids, the TTFT and the first token's log-probabilities
    (``first_token_logprobs``: base64 of little-endian float32, one per vocabulary entry)."""
    body = {key: done[key] for key in ("mode", "reused", "reason", "cached_tokens")}
    if done.get("predicted_kl") is not None:
        body["predicted_kl"] = done["predicted_kl"]
    if details:
        body.update({key: done[key] for key in ("prompt_token_ids", "completion_token_ids", "ttft_s")})
        body["first_token_logprobs"] = base64.b64encode(done["first_token_logprobs"]).decode()
    return body


def completion_body(completion_id: str, model: str, created: int, text: str, done: dict[str, Any],
                    details: bool = False) -> dict[str, Any]:
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": done["finish_reason"], "logprobs": None}],
            "usage": usage_body(done["prompt_tokens"], done["completion_tokens"], done["cached_tokens"]),
            "kvcomm": kvcomm_body(done, details)}


def chunk_body(completion_id: str, model: str, created: int, delta: dict[str, Any],
               finish_reason: str | None = None, usage: dict[str, Any] | None = None,
               with_choice: bool = True, kvcomm: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                            "model": model,
                            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                         "logprobs": None}] if with_choice else []}
    if usage is not None:
        body["usage"] = usage
    if kvcomm is not None:
        body["kvcomm"] = kvcomm
    return body


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"
