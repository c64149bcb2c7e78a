"""Shared fixtures: mock backends as real aiohttp servers on 127.0.0.1, and Nexus in front.

A MockBackend speaks one backend type's real API (Ollama's /api/tags and /api/show, vLLM's and
llama.cpp's /health, /props and /v1/models, LM Studio's /api/v0/models, OpenAI's /v1/*), and
records what it receives. Tests make it misbehave by queueing behaviours.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import nexus  # noqa: E402

Behaviour = Callable[[web.Request, dict[str, Any]], Awaitable[web.StreamResponse]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MockBackend:
    """A real inference-server double: one type's endpoints, canned but well-formed answers."""

    def __init__(
        self,
        kind: str = "generic",
        models: dict[str, dict[str, Any]] | None = None,
        name: str = "mock",
    ) -> None:
        self.kind = kind
        self.name = name
        self.models = models if models is not None else {"llama3:8b": {"context": 8192}}
        self.received: list[tuple[str, dict[str, Any], dict[str, str]]] = []
        self.polls = 0
        self.healthy = True
        self.behaviours: list[Behaviour] = []
        self.reply = f"Hello from {name}"
        self.chunk_delay = 0.0
        self.in_flight = 0
        self.max_in_flight = 0
        self.server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    def received_paths(self) -> list[str]:
        return [path for path, _, _ in self.received]

    # --- the server -------------------------------------------------------------------------

    async def start(self, port: int | None = None) -> MockBackend:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completion)
        app.router.add_post("/v1/embeddings", self.embedding)
        app.router.add_get("/v1/models", self.openai_models)
        if self.kind == "ollama":
            app.router.add_get("/api/tags", self.ollama_tags)
            app.router.add_post("/api/show", self.ollama_show)
        if self.kind in ("vllm", "llamacpp"):
            app.router.add_get("/health", self.health)
        if self.kind == "llamacpp":
            app.router.add_get("/props", self.llamacpp_props)
        if self.kind == "lmstudio":
            app.router.add_get("/api/v0/models", self.lmstudio_models)
        self.server = TestServer(app, host="127.0.0.1", port=port or free_port())
        await self.server.start_server()
        return self

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.close()

    def unavailable(self) -> web.Response | None:
        self.polls += 1
        if not self.healthy:
            return web.json_response({"error": "loading"}, status=503)
        return None

    async def health(self, request: web.Request) -> web.Response:
        down = self.unavailable()
        return down if down is not None else web.json_response({"status": "ok"})

    async def openai_models(self, request: web.Request) -> web.Response:
        if (down := self.unavailable()) is not None:
            return down
        data = []
        for model_id, info in self.models.items():
            entry: dict[str, Any] = {"id": model_id, "object": "model", "owned_by": self.kind}
            if self.kind == "vllm":
                entry["max_model_len"] = info.get("context", 8192)
            if self.kind == "llamacpp":
                entry["meta"] = {"n_ctx_train": 131072}
            data.append(entry)
        return web.json_response({"object": "list", "data": data})

    async def ollama_tags(self, request: web.Request) -> web.Response:
        if (down := self.unavailable()) is not None:
            return down
        return web.json_response(
            {
                "models": [
                    {"name": m, "model": m, "digest": f"sha-{m}", "size": 1, "details": {}}
                    for m in self.models
                ]
            }
        )

    async def ollama_show(self, request: web.Request) -> web.Response:
        body = await request.json()
        info = self.models.get(body.get("model") or body.get("name"))
        if info is None:
            return web.json_response({"error": "model not found"}, status=404)
        caps = ["completion"] + [c for c in ("vision", "tools") if info.get(c)]
        return web.json_response(
            {
                "capabilities": caps,
                "model_info": {
                    "general.architecture": "llama",
                    "llama.context_length": info.get("context", 8192),
                },
                "details": {"family": "llama"},
            }
        )

    async def llamacpp_props(self, request: web.Request) -> web.Response:
        first = next(iter(self.models.values()), {})
        return web.json_response(
            {
                "default_generation_settings": {"n_ctx": first.get("context", 4096)},
                "total_slots": 1,
                "modalities": {"vision": bool(first.get("vision"))},
            }
        )

    async def lmstudio_models(self, request: web.Request) -> web.Response:
        if (down := self.unavailable()) is not None:
            return down
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": m,
                        "type": "vlm" if info.get("vision") else "llm",
                        "state": "loaded",
                        "max_context_length": info.get("context", 8192),
                        "capabilities": ["tool_use"] if info.get("tools") else [],
                    }
                    for m, info in self.models.items()
                ],
            }
        )

    # --- inference --------------------------------------------------------------------------

    async def serve(
        self, request: web.Request, answer: Callable[[web.Request, dict[str, Any]], Awaitable[Any]]
    ) -> web.StreamResponse:
        body = await request.json()
        self.received.append((request.path, body, dict(request.headers)))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.behaviours:
                return await self.behaviours.pop(0)(request, body)
            return await answer(request, body)
        finally:
            self.in_flight -= 1

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self.serve(request, self.chat_answer)

    async def completion(self, request: web.Request) -> web.StreamResponse:
        return await self.serve(request, self.completion_answer)

    async def embedding(self, request: web.Request) -> web.StreamResponse:
        return await self.serve(request, self.embedding_answer)

    def words(self) -> list[str]:
        parts = self.reply.split(" ")
        return [parts[0]] + [" " + p for p in parts[1:]]

    async def chat_answer(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        usage = {"prompt_tokens": 10, "completion_tokens": len(self.words()), "total_tokens": 0}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": "chatcmpl-mock",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": self.reply},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                }
            )
        response = await start_sse(request)
        for i, word in enumerate(self.words()):
            delta = {"content": word} if i else {"role": "assistant", "content": word}
            await send_chunk(response, chat_chunk(body["model"], delta, None))
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
        await send_chunk(response, chat_chunk(body["model"], {}, "stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            chunk = chat_chunk(body["model"], {}, None)
            chunk["choices"] = []
            chunk["usage"] = usage
            await send_chunk(response, chunk)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def completion_answer(
        self, request: web.Request, body: dict[str, Any]
    ) -> web.StreamResponse:
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": "cmpl-mock",
                    "object": "text_completion",
                    "created": int(time.time()),
                    "model": body["model"],
                    "choices": [
                        {"index": 0, "text": self.reply, "finish_reason": "stop", "logprobs": None}
                    ],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
                }
            )
        response = await start_sse(request)
        for word in self.words():
            chunk = {
                "id": "cmpl-mock",
                "object": "text_completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [{"index": 0, "text": word, "finish_reason": None, "logprobs": None}],
            }
            await send_chunk(response, chunk)
        chunk["choices"] = [{"index": 0, "text": "", "finish_reason": "stop", "logprobs": None}]
        await send_chunk(response, chunk)
        await response.write(b"data: [DONE]\n\n")
        return response

    async def embedding_answer(
        self, request: web.Request, body: dict[str, Any]
    ) -> web.StreamResponse:
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {"object": "embedding", "index": i, "embedding": [0.1, 0.2, float(i)]}
                    for i in range(len(inputs))
                ],
                "model": body["model"],
                "usage": {"prompt_tokens": 2 * len(inputs), "total_tokens": 2 * len(inputs)},
            }
        )


