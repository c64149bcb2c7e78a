"""Failure handling (SPEC §3.5, §3.6, §4) against mock backends that really misbehave over
sockets. Each test checks what the client saw (a complete answer, or a clean error; never a
truncated answer presented as success) and how many attempts each backend got."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import backends_toml, chat_chunk, send_chunk, start_sse, unaccepting_listener

import nexus

# Short limits keep the suite fast; each test states the ones it relies on.
FAST = """
[server]
first_byte_timeout_seconds = 0.5
stream_idle_timeout_seconds = 0.5
connect_timeout_seconds = 0.5
"""


@dataclass
class Reply:
    """What a client saw: status, headers, and for streams the events in order."""

    status: int
    headers: Any
    body: Any = None
    events: list[Any] = field(default_factory=list)

    @property
    def text(self) -> str:
        out = ""
        for event in self.events:
            if isinstance(event, dict):
                for choice in event.get("choices") or []:
                    out += (choice.get("delta") or {}).get("content") or ""
        return out

    @property
    def finishes(self) -> list[str]:
        return [
            choice["finish_reason"]
            for event in self.events
            if isinstance(event, dict)
            for choice in event.get("choices") or []
            if choice.get("finish_reason")
        ]

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1] == "[DONE]"

    def complete(self, text: str) -> bool:
        """A whole answer: every word, a normal finish, [DONE] last and no error anywhere."""
        return (
            self.status == 200
            and self.text == text
            and self.finishes == ["stop"]
            and self.done
            and not any(isinstance(e, dict) and "error" in e for e in self.events)
        )


async def ask(
    nx, *, model: str = "m", stream: bool = False, headers: dict | None = None, **extra
) -> Reply:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    if stream:
        body["stream"] = True
    async with (
        aiohttp.ClientSession() as session,
        session.post(nx.url + "/v1/chat/completions", json=body, headers=headers or {}) as resp,
    ):
        raw = await resp.read()
        reply = Reply(resp.status, resp.headers)
    if resp.content_type == "text/event-stream":
        for block in raw.split(b"\n\n"):
            if not block:
                continue
            assert block.startswith(b"data: "), block
            data = block[6:]
            reply.events.append("[DONE]" if data == b"[DONE]" else json.loads(data))
        assert raw.endswith(b"data: [DONE]\n\n")  # every stream Nexus sends ends so
    else:
        reply.body = json.loads(raw)
    return reply


def attempts(*backends) -> list[int]:
    return [len(b.received) for b in backends]


# --- misbehaviours --------------------------------------------------------------------------


def status(code: int, error: dict | None = None, headers: dict | None = None):
    async def answer(request: web.Request, body: dict) -> web.StreamResponse:
        envelope = {"error": error or {"message": f"HTTP {code}", "type": "server_error"}}
        return web.json_response(envelope, status=code, headers=headers)

    return answer


def slow_status(code: int, delay: float):
    """An error answer that comes only after `delay` seconds."""

    async def answer(request: web.Request, body: dict) -> web.StreamResponse:
        await asyncio.sleep(delay)
        return await status(code)(request, body)

    return answer


async def reset(request: web.Request, body: dict) -> web.StreamResponse:
    """Close the connection with a TCP RST before any header."""
    sock = request.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    request.transport.abort()
    await asyncio.sleep(30)  # cancelled: the connection is gone
    raise AssertionError("unreachable")


async def silent(request: web.Request, body: dict) -> web.StreamResponse:
    """Accept the request and never answer."""
    await asyncio.sleep(30)
    raise AssertionError("unreachable")


def sse(
    words: list[str],
    *,
    first_delay: float = 0.0,
    cut_after: int | None = None,
    stall_after: int | None = None,
    malformed_at: int | None = None,
    finish: bool = True,
    done: bool = True,
    usage: dict | None = None,
):
    """A streamed answer that can be slow to start, cut, stalled, garbled or left unfinished."""

    async def answer(request: web.Request, body: dict) -> web.StreamResponse:
        response = await start_sse(request)
        await asyncio.sleep(first_delay)
        for i, word in enumerate(words):
            if i == cut_after:
                request.transport.abort()
                await asyncio.sleep(30)
            if i == stall_after:
                await asyncio.sleep(30)
            if i == malformed_at:
                await response.write(b'data: {"choices": [{"delta": {"content": "x"\n\n')
            await send_chunk(response, chat_chunk(body["model"], {"content": word}, None))
        if finish:
            await send_chunk(response, chat_chunk(body["model"], {}, "stop"))
        if usage is not None:
            chunk = chat_chunk(body["model"], {}, None)
            chunk["choices"] = []
            chunk["usage"] = usage
            await send_chunk(response, chunk)
        if done:
            await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    return answer


WORDS = ["Hello", " from", " a", " stream"]


# --- retries before the first byte ----------------------------------------------------------


async def test_500_once_then_fine_retries_the_only_backend_after_a_short_backoff(
    backend_factory, nexus_factory
):
    a = await backend_factory("generic", {"m": {}}, name="a")
    a.behaviours = [status(500)]
    nx = await nexus_factory(FAST + backends_toml(a))
    started = time.monotonic()
    reply = await ask(nx)
    elapsed = time.monotonic() - started
    assert reply.status == 200
    assert reply.body["choices"][0]["message"]["content"] == "Hello from a"
    assert attempts(a) == [2]
    assert 0.25 <= elapsed < 3  # one backoff of 0.25-1 s
    assert reply.headers["X-Nexus-Route-Reason"] == "capability-match"


async def test_500_once_goes_to_the_next_candidate_at_once(
    backend_factory, nexus_factory, monkeypatch
):
    monkeypatch.setattr(nexus, "RETRY_BACKOFF_SECONDS", (5.0, 5.0))
    a = await backend_factory("generic", {"m": {}}, name="a")
    b = await backend_factory("generic", {"m": {}}, name="b")
    a.behaviours = [status(500)]
    toml = FAST + backends_toml(a, b, a={"priority": 10}, b={"priority": 60})
    nx = await nexus_factory(toml)
    started = time.monotonic()
    reply = await ask(nx)
    assert time.monotonic() - started < 3  # no backoff (5 s here) when another can serve
    assert reply.body["choices"][0]["message"]["content"] == "Hello from b"
    assert reply.headers["X-Nexus-Backend"] == "b"
    assert reply.headers["X-Nexus-Route-Reason"] == "failover"
    assert attempts(a, b) == [1, 1]
    assert (await ask(nx)).headers["X-Nexus-Backend"] == "a"  # one failure is not a verdict


async def test_503_persistently_ends_in_a_clean_502_then_an_actionable_503(
    backend_factory, nexus_factory
):
    a = await backend_factory("generic", {"m": {}}, name="a")
    a.behaviours = [status(503)] * 10
    toml = FAST + "[health_check]\ninterval_seconds = 5\n" + backends_toml(a)
    nx = await nexus_factory(toml)
    started = time.monotonic()
    reply = await ask(nx)
    elapsed = time.monotonic() - started
    assert reply.status == 502
    assert reply.body["error"]["type"] == "backend_error"
    assert "HTTP 503" in reply.body["error"]["message"]
    assert attempts(a) == [3]  # the first try and max_retries = 2 more
    assert 0.5 <= elapsed < 3.0  # two backoffs
    # Three real failures in a row: the backend is unhealthy before the next poll.
    assert nx.backend("a").status == "unhealthy"
    reply = await ask(nx)
    assert reply.status == 503
    assert attempts(a) == [3]
    context = reply.body["error"]["context"]
    assert context["available_nodes"] == []
    assert 0 < context["eta_seconds"] <= 10  # next poll, plus one more to recover
    assert reply.headers["Retry-After"] == str(context["eta_seconds"])


async def test_429_without_retry_after_goes_to_the_next_candidate(backend_factory, nexus_factory):
    a = await backend_factory("generic", {"m": {}}, name="a")
    b = await backend_factory("generic", {"m": {}}, name="b")
    a.behaviours = [status(429)]
    nx = await nexus_factory(FAST + backends_toml(a, b, a={"priority": 10}, b={"priority": 60}))
    reply = await ask(nx)
    assert reply.headers["X-Nexus-Backend"] == "b"
    assert attempts(a, b) == [1, 1]
    assert nx.backend("a").status == "healthy"  # rate limited is alive, not failing
    assert nx.backend("a").fail_streak == 0


async def test_429_without_retry_after_on_the_only_backend_retries_after_backoff(
    backend_factory, nexus_factory
):
    a = await backend_factory("generic", {"m": {}}, name="a")
    a.behaviours = [status(429)]
    nx = await nexus_factory(FAST + backends_toml(a))
    started = time.monotonic()
    reply = await ask(nx)
    assert reply.status == 200
    assert 0.25 <= time.monotonic() - started < 3
    assert attempts(a) == [2]


async def test_429_with_a_short_retry_after_is_honoured(backend_factory, nexus_factory):
    a = await backend_factory("generic", {"m": {}}, name="a")
    a.behaviours = [status(429, headers={"Retry-After": "1"})]
    nx = await nexus_factory(FAST + backends_toml(a))
    started = time.monotonic()
    reply = await ask(nx, stream=True)
    assert 1.0 <= time.monotonic() - started < 3  # waited as asked, then asked again
    assert reply.complete("Hello from a")
    assert attempts(a) == [2]


async def test_429_with_a_long_retry_after_is_not_waited_for(backend_factory, nexus_factory):
    a = await backend_factory("generic", {"m": {}}, name="a")
    a.behaviours = [status(429, headers={"Retry-After": "30"})] * 3
    nx = await nexus_factory(FAST + backends_toml(a))
    started = time.monotonic()
    reply = await ask(nx)
    assert time.monotonic() - started < 5  # not the 30 s asked for
    assert reply.status == 429
    assert reply.headers["Retry-After"] == "30"
    assert reply.body["error"]["type"] == "rate_limit_error"
    assert attempts(a) == [1]
    # With another candidate, the request goes there instead.
    b = await backend_factory("generic", {"m": {}}, name="b")
    nx = await nexus_factory(FAST + backends_toml(a, b, a={"priority": 10}, b={"priority": 60}))
    reply = await ask(nx)
    assert reply.headers["X-Nexus-Backend"] == "b"
    assert attempts(a, b) == [2, 1]


async def test_tcp_reset_before_headers_goes_to_the_next_candidate(backend_factory, nexus_factory):
    a = await backend_factory("generic", {"m": {}}, name="a")
    b = await backend_factory("generic", {"m": {}}, name="b")
    a.behaviours = [reset]
    nx = await nexus_factory(FAST + backends_toml(a, b, a={"priority": 10}, b={"priority": 60}))
    reply = await ask(nx, stream=True)
    assert reply.complete("Hello from b")
    assert reply.headers["X-Nexus-Route-Reason"] == "failover"
    assert attempts(a, b) == [1, 1]
    assert nx.backend("a").fail_streak == 1  # a real failure counts toward health


async def test_no_response_at_all_is_a_504_and_never_asked_again(backend_factory, nexus_factory):
    a = await backend_factory("generic", {"m": {}}, name="a")
    a.behaviours = [silent] * 3
    nx = await nexus_factory(FAST + backends_toml(a))
    started = time.monotonic()
    reply = await ask(nx, stream=True)  # a non-streamed answer has no first-byte limit
    assert time.monotonic() - started < 3  # one first-byte limit, no retry after a timeout
    assert reply.status == 504
    assert reply.body["error"]["type"] == "timeout"
    assert attempts(a) == [1]


async def test_no_response_at_all_moves_on_to_the_next_candidate(backend_factory, nexus_factory):
    a = await backend_factory("generic", {"m": {}}, name="a")
    b = await backend_factory("generic", {"m": {}}, name="b")
    a.behaviours = [silent] * 3
    nx = await nexus_factory(FAST + backends_toml(a, b, a={"priority": 10}, b={"priority": 60}))
    reply = await ask(nx, stream=True)
    assert reply.complete("Hello from b") and reply.headers["X-Nexus-Backend"] == "b"
    assert attempts(a, b) == [1, 1]


async def test_a_silent_backend_is_not_asked_again_even_for_a_fallback_model(
    backend_factory, nexus_factory
):
    a = await backend_factory("generic", {"m": {}, "m2": {}}, name="a")
    b = await backend_factory("generic", {"m": {}}, name="b")
    a.behaviours = [silent] * 3
    b.behaviours = [status(500)]
    toml = FAST + '[routing]\nfallbacks = { "m" = ["m2"] }\n'
    nx = await nexus_factory(toml + backends_toml(a, b, a={"priority": 10}, b={"priority": 60}))
    reply = await ask(nx, stream=True)
    assert reply.status == 502
    assert attempts(a, b) == [1, 1]  # a's m2 was in the plan, but a stayed silent once


async def test_slow_first_token_past_the_limit_moves_on(backend_factory, nexus_factory):
    a = await backend_factory("generic", {"m": {}}, name="a")
    b = await backend_factory("generic", {"m": {}}, name="b")
    a.behaviours = [sse(WORDS, first_delay=10.0)]
    nx = await nexus_factory(FAST + backends_toml(a, b, a={"priority": 10}, b={"priority": 60}))
    started = time.monotonic()
    reply = await ask(nx, stream=True)
    assert time.monotonic() - started < 5  # not the 10 s a needed
    assert reply.complete("Hello from b")
    assert attempts(a, b) == [1, 1]


async def test_slow_first_token_within_the_limit_is_waited_for(backend_factory, nexus_factory):
    a = await backend_factory("generic", {"m": {}}, name="a")
    a.behaviours = [sse(WORDS, first_delay=0.4)]
    nx = await nexus_factory("[server]\nfirst_byte_timeout_seconds = 1\n" + backends_toml(a))
    reply = await ask(nx, stream=True)
    assert reply.complete("Hello from a stream")
    assert attempts(a) == [1]
    assert nx.backend("a").ttft_ema_ms >= 400


@pytest.mark.parametrize("head_first", [False, True])
async def test_a_slow_non_streamed_answer_is_bounded_by_the_request_limit_only(
    backend_factory, nexus_factory, head_first: bool
):
    """A non-streamed answer comes when it is all written: the first-byte and idle limits
    (0.5 s here) are for streams; a model writing for 1.2 s is waited for."""
    a = await backend_factory("generic", {"m": {}}, name="a")

    async def slow(request: web.Request, body: dict) -> web.StreamResponse:
        if not head_first:
            await asyncio.sleep(1.2)
            return await a.chat_answer(request, body)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await asyncio.sleep(1.2)
        answer = await a.chat_answer(request, body)
        await response.write(answer.body)
        await response.write_eof()
        return response

    a.behaviours = [slow]
    nx = await nexus_factory(FAST + backends_toml(a))
    reply = await ask(nx)
    assert reply.status == 200
    assert reply.body["choices"][0]["message"]["content"] == "Hello from a"
    assert attempts(a) == [1]


async def test_a_redirect_is_a_502_naming_where_it_points(backend_factory, nexus_factory):
    a = await backend_factory("generic", {"m": {}}, name="a")

    async def moved(request: web.Request, body: dict) -> web.StreamResponse:
        raise web.HTTPPermanentRedirect("https://new.example.com/v1/chat/completions")

    a.behaviours = [moved]
    nx = await nexus_factory(FAST + "[routing]\nmax_retries = 0\n" + backends_toml(a))
    reply = await ask(nx)
    assert reply.status == 502
    message = reply.body["error"]["message"]
    assert "redirect (308) to https://new.example.com/v1/chat/completions" in message
    assert "set the backend's url" in message


@pytest.mark.parametrize("stream", [False, True])
async def test_a_backend_that_compresses_anyway_is_understood(
    backend_factory, nexus_factory, stream: bool
):
    """Nexus asks for no compression; a server (or a proxy before it) that gzips all the same
    is decoded, streams as they arrive."""
    a = await backend_factory("generic", {"m": {}}, name="a")

    async def gzipped(request: web.Request, body: dict) -> web.StreamResponse:
        if stream:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            response.enable_compression(web.ContentCoding.gzip)
            await response.prepare(request)
            for word in WORDS:
                await send_chunk(response, chat_chunk(body["model"], {"content": word}, None))
            await send_chunk(response, chat_chunk(body["model"], {}, "stop"))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        response = await a.chat_answer(request, body)
        response.enable_compression(web.ContentCoding.gzip)
        return response

    a.behaviours = [gzipped]
    nx = await nexus_factory(FAST + "[routing]\nmax_retries = 0\n" + backends_toml(a))
    reply = await ask(nx, stream=stream)
    assert a.received[-1][2]["Accept-Encoding"] == "identity"
    if stream:
        assert reply.complete("Hello from a stream")
    else:
        assert reply.status == 200
        assert reply.body["choices"][0]["message"]["content"] == "Hello from a"


@pytest.mark.parametrize("stream", [True, False])
async def test_a_rescuing_backend_is_not_charged_the_failed_attempts_time(
    backend_factory, nexus_factory, stream
):
    """Latency and TTFT averages measure the attempt from its send (SPEC §3.5): b answers in
    milliseconds after a stayed silent for the first-byte limit, and is measured so."""
    a = await backend_factory("generic", {"m": {}}, name="a")
    b = await backend_factory("generic", {"m": {}}, name="b")
    if stream:
        a.behaviours = [sse(WORDS, first_delay=10.0)]
        toml = FAST
    else:  # a non-streamed answer has no first-byte limit: a failure that took its time
        a.behaviours = [slow_status(500, 0.6)]
        toml = ""
    nx = await nexus_factory(toml + backends_toml(a, b, a={"priority": 10}, b={"priority": 60}))
    started = time.monotonic()
    reply = await ask(nx, stream=stream)
    assert reply.status == 200 and reply.headers["X-Nexus-Backend"] == "b"
    assert time.monotonic() - started >= 0.5
    rescuer = nx.backend("b")
    assert rescuer.latency_ema_ms is not None and rescuer.latency_ema_ms < 400
    if stream:
        assert rescuer.ttft_ema_ms is not None and rescuer.ttft_ema_ms < 400


async def test_a_queue_wait_is_not_charged_to_the_backend(backend_factory, nexus_factory):
    a = await backend_factory("generic", {"m": {}}, name="a")
    a.behaviours = [slow_status(400, 0.6)]  # holds the only slot, then a 4xx: not measured
    nx = await nexus_factory(backends_toml(a, a={"max_concurrent": 1}))
    first = asyncio.create_task(ask(nx))
    deadline = time.monotonic() + 5
    while a.in_flight == 0:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    started = time.monotonic()
    queued = await ask(nx, stream=True)
    assert queued.complete("Hello from a") and time.monotonic() - started >= 0.4
    assert (await first).status == 400
    backend = nx.backend("a")
    assert backend.latency_ema_ms is not None and backend.latency_ema_ms < 400
    assert backend.ttft_ema_ms is not None and backend.ttft_ema_ms < 400


# --- streams that already started ------------------------------------------------------------


async def test_stream_cut_mid_answer_ends_with_an_error_chunk(backend_factory, nexus_factory):
    a = await backend_factory("generic", {"m": {}}, name="a")
    b = await backend_factory("generic", {"m": {}}, name="b")
    a.behaviours = [sse(WORDS, cut_after=2)]
    nx = await nexus_factory(FAST + backends_toml(a, b, a={"priority": 10}, b={"priority": 60}))
    reply = await ask(nx, stream=True)
    assert reply.status == 200
    assert reply.text == "Hello from"
    assert reply.finishes == ["error"]  # never presented as a finished answer
    assert reply.events[-2]["error"]["code"] == "stream_interrupted"
    assert attempts(a, b) == [1, 0]  # a stream that sent bytes is never restarted
    assert nx.backend("a").in_flight == 0


async def test_stream_stall_ends_after_the_idle_limit(backend_factory, nexus_factory):
    a = await backend_factory("generic", {"m": {}}, name="a")
    a.behaviours = [sse(WORDS, stall_after=3)]
    nx = await nexus_factory(FAST + backends_toml(a))
    started = time.monotonic()
    reply = await ask(nx, stream=True)
    assert time.monotonic() - started < 5  # not the 30 s the backend stalls
    assert reply.text == "Hello from a"
    assert reply.finishes == ["error"]
    assert "stalled" in reply.events[-2]["error"]["message"]
    assert attempts(a) == [1]


async def test_a_malformed_chunk_is_dropped_and_the_stream_goes_on(backend_factory, nexus_factory):
    a = await backend_factory("generic", {"m": {}}, name="a")
    a.behaviours = [sse(WORDS, malformed_at=2)]
    nx = await nexus_factory(FAST + backends_toml(a))
    reply = await ask(nx, stream=True)
    assert reply.complete("Hello from a stream")
    assert attempts(a) == [1]


async def test_a_finished_stream_without_done_ends_normally(backend_factory, nexus_factory):
    a = await backend_factory("generic", {"m": {}}, name="a")
    a.behaviours = [sse(WORDS, done=False)]
    nx = await nexus_factory(FAST + backends_toml(a))
    reply = await ask(nx, stream=True)
    assert reply.complete("Hello from a stream")  # Nexus adds the [DONE]
    assert nx.backend("a").fail_streak == 0


async def test_an_unfinished_stream_without_done_is_an_error(backend_factory, nexus_factory):
    a = await backend_factory("generic", {"m": {}}, name="a")
    a.behaviours = [sse(WORDS, finish=False, done=False)]
    nx = await nexus_factory(FAST + backends_toml(a))
    reply = await ask(nx, stream=True)
    assert reply.text == "Hello from a stream"
    assert reply.finishes == ["error"]


# --- answers that say no ---------------------------------------------------------------------

CONTEXT_ERROR = {
    "message": "This model's maximum context length is 8192 tokens. However, you requested "
    "9000 tokens.",
    "type": "invalid_request_error",
    "param": "messages",
    "code": "context_length_exceeded",
}


async def test_context_length_exceeded_goes_to_the_larger_fallback(backend_factory, nexus_factory):
    small = await backend_factory("generic", {"m": {}}, name="small")
    big = await backend_factory("generic", {"m-128k": {}}, name="big")
    small.behaviours = [status(400, CONTEXT_ERROR)] * 2
    toml = FAST + '[routing]\nfallbacks = { "m" = ["m-128k"] }\n'
    nx = await nexus_factory(toml + backends_toml(small, big))
    reply = await ask(nx)
    assert reply.status == 200
    assert reply.body["model"] == "m-128k"  # the response names the model that served
    assert reply.headers["X-Nexus-Fallback-Model"] == "m-128k"
    assert reply.headers["X-Nexus-Backend"] == "big"
    assert attempts(small, big) == [1, 1]
    assert big.received[-1][1]["model"] == "m-128k"
    reply = await ask(nx, stream=True)  # streams carry the header too
    assert reply.complete("Hello from big")
    assert reply.headers["X-Nexus-Fallback-Model"] == "m-128k"
    assert {e["model"] for e in reply.events if isinstance(e, dict)} == {"m-128k"}
    assert nx.backend("small").fail_streak == 0  # a refusal is not a failure


async def test_context_length_exceeded_without_a_fallback_is_a_clean_400(
    backend_factory, nexus_factory
):
    small = await backend_factory("generic", {"m": {}}, name="small")
    other = await backend_factory("generic", {"m": {}}, name="other")
    small.behaviours = [status(400, CONTEXT_ERROR)]
    toml = FAST + backends_toml(small, other, small={"priority": 10}, other={"priority": 60})
    nx = await nexus_factory(toml)
    reply = await ask(nx)
    assert reply.status == 400
    assert reply.body["error"]["code"] == "context_length_exceeded"
    assert "maximum context length" in reply.body["error"]["message"]
    assert attempts(small, other) == [1, 0]  # same model, same context: not asked again


# Each backend's own words for a prompt over its context (status 400, its error document).
BACKEND_CONTEXT_ERRORS = {
    "vllm": {
        "object": "error",
        "message": "This model's maximum context length is 8192 tokens. However, you requested "
        "9000 tokens (8000 in the messages, 1000 in the completion). Please reduce the length "
        "of the messages or completion.",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    },
    "vllm max_tokens": {
        "object": "error",
        "message": "'max_tokens' or 'max_completion_tokens' is too large: 8000. This model's "
        "maximum context length is 4096 tokens and your request has 2778 input tokens "
        "(8000 > 4096 - 2778).",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    },
    "vllm current": {
        "error": {
            "message": "This model's maximum context length is 8192 tokens. However, your "
            "request has 9000 input tokens. Please reduce the length of the input messages.",
            "type": "BadRequestError",
            "param": "input_tokens",
            "code": 400,
        }
    },
    "vllm current with max_tokens": {
        "error": {
            "message": "This model's maximum context length is 8192 tokens. However, you "
            "requested 1000 output tokens and your prompt contains 7500 input tokens, for a "
            "total of 8500 tokens. Please reduce the length of the input prompt or the number "
            "of requested output tokens.",
            "type": "BadRequestError",
            "param": "input_tokens",
            "code": 400,
        }
    },
    "llama.cpp": {
        "error": {
            "code": 400,
            "message": "request (9000 tokens) exceeds the available context size (8192 tokens), "
            "try increasing it",
            "type": "exceed_context_size_error",
            "n_prompt_tokens": 9000,
            "n_ctx": 8192,
        }
    },
    "llama.cpp older": {
        "error": {
            "code": 400,
            "message": "the request exceeds the available context size, try increasing it",
            "type": "exceed_context_size_error",
        }
    },
    "ollama": {
        "error": {
            "message": "the input length exceeds the context length",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    },
    "openai": {"error": CONTEXT_ERROR},
    "openai responses": {
        "error": {
            "message": "Your input exceeds the context window of this model. Please adjust your "
            "input and try again.",
            "type": "invalid_request_error",
            "param": "input",
            "code": "context_length_exceeded",
        }
    },
    "anthropic": {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "prompt is too long: 208310 tokens > 200000 maximum",
        },
    },
}


def document(code: int, body: dict):
    """An answer with exactly this error document."""

    async def answer(request: web.Request, _: dict) -> web.StreamResponse:
        return web.json_response(body, status=code)

    return answer


@pytest.mark.parametrize("backend", sorted(BACKEND_CONTEXT_ERRORS))
async def test_each_backends_context_error_goes_to_the_fallback(
    backend_factory, nexus_factory, backend: str
):
    small = await backend_factory("generic", {"m": {}}, name="small")
    big = await backend_factory("generic", {"m-128k": {}}, name="big")
    small.behaviours = [document(400, BACKEND_CONTEXT_ERRORS[backend])]
    toml = FAST + '[routing]\nfallbacks = { "m" = ["m-128k"] }\n'
    nx = await nexus_factory(toml + backends_toml(small, big))
    reply = await ask(nx)
    assert reply.status == 200 and reply.headers["X-Nexus-Fallback-Model"] == "m-128k"
    assert attempts(small, big) == [1, 1]


@pytest.mark.parametrize(
    "message",
    [
        "Invalid 'messages[0].name': string too long. Expected a string with maximum length 64, "
        "but got a string with length 80 instead.",
        "Invalid 'tools[0].function.description': string too long.",
        "stop: sequence too long",
        "n_ctx_train is not a parameter",
    ],
)
async def test_a_400_that_is_not_about_the_context_comes_back_untouched(
    backend_factory, nexus_factory, message: str
):
    small = await backend_factory("generic", {"m": {}}, name="small")
    big = await backend_factory("generic", {"m-128k": {}}, name="big")
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    small.behaviours = [status(400, error)]
    toml = FAST + '[routing]\nfallbacks = { "m" = ["m-128k"] }\n'
    nx = await nexus_factory(toml + backends_toml(small, big))
    reply = await ask(nx)
    assert reply.status == 400 and reply.body == {"error": error}
    assert attempts(small, big) == [1, 0]


async def test_content_policy_400_comes_back_untouched(backend_factory, nexus_factory):
    a = await backend_factory("generic", {"m": {}}, name="a")
    b = await backend_factory("generic", {"m": {}}, name="b")
    refusal = {
        "message": "Your request was rejected by the content policy.",
        "type": "invalid_request_error",
        "param": None,
        "code": "content_policy_violation",
    }
    a.behaviours = [status(400, refusal)]
    nx = await nexus_factory(FAST + backends_toml(a, b, a={"priority": 10}, b={"priority": 60}))
    reply = await ask(nx, stream=True)
    assert reply.status == 400
    assert reply.body == {"error": refusal}
    assert reply.headers["X-Nexus-Backend"] == "a"
    assert attempts(a, b) == [1, 0]
    assert nx.backend("a").fail_streak == 0


# --- health from real traffic ----------------------------------------------------------------


async def test_a_primary_that_goes_down_and_comes_back_gets_its_traffic_back(
    backend_factory, nexus_factory
):
    a = await backend_factory("generic", {"m": {}}, name="a")
    b = await backend_factory("generic", {"m": {}}, name="b")
    toml = FAST + "[health_check]\ninterval_seconds = 0.3\nrecovery_threshold = 2\n"
    nx = await nexus_factory(toml + backends_toml(a, b, a={"priority": 10}, b={"priority": 60}))
    assert (await ask(nx)).headers["X-Nexus-Backend"] == "a"
    port = a.server.port
    await a.stop()
    served = [(await ask(nx)).headers["X-Nexus-Backend"] for _ in range(6)]
    assert served == ["b"] * 6  # every request still answered
    # After failure_threshold (3) failed attempts, a is out before any poll could say so.
    assert nx.backend("a").requests <= 1 + 3
    assert nx.backend("a").status == "unhealthy"
    await a.start(port=port)
    deadline = time.monotonic() + 5
    while nx.backend("a").status != "healthy" and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert (await ask(nx)).headers["X-Nexus-Backend"] == "a"  # traffic returns to it
    assert attempts(a) == [2]


async def test_a_fallback_answering_with_usage_is_reported_truthfully(
    backend_factory, nexus_factory
):
    a = await backend_factory("generic", {"m": {}}, name="a")
    b = await backend_factory("vllm", {"m-small": {}}, name="b")
    a.behaviours = [status(500)] * 3
    b.behaviours = [sse(WORDS, usage={"prompt_tokens": 7, "completion_tokens": 4})]
    toml = FAST + '[routing]\nmax_retries = 0\nfallbacks = { "m" = ["m-small"] }\n'
    nx = await nexus_factory(toml + backends_toml(a, b))
    reply = await ask(nx, stream=True, stream_options={"include_usage": True})
    assert reply.complete("Hello from a stream")
    assert reply.headers["X-Nexus-Fallback-Model"] == "m-small"
    assert reply.headers["X-Nexus-Route-Reason"] == "failover"
    assert reply.events[-2]["usage"] == {"prompt_tokens": 7, "completion_tokens": 4}
    assert {e["model"] for e in reply.events if isinstance(e, dict)} == {"m-small"}
    assert attempts(a, b) == [1, 1]
    async with aiohttp.ClientSession() as session, session.get(nx.url + "/v1/stats") as resp:
        recent = (await resp.json())["recent"][-1]
    assert recent["backend"] == "b"
    assert recent["tokens"] == {"prompt": 7, "completion": 4}
    assert recent["route_reason"] == "failover"


async def test_a_client_that_leaves_cancels_the_backend_request(backend_factory, nexus_factory):
    a = await backend_factory("generic", {"m": {}}, name="a")
    a.reply = " ".join(["word"] * 50)
    a.chunk_delay = 0.05
    nx = await nexus_factory(backends_toml(a))
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with (
        aiohttp.ClientSession() as session,
        session.post(nx.url + "/v1/chat/completions", json=body) as resp,
    ):
        await resp.content.readline()
    deadline = time.monotonic() + 2
    while (a.in_flight or nx.backend("a").in_flight) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert a.in_flight == 0  # the backend's handler saw the connection go
    assert nx.backend("a").in_flight == 0


# --- the queue (SPEC §3.6) -------------------------------------------------------------------


def slow(seconds: float, text: str = "done"):
    async def answer(request: web.Request, body: dict) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        message = {"role": "assistant", "content": text}
        return web.json_response(
            {
                "id": "x",
                "object": "chat.completion",
                "model": body["model"],
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            }
        )

    return answer


async def wait_for(condition, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_a_full_backend_sends_the_request_to_the_next_as_capacity_overflow(
    backend_factory, nexus_factory
):
    a = await backend_factory("generic", {"m": {}}, name="a")
    b = await backend_factory("generic", {"m": {}}, name="b")
    a.behaviours = [slow(0.5)]
    toml = backends_toml(a, b, a={"priority": 10, "max_concurrent": 1}, b={"priority": 60})
    nx = await nexus_factory(toml)
    busy = asyncio.create_task(ask(nx))
    await wait_for(lambda: a.in_flight == 1)
    reply = await ask(nx)
    assert reply.headers["X-Nexus-Backend"] == "b"
    assert reply.headers["X-Nexus-Route-Reason"] == "capacity-overflow"
    assert (await busy).headers["X-Nexus-Route-Reason"] == "capability-match"


async def test_requests_wait_in_the_queue_for_a_free_slot(backend_factory, nexus_factory):
    a = await backend_factory("generic", {"m": {}}, name="a")
    a.behaviours = [slow(0.3) for _ in range(4)]
    nx = await nexus_factory(backends_toml(a, a={"max_concurrent": 1}))
    started = time.monotonic()
    replies = await asyncio.gather(*(ask(nx) for _ in range(4)))
    assert [r.status for r in replies] == [200] * 4
    assert a.max_in_flight == 1  # never past max_concurrent
    assert time.monotonic() - started >= 1.2
    assert nx.backend("a").in_flight == 0 and len(nx.app[nexus.QUEUE]) == 0


async def test_high_priority_requests_leave_the_queue_first(backend_factory, nexus_factory):
    a = await backend_factory("generic", {"m": {}}, name="a")
    a.behaviours = [slow(0.4)] + [slow(0.05) for _ in range(4)]
    nx = await nexus_factory(backends_toml(a, a={"max_concurrent": 1}))
    queue = nx.app[nexus.QUEUE]

    async def one(label: str, high: bool) -> None:
        headers = {"X-Nexus-Priority": "high"} if high else {}
        body = {"model": "m", "messages": [{"role": "user", "content": label}]}
        async with (
            aiohttp.ClientSession() as session,
            session.post(nx.url + "/v1/chat/completions", json=body, headers=headers) as resp,
        ):
            assert resp.status == 200

    tasks = [asyncio.create_task(one("first", False))]
    await wait_for(lambda: a.in_flight == 1)
    for i, (label, high) in enumerate([("low1", False), ("low2", False), ("high", True)]):
        tasks.append(asyncio.create_task(one(label, high)))
        await wait_for(lambda i=i: len(queue) == i + 1)
    await asyncio.gather(*tasks)
    order = [body["messages"][0]["content"] for _, body, _ in a.received]
    assert order == ["first", "high", "low1", "low2"]


async def test_a_full_queue_answers_503_with_retry_after(backend_factory, nexus_factory):
    a = await backend_factory("generic", {"m": {}}, name="a")
    a.behaviours = [slow(0.6), slow(0.05)]
    toml = "[queue]\nmax_size = 1\n" + backends_toml(a, a={"max_concurrent": 1})
    nx = await nexus_factory(toml)
    busy = asyncio.create_task(ask(nx))
    await wait_for(lambda: a.in_flight == 1)
    queued = asyncio.create_task(ask(nx))
    await wait_for(lambda: len(nx.app[nexus.QUEUE]) == 1)
    started = time.monotonic()
    reply = await ask(nx)
    assert time.monotonic() - started < 3  # refused at once, not after 30 s of waiting
    assert reply.status == 503
    context = reply.body["error"]["context"]
    assert context["available_nodes"] == ["a"]
    assert isinstance(context["eta_seconds"], int) and context["eta_seconds"] >= 1
    assert reply.headers["Retry-After"] == str(context["eta_seconds"])
    assert (await busy).status == 200 and (await queued).status == 200
    assert attempts(a) == [2]


async def test_the_queue_wait_is_bounded(backend_factory, nexus_factory):
    a = await backend_factory("generic", {"m": {}}, name="a")
    a.behaviours = [slow(1.5)]
    toml = "[queue]\nmax_wait_seconds = 0.3\n" + backends_toml(a, a={"max_concurrent": 1})
    nx = await nexus_factory(toml)
    busy = asyncio.create_task(ask(nx))
    await wait_for(lambda: a.in_flight == 1)
    started = time.monotonic()
    reply = await ask(nx, headers={"X-Nexus-Priority": "high"})
    assert 0.3 <= time.monotonic() - started < 1.4  # before the busy one ends
    assert reply.status == 503 and "Retry-After" in reply.headers
    assert len(nx.app[nexus.QUEUE]) == 0
    assert (await busy).status == 200
    assert attempts(a) == [1]


async def test_without_a_queue_a_full_backend_is_an_immediate_503(backend_factory, nexus_factory):
    a = await backend_factory("generic", {"m": {}}, name="a")
    a.behaviours = [slow(0.5)]
    toml = "[queue]\nenabled = false\n" + backends_toml(a, a={"max_concurrent": 1})
    nx = await nexus_factory(toml)
    busy = asyncio.create_task(ask(nx))
    await wait_for(lambda: a.in_flight == 1)
    reply = await ask(nx)
    assert reply.status == 503
    assert reply.body["error"]["code"] == "no_backend_available"
    assert (await busy).status == 200


# --- the other two time limits ---------------------------------------------------------------


async def test_a_connect_that_hangs_is_cut_at_the_connect_limit(backend_factory, nexus_factory):
    a = await backend_factory("generic", {"m": {}}, name="a")
    b = await backend_factory("generic", {"m": {}}, name="b")
    toml = FAST.replace("first_byte_timeout_seconds = 0.5", "first_byte_timeout_seconds = 20")
    nx = await nexus_factory(toml + backends_toml(a, b, a={"priority": 10}, b={"priority": 60}))
    port = a.server.port
    await a.stop()
    with unaccepting_listener(port):  # in a's place: connecting to it hangs
        await asyncio.sleep(0.2)
        started = time.monotonic()
        reply = await ask(nx)
        assert time.monotonic() - started < 3  # the connect limit (0.5 s), not the 20 s one
        assert reply.status == 200 and reply.headers["X-Nexus-Backend"] == "b"
        assert nx.backend("a").requests == 1 and attempts(b) == [1]
        assert "timed out" in nx.backend("a").last_error


async def test_the_whole_request_limit_ends_a_trickling_stream(backend_factory, nexus_factory):
    a = await backend_factory("generic", {"m": {}}, name="a")
    a.reply = " ".join(["slow"] * 40)
    a.chunk_delay = 0.2  # never idle for long, but 8 s in all
    toml = "[server]\nrequest_timeout_seconds = 1\nstream_idle_timeout_seconds = 5\n"
    nx = await nexus_factory(toml + backends_toml(a))
    started = time.monotonic()
    reply = await ask(nx, stream=True)
    assert time.monotonic() - started < 4
    assert reply.text.startswith("slow") and reply.finishes == ["error"]
    assert "request_timeout_seconds" in reply.events[-2]["error"]["message"]


def raw_stream(*lines: bytes):
    """A streamed answer made of the given data lines, each sent as one SSE event."""

    async def answer(request: web.Request, body: dict) -> web.StreamResponse:
        response = await start_sse(request)
        for line in lines:
            await response.write(line + b"\n\n")
        await response.write_eof()
        return response

    return answer


def good(model: str, delta: dict, finish: str | None = None) -> bytes:
    return b"data: " + json.dumps(chat_chunk(model, delta, finish)).encode()


@pytest.mark.parametrize(
    "odd",
    [
        b'data: {"choices": {"a": 1}}',
        b'data: {"choices": ["x"]}',
        b'data: {"choices": [{"delta": "x", "finish_reason": null}]}',
    ],
)
async def test_a_chunk_of_the_wrong_shape_is_dropped_and_the_stream_goes_on(
    backend_factory, nexus_factory, odd
):
    a = await backend_factory("generic", {"m": {}}, name="a")
    a.behaviours = [
        raw_stream(
            good("m", {"content": "Hello"}),
            odd,
            good("m", {"content": " there"}),
            good("m", {}, "stop"),
            b"data: [DONE]",
        )
    ]
    nx = await nexus_factory(FAST + backends_toml(a))
    reply = await ask(nx, stream=True)
    assert reply.complete("Hello there")


async def test_an_unexpected_error_mid_stream_ends_it_honestly(
    backend_factory, nexus_factory, monkeypatch
):
    a = await backend_factory("generic", {"m": {}}, name="a")
    a.behaviours = [sse(WORDS)]
    nx = await nexus_factory(FAST + backends_toml(a))
    real = nexus.OpenAIFormat.chunk
    calls = []

    def breaks_on_the_third(self, data, chunk):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("a bug")
        return real(self, data, chunk)

    monkeypatch.setattr(nexus.OpenAIFormat, "chunk", breaks_on_the_third)
    reply = await ask(nx, stream=True)  # ask() checks the stream ends with [DONE]
    assert reply.status == 200
    assert reply.text == "Hello from"
    assert reply.finishes == ["error"]


async def test_retries_count_the_attempts_after_the_first(
    backend_factory, nexus_factory, monkeypatch
):
    logged: list[int] = []
    real = nexus.log_request

    def keep(record, *args):
        logged.append(record.retries)
        return real(record, *args)

    monkeypatch.setattr(nexus, "log_request", keep)
    a = await backend_factory("generic", {"m": {}}, name="a")
    a.behaviours = [status(503)]
    nx = await nexus_factory(FAST + "[routing]\nmax_retries = 0\n" + backends_toml(a))
    assert (await ask(nx)).status == 502  # one attempt, no retry
    a2 = await backend_factory("generic", {"m": {}}, name="a2")
    a2.behaviours = [status(500)]
    nx2 = await nexus_factory(FAST + backends_toml(a2))
    assert (await ask(nx2)).status == 200  # a failure, then one retry that served
    assert logged == [0, 1]


async def test_an_error_after_a_stream_began_never_writes_a_second_response(
    backend_factory, nexus_factory, monkeypatch, caplog
):
    a = await backend_factory("generic", {"m": {}}, name="a")
    nx = await nexus_factory(FAST + backends_toml(a))

    async def begins_then_breaks(flight, upstream, headers, *rest):
        response = await nexus.start_stream(flight.request, headers)
        await response.write(b"data: [DONE]\n\n")
        raise RuntimeError("a bug after the stream began")

    monkeypatch.setattr(nexus, "relay_stream", begins_then_breaks)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with (
        aiohttp.ClientSession() as session,
        session.post(nx.url + "/v1/chat/completions", json=body) as resp,
    ):
        assert resp.status == 200
        raw = await resp.read()
    assert raw == b"data: [DONE]\n\n"  # no "HTTP/1.1 500" written into the stream
    assert any("unexpected error" in r.getMessage() for r in caplog.records)


# WaitLimits: one timer per attempt, whatever the number of waits.


async def test_a_wait_past_its_limit_raises_timeout_and_the_task_goes_on():
    loop = asyncio.get_running_loop()
    limits = nexus.WaitLimits(loop.time() + 0.1, 5.0, loop.time() + 10)
    started = loop.time()
    with pytest.raises(TimeoutError):
        await limits.wait(asyncio.sleep(5), limits.first_byte_by)
    assert 0.09 <= loop.time() - started < 1.0
    assert await limits.wait(asyncio.sleep(0.01, "next"), limits.read_by()) == "next"
    limits.close()
    assert asyncio.current_task().cancelling() == 0


async def test_a_limit_that_moves_on_with_each_wait_never_fires_early():
    """Reads 0.15 s apart under a 0.25 s idle limit for 1.5 s: each wait is within its limit,
    though the timer armed for the first one fires long before the last."""
    loop = asyncio.get_running_loop()
    limits = nexus.WaitLimits(loop.time() + 0.25, 0.25, loop.time() + 10)
    started = loop.time()
    for _ in range(10):
        await limits.wait(asyncio.sleep(0.15), limits.read_by())
    assert loop.time() - started >= 1.5
    with pytest.raises(TimeoutError):  # and a read that stalls is still caught
        await limits.wait(asyncio.sleep(5), limits.read_by())
    limits.close()


async def test_a_limit_passing_between_waits_cancels_nothing():
    """Between waits (Nexus writing to a slow client) an expired limit is not a stall."""
    loop = asyncio.get_running_loop()
    limits = nexus.WaitLimits(loop.time() + 0.05, 0.05, loop.time() + 10)
    await limits.wait(asyncio.sleep(0), limits.first_byte_by)
    await asyncio.sleep(0.2)  # not a wait for the backend: the timer fires and lets it be
    assert await limits.wait(asyncio.sleep(0.01, "ok"), limits.read_by()) == "ok"
    limits.close()


async def test_someone_elses_cancel_during_a_wait_stays_a_cancel():
    loop = asyncio.get_running_loop()

    async def attempt() -> None:
        limits = nexus.WaitLimits(loop.time() + 0.2, 0.2, loop.time() + 10)
        try:
            await limits.wait(asyncio.sleep(5), limits.first_byte_by)
        finally:
            limits.close()

    task = asyncio.create_task(attempt())
    await asyncio.sleep(0.05)
    task.cancel()  # the client went away
    with pytest.raises(asyncio.CancelledError):
        await task


def test_a_retry_after_date_past_the_calendar_is_no_date(monkeypatch):
    # A date with no zone in year 9999 is read in local time; east of UTC its timestamp is out of
    # range. The backend's 429 still answers, as with no Retry-After at all.
    monkeypatch.setenv("TZ", "Europe/Paris")
    time.tzset()
    try:
        assert nexus.retry_after_seconds("Fri, 31 Dec 9999 23:59:59 -0000") is None
        assert nexus.retry_after_seconds("120") == 120.0
        assert nexus.retry_after_seconds("soon") is None
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
