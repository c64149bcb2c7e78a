"""Malformed input, secrets in settings and unbounded label sets: each answers a clear 4xx
in the OpenAI envelope, leaks nothing and leaves Nexus's own state bounded (SPEC §2, §4, §6)."""

from __future__ import annotations

import aiohttp
import pytest
from conftest import backends_toml, cloud_env


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
