"""Cloud backends (SPEC §5, §6): OpenAI with a Bearer key, Anthropic's native Messages API
translated to and from chat completions; keys from the environment only and never shown; costs
from real usage × price; health that never spends tokens."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import subprocess
import sys
import time

import aiohttp
import openai
import pytest
import tiktoken_ext.openai_public  # noqa: F401 - the published definitions, for reference counts
from aiohttp.test_utils import TestServer
from conftest import (
    ROOT,
    ConnectProxy,
    MockBackend,
    backends_toml,
    cloud_env,
    free_port,
    key_variable,
    self_signed,
    start_sse,
)

import nexus

PRICES = nexus.load_price_table()


def client(nx) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=nx.url + "/v1", api_key="unused", max_retries=0)


async def cloud_nexus(nexus_factory, *backends, extra: str = "", **per_backend):
    toml = backends_toml(*backends, **per_backend) + extra
    return await nexus_factory(toml, env=cloud_env(*backends))


def expected_cost(model: str, prompt: int, completion: int) -> str:
    return nexus.format_usd(nexus.cost_usd(PRICES[model], nexus.TokenUsage(prompt, completion)))


# --- OpenAI -----------------------------------------------------------------------------------


async def test_openai_backend_gets_the_bearer_key_and_costs_are_priced(
    backend_factory, nexus_factory
):
    cloud = await backend_factory("openai", {"gpt-4o": {}}, name="oai")
    nx = await cloud_nexus(nexus_factory, cloud)
    raw = await client(nx).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.parse().choices[0].message.content == "Hello from oai"
    assert cloud.auth_failures == 0
    assert cloud.received[-1][2]["Authorization"] == f"Bearer {cloud.api_key}"
    assert raw.headers["X-Nexus-Backend-Type"] == "cloud"
    assert raw.headers["X-Nexus-Privacy-Zone"] == "open"
    # The mock reports 10 prompt and 3 completion tokens: the cost is that × gpt-4o's price.
    assert raw.headers["X-Nexus-Cost-Estimated"] == expected_cost("gpt-4o", 10, 3)
    assert float(raw.headers["X-Nexus-Cost-Estimated"]) > 0
    assert nx.app[nexus.BUDGET].spent_usd == pytest.approx(float(expected_cost("gpt-4o", 10, 3)))


@pytest.mark.parametrize("kind", ["vllm", "llamacpp", "lmstudio", "ollama", "generic"])
async def test_a_local_server_started_with_a_key_gets_it_on_polls_and_requests(
    nexus_factory, kind: str
):
    """vLLM or llama-server started with --api-key answer 401 to anything without it."""
    local = MockBackend(kind, {"m": {"context": 4096}}, name="keyed")
    local.key_required = True
    await local.start()
    try:
        toml = backends_toml(local, keyed={"api_key_env": key_variable(local)})
        nx = await nexus_factory(toml, env={key_variable(local): local.api_key})
        context = nx.backend("keyed").models["m"].context_length
        assert context == (None if kind == "generic" else 4096)  # every poll got in
        reply = await client(nx).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.choices[0].message.content == "Hello from keyed"
        assert local.received[-1][2]["Authorization"] == f"Bearer {local.api_key}"
        assert local.auth_failures == 0
    finally:
        await local.stop()


async def test_a_cloud_behind_an_https_proxy_is_reached_through_its_tunnel(
    tmp_path, monkeypatch, nexus_factory
):
    """An offline lab reaches the cloud only through a proxy: polls and requests go through
    HTTPS_PROXY's CONNECT tunnel, TLS inside it, and the proxy resolves the cloud's name."""
    cert, key = self_signed(tmp_path, "cloud.test")
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    cloud = MockBackend("openai", {"gpt-4o": {}}, name="oai")
    cloud.server = TestServer(cloud.build_app(), host="127.0.0.1", port=free_port())
    await cloud.server.start_server(ssl=server_tls)
    proxy = ConnectProxy()
    for name in ("https_proxy", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", await proxy.start())
    monkeypatch.setattr(nexus, "tls_context", lambda: ssl.create_default_context(cafile=cert))
    try:
        toml = (
            f'[[backends]]\nname = "oai"\nurl = "https://cloud.test:{cloud.server.port}"\n'
            f'type = "openai"\napi_key_env = "{key_variable(cloud)}"\n'
        )
        nx = await nexus_factory(toml, env=cloud_env(cloud))  # its poll went through too
        answer = await client(nx).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
        )
        assert answer.choices[0].message.content == "Hello from oai"
        assert cloud.auth_failures == 0
        assert proxy.requests and all(
            r.startswith(b"CONNECT cloud.test:%d HTTP/1.1\r\n" % cloud.server.port)
            for r in proxy.requests
        )
        assert proxy.tunnelled > 0
    finally:
        await proxy.stop()
        await cloud.stop()


async def test_cloud_health_never_spends_tokens(backend_factory, nexus_factory):
    cloud = await backend_factory("openai", {"gpt-4o": {}}, name="oai")
    claude = await backend_factory("anthropic", {"claude-haiku-4-5": {}}, name="claude")
    nx = await cloud_nexus(
        nexus_factory, cloud, claude, extra="[health_check]\ninterval_seconds = 0.05\n"
    )
    for _ in range(100):
        if cloud.polls >= 3 and claude.polls >= 3:
            break
        await __import__("asyncio").sleep(0.02)
    assert cloud.polls >= 3 and claude.polls >= 3
    assert cloud.received == [] and claude.received == []  # no completion, ever
    assert cloud.auth_failures == 0 and claude.auth_failures == 0
    assert nx.backend("claude").status == "healthy"
    assert "claude-haiku-4-5" in nx.backend("claude").models


async def test_cloud_stream_is_accounted_and_usage_stripped(backend_factory, nexus_factory):
    cloud = await backend_factory("openai", {"gpt-4o-mini": {}}, name="oai")
    nx = await cloud_nexus(nexus_factory, cloud)
    raw = await client(nx).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    chunks = [chunk async for chunk in raw.parse()]
    assert all(chunk.usage is None for chunk in chunks)
    assert cloud.received[-1][1]["stream_options"] == {"include_usage": True}
    # Headers precede the answer: a stream's header estimates the prompt's cost.
    assert float(raw.headers["X-Nexus-Cost-Estimated"]) > 0
    spent = nx.app[nexus.BUDGET].spent_usd
    assert spent == pytest.approx(float(expected_cost("gpt-4o-mini", 10, 3)))


async def test_cost_counted_exactly_when_the_backend_reports_no_usage(
    backend_factory, nexus_factory
):
    cloud = await backend_factory("openai", {"gpt-4o": {}}, name="oai")
    cloud.reply = "Counted by Nexus itself, exactly."

    async def no_usage(request, body):
        answer = {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": "gpt-4o",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": cloud.reply},
                    "finish_reason": "stop",
                }
            ],
        }
        return aiohttp.web.json_response(answer)

    cloud.behaviours.append(no_usage)
    nx = await cloud_nexus(nexus_factory, cloud)
    prompt = "How many tokens does this prompt have, exactly?"
    raw = await client(nx).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": prompt}]
    )
    encoding = nexus.load_encoding("o200k_base")
    prompt_tokens = (
        len(encoding.encode_ordinary(prompt))
        + len(encoding.encode_ordinary("user"))
        + nexus.CHAT_MESSAGE_TOKENS
        + nexus.CHAT_REPLY_TOKENS
    )
    completion_tokens = len(encoding.encode_ordinary(cloud.reply))
    assert raw.headers["X-Nexus-Cost-Estimated"] == expected_cost(
        "gpt-4o", prompt_tokens, completion_tokens
    )


async def test_keys_never_shown_anywhere(backend_factory, nexus_factory, caplog):
    caplog.set_level(logging.DEBUG)
    cloud = await backend_factory("openai", {"gpt-4o": {}}, name="oai")
    claude = await backend_factory("anthropic", {"claude-haiku-4-5": {}}, name="claude")
    cloud.api_key = "sk-proj-VERYSECRET-openai-1234"
    claude.api_key = "sk-ant-VERYSECRET-anthropic-5678"
    nx = await cloud_nexus(nexus_factory, cloud, claude)
    seen: list[str] = []
    async with aiohttp.ClientSession() as session:
        for path in ("/v1/stats", "/v1/backends", "/v1/models", "/health", "/"):
            async with session.get(nx.url + path) as resp:
                seen.append(await resp.text())
        for model in ("gpt-4o", "claude-haiku-4-5"):
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
            async with session.post(nx.url + "/v1/chat/completions", json=body) as resp:
                seen.append(await resp.text() + json.dumps(dict(resp.headers)))
        # A backend that rejects the key: the error reaches the client without the key.
        cloud.api_key = "sk-rotated"
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
        async with session.post(nx.url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 401
            seen.append(await resp.text() + json.dumps(dict(resp.headers)))
    seen.append(caplog.text)
    everything = "\n".join(seen)
    assert "VERYSECRET" not in everything


def test_missing_key_variable_stops_start_up_naming_it(tmp_path):
    config = tmp_path / "nexus.toml"
    config.write_text(
        '[[backends]]\nname = "oai"\nurl = "https://api.openai.com/v1"\ntype = "openai"\n'
        'api_key_env = "NEXUS_TEST_ABSENT_KEY"\n'
    )
    env = {k: v for k, v in os.environ.items() if k != "NEXUS_TEST_ABSENT_KEY"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "nexus.py"), "serve", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert result.returncode == 2
    assert "NEXUS_TEST_ABSENT_KEY" in result.stderr
    assert "backends[0].api_key_env" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# --- Anthropic --------------------------------------------------------------------------------


async def test_anthropic_non_stream_translated_both_ways(backend_factory, nexus_factory):
    claude = await backend_factory("anthropic", {"claude-haiku-4-5": {}}, name="claude")
    nx = await cloud_nexus(nexus_factory, claude)
    raw = await client(nx).chat.completions.with_raw_response.create(
        model="claude-haiku-4-5",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
        ],
        temperature=1.5,
        stop="END",
    )
    answer = raw.parse()
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.content == "Hello from claude"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage.prompt_tokens == 12 and answer.usage.completion_tokens == 3
    path, sent, headers = claude.received[-1]
    assert path == "/v1/messages"
    assert headers["x-api-key"] == claude.api_key
    assert headers["anthropic-version"] == "2023-06-01"
    assert "Authorization" not in headers
    assert sent == {
        "model": "claude-haiku-4-5",
        "max_tokens": 4096,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "temperature": 1.0,
        "stop_sequences": ["END"],
    }
    assert raw.headers["X-Nexus-Cost-Estimated"] == expected_cost("claude-haiku-4-5", 12, 3)


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
    ],
)
async def test_anthropic_stop_reasons(backend_factory, nexus_factory, stop_reason, finish):
    claude = await backend_factory("anthropic", {"claude-haiku-4-5": {}}, name="claude")
    claude.stop_reason = stop_reason
    nx = await cloud_nexus(nexus_factory, claude)
    messages = [{"role": "user", "content": "hi"}]
    answer = await client(nx).chat.completions.create(
        model="claude-haiku-4-5", messages=messages, max_tokens=7
    )
    assert answer.choices[0].finish_reason == finish
    assert claude.received[-1][1]["max_tokens"] == 7
    stream = await client(nx).chat.completions.create(
        model="claude-haiku-4-5", messages=messages, stream=True
    )
    finishes = [c.choices[0].finish_reason async for c in stream if c.choices]
    assert finishes[-1] == finish


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


async def test_anthropic_tool_calls_and_results(backend_factory, nexus_factory):
    claude = await backend_factory("anthropic", {"claude-haiku-4-5": {}}, name="claude")
    claude.tool_call = {"name": "get_weather", "input": {"city": "Zürich"}}
    claude.stop_reason = "tool_use"
    nx = await cloud_nexus(nexus_factory, claude)
    image = "data:image/png;base64,iVBORw0KGgo="
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Weather where this is?"},
                {"type": "image_url", "image_url": {"url": image}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Bern"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
        {"role": "user", "content": "And in Zürich?"},
    ]
    answer = await client(nx).chat.completions.create(
        model="claude-haiku-4-5",
        messages=messages,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
    )
    sent = claude.received[-1][1]
    assert sent["tools"] == [
        {
            "name": "get_weather",
            "input_schema": TOOLS[0]["function"]["parameters"],
            "description": "Weather for a city",
        }
    ]
    assert sent["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert sent["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Weather where this is?"},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
                },
            ],
        },
        {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": "call_1",
                    "name": "get_weather",
                    "input": {"city": "Bern"},
                }
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "call_1",
                    "content": [{"type": "text", "text": "rain"}],
                },
                {"type": "text", "text": "And in Zürich?"},
            ],
        },
    ]
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls[0].id == "toolu_mock1"
    assert choice.message.tool_calls[0].function.name == "get_weather"
    assert json.loads(choice.message.tool_calls[0].function.arguments) == {"city": "Zürich"}


async def test_anthropic_stream_with_tool_call(backend_factory, nexus_factory):
    claude = await backend_factory("anthropic", {"claude-haiku-4-5": {}}, name="claude")
    claude.tool_call = {"name": "get_weather", "input": {"city": "Basel"}}
    claude.stop_reason = "tool_use"
    nx = await cloud_nexus(nexus_factory, claude)
    raw = await client(nx).chat.completions.with_raw_response.create(
        model="claude-haiku-4-5",
        messages=[{"role": "user", "content": "weather?"}],
        tools=TOOLS,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert raw.headers["Content-Type"].startswith("text/event-stream")
    text, arguments, names, finish, usage = "", "", [], None, None
    async for chunk in raw.parse():
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            for call in choice.delta.tool_calls or ():
                if call.function.name:
                    names.append((call.index, call.id, call.function.name))
                arguments += call.function.arguments or ""
            finish = choice.finish_reason or finish
    assert text == "Hello from claude"
    assert names == [(0, "toolu_mock1", "get_weather")]
    assert json.loads(arguments) == {"city": "Basel"}
    assert finish == "tool_calls"
    assert usage.prompt_tokens == 12 and usage.completion_tokens == 3
    assert nx.app[nexus.BUDGET].spent_usd == pytest.approx(
        float(expected_cost("claude-haiku-4-5", 12, 3))
    )


async def test_anthropic_stream_without_usage_request_strips_it(backend_factory, nexus_factory):
    claude = await backend_factory("anthropic", {"claude-haiku-4-5": {}}, name="claude")
    nx = await cloud_nexus(nexus_factory, claude)
    async with aiohttp.ClientSession() as session:
        body = {
            "model": "claude-haiku-4-5",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
        }
        async with session.post(nx.url + "/v1/chat/completions", json=body) as resp:
            text = await resp.text()
    events = [line[6:] for line in text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("usage" not in c for c in chunks)
    assert "stream_options" not in claude.received[-1][1]
    assert nx.app[nexus.BUDGET].spent_usd > 0  # accounted all the same


async def test_anthropic_errors_become_openai_errors(backend_factory, nexus_factory):
    claude = await backend_factory("anthropic", {"claude-haiku-4-5": {}}, name="claude")

    async def refuse(request, body):
        error = {"type": "invalid_request_error", "message": "messages: roles must alternate"}
        return aiohttp.web.json_response({"type": "error", "error": error}, status=400)

    claude.behaviours.append(refuse)
    nx = await cloud_nexus(nexus_factory, claude)
    with pytest.raises(openai.BadRequestError) as caught:
        await client(nx).chat.completions.create(
            model="claude-haiku-4-5", messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.body["message"] == "messages: roles must alternate"
    assert caught.value.body["type"] == "invalid_request_error"


async def test_anthropic_overloaded_fails_over(backend_factory, nexus_factory):
    first = await backend_factory("anthropic", {"claude-haiku-4-5": {}}, name="claude-a")
    second = await backend_factory("anthropic", {"claude-haiku-4-5": {}}, name="claude-b")

    async def overloaded(request, body):
        error = {"type": "overloaded_error", "message": "Overloaded"}
        return aiohttp.web.json_response({"type": "error", "error": error}, status=529)

    first.behaviours.append(overloaded)
    nx = await cloud_nexus(
        nexus_factory,
        first,
        second,
        **{"claude-a": {"priority": 1}, "claude-b": {"priority": 2}},
    )
    answer = await client(nx).chat.completions.create(
        model="claude-haiku-4-5", messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.choices[0].message.content == "Hello from claude-b"
    assert len(first.received) == 1  # overloaded (529) counts as a failure: the next one served


async def test_anthropic_backend_serves_chat_only(backend_factory, nexus_factory):
    claude = await backend_factory("anthropic", {"claude-haiku-4-5": {}}, name="claude")
    nx = await cloud_nexus(nexus_factory, claude)
    with pytest.raises(openai.BadRequestError):
        await client(nx).embeddings.create(model="claude-haiku-4-5", input="x")
    assert claude.received == []


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
async def test_a_request_an_anthropic_backend_cannot_take_moves_on_to_the_next_attempt(
    backend_factory, nexus_factory, endpoint: str
):
    """Failover that lands on an anthropic backend for a request it cannot be sent (a legacy
    completion, a content part Messages lacks) goes on to the next attempt, not to a 400."""
    first = await backend_factory("generic", {"m": {}}, name="first")
    claude = await backend_factory("anthropic", {"m": {}}, name="claude")
    last = await backend_factory("generic", {"m": {}}, name="last")

    async def broken(request, body):
        return aiohttp.web.json_response({"error": {"message": "boom"}}, status=500)

    first.behaviours.append(broken)
    nx = await cloud_nexus(
        nexus_factory,
        first,
        claude,
        last,
        first={"priority": 1},
        claude={"priority": 2},
        last={"priority": 3},
    )
    if endpoint == "chat":
        path = "/v1/chat/completions"
        part = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
        body = {"model": "m", "messages": [{"role": "user", "content": [part]}]}
    else:
        path, body = "/v1/completions", {"model": "m", "prompt": "hi"}
    async with aiohttp.ClientSession() as session, session.post(nx.url + path, json=body) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["X-Nexus-Backend"] == "last"
    assert (len(first.received), len(claude.received), len(last.received)) == (1, 0, 1)
    assert nx.backend("claude").fail_streak == 0  # the request's shape, not the backend's fault


# --- /v1/messages to an anthropic backend: native, not translated twice ------------------------


async def test_messages_api_reaches_an_anthropic_backend_natively(backend_factory, nexus_factory):
    import anthropic

    claude = await backend_factory("anthropic", {"claude-haiku-4-5": {}}, name="claude")
    claude.tool_call = {"name": "get_weather", "input": {"city": "Chur"}}
    claude.stop_reason = "tool_use"
    nx = await cloud_nexus(nexus_factory, claude)
    sdk = anthropic.AsyncAnthropic(base_url=nx.url, api_key="unused", max_retries=0)
    request = {
        "model": "claude-haiku-4-5",
        "max_tokens": 300,
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "weather?"}],
        "tools": [
            {
                "name": "get_weather",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
            }
        ],
        "thinking": {"type": "enabled", "budget_tokens": 1024},
    }
    message = await sdk.messages.create(**request)
    sent = claude.received[-1][1]
    assert sent == request  # Anthropic-only fields (cache_control, thinking) arrive untouched
    assert message.content[0].text == "Hello from claude"
    assert message.content[1].input == {"city": "Chur"}
    assert message.stop_reason == "tool_use"
    assert message.id == "msg_mock"  # the backend's own answer, not a re-translation
    assert message.usage.input_tokens == 12
    charged = nx.app[nexus.BUDGET].spent_usd
    assert charged == pytest.approx(float(expected_cost("claude-haiku-4-5", 12, 3)))

    async with sdk.messages.stream(**request) as stream:
        events = [event.type async for event in stream]
        final = await stream.get_final_message()
    assert claude.received[-1][1] == dict(request, stream=True)
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert final.content[0].text == "Hello from claude"
    assert final.content[1].input == {"city": "Chur"}
    assert final.stop_reason == "tool_use"
    assert nx.app[nexus.BUDGET].spent_usd == pytest.approx(2 * charged)
    await sdk.close()


async def test_a_cloud_stream_the_client_leaves_is_charged(backend_factory, nexus_factory):
    cloud = await backend_factory("openai", {"gpt-4o-mini": {}}, name="oai")
    cloud.reply = " ".join(["word"] * 60)
    cloud.chunk_delay = 0.05
    keys = {"NEXUS_KEY_ALICE": "sk-alice-stream-leaver", "NEXUS_KEY_ROOT": "sk-root-admin"}
    auth = (
        "[auth]\napi_keys = [\n"
        '  { name = "alice", key_env = "NEXUS_KEY_ALICE" },\n'
        '  { name = "root", key_env = "NEXUS_KEY_ROOT", admin = true },\n]\n'
        "[routing.budget]\nmonthly_limit_usd = 100.0\n"
    )
    nx = await nexus_factory(backends_toml(cloud) + auth, env={**cloud_env(cloud), **keys})
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
    }
    alice = {"Authorization": "Bearer " + keys["NEXUS_KEY_ALICE"]}
    async with (
        aiohttp.ClientSession() as session,
        session.post(nx.url + "/v1/chat/completions", json=body, headers=alice) as resp,
    ):
        assert resp.status == 200
        for _ in range(6):  # a few chunks, then the client leaves
            await resp.content.readline()
    budget = nx.app[nexus.BUDGET]
    for _ in range(150):  # the cut reaches Nexus at its next write
        if budget.spent_usd > 0 and nx.backend("oai").in_flight == 0:
            break
        await asyncio.sleep(0.02)
    root = {"Authorization": "Bearer " + keys["NEXUS_KEY_ROOT"]}
    async with (
        aiohttp.ClientSession() as session,
        session.get(nx.url + "/v1/stats", headers=root) as resp,
    ):
        stats = await resp.json()
    assert stats["budget"]["spent_usd"] > 0
    (alice_stats,) = [k for k in stats["keys"] if k["name"] == "alice"]
    assert alice_stats["spent_usd"] > 0
    assert len(cloud.received) == 1


def native_stream_body() -> dict:
    return {
        "model": "claude-haiku-4-5",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
    }


async def two_claudes(backend_factory, nexus_factory, extra: str = ""):
    first = await backend_factory("anthropic", {"claude-haiku-4-5": {}}, name="claude-a")
    second = await backend_factory("anthropic", {"claude-haiku-4-5": {}}, name="claude-b")
    nx = await cloud_nexus(
        nexus_factory,
        first,
        second,
        extra=extra,
        **{"claude-a": {"priority": 1}, "claude-b": {"priority": 2}},
    )
    return first, second, nx


async def test_a_native_stream_that_opens_with_an_error_event_fails_over(
    backend_factory, nexus_factory
):
    import anthropic

    first, second, nx = await two_claudes(backend_factory, nexus_factory)

    async def overloaded_stream(request, body):
        response = await start_sse(request)
        error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
        await response.write(b"event: error\ndata: " + json.dumps(error).encode() + b"\n\n")
        await response.write_eof()
        return response

    first.behaviours.append(overloaded_stream)
    sdk = anthropic.AsyncAnthropic(base_url=nx.url, api_key="unused", max_retries=0)
    body = native_stream_body()
    del body["stream"]
    async with sdk.messages.stream(**body) as stream:
        names = [event.type async for event in stream]
        final = await stream.get_final_message()
    await sdk.close()
    assert final.content[0].text == "Hello from claude-b"
    assert names[0] == "message_start" and names[-1] == "message_stop"
    assert len(first.received) == 1 and len(second.received) == 1


async def test_a_native_stream_without_data_in_time_fails_over(backend_factory, nexus_factory):
    fast = "[server]\nfirst_byte_timeout_seconds = 0.5\n"
    first, _second, nx = await two_claudes(backend_factory, nexus_factory, extra=fast)

    async def only_comments(request, body):
        response = await start_sse(request)
        for _ in range(40):  # bounded: about 4 s of keep-alive comments, never an event
            await response.write(b": keep-alive\n\n")
            await asyncio.sleep(0.1)
        await response.write_eof()
        return response

    first.behaviours.append(only_comments)
    started = time.monotonic()
    async with (
        aiohttp.ClientSession() as session,
        session.post(nx.url + "/v1/messages", json=native_stream_body()) as resp,
    ):
        assert resp.status == 200
        text = (await resp.read()).decode()
    assert time.monotonic() - started < 3
    assert resp.headers["X-Nexus-Backend"] == "claude-b"
    assert "keep-alive" not in text
    blocks = [block for block in text.split("\n\n") if block]
    assert blocks[0].startswith("event: message_start\ndata: {")
    assert all(len(b.split("\n")) == 2 and b.startswith("event: ") for b in blocks)


async def test_a_client_leaving_a_native_stream_is_a_499_and_is_charged(
    backend_factory, nexus_factory, monkeypatch, caplog
):
    caplog.set_level(logging.ERROR)
    statuses: list[int] = []
    real = nexus.log_request

    def keep(record, status, *args):
        statuses.append(status)
        return real(record, status, *args)

    monkeypatch.setattr(nexus, "log_request", keep)
    claude = await backend_factory("anthropic", {"claude-haiku-4-5": {}}, name="claude")
    claude.reply = " ".join(["word"] * 60)
    claude.chunk_delay = 0.05
    nx = await cloud_nexus(nexus_factory, claude)
    async with (
        aiohttp.ClientSession() as session,
        session.post(nx.url + "/v1/messages", json=native_stream_body()) as resp,
    ):
        for _ in range(8):  # a few events, then the client leaves
            await resp.content.readline()
    for _ in range(150):
        if statuses:
            break
        await asyncio.sleep(0.02)
    assert statuses == [499]
    assert not [r for r in caplog.records if "unexpected" in r.getMessage()]
    assert nx.app[nexus.BUDGET].spent_usd > 0  # the prompt, as message_start reported it


async def test_a_cloud_stream_is_charged_when_its_handler_is_cancelled(
    backend_factory, tmp_path, monkeypatch
):
    """As Nexus runs (handler_cancellation on): a client that leaves cancels the handler."""
    from aiohttp.test_utils import TestServer
    from conftest import free_port, settings_from

    cloud = await backend_factory("openai", {"gpt-4o-mini": {}}, name="oai")
    cloud.reply = " ".join(["word"] * 60)
    cloud.chunk_delay = 0.05
    for variable, value in cloud_env(cloud).items():
        monkeypatch.setenv(variable, value)
    toml = "[discovery]\nenabled = false\n" + backends_toml(cloud)
    app = nexus.create_app(settings_from(toml, tmp_path, cloud_env(cloud)))
    server = TestServer(app, host="127.0.0.1", port=free_port(), handler_cancellation=True)
    await server.start_server()
    try:
        registry = app[nexus.REGISTRY]
        for _ in range(150):
            if registry.healthy():
                break
            await asyncio.sleep(0.02)
        url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, json=dict(body, stream=True)) as resp,
        ):
            assert resp.status == 200
            for _ in range(6):
                await resp.content.readline()
        budget = app[nexus.BUDGET]
        for _ in range(150):
            if budget.spent_usd > 0:
                break
            await asyncio.sleep(0.02)
        assert budget.spent_usd > 0
    finally:
        await server.close()


def orphan_tool_results(messages: list) -> str | None:
    """What Anthropic answers to a tool_result without its tool_use in the message before."""
    for i, message in enumerate(messages):
        content = message.get("content")
        for j, block in enumerate(content if isinstance(content, list) else ()):
            if block.get("type") != "tool_result":
                continue
            before = messages[i - 1].get("content") if i else None
            uses = {b.get("id") for b in before or () if isinstance(b, dict)}
            if message["role"] != "user" or block.get("tool_use_id") not in uses:
                return (
                    f"messages.{i}.content.{j}: unexpected `tool_use_id` found in `tool_result` "
                    "blocks: " + str(block.get("tool_use_id")) + ". Each `tool_result` block "
                    "must have a corresponding `tool_use` block in the previous message."
                )
    return None


async def test_a_scrubbed_messages_request_sends_no_orphan_tool_result(
    backend_factory, nexus_factory
):
    """A coding agent's last user turn is mostly tool results: scrubbed, the request still
    holds the last user text and no tool_result whose tool_use stayed behind."""
    local = await backend_factory("generic", {"claude-haiku-4-5": {}}, name="gpu")
    claude = await backend_factory("anthropic", {"claude-haiku-4-5": {}}, name="claude")

    async def strict(request, body):
        problem = orphan_tool_results(body["messages"])
        if problem is not None:
            error = {"type": "invalid_request_error", "message": problem}
            return aiohttp.web.json_response({"type": "error", "error": error}, status=400)
        return await claude.anthropic_answer(request, body)

    claude.behaviours.append(strict)
    policy = '[[routing.policies]]\nmodel_pattern = "*"\noverflow = "scrub"\n'
    nx = await cloud_nexus(nexus_factory, local, claude, extra=policy, claude={"priority": 0})
    nx.backend("gpu").status = "unhealthy"
    history = [
        {"role": "user", "content": [{"type": "text", "text": "Fix the failing test, secret 42"}]},
        {"role": "assistant", "content": "Looking."},
        {"role": "user", "content": "Read tests/test_x.py first."},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {}}],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "file"}],
        },
    ]
    body = {"model": "claude-haiku-4-5", "max_tokens": 100, "system": "Be brief."}
    body["messages"] = history
    async with (
        aiohttp.ClientSession() as session,
        session.post(nx.url + "/v1/messages", json=body) as resp,
    ):
        answer = await resp.json()
        assert resp.status == 200, answer
        assert resp.headers["X-Nexus-Context-Scrubbed"] == "true"
    assert answer["content"][0]["text"] == "Hello from claude"
    sent = claude.received[-1][1]
    assert sent["system"] == "Be brief."
    assert sent["messages"] == [{"role": "user", "content": "Read tests/test_x.py first."}]


async def test_a_native_stream_the_backend_breaks_off_counts_against_it(
    backend_factory, nexus_factory
):
    """An error event after the answer began reaches the client as Anthropic sent it, and is a
    failed request and a failure of the backend, as a cut translated stream is."""
    claude = await backend_factory("anthropic", {"claude-haiku-4-5": {}}, name="claude")

    async def breaks_off(request, body):
        response = await start_sse(request)
        message = {"id": "msg_1", "type": "message", "role": "assistant", "content": []}
        message.update(model=body["model"], usage={"input_tokens": 5, "output_tokens": 1})
        error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
        for name, data in (
            ("message_start", {"type": "message_start", "message": message}),
            ("error", error),
        ):
            await response.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
        await response.write_eof()
        return response

    claude.behaviours.append(breaks_off)
    nx = await cloud_nexus(nexus_factory, claude)
    async with (
        aiohttp.ClientSession() as session,
        session.post(nx.url + "/v1/messages", json=native_stream_body()) as resp,
    ):
        assert resp.status == 200
        text = (await resp.read()).decode()
    names = [block.split("\n")[0] for block in text.split("\n\n") if block]
    assert names == ["event: message_start", "event: error"]  # relayed once, nothing after it
    backend = nx.backend("claude")
    assert backend.errors == 1
    assert backend.fail_streak == 1 and "error" in backend.last_error
    stats = nx.app[nexus.STATS]
    assert (stats.success, stats.errors) == (0, 1)


async def test_a_native_stream_failing_at_once_leaves_nothing_for_a_translated_fallback(
    backend_factory, nexus_factory
):
    """An anthropic backend's stream that opens with an error event fails over to a local
    backend of the same model, whose chat stream the Messages door then writes in full."""
    import anthropic

    claude = await backend_factory("anthropic", {"m": {}}, name="claude")
    local = await backend_factory("vllm", {"m": {}}, name="local")

    async def overloaded_stream(request, body):
        response = await start_sse(request)
        error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
        await response.write(b"event: error\ndata: " + json.dumps(error).encode() + b"\n\n")
        await response.write_eof()
        return response

    claude.behaviours.append(overloaded_stream)
    nx = await cloud_nexus(
        nexus_factory, claude, local, claude={"priority": 1}, local={"priority": 2}
    )
    sdk = anthropic.AsyncAnthropic(base_url=nx.url, api_key="unused", max_retries=0)
    body = dict(native_stream_body(), model="m")
    del body["stream"]
    async with sdk.messages.stream(**body) as stream:
        names = [event.type async for event in stream]
        final = await stream.get_final_message()
    await sdk.close()
    assert final.content[0].text == "Hello from local"
    assert names[0] == "message_start" and names[-1] == "message_stop"
    assert len(claude.received) == 1 and len(local.received) == 1
