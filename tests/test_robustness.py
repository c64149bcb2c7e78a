"""Malformed input, secrets in settings and unbounded label sets: each answers a clear 4xx
in the OpenAI envelope, leaks nothing and leaves Nexus's own state bounded (SPEC §2, §4, §6)."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiohttp import web
from conftest import backends_toml, cloud_env
from hypothesis import given, settings
from hypothesis import strategies as st

import nexus


async def call(nx, method: str, path: str, payload=None, headers=None):
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, nx.url + path, json=payload, headers=headers or {}) as resp,
    ):
        text = await resp.text()
        try:
            body = await resp.json(content_type=None)
        except ValueError:
            body = text
        return resp.status, body, resp.headers


async def test_admin_api_refuses_credentials_in_a_backend_url(backend_factory, nexus_factory):
    backend = await backend_factory("ollama")
    nx = await nexus_factory(backends_toml(backend))
    secret_url = backend.url.replace("http://", "http://alice:hunter2@")
    for payload in ({"url": secret_url, "type": "ollama"}, {"url": secret_url}):
        status, body, _ = await call(nx, "POST", "/v1/backends", payload)
        assert status == 400
        assert body["error"]["param"] == "url"
        assert "credentials do not belong in the URL; use api_key_env" in body["error"]["message"]
        assert "hunter2" not in str(body)
    status, listed, _ = await call(nx, "GET", "/v1/backends")
    assert status == 200 and "hunter2" not in str(listed)
    assert len(listed["data"]) == 1


async def test_unknown_model_names_do_not_grow_stats_or_metrics(backend_factory, nexus_factory):
    backend = await backend_factory("ollama")
    nx = await nexus_factory(backends_toml(backend))
    chat = {"model": "llama3:8b", "messages": [{"role": "user", "content": "hi"}]}
    status, _, _ = await call(nx, "POST", "/v1/chat/completions", chat)
    assert status == 200
    _, before, _ = await call(nx, "GET", "/v1/stats")
    _, metrics_before, _ = await call(nx, "GET", "/metrics")
    for i in range(50):
        status, _, _ = await call(nx, "POST", "/v1/chat/completions", {**chat, "model": f"x{i}"})
        assert status == 404
    status, _, _ = await call(nx, "POST", "/v1/chat/completions", {**chat, "messages": "bad"})
    assert status == 400
    _, after, _ = await call(nx, "GET", "/v1/stats")
    _, metrics_after, _ = await call(nx, "GET", "/metrics")
    assert [m["name"] for m in after["models"]] == [m["name"] for m in before["models"]]
    assert after["requests"]["total"] == before["requests"]["total"] + 51
    assert after["requests"]["errors"] == before["requests"]["errors"] + 51

    def label_sets(text: str) -> set[str]:
        return {
            line.rsplit(" ", 1)[0]
            for line in text.splitlines()
            if line.startswith("nexus_requests_total{")
        }

    new = label_sets(metrics_after) - label_sets(metrics_before)
    assert len(new) <= 2, new  # at most one series per status (404, 400), none per model name
    assert not any("x1" in series for series in label_sets(metrics_after))


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
@pytest.mark.parametrize(
    "tool_calls",
    [1.5, [1], [{"id": "c1", "function": ["get_weather", "{}"]}], [{"id": "c1"}], "call"],
)
async def test_malformed_tool_calls_are_a_400_naming_them(
    backend_factory, nexus_factory, kind, tool_calls
):
    backend = await backend_factory(kind, {"m": {}}, name=kind)
    nx = await nexus_factory(backends_toml(backend), env=cloud_env(backend))
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": tool_calls},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    for stream in (False, True):
        body = {"model": "m", "messages": messages, "stream": stream}
        status, answer, _ = await call(nx, "POST", "/v1/chat/completions", body)
        assert status == 400, answer
        assert answer["error"]["type"] == "invalid_request_error"
        assert answer["error"]["param"] == "messages[1].tool_calls"
    assert backend.received == []


async def test_a_backends_html_4xx_reaches_the_client_as_an_openai_error(
    backend_factory, nexus_factory
):
    backend = await backend_factory("generic", {"m": {}})
    page = "<html><body><h1>404 Not Found</h1>" + "x" * 900 + "</body></html>"

    async def html(request: web.Request, body: dict) -> web.Response:
        return web.Response(text=page, status=404, content_type="text/html")

    async def own_error(request: web.Request, body: dict) -> web.Response:
        error = {"message": "bad temperature", "type": "invalid_request_error", "code": None}
        return web.json_response({"error": error, "extra": 1}, status=422)

    backend.behaviours = [html, own_error]
    nx = await nexus_factory(backends_toml(backend) + "[routing.budget]\nmonthly_limit_usd = 5\n")
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    status, answer, headers = await call(nx, "POST", "/v1/chat/completions", chat)
    assert status == 404
    assert headers["Content-Type"].startswith("application/json")
    assert answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["code"] == "backend_error"
    assert answer["error"]["message"] == page[:500]
    assert headers["X-Nexus-Backend"] == "mock"
    assert headers["X-Nexus-Budget-Status"] == "normal"
    status, answer, headers = await call(nx, "POST", "/v1/chat/completions", chat)
    assert status == 422  # a JSON error of the backend's own passes untouched
    assert answer == {
        "error": {"message": "bad temperature", "type": "invalid_request_error", "code": None},
        "extra": 1,
    }
    assert headers["X-Nexus-Budget-Status"] == "normal"


def test_only_json_response_formats_need_json_mode():
    messages = [{"role": "user", "content": "hi"}]
    for kind, wanted in (("text", False), ("json_object", True), ("json_schema", True)):
        body = {"model": "m", "messages": messages, "response_format": {"type": kind}}
        assert nexus.chat_needs(body).json_mode is wanted
    assert nexus.chat_needs({"model": "m", "messages": messages}).json_mode is False


async def test_with_the_queue_off_a_full_backend_says_so(backend_factory, nexus_factory):
    backend = await backend_factory("generic", {"m": {}})

    async def slow(request: web.Request, body: dict) -> web.StreamResponse:
        await asyncio.sleep(0.5)
        return await backend.chat_answer(request, body)

    backend.behaviours = [slow]
    toml = backends_toml(backend, mock={"max_concurrent": 1}) + "[queue]\nenabled = false\n"
    nx = await nexus_factory(toml)
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    busy = asyncio.create_task(call(nx, "POST", "/v1/chat/completions", chat))
    for _ in range(100):
        if backend.in_flight:
            break
        await asyncio.sleep(0.01)
    status, answer, _ = await call(nx, "POST", "/v1/chat/completions", chat)
    assert status == 503
    assert "the queue is off" in answer["error"]["message"]
    assert "full" not in answer["error"]["message"].split("max_concurrent")[1]
    assert answer["error"]["context"]["backends"] == [
        {"backend": "mock", "model": "m", "failed": ["busy"]}
    ]
    assert (await busy)[0] == 200


def big_tools(count: int = 40) -> list[dict]:
    """A coding agent's tool list: about 24,000 characters of JSON schema."""
    properties = {f"option_{j}": {"type": "string", "description": "d" * 40} for j in range(8)}
    return [
        {
            "type": "function",
            "function": {
                "name": f"tool_{i}",
                "description": "Does one thing of a coding agent. " * 2,
                "parameters": {"type": "object", "properties": properties},
            },
        }
        for i in range(count)
    ]


