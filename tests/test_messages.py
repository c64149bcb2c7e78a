"""Anthropic's Messages API in front of OpenAI-style backends, driven by the official anthropic SDK.

The mock backends speak chat completions; Nexus translates requests to them and answers back.
A behaviour built by `chat_reply` answers one request with the text, reasoning, tool calls and
finish reason a test needs, streamed or not, as the backend types really send them.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import pytest
from aiohttp import web
from conftest import backends_toml, chat_chunk, send_chunk, start_sse

import nexus

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PNG_1PX = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
    )
).decode()


@pytest.fixture
async def client():
    """Makes anthropic SDK clients for a running Nexus, and closes them after the test."""
    made: list[anthropic.AsyncAnthropic] = []

    def make(nx) -> anthropic.AsyncAnthropic:
        made.append(anthropic.AsyncAnthropic(base_url=nx.url, api_key="unused", max_retries=0))
        return made[-1]

    yield make
    for c in made:
        await c.close()


def pieces(text: str | None) -> list[str]:
    """Text as a backend streams it: word by word, each but the first with its space."""
    words = text.split(" ") if text else []
    return words[:1] + [" " + w for w in words[1:]]


def chat_reply(
    content: str | None = None,
    *,
    reasoning: str | None = None,
    reasoning_key: str = "reasoning_content",
    tool_calls: list[tuple[str, str, dict[str, Any]]] | None = None,
    finish: str = "stop",
    choice_extra: dict[str, Any] | None = None,
    usage: tuple[int, int] = (12, 7),
    complete: bool = True,
):
    """A behaviour answering one chat request; streamed word by word when the request asks."""
    calls = [
        {
            "id": call_id,
            "type": "function",
            "function": {"name": name, "arguments": json.dumps(args)},
        }
        for call_id, name, args in tool_calls or []
    ]
    usage_doc = {
        "prompt_tokens": usage[0],
        "completion_tokens": usage[1],
        "total_tokens": usage[0] + usage[1],
    }

    async def behaviour(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        model = body["model"]
        if not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if reasoning:
                message[reasoning_key] = reasoning
            if calls:
                message["tool_calls"] = calls
            choice = {"index": 0, "message": message, "finish_reason": finish}
            choice.update(choice_extra or {})
            return web.json_response(
                {
                    "id": "chatcmpl-x",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [choice],
                    "usage": usage_doc,
                }
            )
        response = await start_sse(request)
        await send_chunk(response, chat_chunk(model, {"role": "assistant", "content": ""}, None))
        for word in pieces(reasoning):
            await send_chunk(response, chat_chunk(model, {reasoning_key: word}, None))
        for word in pieces(content):
            await send_chunk(response, chat_chunk(model, {"content": word}, None))
        for i, call in enumerate(calls):
            head = {
                "index": i,
                "id": call["id"],
                "type": "function",
                "function": {"name": call["function"]["name"], "arguments": ""},
            }
            await send_chunk(response, chat_chunk(model, {"tool_calls": [head]}, None))
            args = call["function"]["arguments"]
            for start in range(0, len(args), 5):  # arguments arrive in small fragments
                piece = {"index": i, "function": {"arguments": args[start : start + 5]}}
                await send_chunk(response, chat_chunk(model, {"tool_calls": [piece]}, None))
        if not complete:
            await response.write_eof()  # cut before the answer finished
            return response
        last = chat_chunk(model, {}, finish)
        last["choices"][0].update(choice_extra or {})
        await send_chunk(response, last)
        if (body.get("stream_options") or {}).get("include_usage"):
            usage_chunk = chat_chunk(model, {}, None)
            usage_chunk["choices"] = []
            usage_chunk["usage"] = usage_doc
            await send_chunk(response, usage_chunk)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    return behaviour


async def start(backend_factory, nexus_factory, kind: str = "vllm", models=None, extra: str = ""):
    backend = await backend_factory(kind, models or {"qwen": {"context": 32768}}, name="vl")
    nx = await nexus_factory(backends_toml(backend) + extra)
    return backend, nx


def sent(backend) -> dict[str, Any]:
    """The chat body the backend received last."""
    return backend.received[-1][1]


# --- translation, end to end -----------------------------------------------------------------


async def test_plain_text_non_stream(backend_factory, nexus_factory, client):
    backend, nx = await start(backend_factory, nexus_factory)
    raw = await client(nx).messages.with_raw_response.create(
        model="qwen", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
    )
    message = await raw.parse()
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_")
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == "Hello from vl"
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.usage.input_tokens == 10 and message.usage.output_tokens == 3
    assert message.model == "qwen"
    assert raw.headers["X-Nexus-Backend"] == "vl"
    assert raw.headers["X-Nexus-Backend-Type"] == "local"
    assert raw.headers["X-Request-Id"].startswith("req-")
    body = sent(backend)
    assert body["messages"] == [{"role": "user", "content": "hi"}]
    assert body["max_tokens"] == 100 and body["model"] == "qwen"
    assert "stream" not in body or body["stream"] is False


async def test_system_prompt_string_and_blocks(backend_factory, nexus_factory, client):
    backend, nx = await start(backend_factory, nexus_factory)
    c = client(nx)
    await c.messages.create(
        model="qwen",
        max_tokens=50,
        system="Answer in French.",
        messages=[{"role": "user", "content": "hi"}],
    )
    assert sent(backend)["messages"][0] == {"role": "system", "content": "Answer in French."}
    await c.messages.create(
        model="qwen",
        max_tokens=50,
        system=[
            {"type": "text", "text": "You are terse."},
            {"type": "text", "text": "Use tools.", "cache_control": {"type": "ephemeral"}},
        ],
        messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    )
    messages = sent(backend)["messages"]
    assert messages[0] == {"role": "system", "content": "You are terse.\n\nUse tools."}
    assert messages[1] == {"role": "user", "content": "hi"}
    assert "cache_control" not in json.dumps(sent(backend))


async def test_a_system_turn_among_the_messages_joins_the_system_prompt(
    backend_factory, nexus_factory
):
    """Claude Code with a model name it does not know sends its environment as a "system"
    turn after the first user turn; local chat templates refuse a system message there, so
    its text joins the system prompt at the top."""
    backend, nx = await start(backend_factory, nexus_factory)
    body = {
        "model": "qwen",
        "max_tokens": 50,
        "system": "You are Claude Code.",
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "system", "content": [{"type": "text", "text": "# Environment\ncwd: /"}]},
            {"role": "user", "content": "list files"},
        ],
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(nx.url + "/v1/messages", json=body) as resp,
    ):
        assert resp.status == 200, await resp.text()
    assert sent(backend)["messages"] == [
        {"role": "system", "content": "You are Claude Code.\n\n# Environment\ncwd: /"},
        {"role": "user", "content": "hi"},
        {"role": "user", "content": "list files"},
    ]


async def test_multi_turn_and_sampling_options(backend_factory, nexus_factory, client):
    backend, nx = await start(backend_factory, nexus_factory)
    await client(nx).messages.create(
        model="qwen",
        max_tokens=64,
        extra_body={"temperature": 0.2, "top_p": 0.9, "top_k": 40},
        metadata={"user_id": "user-42"},
        messages=[
            {"role": "user", "content": "My name is Ada."},
            {"role": "assistant", "content": [{"type": "text", "text": "Hello Ada."}]},
            {"role": "user", "content": "What is my name?"},
        ],
    )
    body = sent(backend)
    assert body["messages"] == [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Hello Ada."},
        {"role": "user", "content": "What is my name?"},
    ]
    assert body["temperature"] == 0.2 and body["top_p"] == 0.9 and body["top_k"] == 40
    assert body["user"] == "user-42"
    assert "metadata" not in body


async def test_images_base64_and_url(backend_factory, nexus_factory, client):
    backend, nx = await start(
        backend_factory, nexus_factory, "ollama", {"llava:7b": {"vision": True}}
    )
    await client(nx).messages.create(
        model="llava:7b",
        max_tokens=64,
        messages=[
            {
                "role": "user",
                "content": [
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": PNG_1PX},
                    },
                    {
                        "type": "image",
                        "source": {"type": "url", "url": "https://example.com/cat.jpg"},
                    },
                    {"type": "text", "text": "What are these?"},
                ],
            }
        ],
    )
    content = sent(backend)["messages"][0]["content"]
    assert content == [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_1PX}"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
        {"type": "text", "text": "What are these?"},
    ]


async def test_images_avoid_a_backend_without_vision(backend_factory, nexus_factory, client):
    text_only = await backend_factory("ollama", {"m": {"vision": False}}, name="text")
    seeing = await backend_factory("lmstudio", {"m": {"vision": True}}, name="seeing")
    nx = await nexus_factory(backends_toml(text_only, seeing))
    raw = await client(nx).messages.with_raw_response.create(
        model="m",
        max_tokens=10,
        messages=[
            {
                "role": "user",
                "content": [
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": PNG_1PX},
                    }
                ],
            }
        ],
    )
    assert raw.headers["X-Nexus-Backend"] == "seeing"


WEATHER_TOOL = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"],
    },
}
TOOL_INPUT = {"city": 'Paris, "Île-de-France"', "days": 3, "units": ["C", "F"]}


async def test_tool_use_round_trip_streamed(backend_factory, nexus_factory, client):
    backend, nx = await start(backend_factory, nexus_factory)
    c = client(nx)
    backend.behaviours.append(
        chat_reply(
            "Let me check.",
            tool_calls=[("call_abc123", "get_weather", TOOL_INPUT)],
            finish="tool_calls",
        )
    )
    question = {"role": "user", "content": "Weather in Paris?"}
    events = []
    async with c.messages.stream(
        model="qwen",
        max_tokens=200,
        tools=[WEATHER_TOOL],
        tool_choice={"type": "auto"},
        messages=[question],
    ) as stream:
        async for event in stream:
            events.append(event)
        first = await stream.get_final_message()
    body = sent(backend)
    assert body["stream"] is True
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather in a city.",
                "parameters": WEATHER_TOOL["input_schema"],
            },
        }
    ]
    assert body["tool_choice"] == "auto"
    json_deltas = [
        e for e in events if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
    ]
    assert len(json_deltas) > 3  # the arguments arrived in fragments and were relayed so
    assert [b.type for b in first.content] == ["text", "tool_use"]
    tool_use = first.content[1]
    assert tool_use.id == "call_abc123" and tool_use.name == "get_weather"
    assert tool_use.input == TOOL_INPUT
    assert first.stop_reason == "tool_use"
    assert first.usage.output_tokens == 7

    backend.behaviours.append(chat_reply("It is sunny in Paris."))
    second = await c.messages.create(
        model="qwen",
        max_tokens=200,
        tools=[WEATHER_TOOL],
        messages=[
            question,
            {"role": "assistant", "content": [b.model_dump() for b in first.content]},
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "call_abc123",
                        "content": [{"type": "text", "text": "sunny, 21C"}],
                    },
                    {"type": "text", "text": "Thanks!"},
                ],
            },
        ],
    )
    assert second.content[0].text == "It is sunny in Paris."
    messages = sent(backend)["messages"]
    assert messages[1] == {
        "role": "assistant",
        "content": "Let me check.",
        "tool_calls": [
            {
                "id": "call_abc123",
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "arguments": json.dumps(TOOL_INPUT, ensure_ascii=False),
                },
            }
        ],
    }
    assert messages[2] == {"role": "tool", "tool_call_id": "call_abc123", "content": "sunny, 21C"}
    assert messages[3] == {"role": "user", "content": "Thanks!"}


async def test_tool_use_non_stream_and_tool_choice(backend_factory, nexus_factory, client):
    backend, nx = await start(backend_factory, nexus_factory)
    backend.behaviours.append(
        chat_reply(
            None, tool_calls=[("call_1", "get_weather", {"city": "Oslo"})], finish="tool_calls"
        )
    )
    message = await client(nx).messages.create(
        model="qwen",
        max_tokens=100,
        tools=[WEATHER_TOOL],
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        messages=[{"role": "user", "content": "Oslo?"}],
    )
    assert [b.type for b in message.content] == ["tool_use"]
    assert message.content[0].input == {"city": "Oslo"}
    assert message.stop_reason == "tool_use"
    body = sent(backend)
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["parallel_tool_calls"] is False


async def test_stop_sequence_reported_by_backend(backend_factory, nexus_factory, client):
    backend, nx = await start(backend_factory, nexus_factory)
    c = client(nx)
    backend.behaviours.append(chat_reply("one two", choice_extra={"stop_reason": "END"}))
    message = await c.messages.create(
        model="qwen",
        max_tokens=50,
        stop_sequences=["###", "END"],
        messages=[{"role": "user", "content": "count"}],
    )
    assert sent(backend)["stop"] == ["###", "END"]
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == "END"
    backend.behaviours.append(chat_reply("one two", choice_extra={"stop_reason": "END"}))
    async with c.messages.stream(
        model="qwen",
        max_tokens=50,
        stop_sequences=["###", "END"],
        messages=[{"role": "user", "content": "count"}],
    ) as stream:
        final = await stream.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == "END"


async def test_stop_sequence_found_in_text_when_backend_does_not_say(
    backend_factory, nexus_factory, client
):
    backend, nx = await start(backend_factory, nexus_factory, "generic", {"m": {}})
    backend.behaviours.append(chat_reply("alpha beta###"))
    message = await client(nx).messages.create(
        model="m",
        max_tokens=50,
        stop_sequences=["###"],
        messages=[{"role": "user", "content": "go"}],
    )
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == "###"
    assert message.content[0].text == "alpha beta"  # Anthropic never includes the sequence
    backend.behaviours.append(chat_reply("alpha beta"))
    message = await client(nx).messages.create(
        model="m",
        max_tokens=50,
        stop_sequences=["###"],
        messages=[{"role": "user", "content": "go"}],
    )
    assert message.stop_reason == "end_turn" and message.stop_sequence is None


async def test_max_tokens_cut_off(backend_factory, nexus_factory, client):
    backend, nx = await start(backend_factory, nexus_factory)
    c = client(nx)
    backend.behaviours.append(chat_reply("a long answer that was", finish="length"))
    message = await c.messages.create(
        model="qwen", max_tokens=5, messages=[{"role": "user", "content": "write"}]
    )
    assert message.stop_reason == "max_tokens"
    assert sent(backend)["max_tokens"] == 5
    backend.behaviours.append(chat_reply("a long answer that was", finish="length"))
    async with c.messages.stream(
        model="qwen", max_tokens=5, messages=[{"role": "user", "content": "write"}]
    ) as stream:
        final = await stream.get_final_message()
    assert final.stop_reason == "max_tokens"


async def test_streaming_text_via_text_stream(backend_factory, nexus_factory, client):
    backend, nx = await start(backend_factory, nexus_factory)
    backend.reply = "one two three four"
    async with client(nx).messages.stream(
        model="qwen", max_tokens=50, messages=[{"role": "user", "content": "count"}]
    ) as stream:
        pieces = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert len(pieces) == 4 and "".join(pieces) == "one two three four"
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 4 and final.usage.input_tokens == 10
    assert sent(backend)["stream_options"] == {"include_usage": True}


async def test_stream_event_sequence_and_headers(backend_factory, nexus_factory, client):
    _backend, nx = await start(backend_factory, nexus_factory)
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            nx.url + "/v1/messages",
            json={
                "model": "qwen",
                "max_tokens": 20,
                "stream": True,
                "messages": [{"role": "user", "content": "hi"}],
            },
        ) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["X-Nexus-Backend"] == "vl"
        text = (await resp.read()).decode()
    events = parse_sse(text)
    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"] or names[:2] == [
        "message_start",
        "ping",
    ]
    assert names[-2:] == ["message_delta", "message_stop"]
    assert names.count("content_block_start") == names.count("content_block_stop") == 1
    for name, data in events:
        assert data["type"] == name  # every event names itself the same way in both places
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] == "end_turn"
    assert delta["usage"]["output_tokens"] == 3


async def test_stream_without_backend_usage_estimates_output(
    backend_factory, nexus_factory, client
):
    backend, nx = await start(backend_factory, nexus_factory, "generic", {"m": {}})
    backend.reply = "twelve characters of text here"
    async with client(nx).messages.stream(
        model="m", max_tokens=50, messages=[{"role": "user", "content": "go"}]
    ) as stream:
        final = await stream.get_final_message()
    assert "stream_options" not in sent(backend)  # generic servers are not asked for usage
    assert final.content[0].text == "twelve characters of text here"
    assert final.usage.output_tokens > 0


async def test_thinking_blocks(backend_factory, nexus_factory, client):
    backend, nx = await start(backend_factory, nexus_factory)
    c = client(nx)
    backend.behaviours.append(chat_reply("42", reasoning="Six times seven."))
    message = await c.messages.create(
        model="qwen", max_tokens=100, messages=[{"role": "user", "content": "6*7?"}]
    )
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == "Six times seven."
    assert message.content[1].text == "42"
    backend.behaviours.append(
        chat_reply("42", reasoning="Six times seven.", reasoning_key="reasoning")
    )
    events = []
    async with c.messages.stream(
        model="qwen", max_tokens=100, messages=[{"role": "user", "content": "6*7?"}]
    ) as stream:
        async for event in stream:
            events.append(event)
        final = await stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking.strip() == "Six times seven."
    assert final.content[1].text.strip() == "42"
    assert any(e.type == "content_block_delta" and e.delta.type == "thinking_delta" for e in events)
    # A thinking block sent back in a later turn is not forwarded as text.
    await c.messages.create(
        model="qwen",
        max_tokens=100,
        messages=[
            {"role": "user", "content": "6*7?"},
            {"role": "assistant", "content": [b.model_dump() for b in final.content]},
            {"role": "user", "content": "and 6*8?"},
        ],
    )
    assert sent(backend)["messages"][1] == {"role": "assistant", "content": "42"}


async def test_count_tokens(backend_factory, nexus_factory, client):
    backend, nx = await start(backend_factory, nexus_factory)
    c = client(nx)
    short = await c.messages.count_tokens(
        model="qwen", messages=[{"role": "user", "content": "hi"}]
    )
    long = await c.messages.count_tokens(
        model="qwen",
        system="You are a helpful assistant.",
        tools=[WEATHER_TOOL],
        messages=[{"role": "user", "content": "hello " * 400}],
    )
    assert short.input_tokens > 0
    assert long.input_tokens > short.input_tokens + 300
    assert backend.received == []  # counting never costs a backend request
    with pytest.raises(anthropic.NotFoundError):
        await c.messages.count_tokens(model="nope", messages=[{"role": "user", "content": "x"}])


async def test_count_tokens_knows_the_models_routing_knows(backend_factory, nexus_factory, client):
    """A model served only through its fallback (or an alias leading to one) is counted, as it
    is answered, not refused as unknown."""
    extra = (
        '[routing.aliases]\n"claude-x" = "gone"\n'
        '[routing.fallbacks]\n"gone" = ["qwen"]\n"big" = ["qwen"]\n'
    )
    backend, nx = await start(backend_factory, nexus_factory, extra=extra)
    c = client(nx)
    for model in ("claude-x", "big", "qwen"):
        counted = await c.messages.count_tokens(
            model=model, messages=[{"role": "user", "content": "hi"}]
        )
        assert counted.input_tokens > 0
    answer = await c.messages.create(
        model="claude-x", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.content
    assert sent(backend)["model"] == "qwen"
    with pytest.raises(anthropic.NotFoundError):
        await c.messages.count_tokens(model="gone-too", messages=[{"role": "user", "content": "x"}])


async def test_unknown_model_is_not_found_error(backend_factory, nexus_factory, client):
    _backend, nx = await start(backend_factory, nexus_factory)
    with pytest.raises(anthropic.NotFoundError) as caught:
        await client(nx).messages.create(
            model="claude-opus-9", max_tokens=10, messages=[{"role": "user", "content": "x"}]
        )
    assert caught.value.status_code == 404
    assert caught.value.body["type"] == "error"
    assert caught.value.body["error"]["type"] == "not_found_error"
    assert "qwen" in caught.value.body["error"]["message"]


async def test_bad_body_is_bad_request_error(backend_factory, nexus_factory, client):
    backend, nx = await start(backend_factory, nexus_factory)
    c = client(nx)
    with pytest.raises(anthropic.BadRequestError) as caught:
        await c.messages.create(model="qwen", max_tokens=10, messages=[])
    assert caught.value.body["error"]["type"] == "invalid_request_error"
    assert "messages" in caught.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as caught:
        await c.messages.create(
            model="qwen", max_tokens=10, messages=[{"role": "robot", "content": "x"}]
        )
    assert "role" in caught.value.body["error"]["message"]
    async with aiohttp.ClientSession() as session:
        for payload in (b"{not json", b'{"model": "qwen", "messages": []}', b"[1]"):
            async with session.post(nx.url + "/v1/messages", data=payload) as resp:
                assert resp.status == 400
                doc = await resp.json()
                assert doc["type"] == "error"
                assert doc["error"]["type"] == "invalid_request_error"
                assert resp.headers["X-Request-Id"].startswith("req-")
    assert backend.received == []


async def test_backend_failure_is_api_error(backend_factory, nexus_factory, client):
    backend, nx = await start(backend_factory, nexus_factory)

    async def broken(request: web.Request, body: dict[str, Any]) -> web.Response:
        return web.json_response({"error": "boom"}, status=500)

    backend.behaviours.extend([broken] * 3)
    with pytest.raises(anthropic.InternalServerError) as caught:
        await client(nx).messages.create(
            model="qwen", max_tokens=10, messages=[{"role": "user", "content": "x"}]
        )
    assert caught.value.status_code == 502
    assert caught.value.body["error"]["type"] == "api_error"


async def test_backend_refusal_keeps_its_status_and_nexus_headers(
    backend_factory, nexus_factory, client
):
    backend, nx = await start(backend_factory, nexus_factory)

    async def refuse(request: web.Request, body: dict[str, Any]) -> web.Response:
        return web.json_response(
            {"error": {"message": "temperature must be at most 2", "type": "BadRequestError"}},
            status=400,
        )

    backend.behaviours.append(refuse)
    with pytest.raises(anthropic.BadRequestError) as caught:
        await client(nx).messages.create(
            model="qwen",
            max_tokens=10,
            extra_body={"temperature": 3.0},
            messages=[{"role": "user", "content": "x"}],
        )
    assert caught.value.body["error"] == {
        "type": "invalid_request_error",
        "message": "temperature must be at most 2",
    }
    assert caught.value.response.headers["X-Nexus-Backend"] == "vl"


async def test_a_backend_refusal_in_plain_text_comes_back_in_anthropic_shape(
    backend_factory, nexus_factory, client
):
    backend, nx = await start(backend_factory, nexus_factory)

    async def refuse(request: web.Request, body: dict[str, Any]) -> web.Response:
        return web.Response(text="bad parameter: top_k", status=400)

    backend.behaviours.append(refuse)
    with pytest.raises(anthropic.BadRequestError) as caught:
        await client(nx).messages.create(
            model="qwen", max_tokens=10, messages=[{"role": "user", "content": "x"}]
        )
    assert caught.value.body["type"] == "error"
    assert caught.value.body["error"]["type"] == "invalid_request_error"
    assert "bad parameter: top_k" in caught.value.body["error"]["message"]


async def test_no_backend_available_is_overloaded(backend_factory, nexus_factory, client):
    _backend, nx = await start(backend_factory, nexus_factory)
    nx.backend("vl").status = "unhealthy"
    with pytest.raises(anthropic.APIStatusError) as caught:
        await client(nx).messages.create(
            model="qwen", max_tokens=10, messages=[{"role": "user", "content": "x"}]
        )
    assert caught.value.status_code == 503
    assert caught.value.body["error"]["type"] == "overloaded_error"


async def test_failure_mid_stream_becomes_error_event(backend_factory, nexus_factory, client):
    backend, nx = await start(backend_factory, nexus_factory)
    backend.behaviours.append(chat_reply("partial answer", complete=False))
    pieces = []
    with pytest.raises(anthropic.APIStatusError) as caught:
        async with client(nx).messages.stream(
            model="qwen", max_tokens=50, messages=[{"role": "user", "content": "x"}]
        ) as stream:
            async for text in stream.text_stream:
                pieces.append(text)
    assert "".join(pieces) == "partial answer"
    assert caught.value.body["type"] == "error"
    assert caught.value.body["error"]["type"] == "api_error"
    assert "ended the stream" in caught.value.body["error"]["message"]


async def test_unknown_path_under_messages_answers_in_anthropic_shape(
    backend_factory, nexus_factory, client
):
    _backend, nx = await start(backend_factory, nexus_factory)
    async with (
        aiohttp.ClientSession() as session,
        session.post(nx.url + "/v1/messages/batches", json={}) as resp,
    ):
        assert resp.status in (404, 405)
        doc = await resp.json()
    assert doc["type"] == "error" and doc["error"]["type"] in (
        "not_found_error",
        "invalid_request_error",
    )
    async with (
        aiohttp.ClientSession() as session,
        session.post(nx.url + "/v1/chat/completions", data=b"{bad") as resp,
    ):
        doc = await resp.json()
    assert "type" not in doc and doc["error"]["code"] == "invalid_request"  # OpenAI's shape


# --- a recorded Claude Code-style request ----------------------------------------------------


def parse_sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in text.strip().split("\n\n"):
        name, data = None, None
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
        assert name is not None and data is not None, block
        events.append((name, data))
    return events


async def test_claude_code_request_is_served(backend_factory, nexus_factory, client):
    recorded = json.loads((FIXTURES / "claude-code-request.json").read_text())
    backend, nx = await start(
        backend_factory,
        nexus_factory,
        "vllm",
        {"qwen2.5-coder:32b": {"context": 16384}},
        extra='[routing.aliases]\n"claude-sonnet-4-5-20250929" = "qwen2.5-coder:32b"\n',
    )
    backend.behaviours.append(
        chat_reply(
            "I will count them.",
            tool_calls=[("call_glob1", "Glob", {"pattern": "**/*.py"})],
            finish="tool_calls",
        )
    )
    url = (
        nx.url + recorded["path"] + "?" + "&".join(f"{k}={v}" for k, v in recorded["query"].items())
    )
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, headers=recorded["headers"], json=recorded["body"]) as resp,
    ):
        assert resp.status == 200, await resp.text()
        assert resp.headers["X-Nexus-Backend"] == "vl"
        clamped = int(resp.headers["X-Nexus-Max-Tokens-Clamped"])
        events = parse_sse((await resp.read()).decode())
    assert 0 < clamped < 16384
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names[-1] == "message_stop"
    text = "".join(
        d["delta"]["text"] for n, d in events if n == "content_block_delta" and "text" in d["delta"]
    )
    arguments = "".join(
        d["delta"]["partial_json"]
        for n, d in events
        if n == "content_block_delta" and d["delta"]["type"] == "input_json_delta"
    )
    assert text == "I will count them."
    assert json.loads(arguments) == {"pattern": "**/*.py"}
    tool_start = next(
        d
        for n, d in events
        if n == "content_block_start" and d["content_block"]["type"] == "tool_use"
    )
    assert tool_start["content_block"]["id"] == "call_glob1"
    assert tool_start["content_block"]["name"] == "Glob"
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"

    body = sent(backend)
    assert body["model"] == "qwen2.5-coder:32b" and body["stream"] is True
    assert body["max_tokens"] == clamped
    assert body["user"] == recorded["body"]["metadata"]["user_id"]
    system = body["messages"][0]
    assert system["role"] == "system"
    assert "You are Claude Code" in system["content"]
    assert "interactive CLI tool" in system["content"]
    user = body["messages"][1]
    assert user["role"] == "user"
    assert "How many Python files" in user["content"]
    assert [t["function"]["name"] for t in body["tools"]] == ["Bash", "Glob", "Read"]
    assert (
        body["tools"][0]["function"]["parameters"] == recorded["body"]["tools"][0]["input_schema"]
    )
    for anthropic_only in ("context_management", "metadata", "system", "tool_choice"):
        assert anthropic_only not in body
    assert "cache_control" not in json.dumps(body) and "input_schema" not in json.dumps(body)
    assert body["stream_options"] == {"include_usage": True}


# --- the pure translation functions ------------------------------------------------------------


def test_messages_to_chat_tool_result_variants():
    chat = nexus.messages_to_chat(
        {
            "model": "m",
            "max_tokens": 10,
            "messages": [
                {"role": "user", "content": "run it"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "tool_use", "id": "t1", "name": "a", "input": {}},
                        {"type": "tool_use", "id": "t2", "name": "b", "input": {"x": 1}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "t1", "content": "ok"},
                        {
                            "type": "tool_result",
                            "tool_use_id": "t2",
                            "is_error": True,
                            "content": "no such file",
                        },
                    ],
                },
            ],
        }
    )
    messages = chat["messages"]
    assert messages[1]["content"] is None
    assert [c["id"] for c in messages[1]["tool_calls"]] == ["t1", "t2"]
    assert messages[2] == {"role": "tool", "tool_call_id": "t1", "content": "ok"}
    assert messages[3]["role"] == "tool" and messages[3]["tool_call_id"] == "t2"
    assert "no such file" in messages[3]["content"] and "error" in messages[3]["content"].lower()
    assert len(messages) == 4


def test_messages_to_chat_tool_use_input_is_sent_as_json_text():
    """An input of any JSON type becomes the call's arguments as JSON text: a string input is
    a JSON string, never passed through as if it were the arguments' text."""
    for given, arguments in (({"x": 1}, '{"x": 1}'), ("s", '"s"'), ('{"a":1}', '"{\\"a\\":1}"')):
        chat = nexus.messages_to_chat(
            {
                "model": "m",
                "max_tokens": 10,
                "messages": [
                    {"role": "user", "content": "run it"},
                    {
                        "role": "assistant",
                        "content": [{"type": "tool_use", "id": "t", "name": "a", "input": given}],
                    },
                ],
            }
        )
        call = chat["messages"][1]["tool_calls"][0]["function"]
        assert call["arguments"] == arguments and json.loads(call["arguments"]) == given