def chat_chunk(model: str, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-mock",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


async def start_sse(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    return response


async def send_chunk(response: web.StreamResponse, chunk: dict[str, Any]) -> None:
    await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")


# --- Nexus in front of mock backends ---------------------------------------------------------


class RunningNexus:
    """Nexus's real app on a real 127.0.0.1 port, in this test's event loop."""

    def __init__(self, app: web.Application, server: TestServer) -> None:
        self.app = app
        self.server = server

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def registry(self) -> nexus.Registry:
        return self.app[nexus.REGISTRY]

    def backend(self, name: str) -> nexus.Backend:
        return self.registry.backends[name]

    async def wait_healthy(self, count: int | None = None, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        want = count if count is not None else len(self.registry.backends)
        while time.monotonic() < deadline:
            if len(self.registry.healthy()) >= want:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"backends not healthy in time: {self.registry.backends}")


def settings_from(toml_text: str, tmp_path: Path, env: dict[str, str] | None = None):
    path = tmp_path / "nexus.toml"
    path.write_text(toml_text)
    return nexus.load_settings(path, env or {}, {})


def backends_toml(*backends: MockBackend, **extra: Any) -> str:
    lines = []
    for b in backends:
        lines.append("[[backends]]")
        lines.append(f'name = "{b.name}"')
        lines.append(f'url = "{b.url}"')
        lines.append(f'type = "{b.kind}"')
        for key, value in extra.get(b.name, {}).items():
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


@pytest.fixture
async def backend_factory() -> AsyncIterator[Callable[..., Awaitable[MockBackend]]]:
    started: list[MockBackend] = []

    async def make(kind: str = "generic", models: Any = None, name: str = "mock", **kw: Any):
        backend = await MockBackend(kind, models, name).start(**kw)
        started.append(backend)
        return backend

    yield make
    for backend in started:
        await backend.stop()


@pytest.fixture
async def nexus_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[RunningNexus]]]:
    running: list[TestServer] = []

    async def make(toml_text: str = "", wait: bool = True, env: dict[str, str] | None = None):
        header = "[discovery]\nenabled = false\n"
        if "[discovery]" in toml_text:
            header = ""
        settings = settings_from(header + toml_text, tmp_path, env)
        app = nexus.create_app(settings)
        server = TestServer(app, host="127.0.0.1", port=free_port())
        await server.start_server()
        running.append(server)
        instance = RunningNexus(app, server)
        if wait and settings.backends:
            await instance.wait_healthy()
        return instance

    yield make
    for server in running:
        await server.close()
