"""Shared fixtures: mock backends as real aiohttp servers on 127.0.0.1, and Nexus in front.

A MockBackend speaks one backend type's real API (Ollama's /api/tags and /api/show, vLLM's and
llama.cpp's /health, /props and /v1/models, LM Studio's /api/v0/models, OpenAI's /v1/*), and
records what it receives. Tests make it misbehave by queueing behaviours.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import nexus  # noqa: E402

# Real llama.cpp servers for the end-to-end tests (fixtures engine, llama_pair, ...).
pytest_plugins = ["real_engine"]

Behaviour = Callable[[web.Request, dict[str, Any]], Awaitable[web.StreamResponse]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def unaccepting_listener(port: int = 0) -> Iterator[int]:
    """A socket on 127.0.0.1 (at `port`, or any) that listens but never accepts, its queue
    full: a new connection's SYN goes unanswered and connecting hangs. Yields its port."""
    hole = socket.socket()
    hole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    hole.bind(("127.0.0.1", port))
    hole.listen(0)
    port = hole.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        yield port
    finally:
        for filler in fillers:
            filler.close()
        hole.close()


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
        # Cloud kinds (openai, anthropic) answer 401 unless they get this key the way their
        # API wants it; every request's headers are kept in `received` either way.
        self.api_key = "sk-test-" + name
        self.auth_failures = 0
        # A local server started with a key (vLLM or llama-server --api-key) wants it as a
        # Bearer token too; set before start().
        self.key_required = kind in ("openai", "anthropic")
        # Anthropic answers: a tool call to make ({"name", "input"}), the stop reason, usage.
        self.tool_call: dict[str, Any] | None = None
        self.stop_reason = "end_turn"
        self.send_usage = True

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    def received_paths(self) -> list[str]:
        return [path for path, _, _ in self.received]

    # --- the server -------------------------------------------------------------------------

    async def start(self, port: int | None = None) -> MockBackend:
        return await self.listen(self.build_app(), port)

    def build_app(self) -> web.Application:
        """The backend's API as an aiohttp app (start() serves it; a test may serve it itself)."""
        middlewares = [self.check_auth] if self.key_required else []
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=middlewares)
        if self.kind == "anthropic":
            app.router.add_post("/v1/messages", self.anthropic_messages)
            app.router.add_get("/v1/models", self.anthropic_models)
            return app
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completion)
        app.router.add_post("/v1/embeddings", self.embedding)
        app.router.add_get("/v1/models", self.openai_models)
        if self.kind == "ollama":
            app.router.add_get("/api/tags", self.ollama_tags)
            app.router.add_post("/api/show", self.ollama_show)
            app.router.add_post("/api/chat", self.ollama_chat)
            app.router.add_post("/api/generate", self.ollama_chat)
            app.router.add_post("/api/embed", self.ollama_embed)
            app.router.add_post("/api/embeddings", self.ollama_embed)
        if self.kind in ("vllm", "llamacpp"):
            app.router.add_get("/health", self.health)
        if self.kind == "llamacpp":
            app.router.add_get("/props", self.llamacpp_props)
        if self.kind == "lmstudio":
            app.router.add_get("/api/v0/models", self.lmstudio_models)
        return app

    async def listen(self, app: web.Application, port: int | None) -> MockBackend:
        self.server = TestServer(app, host="127.0.0.1", port=port or free_port())
        await self.server.start_server()
        return self

    @web.middleware
    async def check_auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """A cloud API's door: OpenAI (and a keyed local server) wants a Bearer key, Anthropic
        x-api-key and a version."""
        if self.kind != "anthropic":
            ok = request.headers.get("Authorization") == f"Bearer {self.api_key}"
        else:
            ok = (
                request.headers.get("x-api-key") == self.api_key
                and request.headers.get("anthropic-version") == "2023-06-01"
                and "Authorization" not in request.headers
            )
        if not ok:
            self.auth_failures += 1
            return web.json_response(
                {"error": {"message": "invalid api key", "type": "authentication_error"}},
                status=401,
            )
        return await handler(request)

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
            if self.kind == "openai" and "context" in info:  # as OpenRouter-style clouds do
                entry["context_length"] = info["context"]
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

    # --- Ollama's own API ---------------------------------------------------------------------

    async def ollama_chat(self, request: web.Request) -> web.StreamResponse:
        return await self.serve(request, self.ollama_answer)

    async def ollama_embed(self, request: web.Request) -> web.StreamResponse:
        return await self.serve(request, self.ollama_embed_answer)

    async def ollama_answer(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        """/api/chat and /api/generate: NDJSON unless stream is false, the counts on the last
        line; `tool_call` ({"name", "input"}) becomes a chat tool call with object arguments."""
        chat = request.path == "/api/chat"
        calls = None
        if chat and self.tool_call is not None:
            function = {"name": self.tool_call["name"], "arguments": self.tool_call["input"]}
            calls = [{"function": function}]

        def piece(text: str, done: bool = False, tool_calls: Any = None) -> dict[str, Any]:
            doc: dict[str, Any] = {"model": body["model"], "created_at": "2025-01-01T00:00:00Z"}
            if chat:
                doc["message"] = {"role": "assistant", "content": text}
                if tool_calls:
                    doc["message"]["tool_calls"] = tool_calls
            else:
                doc["response"] = text
            doc["done"] = done
            if done:
                doc.update(
                    done_reason="stop",
                    total_duration=900_000,
                    load_duration=1_000,
                    prompt_eval_count=11,
                    prompt_eval_duration=100_000,
                    eval_count=len(self.words()),
                    eval_duration=700_000,
                )
            return doc

        if body.get("stream") is False:
            return web.json_response(piece(self.reply, True, calls))
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        lines = [piece(word) for word in self.words()]
        if calls:
            lines.append(piece("", tool_calls=calls))
        lines.append(piece("", True))
        for line in lines:
            await response.write(json.dumps(line).encode() + b"\n")
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
        await response.write_eof()
        return response

    async def ollama_embed_answer(
        self, request: web.Request, body: dict[str, Any]
    ) -> web.StreamResponse:
        if request.path == "/api/embeddings":
            return web.json_response({"embedding": [0.5, 0.25]})
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        vectors = [[0.5, 0.25, float(i)] for i in range(len(inputs))]
        return web.json_response(
            {"model": body["model"], "embeddings": vectors, "prompt_eval_count": 2 * len(inputs)}
        )

    # --- Anthropic's Messages API -----------------------------------------------------------

    async def anthropic_models(self, request: web.Request) -> web.Response:
        if (down := self.unavailable()) is not None:
            return down
        data = [
            {"type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"}
            for m in self.models
        ]
        return web.json_response({"data": data, "has_more": False, "first_id": None})

    async def anthropic_messages(self, request: web.Request) -> web.StreamResponse:
        return await self.serve(request, self.anthropic_answer)

    def anthropic_blocks(self) -> list[dict[str, Any]]:
        blocks: list[dict[str, Any]] = [{"type": "text", "text": self.reply}]
        if self.tool_call is not None:
            blocks.append({"type": "tool_use", "id": "toolu_mock1", **self.tool_call})
        return blocks

    async def anthropic_answer(
        self, request: web.Request, body: dict[str, Any]
    ) -> web.StreamResponse:
        if not isinstance(body.get("max_tokens"), int):
            error = {"type": "invalid_request_error", "message": "max_tokens: Field required"}
            return web.json_response({"type": "error", "error": error}, status=400)
        usage = {"input_tokens": 12, "output_tokens": len(self.words())}
        message = {
            "id": "msg_mock",
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": self.anthropic_blocks(),
            "stop_reason": self.stop_reason,
            "stop_sequence": None,
            "usage": usage,
        }
        if not self.send_usage:
            del message["usage"]
        if not body.get("stream"):
            return web.json_response(message)
        response = await start_sse(request)

        async def event(name: str, data: dict[str, Any]) -> None:
            await response.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())

        start = dict(message, content=[], stop_reason=None)
        start["usage"] = {"input_tokens": 12, "output_tokens": 1}
        await event("message_start", {"type": "message_start", "message": start})
        await event("ping", {"type": "ping"})
        text_block = {"type": "content_block_start", "index": 0}
        text_block["content_block"] = {"type": "text", "text": ""}
        await event("content_block_start", text_block)
        for word in self.words():
            delta = {"type": "text_delta", "text": word}
            await event(
                "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}
            )
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
        await event("content_block_stop", {"type": "content_block_stop", "index": 0})
        if self.tool_call is not None:
            block = {"type": "tool_use", "id": "toolu_mock1", "name": self.tool_call["name"]}
            block["input"] = {}
            await event(
                "content_block_start",
                {"type": "content_block_start", "index": 1, "content_block": block},
            )
            arguments = json.dumps(self.tool_call["input"])
            for piece in (arguments[: len(arguments) // 2], arguments[len(arguments) // 2 :]):
                delta = {"type": "input_json_delta", "partial_json": piece}
                await event(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": 1, "delta": delta},
                )
            await event("content_block_stop", {"type": "content_block_stop", "index": 1})
        end = {"type": "message_delta", "delta": {"stop_reason": self.stop_reason}}
        end["delta"]["stop_sequence"] = None
        end["usage"] = {"output_tokens": usage["output_tokens"]}
        await event("message_delta", end)
        await event("message_stop", {"type": "message_stop"})
        await response.write_eof()
        return response


class ByteRecorder:
    """A TCP relay in front of a server that keeps every byte a client sends through it: what
    reached a backend's socket, whatever it was (well-formed HTTP or not)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.data = bytearray()
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> ByteRecorder:
        self.server = await asyncio.start_server(self.relay, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, keep: bool) -> None:
            try:
                while data := await src.read(65536):
                    if keep:
                        self.data.extend(data)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


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
    # Raw UTF-8, as llama.cpp, vLLM and Ollama send it (not \u escapes).
    await response.write(b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n")


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
    """[[backends]] for mocks; a cloud mock reads its key from NEXUS_TEST_KEY_<NAME> (see
    cloud_env)."""
    lines = []
    for b in backends:
        lines.append("[[backends]]")
        lines.append(f'name = "{b.name}"')
        lines.append(f'url = "{b.url}"')
        lines.append(f'type = "{b.kind}"')
        if b.kind in ("openai", "anthropic"):
            lines.append(f'api_key_env = "{key_variable(b)}"')
        for key, value in extra.get(b.name, {}).items():
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def key_variable(backend: MockBackend) -> str:
    return "NEXUS_TEST_KEY_" + "".join(c if c.isalnum() else "_" for c in backend.name.upper())


def cloud_env(*backends: MockBackend) -> dict[str, str]:
    """The environment holding each cloud mock's key, as backends_toml names it."""
    return {key_variable(b): b.api_key for b in backends if b.kind in ("openai", "anthropic")}


@pytest.fixture(autouse=True)
def own_data_home(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Each test's platform data directory (where a ledger goes without data_dir) is its own,
    for Nexus in this process and for every `nexus serve` it starts."""
    home = tmp_path_factory.mktemp("data-home")
    monkeypatch.setenv("XDG_DATA_HOME", str(home))
    monkeypatch.delenv("NEXUS_DATA_DIR", raising=False)
    return home


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
async def nexus_factory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[..., Awaitable[RunningNexus]]]:
    running: list[TestServer] = []

    async def make(toml_text: str = "", wait: bool = True, env: dict[str, str] | None = None):
        for variable, value in (env or {}).items():  # what Nexus reads at run time (keys)
            monkeypatch.setenv(variable, value)
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


# --- TLS and proxies ------------------------------------------------------------------------


def self_signed(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A certificate for `name` (and its key), signed by itself."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


class ConnectProxy:
    """An HTTP proxy that only tunnels (CONNECT), as an offline lab's way to the cloud is. It
    resolves names itself: `cloud.test` is 127.0.0.1 here and nowhere else."""

    def __init__(self, refuse: bytes | None = None) -> None:
        self.refuse = refuse
        self.requests: list[bytes] = []
        self.tunnelled = 0  # bytes carried from the client through the tunnel
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.requests.append(head)
            method, target, _ = head.split(b"\r\n", 1)[0].split(b" ")
            if self.refuse is not None or method != b"CONNECT":
                writer.write(self.refuse or b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
                return
            host, _, port = target.rpartition(b":")
            address = "127.0.0.1" if host == b"cloud.test" else host.decode()
            up_reader, up_writer = await asyncio.open_connection(address, int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

            async def pipe(src, dst, count: bool) -> None:
                with contextlib.suppress(ConnectionError):
                    while data := await src.read(65536):
                        if count:
                            self.tunnelled += len(data)
                        dst.write(data)
                        await dst.drain()
                dst.close()

            await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
