"""Health (SPEC §5): one poll per backend per interval, thresholds against flapping, model lists
refreshed with each poll, and no tokens spent by a poll."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import aiohttp
import openai
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import MockBackend, backends_toml, free_port, key_variable, unaccepting_listener

import nexus

FAST_HEALTH = (
    "[health_check]\ninterval_seconds = 0.1\ntimeout_seconds = 0.5\n"
    "failure_threshold = 3\nrecovery_threshold = 2\n"
)


async def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")


def test_state_machine_thresholds():
    settings = nexus.HealthSettings(failure_threshold=3, recovery_threshold=2)
    backend = nexus.Backend(name="b", url="http://x", type="generic")
    nexus.record_success(backend, settings)
    assert backend.status == "healthy"  # unknown -> healthy on the first result
    nexus.record_failure(backend, settings, "boom")
    nexus.record_failure(backend, settings, "boom")
    assert backend.status == "healthy"  # below the threshold: no flapping
    nexus.record_failure(backend, settings, "boom")
    assert backend.status == "unhealthy"
    nexus.record_success(backend, settings)
    assert backend.status == "unhealthy"
    nexus.record_failure(backend, settings, "boom")  # streak broken
    nexus.record_success(backend, settings)
    nexus.record_success(backend, settings)
    assert backend.status == "healthy"
    fresh = nexus.Backend(name="c", url="http://y", type="generic")
    nexus.record_failure(fresh, settings, "refused")
    assert fresh.status == "unhealthy"  # unknown -> unhealthy on the first result


async def test_failing_backend_is_excluded_then_recovers(backend_factory, nexus_factory):
    a = await backend_factory("vllm", {"m": {}}, name="a")
    b = await backend_factory("vllm", {"m": {}}, name="b")
    nx = await nexus_factory(FAST_HEALTH + backends_toml(a, b))
    sdk = openai.AsyncOpenAI(base_url=nx.url + "/v1", api_key="x", max_retries=0)
    a.healthy = False
    await wait_for(lambda: nx.backend("a").status == "unhealthy")
    assert nx.backend("a").fail_streak >= 3
    before = len(a.received)
    for _ in range(6):
        answer = await sdk.chat.completions.create(model="m", messages=[{"content": "x"}])
        assert answer.choices[0].message.content == "Hello from b"
    assert len(a.received) == before  # an unhealthy backend is never chosen
    a.healthy = True
    await wait_for(lambda: nx.backend("a").status == "healthy")
    served = set()
    for _ in range(6):
        answer = await sdk.chat.completions.create(model="m", messages=[{"content": "x"}])
        served.add(answer.choices[0].message.content)
    assert "Hello from a" in served


async def test_model_lists_refresh_with_each_poll(backend_factory, nexus_factory):
    backend = await backend_factory("ollama", {"llama3:8b": {}}, name="o")
    nx = await nexus_factory(FAST_HEALTH + backends_toml(backend))
    assert set(nx.registry.by_model) == {"llama3:8b"}
    backend.models["qwen2:7b"] = {"context": 4096, "tools": True}
    await wait_for(lambda: "qwen2:7b" in nx.registry.by_model)
    assert nx.backend("o").models["qwen2:7b"].context_length == 4096
    del backend.models["llama3:8b"]
    await wait_for(lambda: "llama3:8b" not in nx.registry.by_model)


async def test_polls_never_spend_tokens(backend_factory, nexus_factory):
    kinds = ["ollama", "vllm", "llamacpp", "lmstudio", "exo", "generic"]
    backends = [await backend_factory(k, {f"m-{k}": {}}, name=k) for k in kinds]
    nx = await nexus_factory(FAST_HEALTH + backends_toml(*backends))
    await wait_for(lambda: all(b.polls >= 3 for b in backends))
    assert len(nx.registry.healthy()) == len(kinds)
    for backend in backends:
        assert backend.received == []  # no completion was ever asked for


async def test_unreachable_backend_is_unhealthy_and_never_blocks(nexus_factory):
    toml = FAST_HEALTH + '[[backends]]\nname = "ghost"\nurl = "http://127.0.0.1:9"\n'
    nx = await nexus_factory(toml, wait=False)
    await wait_for(lambda: nx.backend("ghost").status == "unhealthy")
    assert nx.backend("ghost").last_error


async def test_no_health_check_trusts_configured_backends(backend_factory, nexus_factory):
    backend = await backend_factory("generic", {"m": {}}, name="g")
    nx = await nexus_factory("[health_check]\nenabled = false\n" + backends_toml(backend))
    polls = backend.polls
    await asyncio.sleep(0.3)
    assert backend.polls == polls == 1  # the model list is read once, then no polling
    sdk = openai.AsyncOpenAI(base_url=nx.url + "/v1", api_key="x", max_retries=0)
    answer = await sdk.chat.completions.create(model="m", messages=[{"content": "x"}])
    assert answer.choices[0].message.content == "Hello from g"


class SlowShowOllama(MockBackend):
    """An Ollama whose /api/show takes 0.3 s, as a loaded one with many models does."""

    def __init__(self, models: dict) -> None:
        super().__init__("ollama", models, "many")
        self.shows_now = 0
        self.shows_most = 0

    async def ollama_show(self, request):
        self.shows_now += 1
        self.shows_most = max(self.shows_most, self.shows_now)
        try:
            await asyncio.sleep(0.3)
            return await super().ollama_show(request)
        finally:
            self.shows_now -= 1


async def test_an_ollama_with_many_models_is_healthy_after_its_first_poll(nexus_factory):
    ollama = await SlowShowOllama(
        {f"model-{i}:7b": {"context": 4096 + i} for i in range(30)}
    ).start()
    try:
        toml = (
            backends_toml(ollama) + "[health_check]\ntimeout_seconds = 5\ninterval_seconds = 60\n"
        )
        nx = await nexus_factory(toml, wait=False)
        await nx.wait_healthy(timeout=4.5)  # one at a time, 30 shows would take 9 s
        backend = nx.backend("many")
        assert len(backend.models) == 30
        assert backend.models["model-29:7b"].context_length == 4096 + 29
        assert 1 < ollama.shows_most <= 8  # bounded: an Ollama is not sent 30 at once
    finally:
        await ollama.stop()


async def test_every_unhealthy_backend_says_why(backend_factory, nexus_factory):
    """Refused, timed out, HTTP 401, not an LLM server: in /v1/backends and /v1/stats alike,
    without the key that was refused."""
    up = await backend_factory("generic", {"m": {}}, name="up")
    locked = await backend_factory("openai", {"gpt-4o": {}}, name="locked")

    async def html(_: web.Request) -> web.Response:
        return web.Response(text="<html>hi</html>", content_type="text/html")

    web_page = web.Application()  # a web server that is not an LLM server: HTML everywhere
    web_page.router.add_get("/{tail:.*}", html)
    page = await TestServer(web_page, host="127.0.0.1", port=free_port()).__aenter__()
    missing = web.Application()  # a web server where no LLM API is: 404 everywhere
    gone = await TestServer(missing, host="127.0.0.1", port=free_port()).__aenter__()
    wrong_key = "sk-wrong-key-that-must-not-show"
    try:
        with unaccepting_listener() as silent:
            toml = FAST_HEALTH + backends_toml(up, locked)
            for name, port in (("refused", free_port()), ("silent", silent)):
                toml += f'[[backends]]\nname = "{name}"\nurl = "http://127.0.0.1:{port}"\n'
            for name, server in (("html", page), ("web404", gone)):
                toml += f'[[backends]]\nname = "{name}"\nurl = "http://127.0.0.1:{server.port}"\n'
            nx = await nexus_factory(toml, wait=False, env={key_variable(locked): wrong_key})
            down = ("locked", "refused", "silent", "html", "web404")
            await wait_for(lambda: all(nx.backend(n).status == "unhealthy" for n in down))
            async with aiohttp.ClientSession() as session:
                async with session.get(nx.url + "/v1/backends") as resp:
                    listed = {b["name"]: b for b in (await resp.json())["data"]}
                    text = json.dumps(listed)
                async with session.get(nx.url + "/v1/stats") as resp:
                    stats = {b["name"]: b for b in (await resp.json())["backends"]}
    finally:
        await page.close()
        await gone.close()
    assert listed["up"]["status"] == "healthy" and listed["up"]["last_error"] is None
    why = {name: listed[name]["last_error"] for name in down}
    assert "connection refused" in why["refused"]
    assert why["silent"].startswith("timed out")
    assert "HTTP 401" in why["locked"]
    assert "not an LLM server" in why["html"] and "not JSON" in why["html"]
    assert "HTTP 404" in why["web404"] and "not an LLM server" in why["web404"]
    assert {name: stats[name]["last_error"] for name in down} == why
    assert wrong_key not in text and locked.api_key not in text


def test_a_failure_shown_never_carries_a_key_or_url_credentials(monkeypatch, caplog):
    monkeypatch.setenv("NEXUS_TEST_CLOUD_KEY", "sk-live-0123456789abcdef")
    backend = nexus.Backend(name="c", url="http://x", type="openai")
    backend.api_key_env = "NEXUS_TEST_CLOUD_KEY"
    settings = nexus.HealthSettings()
    reason = "Incorrect API key sk-live-0123456789abcdef; see http://user:pw@proxy.lan:3128/x"
    with caplog.at_level(logging.WARNING, logger="nexus"):
        nexus.record_failure(backend, settings, reason)
    assert backend.last_error == "Incorrect API key [redacted]; see http://proxy.lan:3128/x"
    # The log says the same, not what the backend said: no key, no URL's credentials.
    assert caplog.messages == ["backend c is unhealthy: " + backend.last_error]
    assert backend.public()["last_error"] == backend.last_error  # down: it says why
    nexus.record_success(backend, settings)
    nexus.record_success(backend, settings)
    assert backend.status == "healthy" and backend.public()["last_error"] is None