async def test_an_answer_with_junk_tool_calls_is_still_answered(
    backend_factory, nexus_factory, client
):
    """A backend's `tool_calls` that is no list (or holds no objects) is no call: the answer's
    text still comes back, never a 500."""
    backend, nx = await start(backend_factory, nexus_factory)
    for junk in (True, 5, ["junk"]):

        async def reply(request: web.Request, body: dict) -> web.Response:
            message = {"role": "assistant", "content": "fine", "tool_calls": junk}  # noqa: B023
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            return web.json_response({"id": "x", "object": "chat.completion", "choices": [choice]})

        backend.behaviours.append(reply)
        message = await client(nx).messages.create(
            model="qwen", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        )
        assert [b.type for b in message.content] == ["text"] and message.content[0].text == "fine"


def test_messages_to_chat_tool_choice_any_and_none():
    base = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
    tools = [WEATHER_TOOL]
    any_ = nexus.messages_to_chat(dict(base, tools=tools, tool_choice={"type": "any"}))
    assert any_["tool_choice"] == "required"
    none = nexus.messages_to_chat(dict(base, tools=tools, tool_choice={"type": "none"}))
    assert none["tool_choice"] == "none"


@pytest.mark.parametrize(
    "bad",
    [
        {"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]},
        {"model": "m", "messages": [{"role": "user", "content": "x"}]},
        {"model": "m", "max_tokens": -1, "messages": [{"role": "user", "content": "x"}]},
        {"model": "m", "max_tokens": 5, "messages": "hi"},
        {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": 7}]},
        {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "x"}]}]},
        {
            "model": "m",
            "max_tokens": 5,
            "system": 3,
            "messages": [{"role": "user", "content": "x"}],
        },
        {
            "model": "m",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}],
        },
    ],
)
def test_messages_to_chat_rejects_bad_bodies(bad):
    with pytest.raises(nexus.NexusError) as caught:
        nexus.messages_to_chat(bad)
    assert caught.value.status == 400


