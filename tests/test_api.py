"""The HTTP API of SPEC §2 and the errors of §4, driven by the official openai SDK."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import openai
import pytest
from aiohttp import web
from conftest import backends_toml

MODELS_ALL_TYPES = {
    "ollama": {"llama3:8b": {"context": 8192, "tools": True}, "llava:7b": {"vision": True}},
    "vllm": {"Qwen/Qwen2.5-7B": {"context": 32768}},
    "llamacpp": {"smollm2": {"context": 2048}},
    "lmstudio": {"phi-4": {"context": 16384, "tools": True}},
    "exo": {"mlx-llama": {}},
    "generic": {"generic-model": {}},
}


def client(nx, **kw) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=nx.url + "/v1", api_key="unused", max_retries=0, **kw)


async def test_chat_non_stream_through_openai_sdk(backend_factory, nexus_factory):
    backend = await backend_factory("ollama", name="gpu")
    nx = await nexus_factory(backends_toml(backend))
    raw = await client(nx).chat.completions.with_raw_response.create(
        model="llama3:8b", messages=[{"role": "user", "content": "hi"}]
    )
    answer = raw.parse()
    assert answer.choices[0].message.content == "Hello from gpu"
    assert answer.usage.completion_tokens == 3
    assert raw.headers["X-Nexus-Backend"] == "gpu"
    assert raw.headers["X-Nexus-Backend-Type"] == "local"
    assert raw.headers["X-Nexus-Route-Reason"] == "capability-match"
    assert raw.headers["X-Nexus-Privacy-Zone"] == "restricted"
    assert raw.headers["X-Nexus-Cost-Estimated"] == "0"
    assert raw.headers["X-Request-Id"].startswith("req-")
    assert "x_nexus" not in json.dumps(answer.model_dump()).lower()


async def test_chat_stream_through_openai_sdk(backend_factory, nexus_factory):
    backend = await backend_factory("vllm", {"qwen": {"context": 4096}}, name="vl")
    nx = await nexus_factory(backends_toml(backend))
    raw = await client(nx).chat.completions.with_raw_response.create(
        model="qwen", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    assert raw.headers["X-Nexus-Backend"] == "vl"
    assert raw.headers["Content-Type"].startswith("text/event-stream")
    text = ""
    finish = None
    async for chunk in raw.parse():
        assert chunk.usage is None  # the client did not ask for usage, so Nexus strips it
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    assert text == "Hello from vl"
    assert finish == "stop"
    # Nexus asked the backend for usage on the client's behalf, to count tokens.
    assert backend.received[-1][1]["stream_options"] == {"include_usage": True}


async def test_stream_usage_kept_when_client_asks(backend_factory, nexus_factory):
    backend = await backend_factory("vllm", {"qwen": {}}, name="vl")
    nx = await nexus_factory(backends_toml(backend))
    stream = await client(nx).chat.completions.create(
        model="qwen",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    usages = [chunk.usage async for chunk in stream if chunk.usage]
    assert len(usages) == 1 and usages[0].completion_tokens == 3


async def test_stream_ends_with_done_exactly(backend_factory, nexus_factory):
    backend = await backend_factory("generic", {"m": {}})
    nx = await nexus_factory(backends_toml(backend))
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            nx.url + "/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True},
        ) as resp,
    ):
        body = await resp.read()
    events = body.split(b"\n\n")
    assert events[-2] == b"data: [DONE]" and events[-1] == b""
    assert all(e.startswith(b"data: ") for e in events[:-1])


async def test_first_chunk_arrives_before_backend_finishes(backend_factory, nexus_factory):
    backend = await backend_factory("generic", {"m": {}})
    backend.reply = "one two three four"
    backend.chunk_delay = 0.4
    nx = await nexus_factory(backends_toml(backend))
    started = time.monotonic()
    stream = await client(nx).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}], stream=True
    )
    arrivals = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - started)
    assert len(arrivals) == 4
    # The backend needs ~1.6 s for the whole answer; the first word must not wait for it
    # (the bound leaves room for a loaded machine, and is still half of the whole).
    assert arrivals[0] < 0.8
    assert arrivals[-1] - arrivals[0] > 1.0  # words arrived as produced, not all at the end


async def test_legacy_completions_stream_and_not(backend_factory, nexus_factory):
    backend = await backend_factory("llamacpp", {"coder": {"context": 4096}}, name="cpp")
    nx = await nexus_factory(backends_toml(backend))
    answer = await client(nx).completions.create(model="coder", prompt="def add(a, b):")
    assert answer.choices[0].text == "Hello from cpp"
    stream = await client(nx).completions.create(model="coder", prompt="x", stream=True)
    text = "".join([c.choices[0].text async for c in stream if c.choices])
    assert text == "Hello from cpp"
    assert backend.received_paths() == ["/v1/completions", "/v1/completions"]


async def test_embeddings_string_and_list(backend_factory, nexus_factory):
    backend = await backend_factory("ollama", {"nomic-embed": {}})
    nx = await nexus_factory(backends_toml(backend))
    one = await client(nx).embeddings.create(model="nomic-embed", input="hello")
    assert len(one.data) == 1
    many = await client(nx).embeddings.create(model="nomic-embed", input=["a", "b", "c"])
    assert [d.index for d in many.data] == [0, 1, 2]


async def test_models_list_every_type_with_capabilities(backend_factory, nexus_factory):
    backends = [
        await backend_factory(kind, models, name=f"b-{kind}")
        for kind, models in MODELS_ALL_TYPES.items()
    ]
    nx = await nexus_factory(backends_toml(*backends))
    listing = await client(nx).models.list()
    by_id = {m.id: m.model_dump() for m in listing.data}
    expected = {m for models in MODELS_ALL_TYPES.values() for m in models}
    assert set(by_id) == expected
    assert by_id["llama3:8b"]["context_length"] == 8192
    assert by_id["llama3:8b"]["capabilities"] == {"vision": False, "tools": True, "json_mode": None}
    assert by_id["llava:7b"]["capabilities"]["vision"] is True
    assert by_id["Qwen/Qwen2.5-7B"]["context_length"] == 32768
    assert by_id["smollm2"]["context_length"] == 2048
    assert by_id["phi-4"]["context_length"] == 16384
    assert by_id["phi-4"]["capabilities"]["tools"] is True
    assert by_id["mlx-llama"]["backends"] == ["b-exo"]
    assert by_id["generic-model"]["owned_by"] == "generic"
    one = await client(nx).models.retrieve("Qwen/Qwen2.5-7B")
    assert one.model_dump()["backends"] == ["b-vllm"]


async def test_one_entry_per_model_across_backends(backend_factory, nexus_factory):
    a = await backend_factory("ollama", {"llama3:8b": {"context": 8192}}, name="a")
    b = await backend_factory("vllm", {"llama3:8b": {"context": 16384}}, name="b")
    nx = await nexus_factory(backends_toml(a, b))
    listing = await client(nx).models.list()
    assert [m.id for m in listing.data] == ["llama3:8b"]
    entry = listing.data[0].model_dump()
    assert entry["backends"] == ["a", "b"]
    assert entry["context_length"] == 16384


async def test_alias_routes_to_real_model_and_is_listed(backend_factory, nexus_factory):
    backend = await backend_factory("ollama", {"llama3:70b": {}})
    toml = '[routing]\naliases = { "gpt-4" = "big", "big" = "llama3:70b" }\n'
    nx = await nexus_factory(toml + backends_toml(backend))
    answer = await client(nx).chat.completions.create(
        model="gpt-4", messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.model == "llama3:70b"  # the response names the model that served
    assert backend.received[-1][1]["model"] == "llama3:70b"
    ids = {m.id for m in (await client(nx).models.list()).data}
    assert {"gpt-4", "big", "llama3:70b"} <= ids


async def test_unknown_fields_pass_through_untouched(backend_factory, nexus_factory):
    backend = await backend_factory("generic", {"m": {}})
    nx = await nexus_factory(backends_toml(backend))
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "response_format": {"type": "json_object"},
        "mirostat": 2,
        "custom": {"nested": [1, 2, {"x": None}]},
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(nx.url + "/v1/chat/completions", json=body) as resp,
    ):
        assert resp.status == 200
    assert backend.received[-1][1] == body


async def post(nx, path: str, data: bytes | str, headers: dict | None = None):
    async with (
        aiohttp.ClientSession() as session,
        session.post(nx.url + path, data=data, headers=headers or {}) as resp,
    ):
        return resp.status, await resp.json(), resp.headers


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "model"),
        (json.dumps({"model": 5, "messages": []}), "model"),
        (json.dumps({"model": "m"}), "messages"),
        (json.dumps({"model": "m", "messages": "hi"}), "messages"),
        (json.dumps({"model": "m", "messages": [{"role": "user"}], "stream": "yes"}), "stream"),
        (json.dumps({"model": "m", "messages": [1]}), "messages[0]"),
        (json.dumps({"model": "m", "messages": [{"content": 1}]}), "messages"),
        (
            json.dumps({"model": "m", "messages": [{"content": "x"}], "max_tokens": -1}),
            "max_tokens",
        ),
    ],
)
async def test_400_names_the_field(backend_factory, nexus_factory, body, param):
    backend = await backend_factory("generic", {"m": {}})
    nx = await nexus_factory(backends_toml(backend))
    status, answer, _ = await post(nx, "/v1/chat/completions", body)
    assert status == 400
    assert answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["param"] == param
    assert set(answer["error"]) >= {"message", "type", "param", "code"}
    assert backend.received == []


async def test_400_through_sdk_raises_bad_request(backend_factory, nexus_factory):
    backend = await backend_factory("generic", {"m": {}})
    nx = await nexus_factory(backends_toml(backend))
    with pytest.raises(openai.BadRequestError) as caught:
        await client(nx).chat.completions.create(model="m", messages=[])
    assert caught.value.body["param"] == "messages"


async def test_404_unknown_model_lists_available(backend_factory, nexus_factory):
    backend = await backend_factory("ollama", {"llama3:8b": {}, "qwen2:7b": {}})
    nx = await nexus_factory(backends_toml(backend))
    with pytest.raises(openai.NotFoundError) as caught:
        await client(nx).chat.completions.create(
            model="gpt-17", messages=[{"role": "user", "content": "x"}]
        )
    error = caught.value.body
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"
    assert "llama3:8b" in error["message"] and "qwen2:7b" in error["message"]
    with pytest.raises(openai.NotFoundError):
        await client(nx).models.retrieve("gpt-17")


async def test_413_body_over_limit(backend_factory, nexus_factory):
    backend = await backend_factory("generic", {"m": {}})
    nx = await nexus_factory("[server]\nmax_body_mb = 1\n" + backends_toml(backend))
    big = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 2_000_000}]})
    status, answer, _ = await post(nx, "/v1/chat/completions", big)
    assert status == 413
    assert answer["error"]["code"] == "request_too_large"
    status, _, _ = await post(nx, "/v1/chat/completions", json.dumps({"model": "m"}))
    assert status == 400  # still serving


async def test_502_backend_answers_garbage(backend_factory, nexus_factory):
    backend = await backend_factory("generic", {"m": {}})

    async def garbage(request, body):
        return web.Response(text="<html>oops</html>", content_type="text/html")

    backend.behaviours = [garbage] * 3
    nx = await nexus_factory(backends_toml(backend))
    with pytest.raises(openai.APIStatusError) as caught:
        await client(nx).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}]
        )
    assert caught.value.status_code == 502
    assert caught.value.body["type"] == "backend_error"


async def test_504_backend_hangs(backend_factory, nexus_factory):
    backend = await backend_factory("generic", {"m": {}})

    async def hang(request, body):
        await asyncio.sleep(30)
        return web.json_response({})

    backend.behaviours = [hang]
    toml = "[server]\nfirst_byte_timeout_seconds = 0.5\n" + backends_toml(backend)
    nx = await nexus_factory(toml)
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        await client(nx).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}]
        )
    assert caught.value.status_code == 504
    assert time.monotonic() - started < 3


async def test_503_actionable_when_nothing_can_serve(backend_factory, nexus_factory):
    up = await backend_factory("generic", {"other": {}}, name="up")
    down = await backend_factory("generic", {"m": {}}, name="down")
    nx = await nexus_factory(backends_toml(up, down))
    down.healthy = False
    nx.backend("down").status = "unhealthy"
    with pytest.raises(openai.InternalServerError) as caught:
        await client(nx).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}]
        )
    assert caught.value.status_code == 503
    context = caught.value.body["context"]
    assert context["available_nodes"] == ["up"]
    assert set(context) == {
        "available_nodes",
        "eta_seconds",
        "required_tier",
        "privacy_zone_required",
        "backends",
    }
    assert context["backends"] == [{"backend": "down", "model": "m", "failed": ["down"]}]
    assert caught.value.body["message"] == (
        "No backend can serve model 'm' now: every backend serving it is down (down: down)."
    )


async def test_no_backends_at_all(nexus_factory):
    nx = await nexus_factory("")
    assert (await client(nx).models.list()).data == []
    status, answer, _ = await post(
        nx, "/v1/chat/completions", json.dumps({"model": "m", "messages": [{"content": "x"}]})
    )
    assert status == 404 and answer["error"]["code"] == "model_not_found"


async def test_unknown_path_and_method_are_openai_errors(nexus_factory):
    nx = await nexus_factory("")
    async with aiohttp.ClientSession() as session:
        async with session.get(nx.url + "/v1/nothing") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["type"] == "not_found_error"
        async with session.get(nx.url + "/v1/chat/completions") as resp:
            assert resp.status == 405
            assert "error" in await resp.json()


async def test_health_and_stats(backend_factory, nexus_factory):
    a = await backend_factory("ollama", {"llama3:8b": {}}, name="a")
    b = await backend_factory("generic", {"m": {}}, name="b")
    nx = await nexus_factory(backends_toml(a, b))
    await client(nx).chat.completions.create(
        model="llama3:8b", messages=[{"role": "user", "content": "x"}]
    )
    with pytest.raises(openai.NotFoundError):
        await client(nx).chat.completions.create(model="zz", messages=[{"content": "x"}])
    async with aiohttp.ClientSession() as session:
        async with session.get(nx.url + "/health") as resp:
            health = await resp.json()
        async with session.get(nx.url + "/v1/stats") as resp:
            stats = await resp.json()
    assert health["status"] == "healthy"
    assert health["backends"] == {"total": 2, "healthy": 2, "unhealthy": 0}
    assert health["models"] == 2 and health["version"]
    assert stats["requests"] == {"total": 2, "success": 1, "errors": 1}
    by_name = {s["name"]: s for s in stats["backends"]}
    assert by_name["a"]["requests"] == 1 and by_name["a"]["pending"] == 0
    assert by_name["a"]["avg_latency_ms"] > 0
    assert {m["name"]: m["requests"] for m in stats["models"]}["llama3:8b"] == 1
    assert stats["recent"][-1]["status"] == 404


async def test_200_concurrent_requests_counters_return_to_zero(backend_factory, nexus_factory):
    a = await backend_factory("generic", {"m": {}}, name="a")
    b = await backend_factory("generic", {"m": {}}, name="b")
    a.chunk_delay = b.chunk_delay = 0.01
    nx = await nexus_factory(backends_toml(a, b))
    sdk = client(nx)

    async def one(i: int) -> str:
        if i % 2:
            answer = await sdk.chat.completions.create(
                model="m", messages=[{"role": "user", "content": str(i)}]
            )
            return answer.choices[0].message.content
        stream = await sdk.chat.completions.create(
            model="m", messages=[{"role": "user", "content": str(i)}], stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    answers = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(200))), 60)
    assert all(text in ("Hello from a", "Hello from b") for text in answers)
    assert len(a.received) + len(b.received) == 200
    assert min(len(a.received), len(b.received)) > 50  # equal backends share the work
    assert nx.backend("a").in_flight == 0 and nx.backend("b").in_flight == 0


async def test_a_stream_of_any_language_arrives_whole(backend_factory, nexus_factory):
    backend = await backend_factory("generic", {"m": {}})
    backend.reply = "Grüße aus 東京 und Zürich 🚀 ok"
    nx = await nexus_factory(backends_toml(backend))
    stream = await client(nx).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}], stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == backend.reply
