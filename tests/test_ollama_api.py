"""Ollama's API (/api/*, SPEC §2.1) in front of every backend type, driven by the official
`ollama` Python client.

Over vLLM-, llama.cpp- and Anthropic-style mock backends Nexus translates each request into a
chat completion (or a completion, or embeddings) and the answer back into Ollama's shape; an
Ollama backend is sent the request as it came and its answer is relayed untouched.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import aiohttp
import ollama
import pytest
from aiohttp import web
from conftest import backends_toml, chat_chunk, cloud_env, send_chunk, start_sse
from real_engine import CONTEXT_SIZE, MODEL_ALIAS, PARALLEL_SLOTS

import nexus

KINDS = ["ollama", "vllm", "llamacpp", "anthropic"]
OPENAI_STYLE = ["vllm", "llamacpp"]
PNG_1PX = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
    )
).decode()
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@pytest.fixture
async def client():
    """Makes ollama AsyncClients for a running Nexus, and closes them after the test."""
    made: list[ollama.AsyncClient] = []

    def make(nx, **kw: Any) -> ollama.AsyncClient:
        made.append(ollama.AsyncClient(host=nx.url, timeout=20, **kw))
        return made[-1]

    yield make
    for c in made:
        await c._client.aclose()


async def start(backend_factory, nexus_factory, kind: str, extra: str = "", env=None):
    """One backend of the kind serving "qwen" (and "embedder"), an alias "fast" for qwen."""
    models = {"qwen": {"context": 32768, "tools": True}, "embedder": {"context": 512}}
    if kind == "anthropic":
        models = {"qwen": {}}
    backend = await backend_factory(kind, models, name="be")
    toml = backends_toml(backend) + '[routing]\naliases = { "fast" = "qwen" }\n' + extra
    nx = await nexus_factory(toml, env={**cloud_env(backend), **(env or {})})
    return backend, nx


def sent(backend) -> tuple[str, dict[str, Any]]:
    """The path and body the backend received last."""
    path, body, _ = backend.received[-1]
    return path, body


async def post(nx, path: str, data: Any, **kw: Any) -> tuple[int, Any, bytes]:
    async with aiohttp.ClientSession() as session:
        payload = data if isinstance(data, bytes) else json.dumps(data).encode()
        async with session.post(nx.url + path, data=payload, **kw) as resp:
            return resp.status, resp.headers.copy(), await resp.read()


def tool_call_reply(arguments: dict[str, Any]):
    """An OpenAI-style backend answering one chat request with a get_weather tool call, its
    arguments streamed in small fragments as vLLM and llama.cpp send them."""
    text = json.dumps(arguments)

    async def behaviour(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        model = body["model"]
        call = {"id": "call_1", "type": "function"}
        if not body.get("stream"):
            call["function"] = {"name": "get_weather", "arguments": text}
            message = {"role": "assistant", "content": None, "tool_calls": [call]}
            return web.json_response(
                {
                    "id": "chatcmpl-t",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}],
                    "usage": {"prompt_tokens": 30, "completion_tokens": 9, "total_tokens": 39},
                }
            )
        response = await start_sse(request)
        head = dict(call, index=0, function={"name": "get_weather", "arguments": ""})
        await send_chunk(
            response, chat_chunk(model, {"role": "assistant", "tool_calls": [head]}, None)
        )
        for i in range(0, len(text), 4):
            piece = {"index": 0, "function": {"arguments": text[i : i + 4]}}
            await send_chunk(response, chat_chunk(model, {"tool_calls": [piece]}, None))
        await send_chunk(response, chat_chunk(model, {}, "tool_calls"))
        await response.write(b"data: [DONE]\n\n")
        return response

    return behaviour


def assert_done(part: Any) -> None:
    """The last object of an answer: done, with Ollama's counts and durations."""
    assert part.done is True
    assert part.done_reason == "stop"
    assert part.prompt_eval_count > 0 and part.eval_count > 0
    assert part.total_duration > 0 and part.eval_duration > 0 and part.prompt_eval_duration > 0
    assert part.load_duration is not None


# --- listing and showing models ---------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_list_show_and_ps_match_v1_models(backend_factory, nexus_factory, client, kind):
    _backend, nx = await start(backend_factory, nexus_factory, kind)
    c = client(nx)
    listed = await c.list()
    async with aiohttp.ClientSession() as session, session.get(nx.url + "/v1/models") as resp:
        v1 = {m["id"]: m for m in (await resp.json())["data"]}
    names = [m.model for m in listed.models]
    assert sorted(names) == sorted(v1) and "fast" in names and "qwen" in names
    for model in listed.models:
        assert model.modified_at is not None and model.details is not None
        assert len(model.digest) == 64 and model.size == 0
    alias = next(m for m in listed.models if m.model == "fast")
    assert alias.details.parent_model == "qwen"

    shown = await c.show("qwen")
    assert "completion" in shown.capabilities and "tools" in shown.capabilities
    architecture = shown.modelinfo["general.architecture"]
    context = v1["qwen"]["context_length"]
    if context is None:  # the backend does not say (Anthropic's model list)
        assert f"{architecture}.context_length" not in shown.modelinfo
    else:
        assert shown.modelinfo[f"{architecture}.context_length"] == context == 32768
    alias_info = (await c.show("fast")).modelinfo
    assert alias_info.get(f"{architecture}.context_length") == context

    # What is in memory: a local server that does not say keeps what it serves loaded; a
    # cloud API holds nothing of Nexus's users in memory.
    running = await c.ps()
    in_memory = [] if kind == "anthropic" else sorted(v1)
    assert sorted(m.model for m in running.models) == in_memory

    async with aiohttp.ClientSession() as session, session.get(nx.url + "/api/version") as resp:
        assert resp.status == 200
        assert (await resp.json())["version"].count(".") == 2


