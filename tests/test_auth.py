"""Keys, model allow-lists, rate limits and admin protection ([auth], SPEC §1 and §4).

With no [auth] section Nexus is open (a trusted network). With keys configured every /v1/*
request needs one, each key sees only the models it may use, token buckets enforce rpm and tpm
with honest Retry-After values, the admin API needs an admin key, and no key's secret appears
anywhere Nexus writes: logs, errors, stats, pages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import sys
import time
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from aiohttp import web
from browser import Chromium
from conftest import ROOT, backends_toml, cloud_env, free_port
from hypothesis import given, settings
from hypothesis import strategies as st
from netns import namespace_pair, requires_root

import nexus

ALICE = "sk-nexus-alice-3b8f0c2e9d"
BOB = "sk-nexus-bob-71d04aa6e5"
ROOT_KEY = "sk-nexus-root-c0ffee1234"
WRONG = "sk-nexus-wrong-5e5e5e5e5e"
KEY_ENV = {"NEXUS_KEY_ALICE": ALICE, "NEXUS_KEY_BOB": BOB, "NEXUS_KEY_ROOT": ROOT_KEY}
CHAT = {"model": "llama3:8b", "messages": [{"role": "user", "content": "hi"}]}
MESSAGE = {"model": "llama3:8b", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}


def auth_toml(alice: str = "", bob: str = "") -> str:
    """An [auth] section: alice and bob (with extra fields each), root an admin."""
    lines = ["[auth]", "api_keys = ["]
    lines.append(f'  {{ name = "alice", key_env = "NEXUS_KEY_ALICE"{alice} }},')
    lines.append(f'  {{ name = "bob", key_env = "NEXUS_KEY_BOB"{bob} }},')
    lines.append('  { name = "root", key_env = "NEXUS_KEY_ROOT", admin = true },')
    lines.append("]")
    return "\n".join(lines) + "\n"


async def start(backend_factory, nexus_factory, alice: str = "", bob: str = "", models=None):
    backend = await backend_factory("ollama", models or {"llama3:8b": {"context": 8192}})
    nx = await nexus_factory(auth_toml(alice, bob) + backends_toml(backend), env=KEY_ENV)
    return backend, nx


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def call(
    nx, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, nx.url + path, json=body, headers=headers or {}) as resp,
    ):
        text = await resp.text()
        document = json.loads(text) if text.startswith("{") else {}
        return resp.status, document, dict(resp.headers)


def openai_client(nx, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=nx.url + "/v1", api_key=key, max_retries=0)


def anthropic_client(nx, key: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=nx.url, api_key=key, max_retries=0)


# --- who may call ---------------------------------------------------------------------------


async def test_without_auth_section_nothing_needs_a_key(backend_factory, nexus_factory):
    backend = await backend_factory("ollama")
    nx = await nexus_factory(backends_toml(backend))
    status, _, _ = await call(nx, "POST", "/v1/chat/completions", CHAT)
    assert status == 200
    status, _, _ = await call(nx, "POST", "/v1/messages", MESSAGE)
    assert status == 200
    status, _, _ = await call(nx, "POST", "/v1/chat/completions", CHAT, bearer(WRONG))
    assert status == 200  # a key sent to an open Nexus is ignored


async def test_openai_sdk_missing_wrong_and_right_key(backend_factory, nexus_factory):
    backend, nx = await start(backend_factory, nexus_factory)
    for key in (WRONG, ALICE + "x", ALICE[:-1]):
        sdk = openai_client(nx, key)
        with pytest.raises(openai.AuthenticationError) as caught:
            await sdk.chat.completions.create(**CHAT)
        assert caught.value.status_code == 401
        error = caught.value.body
        assert error["type"] == "invalid_request_error"
        assert error["code"] == "invalid_api_key"
        assert key not in error["message"]
        await sdk.close()
    assert backend.received == []
    sdk = openai_client(nx, ALICE)
    answer = await sdk.chat.completions.create(**CHAT)
    assert answer.choices[0].message.content == "Hello from mock"
    assert "authorization" not in {k.lower() for k in backend.received[0][2]}  # never forwarded
    stream = await sdk.chat.completions.create(**CHAT, stream=True)
    assert [c async for c in stream]
    await sdk.close()


async def test_missing_key_is_401_envelope_with_www_authenticate(backend_factory, nexus_factory):
    _, nx = await start(backend_factory, nexus_factory)
    status, document, headers = await call(nx, "POST", "/v1/chat/completions", CHAT)
    assert status == 401
    assert set(document["error"]) >= {"message", "type", "param", "code"}
    assert "Authorization: Bearer" in document["error"]["message"]
    assert headers["WWW-Authenticate"].startswith("Bearer")
    status, document, _ = await call(
        nx, "POST", "/v1/chat/completions", CHAT, {"Authorization": "Basic " + ALICE}
    )
    assert status == 401


async def test_anthropic_sdk_missing_wrong_and_right_key(backend_factory, nexus_factory):
    backend, nx = await start(backend_factory, nexus_factory)
    for key in (WRONG, BOB.upper()):
        sdk = anthropic_client(nx, key)
        with pytest.raises(anthropic.AuthenticationError) as caught:
            await sdk.messages.create(**MESSAGE)
        assert caught.value.body["type"] == "error"
        assert caught.value.body["error"]["type"] == "authentication_error"
        with pytest.raises(anthropic.AuthenticationError):
            await sdk.messages.count_tokens(model="llama3:8b", messages=MESSAGE["messages"])
        await sdk.close()
    assert backend.received == []
    sdk = anthropic_client(nx, BOB)
    answer = await sdk.messages.create(**MESSAGE)
    assert answer.content[0].text == "Hello from mock"
    counted = await sdk.messages.count_tokens(model="llama3:8b", messages=MESSAGE["messages"])
    assert counted.input_tokens > 0
    await sdk.close()
    # Either header works on either API style.
    status, _, _ = await call(nx, "POST", "/v1/messages", MESSAGE, bearer(BOB))
    assert status == 200
    status, _, _ = await call(nx, "POST", "/v1/chat/completions", CHAT, {"x-api-key": BOB})
    assert status == 200


async def test_every_v1_path_needs_a_key_but_dashboard_health_stay_open(
    backend_factory, nexus_factory
):
    _, nx = await start(backend_factory, nexus_factory)
    guarded = [
        ("POST", "/v1/chat/completions", CHAT),
        ("POST", "/v1/completions", {"model": "llama3:8b", "prompt": "hi"}),
        ("POST", "/v1/embeddings", {"model": "llama3:8b", "input": "hi"}),
        ("POST", "/v1/messages", MESSAGE),
        ("POST", "/v1/messages/count_tokens", MESSAGE),
        ("GET", "/v1/models", None),
        ("GET", "/v1/models/llama3:8b", None),
        ("GET", "/v1/nothing-here", None),
        *ADMIN_VIEWS,
        ("POST", "/v1/backends", {"url": "http://127.0.0.1:9"}),
        ("DELETE", "/v1/backends/mock", None),
    ]
    for method, path, body in guarded:
        status, _, _ = await call(nx, method, path, body)
        assert status == 401, (method, path)
        status, _, _ = await call(nx, method, path, body, bearer(WRONG))
        assert status == 401, (method, path)
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        body = next(b for _, p, b in guarded if p == path)
        status, _, _ = await call(nx, "POST", path, body, bearer(ALICE))
        assert status == 200, path
    for path in ("/v1/models", "/v1/models/llama3:8b"):
        status, _, _ = await call(nx, "GET", path, None, bearer(ALICE))
        assert status == 200, path
    for path in ("/health", "/"):
        status, _, _ = await call(nx, "GET", path)
        assert status == 200, path


# What shows backend URLs, key names and spend (SPEC §7): an admin key only.
ADMIN_VIEWS = [
    ("GET", "/v1/stats", None),
    ("GET", "/v1/stats/stream", None),
    ("GET", "/v1/usage", None),
    ("GET", "/metrics", None),
    ("GET", "/v1/backends", None),
]


async def test_operations_views_need_an_admin_key(backend_factory, nexus_factory):
    backend, nx = await start(backend_factory, nexus_factory)
    for method, path, _ in ADMIN_VIEWS:
        status, document, _ = await call(nx, method, path, None, bearer(ALICE))
        assert status == 403, path
        assert document["error"]["type"] == "permission_error"
        assert "alice" in document["error"]["message"] and ALICE not in json.dumps(document)
    async with aiohttp.ClientSession(headers=bearer(ROOT_KEY)) as session:
        for _, path, _ in ADMIN_VIEWS:
            if path.endswith("/stream"):
                continue
            async with session.get(nx.url + path) as resp:
                assert resp.status == 200, path
        async with session.get(nx.url + "/v1/stats/stream") as resp:
            assert resp.status == 200
            line = await asyncio.wait_for(resp.content.readline(), 5)
            assert line.startswith(b"data: ")
        # Prometheus sends the key as a Bearer token (authorization: {credentials: <key>}).
        async with session.get(nx.url + "/metrics") as resp:
            assert "nexus_backends_total 1" in await resp.text()
    # /health stays open, and shows counts, never a backend's URL.
    status, document, _ = await call(nx, "GET", "/health")
    assert status == 200
    assert document["backends"] == {"total": 1, "healthy": 1, "unhealthy": 0}
    assert backend.url.split("//")[1] not in json.dumps(document)


# --- which models ---------------------------------------------------------------------------

MANY_MODELS = {"llama3:8b": {}, "llama3:70b": {}, "secret-model": {}, "qwen:7b": {}}


async def test_model_allow_list_hides_other_models(backend_factory, nexus_factory):
    backend, nx = await start(
        backend_factory, nexus_factory, alice=', models = ["llama3:*"]', models=MANY_MODELS
    )
    sdk = openai_client(nx, ALICE)
    listed = [m.id async for m in sdk.models.list()]
    assert listed == ["llama3:70b", "llama3:8b"]
    for model in ("secret-model", "qwen:7b", "llama3:405b"):
        with pytest.raises(openai.NotFoundError) as caught:
            await sdk.chat.completions.create(model=model, messages=CHAT["messages"])
        error = caught.value.body
        assert error["code"] == "model_not_found" and error["param"] == "model"
        assert "llama3:8b" in error["message"] and "llama3:70b" in error["message"]
        others = {"secret-model", "qwen:7b"} - {model}
        assert not any(name in error["message"] for name in others)
        with pytest.raises(openai.NotFoundError) as caught:
            await sdk.models.retrieve(model)
        assert not any(name in caught.value.body["message"] for name in others)
    assert backend.received == []
    answer = await sdk.chat.completions.create(model="llama3:70b", messages=CHAT["messages"])
    assert answer.model == "llama3:70b"
    await sdk.close()
    # Anthropic's side: the same list, in its error shape; counting tokens is no way around it.
    sdk = anthropic_client(nx, ALICE)
    with pytest.raises(anthropic.NotFoundError) as caught:
        await sdk.messages.create(**{**MESSAGE, "model": "secret-model"})
    assert caught.value.body["error"]["type"] == "not_found_error"
    assert "qwen" not in caught.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError):
        await sdk.messages.count_tokens(model="qwen:7b", messages=MESSAGE["messages"])
    await sdk.close()
    # bob has no allow-list: he sees and uses everything.
    sdk = openai_client(nx, BOB)
    assert len([m async for m in sdk.models.list()]) == 4
    await sdk.chat.completions.create(model="secret-model", messages=CHAT["messages"])
    await sdk.close()


async def test_allow_list_covers_aliases_and_fallbacks(backend_factory, nexus_factory):
    main = await backend_factory("generic", {"big": {}}, name="main")
    spare = await backend_factory("generic", {"small": {}, "other": {}}, name="spare")
    toml = (
        '[routing]\nmax_retries = 0\naliases = { "fast" = "small" }\n'
        'fallbacks = { "big" = ["other"] }\n'
        + auth_toml(alice=', models = ["big", "fast"]')
        + backends_toml(main, spare)
    )
    nx = await nexus_factory(toml, env=KEY_ENV)
    sdk = openai_client(nx, ALICE)
    assert sorted([m.id async for m in sdk.models.list()]) == ["big", "fast"]
    answer = await sdk.chat.completions.create(model="fast", messages=CHAT["messages"])
    assert answer.choices[0].message.content == "Hello from spare"

    async def broken(request: web.Request, body: dict[str, Any]) -> web.Response:
        return web.json_response({"error": "boom"}, status=500)

    # "big" falls back to "other" for keys that may use it, never for alice.
    main.behaviours.append(broken)
    with pytest.raises(openai.APIStatusError) as caught:
        await sdk.chat.completions.create(model="big", messages=CHAT["messages"])
    assert caught.value.status_code == 502
    assert [body["model"] for _, body, _ in spare.received] == ["small"]
    await sdk.close()
    main.behaviours.append(broken)
    sdk = openai_client(nx, BOB)
    raw = await sdk.chat.completions.with_raw_response.create(
        model="big", messages=CHAT["messages"]
    )
    assert raw.headers["X-Nexus-Fallback-Model"] == "other"
    await sdk.close()


# --- how much -------------------------------------------------------------------------------


def test_token_bucket_wait_is_exact_and_enough():
    bucket = nexus.TokenBucket(per_minute=60, now=100.0)
    for _ in range(60):
        assert bucket.wait(1, 100.0) == 0
        bucket.take(1, 100.0)
    assert bucket.wait(1, 100.0) == pytest.approx(1.0)
    assert bucket.wait(1, 100.5) == pytest.approx(0.5)
    assert bucket.wait(1, 101.0) == 0
    # More than a minute's worth needs a full bucket, then runs the bucket into debt.
    bucket = nexus.TokenBucket(per_minute=600, now=0.0)
    assert bucket.wait(5000, 0.0) == 0
    bucket.take(5000, 0.0)
    assert bucket.wait(1, 0.0) == pytest.approx(4401 / 10)
    bucket.adjust(-4400, 0.0)  # real usage was far less than the estimate
    assert bucket.wait(1, 0.0) == pytest.approx(0.1)


@settings(max_examples=300, deadline=None)
@given(
    per_minute=st.integers(1, 100_000),
    takes=st.lists(st.tuples(st.integers(1, 200_000), st.floats(0, 120)), max_size=20),
    amount=st.integers(1, 200_000),
)
def test_retry_after_in_whole_seconds_always_lets_the_request_through(per_minute, takes, amount):
    now = 0.0
    bucket = nexus.TokenBucket(per_minute=per_minute, now=now)
    for taken, pause in takes:
        now += pause
        if bucket.wait(taken, now) == 0:
            bucket.take(taken, now)
    wait = bucket.wait(amount, now)
    retry_after = nexus.retry_after_header(wait)
    assert int(retry_after) == math.ceil(wait) or (wait == 0 and retry_after == "1")
    assert bucket.wait(amount, now + int(retry_after)) == 0


async def limited(nx, key: str, path: str = "/v1/chat/completions", body=None, count=200):
    """Send requests until one is refused with 429 (bounded); return that answer."""
    deadline = time.monotonic() + 20
    for _ in range(count):
        status, document, headers = await call(nx, "POST", path, body or CHAT, bearer(key))
        if status == 429:
            return document, headers
        assert status == 200, document
        assert time.monotonic() < deadline
    raise AssertionError("never rate limited")


async def test_rpm_limit_with_retry_after_that_lets_the_next_through(
    backend_factory, nexus_factory
):
    backend, nx = await start(backend_factory, nexus_factory, alice=", rpm = 60", bob=", rpm = 1")
    document, headers = await limited(nx, ALICE)
    assert document["error"]["type"] == "rate_limit_error"
    assert document["error"]["code"] == "rate_limit_exceeded"
    assert "60 requests per minute" in document["error"]["message"]
    assert headers["Retry-After"] == "1"
    served = len(backend.received)
    assert 60 <= served <= 70
    status, _, _ = await call(nx, "POST", "/v1/chat/completions", CHAT, bearer(ALICE))
    assert status == 429  # asking again at once does not help
    status, _, _ = await call(nx, "POST", "/v1/chat/completions", CHAT, bearer(BOB))
    assert status == 200  # other keys have their own buckets
    await asyncio.sleep(int(headers["Retry-After"]))
    status, _, _ = await call(nx, "POST", "/v1/chat/completions", CHAT, bearer(ALICE))
    assert status == 200
    # Anthropic clients get it in their shape, with the same header. Bob's one request a
    # minute went above: the next is a minute away.
    sdk = anthropic_client(nx, BOB)
    with pytest.raises(anthropic.RateLimitError) as caught:
        await sdk.messages.create(**MESSAGE)
    assert caught.value.body["error"]["type"] == "rate_limit_error"
    assert caught.value.response.headers["Retry-After"] in ("59", "60")
    await sdk.close()


def usage_reply(prompt: int, completion: int):
    async def reply(request: web.Request, body: dict[str, Any]) -> web.Response:
        return web.json_response(
            {
                "id": "chatcmpl-usage",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "ok"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                },
            }
        )

    return reply


async def test_tpm_counts_real_usage_and_retry_after_lets_the_next_through(
    backend_factory, nexus_factory
):
    backend, nx = await start(backend_factory, nexus_factory, alice=", tpm = 600")
    backend.behaviours.append(usage_reply(500, 100))  # a whole minute's tokens in one answer
    status, _, _ = await call(nx, "POST", "/v1/chat/completions", CHAT, bearer(ALICE))
    assert status == 200
    status, document, headers = await call(nx, "POST", "/v1/chat/completions", CHAT, bearer(ALICE))
    assert status == 429
    assert document["error"]["code"] == "rate_limit_exceeded"
    assert "600 tokens per minute" in document["error"]["message"]
    assert headers["Retry-After"] == "1"  # the next small request needs a few tokens: 10 a second
    assert len(backend.received) == 1
    await asyncio.sleep(int(headers["Retry-After"]))
    status, _, _ = await call(nx, "POST", "/v1/chat/completions", CHAT, bearer(ALICE))
    assert status == 200


async def test_tpm_charges_the_estimate_up_front(backend_factory, nexus_factory):
    backend, nx = await start(backend_factory, nexus_factory, alice=", tpm = 1000")
    release = asyncio.Event()

    async def slow(request: web.Request, body: dict[str, Any]) -> web.Response:
        await asyncio.wait_for(release.wait(), 10)
        return await usage_reply(10, 3)(request, body)

    backend.behaviours.append(slow)
    big = {"model": "llama3:8b", "messages": [{"role": "user", "content": "x" * 3000}]}
    medium = {"model": "llama3:8b", "messages": [{"role": "user", "content": "x" * 1200}]}
    first = asyncio.create_task(call(nx, "POST", "/v1/chat/completions", big, bearer(ALICE)))
    for _ in range(100):  # until the first request reached the backend (bounded: 5 s)
        if backend.received:
            break
        await asyncio.sleep(0.05)
    status, _, headers = await call(nx, "POST", "/v1/chat/completions", medium, bearer(ALICE))
    assert status == 429  # ~754 tokens are reserved by the first, ~304 more do not fit
    wait = int(headers["Retry-After"])
    assert 1 <= wait <= 5
    release.set()
    status, _, _ = await first
    assert status == 200
    # The first used 13 tokens, not 754: the difference went back, so the medium one fits now.
    status, _, _ = await call(nx, "POST", "/v1/chat/completions", medium, bearer(ALICE))
    assert status == 200


async def test_backend_rpm_protects_a_shared_gpu(backend_factory, nexus_factory):
    gpu = await backend_factory("ollama", name="gpu")
    toml = "[routing]\nmax_retries = 0\n" + backends_toml(gpu, gpu={"rpm": 60})
    nx = await nexus_factory(toml)
    document, headers = await limited(nx, "unused")
    assert document["error"]["type"] == "rate_limit_error"
    assert "gpu" in document["error"]["message"]
    retry = int(headers["Retry-After"])
    assert retry == 1
    assert 60 <= len(gpu.received) <= 70
    await asyncio.sleep(retry)
    status, _, _ = await call(nx, "POST", "/v1/chat/completions", CHAT)
    assert status == 200


async def test_key_budget_keeps_its_cloud_spend_within_the_monthly_limit(
    backend_factory, nexus_factory
):
    gpu = await backend_factory("ollama", {"llama3": {}}, name="gpu")
    cloud = await backend_factory("openai", {"llama3": {}, "gpt-4o": {}}, name="cloud")
    toml = (
        '[routing.budget]\nprices = { "llama3" = { input = 1.0, output = 2.0 } }\n'
        + auth_toml(alice=", monthly_limit_usd = 0.00001")
        + backends_toml(gpu, cloud, gpu={"priority": 90}, cloud={"priority": 0})
    )
    nx = await nexus_factory(toml, env={**KEY_ENV, **cloud_env(cloud)})
    llama = {**CHAT, "model": "llama3"}
    status, _, headers = await call(nx, "POST", "/v1/chat/completions", llama, bearer(ALICE))
    assert status == 200 and headers["X-Nexus-Backend"] == "cloud"
    spent = (10 * 1.0 + 3 * 2.0) / 1e6  # the mock's usage at the configured price
    assert spent > 0.00001
    _, stats, _ = await call(nx, "GET", "/v1/stats", None, bearer(ROOT_KEY))
    alice = next(k for k in stats["keys"] if k["name"] == "alice")
    assert alice["spent_usd"] == pytest.approx(spent)
    assert alice["monthly_limit_usd"] == 0.00001
    # Over its limit, alice's work stays on local backends; what only the cloud serves is a 429.
    status, _, headers = await call(nx, "POST", "/v1/chat/completions", llama, bearer(ALICE))
    assert status == 200 and headers["X-Nexus-Backend"] == "gpu"
    gpt = {**CHAT, "model": "gpt-4o"}
    status, document, headers = await call(nx, "POST", "/v1/chat/completions", gpt, bearer(ALICE))
    assert status == 429
    assert document["error"]["type"] == "insufficient_quota"
    assert "alice" in document["error"]["message"] and "monthly" in document["error"]["message"]
    assert 0 < int(headers["Retry-After"]) <= 31 * 24 * 3600
    sdk = anthropic_client(nx, ALICE)
    with pytest.raises(anthropic.RateLimitError):
        await sdk.messages.create(**{**MESSAGE, "model": "gpt-4o"})
    await sdk.close()
    assert len([p for p in cloud.received_paths() if p == "/v1/chat/completions"]) == 1
    # Other keys have their own budgets (bob has none).
    status, _, headers = await call(nx, "POST", "/v1/chat/completions", gpt, bearer(BOB))
    assert status == 200 and headers["X-Nexus-Backend"] == "cloud"
    _, stats, _ = await call(nx, "GET", "/v1/stats", None, bearer(ROOT_KEY))
    spent_by = {k["name"]: k["spent_usd"] for k in stats["keys"]}
    assert spent_by["alice"] == pytest.approx(spent) and spent_by["bob"] > 0
    assert stats["budget"] is None  # no global limit: only the keys' own


async def test_backend_rpm_waits_out_a_short_wait_when_it_is_the_only_candidate(
    backend_factory, nexus_factory
):
    gpu = await backend_factory("ollama", name="gpu")
    nx = await nexus_factory(backends_toml(gpu, gpu={"rpm": 20}))  # max_retries: 2
    for _ in range(20):
        status, _, _ = await call(nx, "POST", "/v1/chat/completions", CHAT)
        assert status == 200
    started = time.monotonic()
    status, _, _ = await call(nx, "POST", "/v1/chat/completions", CHAT)
    # Held until the GPU's bucket had room again (one request per 3 s), longer than the retry
    # backoff alone would have waited.
    assert status == 200
    assert 2 < time.monotonic() - started < 8
    assert len(gpu.received) == 21


# --- the admin API --------------------------------------------------------------------------


async def test_admin_api_needs_an_admin_key(backend_factory, nexus_factory):
    _, nx = await start(backend_factory, nexus_factory)
    extra = await backend_factory("generic", {"extra": {}}, name="extra")
    add = {"url": extra.url, "name": "extra", "type": "generic"}
    status, _, _ = await call(nx, "POST", "/v1/backends", add)
    assert status == 401  # loopback alone is not enough once keys exist
    status, document, _ = await call(nx, "POST", "/v1/backends", add, bearer(ALICE))
    assert status == 403
    assert document["error"]["type"] == "permission_error"
    assert "alice" in document["error"]["message"] and ALICE not in json.dumps(document)
    status, _, _ = await call(nx, "DELETE", "/v1/backends/mock", None, bearer(ALICE))
    assert status == 403
    status, document, _ = await call(nx, "POST", "/v1/backends", add, bearer(ROOT_KEY))
    assert status == 201 and document["name"] == "extra"
    status, _, _ = await call(nx, "DELETE", "/v1/backends/extra", None, bearer(ROOT_KEY))
    assert status == 200


async def test_without_keys_the_admin_api_refuses_what_came_through_a_proxy(
    backend_factory, nexus_factory
):
    backend = await backend_factory("ollama", {"llama3:8b": {}}, name="gpu")
    nx = await nexus_factory(backends_toml(backend))
    extra = await backend_factory("generic", {"extra": {}}, name="extra")
    add = {"url": extra.url, "name": "extra", "type": "generic"}
    # A reverse proxy on this machine connects from loopback, for a caller from anywhere.
    for proxied in (
        {"X-Forwarded-For": "127.0.0.1"},
        {"X-Forwarded-For": "203.0.113.9, 127.0.0.1"},
        {"Forwarded": "for=127.0.0.1;proto=https"},
        {"X-Real-IP": "203.0.113.9"},
    ):
        status, document, _ = await call(nx, "POST", "/v1/backends", add, proxied)
        assert status == 403, proxied
        assert "proxy" in document["error"]["message"]
        status, _, _ = await call(nx, "DELETE", "/v1/backends/gpu", None, proxied)
        assert status == 403, proxied
    assert set(nx.registry.backends) == {"gpu"}
    status, document, _ = await call(nx, "POST", "/v1/backends", add)
    assert status == 201 and document["name"] == "extra"
    status, _, _ = await call(nx, "DELETE", "/v1/backends/extra")
    assert status == 200
    # Without keys the views stay open (a trusted LAN), proxied or not.
    for _, path, _ in ADMIN_VIEWS:
        if not path.endswith("/stream"):
            status, _, _ = await call(nx, "GET", path, None, {"X-Forwarded-For": "203.0.113.9"})
            assert status == 200, path


# --- what is shown --------------------------------------------------------------------------


async def test_stats_count_per_key_name(backend_factory, nexus_factory):
    _, nx = await start(backend_factory, nexus_factory)
    for key in (ALICE, ALICE, BOB):
        status, _, _ = await call(nx, "POST", "/v1/chat/completions", CHAT, bearer(key))
        assert status == 200
    await call(nx, "POST", "/v1/chat/completions", CHAT, bearer(WRONG))
    status, stats, _ = await call(nx, "GET", "/v1/stats", None, bearer(ROOT_KEY))
    keys = {k["name"]: k for k in stats["keys"]}
    assert set(keys) == {"alice", "bob", "root"}
    assert keys["alice"]["requests"] == 2 and keys["bob"]["requests"] == 1
    assert keys["root"]["requests"] == 0
    assert keys["alice"]["spent_usd"] == 0
    assert keys["alice"]["tokens"] == 2 * 13  # the mock's usage: 10 prompt + 3 completion
    # The refused request is in the list too, with no key to its name.
    assert [r["key"] for r in stats["recent"]] == ["alice", "alice", "bob", None]
    assert stats["recent"][-1]["status"] == 401
    text = json.dumps(stats)
    assert not any(secret in text for secret in (ALICE, BOB, ROOT_KEY, WRONG))
    async with (
        aiohttp.ClientSession() as session,
        session.get(nx.url + "/metrics", headers=bearer(ROOT_KEY)) as resp,
    ):
        metrics = await resp.text()
    assert 'nexus_key_requests_total{key="alice"} 2' in metrics
    assert 'nexus_key_requests_total{key="bob"} 1' in metrics
    assert 'nexus_key_requests_total{key="root"} 0' in metrics
    assert 'nexus_key_rate_limited_total{key="alice"} 0' in metrics
    assert 'nexus_key_spending_usd{key="alice"} 0' in metrics
    assert "# TYPE nexus_key_requests_total counter" in metrics
    assert not any(secret in metrics for secret in (ALICE, BOB, ROOT_KEY, WRONG))


async def test_dashboard_shows_usage_per_key_name_never_a_key(backend_factory, nexus_factory):
    _, nx = await start(backend_factory, nexus_factory, bob=", rpm = 1")
    for key in (ALICE, ALICE, BOB, BOB):
        await call(nx, "POST", "/v1/chat/completions", CHAT, bearer(key))
    async with Chromium() as browser:
        await browser.navigate(nx.url + "/")
        await browser.wait_for("!document.getElementById('login').hidden")
        await browser.evaluate(
            f"document.getElementById('key').value = {json.dumps(ROOT_KEY)};"
            "document.getElementById('login').requestSubmit()"
        )
        await browser.wait_for("document.querySelectorAll('#keys tbody tr').length === 3")
        assert not await browser.evaluate("document.getElementById('keys').hidden")
        rows = await browser.evaluate(
            "[...document.querySelectorAll('#keys tbody tr')].map(r => r.innerText)"
        )
        page = await browser.evaluate("document.documentElement.outerHTML")
    assert [row.split()[0] for row in rows] == ["alice", "bob", "root"]
    assert "2" in rows[0].split() and "2" in rows[1].split()  # bob's refused one counts too
    assert not any(secret in page for secret in (ALICE, BOB, ROOT_KEY))


# --- settings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "key", "problem"),
    [
        (
            '[auth]\napi_keys = [{ key_env = "NEXUS_KEY_ALICE" }]',
            "auth.api_keys[0].name",
            "required",
        ),
        ('[auth]\napi_keys = [{ name = "a" }]', "auth.api_keys[0].key_env", "required"),
        (
            '[auth]\napi_keys = [{ name = "a", key_env = "NEXUS_KEY_NOPE" }]',
            "auth.api_keys[0].key_env",
            "NEXUS_KEY_NOPE is not set",
        ),
        (
            '[auth]\napi_keys = [{ name = "a", key_env = "NEXUS_KEY_ALICE" },'
            ' { name = "a", key_env = "NEXUS_KEY_BOB" }]',
            "auth.api_keys[1].name",
            "duplicate",
        ),
        (
            '[auth]\napi_keys = [{ name = "a", key_env = "NEXUS_KEY_ALICE" },'
            ' { name = "b", key_env = "NEXUS_KEY_SAME" }]',
            "auth.api_keys[1].key_env",
            "same key as auth.api_keys[0]",
        ),
        (
            '[auth]\napi_keys = [{ name = "a", key_env = "NEXUS_KEY_ALICE", rpm = -1 }]',
            "auth.api_keys[0].rpm",
            "negative",
        ),
        (
            '[auth]\napi_keys = [{ name = "a", key_env = "NEXUS_KEY_ALICE", tpm = -5 }]',
            "auth.api_keys[0].tpm",
            "negative",
        ),
        (
            '[auth]\napi_keys = [{ name = "a", key_env = "NEXUS_KEY_ALICE",'
            " monthly_limit_usd = -1 }]",
            "auth.api_keys[0].monthly_limit_usd",
            "negative",
        ),
        (
            '[auth]\napi_keys = [{ name = "a", key_env = "NEXUS_KEY_ALICE", digest = "x" }]',
            "auth.api_keys[0].digest",
            "unknown key",
        ),
        (
            '[[backends]]\nurl = "http://127.0.0.1:9"\nrpm = -1',
            "backends[0].rpm",
            "negative",
        ),
    ],
)
def test_invalid_auth_settings(tmp_path, toml, key, problem):
    path = tmp_path / "nexus.toml"
    path.write_text(toml)
    env = {**KEY_ENV, "NEXUS_KEY_SAME": ALICE}
    with pytest.raises(nexus.ConfigError) as caught:
        nexus.load_settings(path, env, {})
    assert caught.value.key == key
    assert problem in str(caught.value)
    assert ALICE not in str(caught.value)


def test_settings_never_show_the_secret(tmp_path):
    path = tmp_path / "nexus.toml"
    path.write_text(auth_toml())
    loaded = nexus.load_settings(path, KEY_ENV, {})
    assert [k.name for k in loaded.auth.api_keys] == ["alice", "bob", "root"]
    assert not any(secret in repr(loaded) for secret in KEY_ENV.values())
    keys = nexus.api_keys(loaded.auth)
    assert not any(secret in repr(keys) for secret in KEY_ENV.values())


# --- Nexus as a process: no secret anywhere, admin from another address ------------------------

NEXUS = [sys.executable, str(ROOT / "nexus.py")]


async def wait_serving(url: str, timeout: float = 15.0) -> None:
    """Until Nexus answers and its backend's models are routable."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url + "/health") as resp:
                    if resp.status == 200 and (await resp.json())["models"]:
                        return
            await asyncio.sleep(0.05)
    raise AssertionError("nexus did not start serving in time")


