"""How the ingress ends a streamed chat (`cluster.serve.chat.ChatService._chat_chunks`), fed the worker replica's
event protocol (`cluster.serve.worker.WorkerDeployment.chat`) as plain data, no Ray: a finished chat ends with its
finish chunk and ``[DONE]``; one that fails mid-decode (the worker's ``error`` event), whose worker replica is lost
mid-stream, or whose events end without ``done`` ends with OpenAI's error object and no ``[DONE]``, which the
openai client raises, so the text sent before it is never taken for a whole answer. (A real replica lost mid-chat
cannot be timed reliably here: the tiny model decodes a chat before a kill lands.) And a streamed response
cancelled in the middle of a send closes its body at once (`cluster.serve.http.ClosingStreamingResponse`), where
Starlette's own leaves it to garbage collection."""
from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionChunk

from cluster.serve.chat import ChatService
from cluster.serve.http import InFlightSlots
from cluster.serve.metrics import ServiceMetrics

DONE = {"event": "done", "finish_reason": "stop", "prompt_tokens": 5, "completion_tokens": 2, "cached_tokens": 0,
        "mode": "kvcomm", "reused": False, "reason": "new_anchor:cold_pool", "ttft_s": 0.01, "details": None}


class WorkerEvents:
    """The worker's events for one chat, as the ingress iterates them (async, with `cancel`); `lost` raises after
    them as a stream from a dead replica does."""

    def __init__(self, events: list[dict], lost: bool = False):
        self.events, self.lost, self.cancelled = events, lost, False

    def __aiter__(self):
        return self._run()

    async def _run(self):
        for event in self.events:
            yield event
        if self.lost:
            raise ConnectionError("the replica's actor died")

    def cancel(self) -> None:
        self.cancelled = True


def stream_bytes(stream: WorkerEvents) -> bytes:
    service = ChatService(SimpleNamespace(served_model="m"), None, ServiceMetrics(export_to_ray=False),
                          InFlightSlots(4, None, 1))
    service.slots.take(None)

    async def collect() -> bytes:
        return b"".join([chunk async for chunk in service._chat_chunks(stream, "chatcmpl-1", 0, True, False, None)])
    body = asyncio.run(collect())
    assert service.slots.total == 0                   # the chat's slot is given back however it ended
    return body


def client_read(body: bytes) -> list[ChatCompletionChunk]:
    """What the openai client makes of the bytes."""
    response = httpx.Response(200, content=body, headers={"content-type": "text/event-stream"},
                              request=httpx.Request("POST", "http://localhost/v1/chat/completions"))
    return list(openai.Stream(cast_to=ChatCompletionChunk, response=response,
                              client=openai.OpenAI(api_key="k", base_url="http://localhost/v1")))


def test_a_finished_chat_ends_with_its_finish_chunk_and_done():
    deltas = [{"event": "delta", "text": "Hello"}, {"event": "delta", "text": " world"}]
    stream = WorkerEvents(deltas + [DONE])
    body = stream_bytes(stream)
    assert body.endswith(b"data: [DONE]\n\n") and not stream.cancelled
    chunks = client_read(body)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello world"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop" and chunks[-1].usage.total_tokens == 7


@pytest.mark.parametrize("events, lost, status, words", [
    ([{"event": "error", "status": 500, "param": None, "message": "internal error (id e-1)"}], False, 500,
     "internal error"),
    ([], True, 502, "worker replica was lost"),
    ([], False, 502, "without finishing"),
])
def test_a_chat_failing_after_its_first_token_ends_with_an_error_the_client_raises(events, lost, status, words):
    stream = WorkerEvents([{"event": "delta", "text": "Hel"}] + events, lost=lost)
    body = stream_bytes(stream)
    assert b"[DONE]" not in body and stream.cancelled          # the worker is told to stop, whatever is left
    last = json.loads(body.strip().split(b"\n\n")[-1][len(b"data: "):])
    assert words in last["error"]["message"]
    assert last["error"]["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    with pytest.raises(openai.APIError, match=words):
        client_read(body)


@pytest.mark.parametrize("closing", [True, False])
def test_a_stream_cancelled_mid_send_closes_its_body_at_once_not_at_garbage_collection(closing):
    """The client goes away while a chunk is being sent: the response task is cancelled inside ``send``. Starlette
    leaves its body generator suspended there, so the generator's ``finally`` (cancel the job, stop the decoding,
    give back the slot) waits for garbage collection (off here: never); `ClosingStreamingResponse` closes it."""
    import gc

    from starlette.responses import StreamingResponse

    from cluster.serve.http import ClosingStreamingResponse
    cleaned = []

    async def body():
        try:
            while True:
                yield b"data: x\n\n"
        finally:
            cleaned.append(True)

    async def scenario() -> list:
        sending = asyncio.Event()

        async def send(message: dict) -> None:
            if message["type"] == "http.response.body":
                sending.set()
                await asyncio.sleep(3600)          # the proxy's send, when the client has gone

        async def receive() -> dict:
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}
        response = (ClosingStreamingResponse if closing else StreamingResponse)(body())
        scope = {"type": "http", "asgi": {"spec_version": "2.4"}}
        task = asyncio.ensure_future(response(scope, receive, send))
        await sending.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.1)
        return list(cleaned)            # before the loop's own shutdown closes what is left

    gc.disable()
    try:
        assert asyncio.run(scenario()) == ([True] if closing else [])
    finally:
        gc.enable()
