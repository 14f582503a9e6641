"""The OpenAI-compatible chat surface: request validation, the chat prompt, chat decoding on a worker, response shapes.

This module owns:

* `ChatCompletionRequest`: the body of ``POST /v1/chat/completions`` (pydantic; unknown OpenAI fields are
  ignored, unsupported values of known ones are rejected naming the field), and `ChatParams`, what a worker needs.
* `chat_prompt_ids`: messages through the tokenizer's chat template, tokenized the way agent templates are
  (`kvcomm.templates.render_template`: the same text, BOS rule and ``add_special_tokens=False``), so a chat with
  one system and one user message is the very prompt an agent with that system prompt and user text would get.
* `ChatDecoder`: chat completions decoded on a worker's `actors.agent_worker.TurnScheduler` *model thread*. A chat
  is a dense prefill with no shared contents, so it does not go through the engine's turn path: its prefill runs
  as a scheduler call, and all running chats share one `kvcomm.generation.DecodeBatch` that advances one token per
  scheduler call, re-queued while chats remain. The scheduler alternates those calls with its own decode steps
  (the turns of jobs), so chats and jobs share the model thread fairly and every chat streams token by token.
* `completion_body` / `chunk_body`: the OpenAI response and ``chat.completion.chunk`` shapes.
"""
from __future__ import annotations

import concurrent.futures
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from actors.turns import RoutingHint
from kvcomm.engine import ContextLengthError
from kvcomm.generation import DecodeBatch, Sampling, SequenceState, first_stop_at


DEFAULT_CHAT_COST_TOKENS = 256   # a chat without max_tokens counts this many output tokens when routed


class ChatRequestError(ValueError):
    """A chat request cannot run as given; `param` names the offending field (OpenAI's ``error.param``)."""

    def __init__(self, param: str, message: str):
        self.param = param
        super().__init__(f"{param}: {message}")


# ------------------------------------------------------------------------------------------------------------
# Requests
# ------------------------------------------------------------------------------------------------------------
class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``. Fields OpenAI defines that this server does not act on are ignored when they
    keep their default (``n=1``, no tools, no logprobs) and rejected otherwise."""
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
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
    tools: list[Any] | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, logprobs: bool | None) -> bool | None:
        if logprobs:
            raise ValueError("logprobs are not supported")
        return logprobs

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, tools: list[Any] | None) -> list[Any] | None:
        if tools:
            raise ValueError("tools are not supported")
        return tools

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

    def params(self) -> "ChatParams":
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return ChatParams(
            messages=[{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                      for m in self.messages],
            max_tokens=self.max_completion_tokens or self.max_tokens,
            max_tokens_param="max_completion_tokens" if self.max_completion_tokens else "max_tokens",
            temperature=self.temperature, top_p=self.top_p,
            seed=self.seed if self.seed is not None else uuid.uuid4().int % (2**31), stop=tuple(stops))


@dataclass(frozen=True)
class ChatParams:
    """What a worker needs to run one chat completion (plain data: crosses Ray as is)."""
    messages: list[dict[str, str]]
    max_tokens: int | None            # None: the server's default, capped by the context left
    temperature: float
    top_p: float
    seed: int
    stop: tuple[str, ...] = ()
    max_tokens_param: str = "max_tokens"

    def routing_hint(self) -> RoutingHint:
        """The chat's routing cost: its prompt (~4 characters per token) and its output budget."""
        prompt = sum(len(m.get("content") or "") for m in self.messages) // 4
        return RoutingHint(None, prompt + (self.max_tokens or DEFAULT_CHAT_COST_TOKENS), {})


# ------------------------------------------------------------------------------------------------------------
# The prompt
# ------------------------------------------------------------------------------------------------------------
def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The prompt's token ids: the chat template with the generation prompt, as `render_template` tokenizes."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:  # the plain layout render_template uses for tokenizers without a chat template
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    ids = list(tokenizer.encode(text, add_special_tokens=False)) if text else []
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and getattr(tokenizer, "add_bos_token", False) and (not ids or ids[0] != bos):
        ids.insert(0, bos)
    return ids


# ------------------------------------------------------------------------------------------------------------
# Decoding on the model thread
# ------------------------------------------------------------------------------------------------------------
@dataclass
class _ChatSequence:
    """One running chat (touched on the model thread only, except `cancelled`)."""
    params: ChatParams
    emit: Callable[[dict[str, Any]], None]
    tokenizer: Any
    started: float
    prompt_tokens: int = 0
    state: SequenceState | None = None
    text: str = ""              # decoded so far (stop strings cut)
    sent: int = 0               # characters of `text` already emitted
    stopped_by_string: bool = False
    cancelled: bool = False
    finished: bool = False
    tokens: list[int] = field(default_factory=list)

    def on_token(self, token: int) -> None:
        if self.stopped_by_string:
            return
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):        # an incomplete UTF-8 sequence: wait for the next token
            return
        at = first_stop_at(text, self.params.stop)
        if at is not None:
            text = text[:at]
            self.stopped_by_string = True
        self.text = text
        # with stop strings, hold back what could still be the start of one
        hold = 0 if self.stopped_by_string else max((len(s) - 1 for s in self.params.stop), default=0)
        ready = max(self.sent, len(self.text) - hold)
        if ready > self.sent:
            self.emit({"event": "delta", "text": self.text[self.sent:ready]})
            self.sent = ready


