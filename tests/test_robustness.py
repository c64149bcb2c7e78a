"""Malformed input, secrets in settings and unbounded label sets: each answers a clear 4xx
in the OpenAI envelope, leaks nothing and leaves Nexus's own state bounded (SPEC §2, §4, §6)."""

from __future__ import annotations

import aiohttp
from conftest import backends_toml


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