async def test_tool_schemas_count_in_the_prompt_estimate(backend_factory, nexus_factory):
    small = await backend_factory("ollama", {"coder": {"context": 4096, "tools": True}}, "small")
    large = await backend_factory("ollama", {"coder": {"context": 32768, "tools": True}}, "large")
    toml = backends_toml(small, large, small={"priority": 0}, large={"priority": 100})
    nx = await nexus_factory(toml)
    tools = big_tools()
    assert len(json.dumps(tools)) > 5000 * 4  # over 5,000 tokens: more than small can hold
    chat = {"model": "coder", "messages": [{"role": "user", "content": "fix the bug"}]}
    status, _, headers = await call(nx, "POST", "/v1/chat/completions", chat)
    assert status == 200 and headers["X-Nexus-Backend"] == "small"
    for max_tokens in (None, 1000):
        body = {**chat, "tools": tools, "max_tokens": max_tokens}
        status, answer, headers = await call(nx, "POST", "/v1/chat/completions", body)
        assert status == 200, answer
        assert headers["X-Nexus-Backend"] == "large"
    body = {**chat, "tools": tools, "max_tokens": 30000}
    status, _, headers = await call(nx, "POST", "/v1/chat/completions", body)
    assert status == 200 and headers["X-Nexus-Backend"] == "large"
    clamped = int(headers["X-Nexus-Max-Tokens-Clamped"])
    assert clamped <= 32768 - 5000
    # An assistant turn's tool call arguments count as well.
    history = [
        {"role": "user", "content": "write it"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "write", "arguments": json.dumps({"text": "y" * 24000})},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "ok"},
    ]
    status, _, headers = await call(
        nx, "POST", "/v1/chat/completions", {"model": "coder", "messages": history}
    )
    assert status == 200 and headers["X-Nexus-Backend"] == "large"


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    value=JSON_VALUES,
    before=st.sampled_from(["", " ", "\n", "\t \r\n"]),
    after=st.sampled_from(["", " ", "\n"]),
    ascii_only=st.booleans(),
)
def test_parse_json_reads_what_json_loads_reads(
    value: object, before: str, after: str, ascii_only: bool
) -> None:
    """The hot path's JSON parser (request bodies, answers, stream chunks) agrees with
    json.loads on any document, whitespace around it, any characters and any encoding json.loads
    detects, and fails where json.loads fails."""
    text = before + json.dumps(value, ensure_ascii=ascii_only) + after
    assert nexus.parse_json(text.encode()) == json.loads(text.encode())
    assert nexus.parse_json(text.encode("utf-16")) == json.loads(text.encode("utf-16"))
    for garbage in (b"x", b"}", b" 1"):
        with pytest.raises(ValueError):
            nexus.parse_json(text.encode() + garbage)