def test_chat_to_message_usage_and_cached_tokens():
    message = nexus.chat_to_message(
        {
            "id": "chatcmpl-1",
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "hi"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": 100,
                "completion_tokens": 5,
                "prompt_tokens_details": {"cached_tokens": 60},
            },
        },
        "m",
    )
    assert message["usage"]["input_tokens"] == 40
    assert message["usage"]["cache_read_input_tokens"] == 60
    assert message["usage"]["output_tokens"] == 5
    assert message["content"] == [{"type": "text", "text": "hi"}]


def test_tool_result_images_follow_as_user_content():
    chat = nexus.messages_to_chat(
        {
            "model": "m",
            "max_tokens": 10,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "shot",
                            "content": [
                                {"type": "text", "text": "the screen:"},
                                {
                                    "type": "image",
                                    "source": {
                                        "type": "base64",
                                        "media_type": "image/png",
                                        "data": PNG_1PX,
                                    },
                                },
                            ],
                        }
                    ],
                }
            ],
        }
    )
    assert chat["messages"] == [
        {"role": "tool", "tool_call_id": "shot", "content": "the screen:"},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_1PX}"}}
            ],
        },
    ]


def test_stream_translator_parallel_tool_calls():
    """Two tool calls in one streamed answer become two tool_use blocks, in order, each with
    its own arguments; the usage chunk after the finish sets message_delta's counts."""
    needs = nexus.RequestNeeds(model="m", prompt_tokens=20)
    fmt = nexus.AnthropicFormat({"model": "m", "max_tokens": 5, "messages": []}, needs)
    chunks = [
        {"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"content": "Both."}, "finish_reason": None}]},
    ]
    for i, (call_id, args) in enumerate([("c1", '{"a": 1}'), ("c2", '{"b": [2]}')]):
        head = {"index": i, "id": call_id, "function": {"name": f"f{i}", "arguments": ""}}
        chunks.append({"choices": [{"index": 0, "delta": {"tool_calls": [head]}}]})
        for piece in (args[:4], args[4:]):
            frag = {"index": i, "function": {"arguments": piece}}
            chunks.append({"choices": [{"index": 0, "delta": {"tool_calls": [frag]}}]})
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    chunks.append({"choices": [], "usage": {"prompt_tokens": 30, "completion_tokens": 9}})
    out = b"".join(fmt.chunk(json.dumps(c).encode(), c) for c in chunks) + fmt.end()
    events = parse_sse(out.decode())
    starts = [d["content_block"] for n, d in events if n == "content_block_start"]
    assert [(b["type"], b.get("id")) for b in starts] == [
        ("text", None),
        ("tool_use", "c1"),
        ("tool_use", "c2"),
    ]
    for index, expected in ((1, {"a": 1}), (2, {"b": [2]})):
        partial = "".join(
            d["delta"]["partial_json"]
            for n, d in events
            if n == "content_block_delta" and d["index"] == index
        )
        assert json.loads(partial) == expected
    stops = [d["index"] for n, d in events if n == "content_block_stop"]
    assert stops == [0, 1, 2]
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    assert events[-2][1]["usage"]["output_tokens"] == 9
    assert events[-2][1]["usage"]["input_tokens"] == 30
    assert events[0][1]["message"]["usage"]["input_tokens"] == 20  # the estimate, at the start


async def test_a_stream_chunk_of_the_wrong_shape_is_dropped(backend_factory, nexus_factory, client):
    backend, nx = await start(backend_factory, nexus_factory)

    async def behaviour(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = await start_sse(request)
        model = body["model"]
        await send_chunk(response, chat_chunk(model, {"content": "Hello"}, None))
        await send_chunk(response, chat_chunk(model, {"tool_calls": 5}, None))
        await send_chunk(response, chat_chunk(model, {"content": " there"}, None))
        await send_chunk(response, chat_chunk(model, {}, "stop"))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    backend.behaviours.append(behaviour)
    async with client(nx).messages.stream(
        model="qwen", max_tokens=50, messages=[{"role": "user", "content": "x"}]
    ) as stream:
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "Hello there"
    assert final.stop_reason == "end_turn"


def test_stream_translator_ignores_events_of_the_wrong_shape():
    translator = nexus.AnthropicStream(None, "m")  # type: ignore[arg-type]
    for odd in (
        {"type": "content_block_start", "content_block": "text"},
        {"type": "content_block_delta", "delta": ["x"]},
        {"type": "message_delta", "delta": 3, "usage": "many"},
        {"type": "message_start", "message": {"usage": 5}},
        {"type": "content_block_start", "index": [1], "content_block": {"type": "tool_use"}},
        {"type": "message_delta", "delta": {"stop_reason": ["x"]}},
    ):
        chunks = translator.feed(odd)
        assert all(isinstance(c, dict) for c in chunks)


def test_a_stream_cut_twice_says_so_once():
    """Every door writes one error for a stream it cut, however many problems follow (a
    backend's error, then an internal one while ending): a client reads one last word."""
    needs = nexus.RequestNeeds(model="m", prompt_tokens=1)
    formats = [
        nexus.AnthropicFormat({"model": "m", "max_tokens": 5, "messages": []}, needs),
        nexus.ResponsesFormat({"model": "m", "input": "hi"}, needs),
        nexus.OllamaFormat({}, "chat"),
    ]
    for fmt in formats:
        first = fmt.error("chat", "m", "The backend stopped answering.")
        assert first and b"The backend stopped answering." in first
        assert fmt.error("chat", "m", "Nexus hit an internal error.") == b"", type(fmt).__name__
        assert fmt.end() == b""