async def test_no_secret_in_any_log_line_error_stat_or_page(backend_factory, tmp_path):
    backend = await backend_factory("ollama", MANY_MODELS)
    config = tmp_path / "nexus.toml"
    config.write_text(
        auth_toml(alice=', models = ["llama3:*"]', bob=", rpm = 1") + backends_toml(backend)
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, **KEY_ENV}
    proc = await asyncio.create_subprocess_exec(
        *NEXUS,
        *("serve", "-c", str(config), "-p", str(port), "-H", "127.0.0.1", "--no-discovery"),
        *("--log-format", "json", "-l", "debug"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    seen: list[str] = []  # every status line, header and body Nexus sent back
    try:
        await wait_serving(url)
        calls: list[tuple[str, str, Any, dict[str, str]]] = [
            ("POST", "/v1/chat/completions", CHAT, bearer(ALICE)),
            ("POST", "/v1/chat/completions", {**CHAT, "stream": True}, bearer(ALICE)),
            ("POST", "/v1/chat/completions", {**CHAT, "model": "qwen:7b"}, bearer(ALICE)),
            ("POST", "/v1/messages", MESSAGE, {"x-api-key": BOB}),
            ("POST", "/v1/messages", MESSAGE, {"x-api-key": BOB}),  # 429: rpm = 1
            ("POST", "/v1/chat/completions", CHAT, bearer(BOB)),  # 429
            ("POST", "/v1/chat/completions", CHAT, bearer(WRONG)),
            ("POST", "/v1/messages", MESSAGE, {"x-api-key": WRONG}),
            ("POST", "/v1/chat/completions", CHAT, {"Authorization": WRONG}),
            ("POST", "/v1/chat/completions", b"{not json", bearer(ALICE)),
            ("POST", "/v1/embeddings", {"model": "llama3:8b", "input": "x"}, bearer(ROOT_KEY)),
            ("GET", "/v1/models", None, bearer(ALICE)),
            ("GET", "/v1/models/secret-model", None, bearer(ALICE)),
            ("POST", "/v1/backends", {"url": "http://127.0.0.1:9"}, bearer(ALICE)),
            ("POST", "/v1/backends", {"url": "http://127.0.0.1:9", "type": "x"}, bearer(ROOT_KEY)),
            ("DELETE", "/v1/backends/none", None, bearer(ROOT_KEY)),
            ("GET", "/v1/backends", None, bearer(ROOT_KEY)),
            ("GET", "/v1/stats", None, bearer(ROOT_KEY)),
            ("GET", "/metrics", None, bearer(ROOT_KEY)),
            ("GET", "/v1/usage", None, bearer(ROOT_KEY)),
            ("GET", "/v1/stats", None, bearer(ALICE)),
            ("GET", "/health", None, {}),
            ("GET", "/", None, {}),
        ]
        statuses = []
        async with aiohttp.ClientSession() as session:
            for method, path, body, headers in calls:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                async with session.request(
                    method, url + path, data=None if body is None else data, headers=headers
                ) as resp:
                    statuses.append(resp.status)
                    seen.append(f"{resp.status} {resp.reason} {dict(resp.headers)}")
                    seen.append(await resp.text())
            async with session.get(url + "/v1/stats/stream", headers=bearer(ROOT_KEY)) as resp:
                seen.append(str(await asyncio.wait_for(resp.content.readline(), 5)))
        assert statuses[:9] == [200, 200, 404, 200, 429, 429, 401, 401, 401]
        assert statuses[13:15] == [403, 400]
        assert statuses[16:23] == [200, 200, 200, 200, 403, 200, 200]
        cli = await asyncio.create_subprocess_exec(
            *NEXUS,
            *("backends", "list", "--url", url),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "NEXUS_API_KEY": ROOT_KEY},
        )
        out, err = await asyncio.wait_for(cli.communicate(), 30)
        assert cli.returncode == 0, err
        seen += [out.decode(), err.decode()]
    finally:
        proc.terminate()
        out, err = await asyncio.wait_for(proc.communicate(), 15)
    logs = out.decode() + err.decode()
    lines = [json.loads(line) for line in err.decode().splitlines() if line.startswith("{")]
    assert any(line.get("key") == "alice" for line in lines)  # request lines name the key
    assert any(line.get("status") == 401 for line in lines)  # refusals are logged too
    everything = logs + "\n".join(seen)
    for secret in (ALICE, BOB, ROOT_KEY, WRONG):
        assert secret not in everything
        assert secret[8:] not in everything  # nor a recognisable part of one


@requires_root
@pytest.mark.netns
def test_admin_api_from_another_address(tmp_path):
    open_config = tmp_path / "open.toml"
    open_config.write_text("[health_check]\nenabled = false\n")
    keyed_config = tmp_path / "keyed.toml"
    keyed_config.write_text("[health_check]\nenabled = false\n" + auth_toml())
    add = json.dumps({"url": "http://127.0.0.1:9", "name": "far", "type": "generic"}).encode()
    json_headers = {"Content-Type": "application/json"}
    with namespace_pair() as (a, b):
        for config, port in ((open_config, 8000), (keyed_config, 8001)):
            serve = ["serve", "-c", str(config), "-H", "0.0.0.0", "-p", str(port)]
            a.popen([*NEXUS, *serve, "--no-discovery"], env={**os.environ, **KEY_ENV})
        open_url = f"http://{a.address}:8000"
        keyed_url = f"http://{a.address}:8001"
        b.wait_http(open_url + "/health", timeout=15)
        b.wait_http(keyed_url + "/health", timeout=15)
        # Without keys the admin API answers loopback only.
        status, body = b.http("POST", open_url + "/v1/backends", add, json_headers)
        assert status == 403, body
        assert json.loads(body)["error"]["type"] == "permission_error"
        status, _ = b.http("DELETE", open_url + "/v1/backends/far")
        assert status == 403
        status, _ = b.http("GET", open_url + "/v1/backends")
        assert status == 200
        # With keys: an admin key works from anywhere, nothing else does.
        status, _ = b.http("POST", keyed_url + "/v1/backends", add, json_headers)
        assert status == 401
        status, body = b.http(
            "POST", keyed_url + "/v1/backends", add, {**json_headers, **bearer(ALICE)}
        )
        assert status == 403, body
        status, body = b.http(
            "POST", keyed_url + "/v1/backends", add, {**json_headers, **bearer(ROOT_KEY)}
        )
        assert status == 201, body
        status, _ = b.http("DELETE", keyed_url + "/v1/backends/far", None, bearer(ALICE))
        assert status == 403
        status, _ = b.http("DELETE", keyed_url + "/v1/backends/far", None, bearer(ROOT_KEY))
        assert status == 200
        # Loopback inside a's own namespace: the admin key is needed there too.
        status, _ = a.http("POST", "http://127.0.0.1:8001/v1/backends", add, json_headers)
        assert status == 401
        status, _ = a.http("POST", "http://127.0.0.1:8000/v1/backends", add, json_headers)
        assert status == 201