async def test_show_reports_vision_and_missing_tools(backend_factory, nexus_factory, client):
    models = {"seer": {"context": 4096, "vision": True, "tools": False}}
    backend = await backend_factory("ollama", models, name="ol")
    nx = await nexus_factory(backends_toml(backend))
    shown = await client(nx).show("seer")
    assert shown.capabilities == ["completion", "vision"]
    assert shown.modelinfo[shown.modelinfo["general.architecture"] + ".context_length"] == 4096


# --- chat and generate --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_chat_non_stream_and_stream(backend_factory, nexus_factory, client, kind):
    backend, nx = await start(backend_factory, nexus_factory, kind)
    c = client(nx)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    answer = await c.chat(model="qwen", messages=messages, stream=False)
    assert answer.message.role == "assistant"
    assert answer.message.content == "Hello from be"
    assert answer.model == "qwen"
    assert_done(answer)
    path, body = sent(backend)
    if kind == "ollama":  # the client's own request, untranslated
        assert path == "/api/chat" and body["messages"] == messages and body["stream"] is False
    elif kind == "anthropic":
        assert body["system"] == "Be brief."
    else:
        assert path == "/v1/chat/completions" and body["messages"] == messages

    parts = [p async for p in await c.chat(model="qwen", messages=messages, stream=True)]
    assert "".join(p.message.content for p in parts) == "Hello from be"
    assert all(p.done is False for p in parts[:-1])
    assert_done(parts[-1])
    assert len(parts) >= 3  # word by word, as the backend sent it


@pytest.mark.parametrize("kind", KINDS)
async def test_generate_non_stream_and_stream(backend_factory, nexus_factory, client, kind):
    backend, nx = await start(backend_factory, nexus_factory, kind)
    c = client(nx)
    answer = await c.generate(model="qwen", prompt="Say hi", system="Be kind.", stream=False)
    assert answer.response == "Hello from be"
    assert_done(answer)
    path, body = sent(backend)
    if kind == "ollama":
        assert path == "/api/generate" and body["prompt"] == "Say hi"
    elif kind != "anthropic":
        assert body["messages"] == [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "Say hi"},
        ]
    parts = [p async for p in await c.generate(model="qwen", prompt="Say hi", stream=True)]
    assert "".join(p.response for p in parts) == "Hello from be"
    assert_done(parts[-1])


@pytest.mark.parametrize("kind", OPENAI_STYLE)
async def test_generate_raw_and_suffix_are_completions(
    backend_factory, nexus_factory, client, kind
):
    backend, nx = await start(backend_factory, nexus_factory, kind)
    c = client(nx)
    answer = await c.generate(model="qwen", prompt="def add(a, b):", suffix="\n", stream=False)
    assert answer.response == "Hello from be"
    path, body = sent(backend)
    assert path == "/v1/completions"
    assert body["prompt"] == "def add(a, b):" and body["suffix"] == "\n"
    parts = [p async for p in await c.generate(model="qwen", prompt="<s>x", raw=True, stream=True)]
    assert "".join(p.response for p in parts) == "Hello from be"
    assert parts[-1].done is True
    assert sent(backend) == ("/v1/completions", sent(backend)[1])
    assert sent(backend)[1]["prompt"] == "<s>x" and "suffix" not in sent(backend)[1]


async def test_empty_prompt_loads_without_inference(backend_factory, nexus_factory, client):
    backend, nx = await start(backend_factory, nexus_factory, "vllm")
    c = client(nx)
    loaded = await c.generate(model="qwen", stream=False)
    assert loaded.done is True and loaded.done_reason == "load" and loaded.response == ""
    chat = await c.chat(model="qwen", messages=[], stream=False)
    assert chat.done_reason == "load"
    assert backend.received == []
    with pytest.raises(ollama.ResponseError) as caught:
        await c.generate(model="nope", stream=False)
    assert caught.value.status_code == 404


async def test_options_format_images_and_think_map_to_chat(backend_factory, nexus_factory, client):
    backend, nx = await start(
        backend_factory,
        nexus_factory,
        "vllm",
    )
    backend_model = nx.registry.backends["be"].models["qwen"]
    backend_model.vision = True
    c = client(nx)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    await c.chat(
        model="qwen",
        messages=[{"role": "user", "content": "what is this?", "images": [PNG_1PX]}],
        options={
            "temperature": 0.2,
            "top_p": 0.9,
            "top_k": 20,
            "seed": 7,
            "stop": ["END"],
            "num_predict": 64,
            "num_ctx": 8192,
        },
        format=schema,
        think=True,
        keep_alive="5m",
        stream=False,
    )
    _, body = sent(backend)
    assert body["temperature"] == 0.2 and body["top_p"] == 0.9 and body["top_k"] == 20
    assert body["seed"] == 7 and body["stop"] == ["END"] and body["max_tokens"] == 64
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "response", "schema": schema},
    }
    assert body["chat_template_kwargs"] == {"enable_thinking": True}
    assert "num_ctx" not in json.dumps(body) and "keep_alive" not in body
    content = body["messages"][0]["content"]
    assert content[0] == {"type": "text", "text": "what is this?"}
    assert content[1] == {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64," + PNG_1PX},
    }
    await c.generate(model="qwen", prompt="x", format="json", think="high", stream=False)
    _, body = sent(backend)
    assert body["response_format"] == {"type": "json_object"} and body["reasoning_effort"] == "high"