class ChatDecoder:
    """Chat completions on a `TurnScheduler`'s model thread, batched among themselves (see the module docstring)."""

    def __init__(self, scheduler: Any, engine: Any, max_batch_size: int, default_max_tokens: int):
        self.scheduler = scheduler
        self.engine = engine
        self.default_max_tokens = default_max_tokens
        self._batch = DecodeBatch(engine.runner, max_batch_size=max_batch_size)
        self._sequences: dict[int, _ChatSequence] = {}     # id(state) -> sequence; model thread only
        self._stepping = False                             # a step call is queued; model thread only
        self._stop_ids = engine.stop_token_ids
        self.tokens_generated = 0                          # tokens decoded for chats that have ended (cancelled too)

    @property
    def running(self) -> int:
        """Chats admitted and not finished (a snapshot; read from any thread)."""
        return len(self._sequences)

    @property
    def context_length(self) -> int:
        return int(self.engine.spec.max_position_embeddings)

    def start(self, params: ChatParams, emit: Callable[[dict[str, Any]], None]) -> tuple[concurrent.futures.Future,
                                                                                            "_ChatSequence"]:
        """Queue a chat; the future resolves to its prompt token count once its prefill is done (or raises
        `ChatRequestError`). `emit` is then called on the model thread with ``{"event": "delta", "text"}`` events
        and one final ``{"event": "done", ...}``."""
        sequence = _ChatSequence(params, emit, self.engine.tokenizer, time.perf_counter())
        return self.scheduler.call(self._admit, sequence), sequence

    def cancel(self, sequence: "_ChatSequence") -> None:
        """Stop decoding a chat whose client went away (its slot is freed at the next chat step)."""
        sequence.cancelled = True

    # ---- model thread -------------------------------------------------------------------------------------------
    def _admit(self, sequence: _ChatSequence) -> int:
        params = sequence.params
        prompt = chat_prompt_ids(self.engine.tokenizer, params.messages)
        context = self.context_length
        room = context - len(prompt)
        if room < 1:
            raise ChatRequestError("messages", f"the prompt is {len(prompt)} tokens; the model's context is {context}")
        if params.max_tokens is not None and params.max_tokens > room:
            raise ChatRequestError(params.max_tokens_param,
                                   f"{params.max_tokens} new tokens + {len(prompt)} prompt tokens exceed the model's "
                                   f"context of {context} tokens (at most {room} for this prompt)")
        max_tokens = params.max_tokens or min(self.default_max_tokens, room)
        sampling = Sampling(max_new_tokens=max_tokens, temperature=params.temperature, top_p=params.top_p,
                            seed=params.seed, stop_token_ids=self._stop_ids)
        try:
            logits, kv = self.engine.runner.prefill(prompt, extra_capacity=max_tokens + 1)
        except ContextLengthError as exc:
            raise ChatRequestError(params.max_tokens_param, str(exc)) from None
        sequence.prompt_tokens = len(prompt)
        sequence.state = self._batch.add(kv, logits[-1], sampling, on_token=sequence.on_token,
                                         started_at=sequence.started)
        self._sequences[id(sequence.state)] = sequence
        self._settle()
        return len(prompt)

    def _step(self) -> None:
        self._stepping = False
        self._batch.step()
        self._settle()

    def _settle(self) -> None:
        """Finish chats that are done, stopped by a stop string or cancelled; queue the next step if any run."""
        for key, sequence in list(self._sequences.items()):
            state = sequence.state
            if state.done or sequence.stopped_by_string or sequence.cancelled:
                self._batch.active = [s for s in self._batch.active if s is not state]   # by identity
                del self._sequences[key]
                self._finish(sequence)
        if self._batch.active and not self._stepping:
            self._stepping = True
            self.scheduler.call(self._step)

    def _finish(self, sequence: _ChatSequence) -> None:
        state = sequence.state
        self.tokens_generated += len(state.tokens)
        if sequence.sent < len(sequence.text):
            sequence.emit({"event": "delta", "text": sequence.text[sequence.sent:]})
            sequence.sent = len(sequence.text)
        if sequence.stopped_by_string or state.finish_reason == "stop":
            reason = "stop"
        elif sequence.cancelled:
            reason = "cancelled"
        else:
            reason = "length"
        sequence.finished = True
        sequence.emit({"event": "done", "finish_reason": reason, "prompt_tokens": sequence.prompt_tokens,
                       "completion_tokens": len(sequence.tokens),
                       "ttft_s": max(0.0, state.first_token_at - state.started_at),
                       "total_s": time.perf_counter() - state.started_at})


# ------------------------------------------------------------------------------------------------------------
# Response shapes
# ------------------------------------------------------------------------------------------------------------
def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(completion_id: str, model: str, created: int, text: str, finish_reason: str,
                    prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage_body(prompt_tokens, completion_tokens)}


def chunk_body(completion_id: str, model: str, created: int, delta: dict[str, Any],
               finish_reason: str | None = None, usage: dict[str, int] | None = None,
               with_choice: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                            "model": model,
                            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                         "logprobs": None}] if with_choice else []}
    if usage is not None:
        body["usage"] = usage
    return body


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"