async def test_images_route_only_to_a_vision_backend(backend_factory, nexus_factory, client):
    blind = await backend_factory("vllm", {"qwen": {"context": 8192}}, name="blind")
    seer = await backend_factory("llamacpp", {"qwen": {"vision": True}}, name="seer")
    nx = await nexus_factory(backends_toml(blind, seer, blind={"priority": 1}))
    nx.backend("blind").models["qwen"].vision = False
    answer = await client(nx).chat(
        model="qwen", messages=[{"role": "user", "content": "?", "images": [PNG_1PX]}], stream=False
    )
    assert answer.message.content == "Hello from seer"
    assert blind.received == []


async def test_ollama_backend_gets_the_request_as_sent(backend_factory, nexus_factory, client):
    backend, nx = await start(backend_factory, nexus_factory, "ollama")
    nx.backend("be").models["qwen"].vision = True
    await client(nx).chat(
        model="fast",
        messages=[{"role": "user", "content": "hi", "images": [PNG_1PX]}],
        options={"num_ctx": 8192, "temperature": 0.1},
        keep_alive="10m",
        think=False,
        stream=False,
    )
    path, body = sent(backend)
    assert path == "/api/chat"
    assert body["model"] == "qwen"  # the alias resolved; everything else as the client sent it
    assert body["options"] == {"num_ctx": 8192, "temperature": 0.1}
    assert body["keep_alive"] == "10m" and body["think"] is False
    assert body["messages"][0]["images"] == [PNG_1PX]


# --- tools ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stream", [False, True])
async def test_tool_calls_have_object_arguments(
    backend_factory, nexus_factory, client, kind, stream
):
    backend, nx = await start(backend_factory, nexus_factory, kind)
    arguments = {"city": "Paris", "days": 2}
    if kind in ("ollama", "anthropic"):
        backend.tool_call = {"name": "get_weather", "input": arguments}
    else:
        backend.behaviours.append(tool_call_reply(arguments))
    c = client(nx)
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    if stream:
        parts = [
            p
            async for p in await c.chat(
                model="qwen", messages=ask, tools=[WEATHER_TOOL], stream=True
            )
        ]
        calls = [call for p in parts for call in p.message.tool_calls or ()]
        assert parts[-1].done is True
    else:
        answer = await c.chat(model="qwen", messages=ask, tools=[WEATHER_TOOL], stream=False)
        calls = list(answer.message.tool_calls or ())
    assert len(calls) == 1
    assert calls[0].function.name == "get_weather"
    assert calls[0].function.arguments == arguments  # an object, not JSON text
    _, body = sent(backend)
    tools = body["tools"]
    assert (tools[0].get("function") or tools[0])["name"] == "get_weather"


@pytest.mark.parametrize("kind", ["vllm", "anthropic"])
async def test_tool_history_maps_to_chat_tool_messages(
    backend_factory, nexus_factory, client, kind
):
    backend, nx = await start(backend_factory, nexus_factory, kind)
    history = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                {"function": {"name": "get_time", "arguments": {"city": "Rome"}}},
            ],
        },
        {"role": "tool", "content": "12:00", "tool_name": "get_time"},
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
    ]
    answer = await client(nx).chat(
        model="qwen", messages=history, tools=[WEATHER_TOOL], stream=False
    )
    assert answer.message.content == "Hello from be"
    _, body = sent(backend)
    if kind == "vllm":
        assistant = body["messages"][1]
        ids = {c["function"]["name"]: c["id"] for c in assistant["tool_calls"]}
        assert json.loads(assistant["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
        assert body["messages"][2] == {
            "role": "tool",
            "content": "12:00",
            "tool_call_id": ids["get_time"],
        }
        assert body["messages"][3]["tool_call_id"] == ids["get_weather"]
    else:
        uses = {
            b["name"]: b["id"] for b in body["messages"][1]["content"] if b["type"] == "tool_use"
        }
        results = body["messages"][2]["content"]
        assert [r["tool_use_id"] for r in results] == [uses["get_time"], uses["get_weather"]]


# --- embeddings -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ollama", "vllm", "llamacpp"])
async def test_embed_string_and_list_and_legacy(backend_factory, nexus_factory, client, kind):
    backend, nx = await start(backend_factory, nexus_factory, kind)
    c = client(nx)
    one = await c.embed(model="embedder", input="hello")
    assert len(one.embeddings) == 1 and len(one.embeddings[0]) >= 2
    many = await c.embed(model="embedder", input=["a", "b", "c"])
    assert len(many.embeddings) == 3 and many.embeddings[2][2] == 2.0
    assert many.prompt_eval_count > 0
    path, body = sent(backend)
    assert body["input"] == ["a", "b", "c"]
    assert path == ("/api/embed" if kind == "ollama" else "/v1/embeddings")
    legacy = await c.embeddings(model="embedder", prompt="hello")
    assert len(legacy.embedding) >= 2 and all(isinstance(x, float) for x in legacy.embedding)


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_unknown_model_is_404(backend_factory, nexus_factory, client, kind):
    _backend, nx = await start(backend_factory, nexus_factory, kind)
    c = client(nx)
    for call in (
        c.chat(model="nope", messages=[{"role": "user", "content": "x"}], stream=False),
        c.chat(model="nope", messages=[{"role": "user", "content": "x"}], stream=True),
        c.generate(model="nope", prompt="x", stream=False),
        c.show("nope"),
    ):
        with pytest.raises(ollama.ResponseError) as caught:
            result = await call
            if hasattr(result, "__aiter__"):
                [p async for p in result]
        assert caught.value.status_code == 404
        assert "nope" in caught.value.error and "qwen" in caught.value.error


async def test_model_management_is_501(backend_factory, nexus_factory, client):
    backend, nx = await start(backend_factory, nexus_factory, "ollama")
    c = client(nx)
    for call in (c.pull("qwen"), c.delete("qwen"), c.copy("qwen", "q2"), c.push("qwen")):
        with pytest.raises(ollama.ResponseError) as caught:
            await call
        assert caught.value.status_code == 501
        assert "does not manage models" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        [p async for p in await c.pull("qwen", stream=True)]
    assert caught.value.status_code == 501
    status, _, raw = await post(nx, "/api/create", {"model": "x", "from": "qwen"})
    assert status == 501 and "error" in json.loads(raw)
    assert backend.received == []


BAD_BODIES = [
    (b"{not json", "JSON"),
    (b"[1, 2]", "JSON object"),
    (b"\xff\xfe", "JSON"),
    (b'{"messages": [{"role": "user", "content": "x"}]}', "model"),
    (b'{"model": 5, "messages": []}', "model"),
    (b'{"model": "qwen", "messages": "hi"}', "messages"),
    (b'{"model": "qwen", "messages": [1]}', "messages[0]"),
    (b'{"model": "qwen", "messages": [{"role": "robot", "content": "x"}]}', "messages[0].role"),
    (b'{"model": "qwen", "messages": [{"role": "user", "content": 5}]}', "content"),
    (
        b'{"model": "qwen", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}',
        "stream",
    ),
    (
        b'{"model": "qwen", "messages": [{"role": "user", "content": "x"}], "options": []}',
        "options",
    ),
    (
        b'{"model": "qwen", "messages": [{"role": "user", "content": "x"}],'
        b' "options": {"temperature": "hot"}}',
        "temperature",
    ),
    (
        b'{"model": "qwen", "messages": [{"role": "user", "content": "x"}],'
        b' "options": {"num_predict": 1.5}}',
        "num_predict",
    ),
    (b'{"model": "qwen", "messages": [{"role": "user", "content": "x"}], "format": 3}', "format"),
    (b'{"model": "qwen", "messages": [{"role": "user", "content": "x"}], "think": 3}', "think"),
    (b'{"model": "qwen", "messages": [{"role": "user", "content": "x"}], "tools": {}}', "tools"),
    (b'{"model": "qwen", "messages": [{"role": "user", "content": "x"}], "tools": [1]}', "tools"),
    (
        b'{"model": "qwen", "messages": [{"role": "user", "content": "x", "images": "abc"}]}',
        "images",
    ),
    (
        b'{"model": "qwen", "messages": [{"role": "assistant", "content": "",'
        b' "tool_calls": [{"function": {"name": "f", "arguments": 3}}]}]}',
        "arguments",
    ),
]


@pytest.mark.parametrize(("payload", "names"), BAD_BODIES)
async def test_bad_chat_bodies_are_400_naming_the_field(
    backend_factory, nexus_factory, payload, names
):
    backend, nx = await start(backend_factory, nexus_factory, "vllm")
    status, headers, raw = await post(nx, "/api/chat", payload)
    assert status == 400, raw
    document = json.loads(raw)
    assert list(document) == ["error"] and names in document["error"]
    assert headers["X-Request-Id"].startswith("req-")
    assert backend.received == []


@pytest.mark.parametrize(
    ("path", "payload", "names"),
    [
        ("/api/generate", {"model": "qwen", "prompt": 5}, "prompt"),
        ("/api/generate", {"model": "qwen", "prompt": "x", "raw": "yes"}, "raw"),
        ("/api/generate", {"model": "qwen", "prompt": "x", "system": ["a"]}, "system"),
        ("/api/generate", {"model": "qwen", "prompt": "x", "images": [5]}, "images"),
        ("/api/embed", {"model": "embedder", "input": 5}, "input"),
        ("/api/embed", {"model": "embedder", "input": []}, "input"),
        ("/api/embed", {"model": "embedder", "input": ["a", 1]}, "input"),
        ("/api/embed", {"model": "embedder", "input": "a", "dimensions": -1}, "dimensions"),
        ("/api/embeddings", {"model": "embedder", "prompt": ["a"]}, "prompt"),
        ("/api/show", {"model": 5}, "model"),
        ("/api/show", {}, "model"),
    ],
)
async def test_bad_bodies_on_other_endpoints_are_400(
    backend_factory, nexus_factory, path, payload, names
):
    backend, nx = await start(backend_factory, nexus_factory, "vllm")
    status, _, raw = await post(nx, path, payload)
    assert status == 400, raw
    assert names in json.loads(raw)["error"]
    assert backend.received == []


async def test_huge_body_and_unknown_paths_answer_in_ollama_shape(backend_factory, nexus_factory):
    backend, nx = await start(backend_factory, nexus_factory, "vllm", "[server]\nmax_body_mb = 1\n")
    huge = json.dumps(
        {"model": "qwen", "messages": [{"role": "user", "content": "x" * 2_000_000}]}
    ).encode()
    status, _, raw = await post(nx, "/api/chat", huge)
    assert status == 413 and "max_body_mb" in json.loads(raw)["error"]
    status, _, raw = await post(nx, "/api/nothing-here", {})
    assert status == 404 and list(json.loads(raw)) == ["error"]
    async with aiohttp.ClientSession() as session, session.get(nx.url + "/api/chat") as resp:
        assert resp.status == 405 and list(await resp.json()) == ["error"]
    # Still serving.
    status, _, raw = await post(
        nx,
        "/api/chat",
        {"model": "qwen", "messages": [{"role": "user", "content": "x"}], "stream": False},
    )
    assert status == 200 and json.loads(raw)["message"]["content"] == "Hello from be"
    assert len(backend.received) == 1


async def test_backend_refusal_keeps_status_in_ollama_shape(backend_factory, nexus_factory, client):
    backend, nx = await start(backend_factory, nexus_factory, "vllm")

    async def refuse(request: web.Request, body: dict[str, Any]) -> web.Response:
        return web.json_response({"error": {"message": "top_k must be positive"}}, status=400)

    backend.behaviours.append(refuse)
    with pytest.raises(ollama.ResponseError) as caught:
        await client(nx).chat(
            model="qwen", messages=[{"role": "user", "content": "x"}], stream=False
        )
    assert caught.value.status_code == 400 and caught.value.error == "top_k must be positive"


async def test_no_healthy_backend_is_503(backend_factory, nexus_factory, client):
    _backend, nx = await start(backend_factory, nexus_factory, "vllm")
    nx.backend("be").status = "unhealthy"
    with pytest.raises(ollama.ResponseError) as caught:
        [
            p
            async for p in await client(nx).chat(
                model="qwen", messages=[{"role": "user", "content": "x"}], stream=True
            )
        ]
    assert caught.value.status_code == 503
    assert "down" in caught.value.error


# --- streams that break ----------------------------------------------------------------------


def cut_chat_stream(words: list[str]):
    """An OpenAI-style backend that sends some words, then drops the connection."""

    async def behaviour(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = await start_sse(request)
        for word in words:
            await send_chunk(response, chat_chunk(body["model"], {"content": word}, None))
        await response.write_eof()
        return response

    return behaviour


async def cut_ndjson_stream(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    """An Ollama backend that sends two lines, then drops the connection."""
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    for word in ("partial", " answer"):
        line = {"model": body["model"], "message": {"role": "assistant", "content": word}}
        await response.write(json.dumps(dict(line, done=False)).encode() + b"\n")
    await response.write_eof()
    return response


@pytest.mark.parametrize("kind", ["vllm", "ollama"])
async def test_backend_dying_mid_stream_ends_with_an_error_line(
    backend_factory, nexus_factory, client, kind
):
    backend, nx = await start(backend_factory, nexus_factory, kind)
    if kind == "ollama":
        backend.behaviours.append(cut_ndjson_stream)
    else:
        backend.behaviours.append(cut_chat_stream(["partial", " answer"]))
    status, headers, raw = await post(
        nx, "/api/chat", {"model": "qwen", "messages": [{"role": "user", "content": "x"}]}
    )
    assert status == 200 and headers["Content-Type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in raw.decode().splitlines()]
    assert "".join(line["message"]["content"] for line in lines[:-1]) == "partial answer"
    assert list(lines[-1]) == ["error"] and "ended the stream" in lines[-1]["error"]

    if kind == "ollama":
        backend.behaviours.append(cut_ndjson_stream)
    else:
        backend.behaviours.append(cut_chat_stream(["partial"]))
    pieces = []
    with pytest.raises(ollama.ResponseError) as caught:
        async for part in await client(nx).chat(
            model="qwen", messages=[{"role": "user", "content": "x"}], stream=True
        ):
            pieces.append(part.message.content)
    assert pieces and "ended the stream" in caught.value.error
    async with aiohttp.ClientSession() as session, session.get(nx.url + "/v1/stats") as resp:
        stats = await resp.json()
    assert stats["requests"]["errors"] >= 2


# --- the same request as chat completions: headers, stats, auth -----------------------------


async def test_stream_headers_stats_and_content_type(backend_factory, nexus_factory):
    _backend, nx = await start(backend_factory, nexus_factory, "llamacpp")
    status, headers, raw = await post(
        nx, "/api/chat", {"model": "fast", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert status == 200
    assert headers["Content-Type"].startswith("application/x-ndjson")
    assert headers["X-Nexus-Backend"] == "be" and headers["X-Nexus-Route-Reason"]
    lines = [json.loads(line) for line in raw.decode().splitlines()]
    assert lines[-1]["done"] is True and lines[-1]["eval_count"] == 3
    assert lines[-1]["model"] == "qwen"
    async with aiohttp.ClientSession() as session, session.get(nx.url + "/v1/stats") as resp:
        stats = await resp.json()
    recent = {r["id"]: r for r in stats["recent"]}[headers["X-Request-Id"]]
    assert recent["status"] == 200 and recent["tokens"]["completion"] == 3


async def test_keys_are_needed_as_for_chat_completions(backend_factory, nexus_factory, client):
    auth = (
        '[auth]\napi_keys = [{ name = "alice", key_env = "NEXUS_KEY_ALICE", models = ["qwen"] }]\n'
    )
    env = {"NEXUS_KEY_ALICE": "sk-alice-1234567890"}
    _backend, nx = await start(backend_factory, nexus_factory, "vllm", auth, env)
    with pytest.raises(ollama.ResponseError) as caught:
        await client(nx).list()
    assert caught.value.status_code == 401
    c = client(nx, headers={"Authorization": "Bearer sk-alice-1234567890"})
    assert [m.model for m in (await c.list()).models] == ["fast", "qwen"]  # as /v1/models
    answer = await c.chat(model="qwen", messages=[{"role": "user", "content": "x"}], stream=False)
    assert answer.message.content == "Hello from be"
    with pytest.raises(ollama.ResponseError) as caught:
        await c.show("embedder")
    assert caught.value.status_code == 404
    async with aiohttp.ClientSession() as session, session.get(nx.url + "/api/version") as resp:
        assert resp.status == 200


def test_stream_translator_gathers_parallel_tool_calls():
    fmt = nexus.OllamaFormat({}, "chat")
    fmt.model = "m"
    out = b""
    for delta in (
        {"tool_calls": [{"index": 0, "id": "a", "function": {"name": "f", "arguments": ""}}]},
        {"tool_calls": [{"index": 1, "id": "b", "function": {"name": "g", "arguments": '{"y"'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"x": 1}'}}]},
        {"tool_calls": [{"index": 1, "function": {"arguments": ": 2}"}}]},
    ):
        out += fmt.chunk(b"", chat_chunk("m", delta, None))
    assert out == b""  # nothing until the calls are whole
    out = fmt.chunk(b"", chat_chunk("m", {}, "tool_calls")) + fmt.end()
    lines = [json.loads(line) for line in out.splitlines()]
    calls = lines[0]["message"]["tool_calls"]
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("f", {"x": 1}),
        ("g", {"y": 2}),
    ]
    assert lines[-1]["done"] is True and lines[-1]["done_reason"] == "stop"


# --- an Ollama backend, natively ------------------------------------------------------------


async def ndjson_error_first(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    """An Ollama backend whose stream opens with an error line (a model that failed to load)."""
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    await response.write(b'{"error": "llama runner process has terminated"}\n')
    await response.write_eof()
    return response


async def test_native_stream_failing_before_its_first_line_fails_over(
    backend_factory, nexus_factory, client
):
    first = await backend_factory("ollama", {"qwen": {}}, name="first")
    second = await backend_factory("ollama", {"qwen": {}}, name="second")
    nx = await nexus_factory(backends_toml(first, second, first={"priority": 1}))
    first.behaviours.append(ndjson_error_first)
    parts = [
        p
        async for p in await client(nx).chat(
            model="qwen", messages=[{"role": "user", "content": "x"}], stream=True
        )
    ]
    assert "".join(p.message.content for p in parts) == "Hello from second"
    assert parts[-1].done is True and parts[-1].eval_count == 3
    assert len(first.received) == 1 and len(second.received) == 1


@pytest.mark.parametrize("kind", ["ollama", "llamacpp", "anthropic"])
@pytest.mark.parametrize("stream", [False, True])
async def test_token_counts_reach_stats(backend_factory, nexus_factory, kind, stream):
    _backend, nx = await start(backend_factory, nexus_factory, kind)
    request = {"model": "qwen", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    status, headers, raw = await post(nx, "/api/chat", request)
    assert status == 200
    last = json.loads(raw.decode().splitlines()[-1])
    assert last["done"] is True
    async with aiohttp.ClientSession() as session, session.get(nx.url + "/v1/stats") as resp:
        stats = await resp.json()
    recent = {r["id"]: r for r in stats["recent"]}[headers["X-Request-Id"]]
    assert recent["status"] == 200
    assert recent["tokens"] == {
        "prompt": last["prompt_eval_count"],
        "completion": last["eval_count"],
    }
    assert recent["tokens"]["completion"] == 3  # the backend's own count of "Hello from be"


# Bodies of every wrong shape, to every endpoint: each is answered 4xx in Ollama's shape.
ODD_VALUES = [None, True, 0, -1, 1.5, "", "x", [], [None], {}, {"a": 1}, [[1]], "\u0000"]
ODD_FIELDS = {
    "/api/chat": ["model", "messages", "tools", "options", "format", "think", "stream", "images"],
    "/api/generate": ["model", "prompt", "suffix", "system", "raw", "images", "options", "format"],
    "/api/embed": ["model", "input", "dimensions", "truncate"],
    "/api/embeddings": ["model", "prompt"],
    "/api/show": ["model", "name"],
}
GOOD = {
    "/api/chat": {"model": "qwen", "messages": [{"role": "user", "content": "x"}], "stream": False},
    "/api/generate": {"model": "qwen", "prompt": "x", "stream": False},
    "/api/embed": {"model": "embedder", "input": "x"},
    "/api/embeddings": {"model": "embedder", "prompt": "x"},
    "/api/show": {"model": "qwen"},
}


async def test_wrong_types_anywhere_are_never_a_500(backend_factory, nexus_factory):
    backend, nx = await start(backend_factory, nexus_factory, "vllm")
    statuses: dict[int, int] = {}
    async with aiohttp.ClientSession() as session:
        for path, fields in ODD_FIELDS.items():
            for field in fields:
                for value in ODD_VALUES:
                    body = dict(GOOD[path], **{field: value})
                    async with session.post(nx.url + path, json=body) as resp:
                        raw = await resp.read()
                    statuses[resp.status] = statuses.get(resp.status, 0) + 1
                    assert resp.status < 500, (path, field, value, raw)
                    if resp.status >= 400:
                        assert list(json.loads(raw)) == ["error"], raw
        for path in GOOD:
            async with session.post(nx.url + path, json=GOOD[path]) as resp:
                assert resp.status == 200, await resp.text()  # still serving
    assert statuses.get(400, 0) > 50 and statuses.get(200, 0) > 10
    assert backend.received  # the well-formed ones among them were served


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "tool", "content": "orphan result"}],
        [{"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}],
        [{"role": "user", "content": "x", "images": ["data:image/png;base64," + PNG_1PX]}],
        [{"role": "assistant", "content": "", "thinking": "hmm", "tool_calls": []}],
    ],
)
async def test_odd_but_valid_histories_are_served(backend_factory, nexus_factory, messages):
    backend, nx = await start(backend_factory, nexus_factory, "llamacpp")
    nx.backend("be").models["qwen"].vision = True
    status, _, raw = await post(
        nx, "/api/chat", {"model": "qwen", "messages": messages, "stream": False}
    )
    assert status == 200, raw
    chat = sent(backend)[1]["messages"]
    assert len(chat) == len(messages)
    for message in chat:
        if message["role"] == "tool":
            assert message["tool_call_id"]
        for call in message.get("tool_calls", ()):
            assert call["id"] and json.loads(call["function"]["arguments"]) == {}


# --- end to end: the real llama-server ----------------------------------------------------------


@pytest.mark.engine
async def test_real_llama_server_through_the_ollama_client(llama_pair, nexus_factory):
    """The ollama client against Nexus in front of a real llama-server (SmolLM2-135M): list,
    show (the per-slot context Nexus routes by), chat and generate, streamed and not."""
    server = llama_pair[0]
    nx = await nexus_factory(
        f'[[backends]]\nname = "real"\nurl = "{server.url}"\ntype = "llamacpp"\n'
    )
    c = ollama.AsyncClient(host=nx.url, timeout=120)
    try:
        assert [m.model for m in (await c.list()).models] == [MODEL_ALIAS]
        shown = await c.show(MODEL_ALIAS)
        key = shown.modelinfo["general.architecture"] + ".context_length"
        assert shown.modelinfo[key] == CONTEXT_SIZE // PARALLEL_SLOTS
        options = {"num_predict": 16, "temperature": 0}
        ask = [{"role": "user", "content": "Name three colours."}]
        answer = await c.chat(model=MODEL_ALIAS, messages=ask, options=options, stream=False)
        assert any(ch.isalpha() for ch in answer.message.content)
        assert answer.done is True and answer.done_reason in ("stop", "length")
        assert answer.prompt_eval_count > 0 and 0 < answer.eval_count <= 16
        assert answer.eval_duration > 0 and answer.total_duration > 0
        parts = [
            p
            async for p in await c.chat(
                model=MODEL_ALIAS, messages=ask, options=options, stream=True
            )
        ]
        assert "".join(p.message.content for p in parts) == answer.message.content
        assert parts[-1].done is True and parts[-1].eval_count == answer.eval_count
        generated = await c.generate(model=MODEL_ALIAS, prompt="The sky is", options=options)
        assert any(ch.isalpha() for ch in generated.response) and generated.done is True
    finally:
        await c._client.aclose()


def reasoning_reply(finish: str):
    """An OpenAI-style backend answering with reasoning_content, then text, then `finish`."""

    async def behaviour(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        model = body["model"]
        if not body.get("stream"):
            message = {"role": "assistant", "content": "Four.", "reasoning_content": "2+2=4"}
            return web.json_response(
                {
                    "id": "chatcmpl-r",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                }
            )
        response = await start_sse(request)
        for delta in (
            {"reasoning_content": "2+2"},
            {"reasoning_content": "=4"},
            {"content": "Four."},
        ):
            await send_chunk(response, chat_chunk(model, delta, None))
        await send_chunk(response, chat_chunk(model, {}, finish))
        await response.write(b"data: [DONE]\n\n")
        return response

    return behaviour


@pytest.mark.parametrize("stream", [False, True])
async def test_thinking_and_length_stop(backend_factory, nexus_factory, client, stream):
    backend, nx = await start(backend_factory, nexus_factory, "vllm")
    backend.behaviours.append(reasoning_reply("length"))
    c = client(nx)
    ask = [{"role": "user", "content": "2+2?"}]
    if stream:
        parts = [p async for p in await c.chat(model="qwen", messages=ask, think=True, stream=True)]
        thinking = "".join(p.message.thinking or "" for p in parts)
        text = "".join(p.message.content or "" for p in parts)
        last = parts[-1]
    else:
        last = await c.chat(model="qwen", messages=ask, think=True, stream=False)
        thinking, text = last.message.thinking, last.message.content
    assert thinking == "2+2=4" and text == "Four."
    assert last.done is True and last.done_reason == "length"
    assert last.eval_count > 0 and last.prompt_eval_count > 0  # estimated: no usage was sent
    backend.behaviours.append(reasoning_reply("stop"))
    answer = await c.generate(model="qwen", prompt="2+2?", think=True, stream=stream)
    if stream:
        answer = [p async for p in answer]
        assert "".join(p.thinking or "" for p in answer) == "2+2=4"
        assert answer[-1].done_reason == "stop"
    else:
        assert answer.thinking == "2+2=4" and answer.response == "Four."


async def test_unload_request_is_answered_without_inference(backend_factory, nexus_factory, client):
    backend, nx = await start(backend_factory, nexus_factory, "llamacpp")
    answer = await client(nx).generate(model="qwen", keep_alive=0)
    assert answer.done is True and answer.done_reason == "unload"
    assert backend.received == []


async def anthropic_error_mid_stream(
    request: web.Request, body: dict[str, Any]
) -> web.StreamResponse:
    """An Anthropic backend that starts a message, sends some text, then an error event."""
    response = await start_sse(request)

    async def event(name: str, data: dict[str, Any]) -> None:
        await response.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())

    message = {"id": "msg_x", "type": "message", "role": "assistant", "model": body["model"]}
    message.update(content=[], stop_reason=None, usage={"input_tokens": 5, "output_tokens": 1})
    await event("message_start", {"type": "message_start", "message": message})
    block = {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    await event("content_block_start", block)
    delta = {"type": "content_block_delta", "index": 0}
    await event("content_block_delta", dict(delta, delta={"type": "text_delta", "text": "partial"}))
    error = {"type": "overloaded_error", "message": "Overloaded"}
    await event("error", {"type": "error", "error": error})
    await response.write_eof()
    return response


async def test_anthropic_error_mid_stream_ends_with_an_error_line(backend_factory, nexus_factory):
    backend, nx = await start(backend_factory, nexus_factory, "anthropic")
    backend.behaviours.append(anthropic_error_mid_stream)
    status, _, raw = await post(
        nx, "/api/chat", {"model": "qwen", "messages": [{"role": "user", "content": "x"}]}
    )
    assert status == 200
    lines = [json.loads(line) for line in raw.decode().splitlines()]
    assert lines[0]["message"]["content"] == "partial"
    assert list(lines[-1]) == ["error"] and lines[-1]["error"]
    assert not any(line.get("done") for line in lines)


async def ndjson_error_mid_stream(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    """An Ollama backend that answers a line, then reports an error on its own line."""
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    line = {"model": body["model"], "message": {"role": "assistant", "content": "partial"}}
    await response.write(json.dumps(dict(line, done=False)).encode() + b"\n")
    await response.write(b'{"error": "out of memory"}\n')
    await response.write_eof()
    return response


async def test_native_error_line_mid_stream_is_the_last_line(backend_factory, nexus_factory):
    backend, nx = await start(backend_factory, nexus_factory, "ollama")
    backend.behaviours.append(ndjson_error_mid_stream)
    status, headers, raw = await post(
        nx, "/api/chat", {"model": "qwen", "messages": [{"role": "user", "content": "x"}]}
    )
    assert status == 200
    lines = [json.loads(line) for line in raw.decode().splitlines()]
    assert lines == [
        {"model": "qwen", "message": {"role": "assistant", "content": "partial"}, "done": False},
        {"error": "out of memory"},
    ]
    async with aiohttp.ClientSession() as session, session.get(nx.url + "/v1/stats") as resp:
        stats = await resp.json()
    assert {r["id"]: r for r in stats["recent"]}[headers["X-Request-Id"]]["status"] == 502


@pytest.mark.parametrize("kind", ["chat", "generate"])
def test_a_text_line_is_the_line_of_its_piece(kind, monkeypatch):
    """Stream lines of text come from a head encoded once; they are the very bytes json.dumps
    writes for the same answer piece."""
    monkeypatch.setattr(nexus, "ollama_time", lambda seconds=None: "2026-01-01T00:00:00Z")
    fmt = nexus.OllamaFormat({}, kind)
    for model, text in (("m", "Hello"), ("qwen3:8b", ' "quoted" ünïcode\n\ttab')):
        fmt.model = model
        assert fmt.text_line(text) == fmt.line(fmt.piece(text))
