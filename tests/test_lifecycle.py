"""Model lifecycle (SPEC §5.1) and warm-before-cold routing (§3 step 8), against Ollama-style
mock backends that really keep load state over HTTP: /api/tags with sizes, /api/ps, and
/api/generate loading a model after a delay (or unloading it with keep_alive 0)."""

from __future__ import annotations

import asyncio
import collections
import json
import subprocess
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import MockBackend, backends_toml, free_port
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

import nexus
from nexus import Backend, Model, Registry, RequestNeeds, Settings, route

GIB = 1024**3
MODEL = "llama3:8b"


class FleetOllama(MockBackend):
    """An Ollama that keeps which models are in memory: /api/generate without a prompt loads
    one (after `load_delay`) or, with keep_alive 0, unloads it; /api/ps says what is loaded;
    a chat for a model not loaded loads it first, as Ollama does."""

    def __init__(
        self,
        name: str,
        sizes: dict[str, int] | None = None,
        loaded: tuple[str, ...] = (),
        load_delay: float = 0.1,
    ) -> None:
        self.sizes = sizes or {MODEL: 4 * GIB}
        super().__init__("ollama", {m: {"context": 8192} for m in self.sizes}, name)
        self.loaded = {m: self.sizes[m] for m in loaded}
        self.load_delay = load_delay
        self.generates: list[dict[str, Any]] = []
        self.ps_answer = "ok"  # ok | missing (an old Ollama) | garbage | slow
        self.die_on_load = False
        self.loaded_at: dict[str, float] = {}  # when /api/generate finished loading a model
        self.chat_times: list[float] = []
        self.peers: dict[str, list[Any]] = {}  # the client address of each /api/tags, /api/ps
        self.close_after_tags = False  # a server (or a proxy before it) keeping no connection

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.openai_models)
        app.router.add_get("/api/tags", self.ollama_tags)
        app.router.add_post("/api/show", self.ollama_show)
        app.router.add_get("/api/ps", self.ps)
        app.router.add_post("/api/generate", self.generate)
        return app

    async def ollama_tags(self, request: web.Request) -> web.Response:
        if (down := self.unavailable()) is not None:
            return down
        self.peers.setdefault("tags", []).append(request.transport.get_extra_info("peername"))
        models = [
            {"name": m, "model": m, "digest": f"sha-{m}", "size": size, "details": {}}
            for m, size in self.sizes.items()
        ]
        answer = web.json_response({"models": models})
        if self.close_after_tags:
            answer.force_close()
        return answer

    async def ps(self, request: web.Request) -> web.Response:
        self.peers.setdefault("ps", []).append(request.transport.get_extra_info("peername"))
        if self.ps_answer == "missing":
            return web.json_response({"error": "404 page not found"}, status=404)
        if self.ps_answer == "garbage":
            return web.Response(text="<html>busy</html>")
        if self.ps_answer == "slow":
            await asyncio.sleep(5)
        if self.ps_answer == "reset":
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        models = [
            {"name": m, "model": m, "size": size + GIB // 2, "size_vram": size, "digest": "x"}
            for m, size in self.loaded.items()
        ]
        return web.json_response({"models": models})

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.generates.append(body)
        model = body.get("model")
        if model not in self.sizes:
            return web.json_response({"error": f"model '{model}' not found"}, status=404)
        if body.get("prompt"):
            return web.json_response({"error": "this mock only loads and unloads"}, status=400)
        answer = {
            "model": model,
            "created_at": "2026-01-01T00:00:00Z",
            "response": "",
            "done": True,
        }
        if body.get("keep_alive") == 0:  # Ollama answers at once and unloads just after
            asyncio.get_running_loop().call_later(self.load_delay / 2, self.loaded.pop, model, None)
            return web.json_response(dict(answer, done_reason="unload"))
        if self.die_on_load:
            await asyncio.sleep(self.load_delay / 2)
            self.healthy = False
            assert request.transport is not None
            request.transport.abort()  # the process is gone: no answer, then no server
            asyncio.get_running_loop().create_task(self.stop())
            return web.Response()
        await asyncio.sleep(self.load_delay)
        self.loaded[model] = self.sizes[model]
        self.loaded_at[model] = time.monotonic()
        return web.json_response(dict(answer, done_reason="load"))

    async def chat(self, request: web.Request) -> web.StreamResponse:
        model = (await request.json()).get("model")
        self.chat_times.append(time.monotonic())
        if model in self.sizes and model not in self.loaded:
            await asyncio.sleep(self.load_delay)
            self.loaded[model] = self.sizes[model]
        return await super().chat(request)

    async def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            await server.close()
            self.server = server  # its URL stays known (nothing answers there)


async def fleet(*specs: FleetOllama) -> list[FleetOllama]:
    return [await spec.start() for spec in specs]


@pytest.fixture
async def stop_later():
    started: list[FleetOllama] = []
    yield started
    for backend in started:
        await backend.stop()


async def start_fleet(stop_later, *specs: FleetOllama) -> list[FleetOllama]:
    backends = await fleet(*specs)
    stop_later.extend(backends)
    return backends


async def call(
    nx, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, nx.url + path, json=body, headers=headers) as resp,
    ):
        return resp.status, await resp.json(), resp.headers


async def wait_done(nx, op_id: str, timeout: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, op, headers = await call(nx, "GET", f"/v1/operations/{op_id}")
        assert status == 200
        assert headers["X-Nexus-Lifecycle-Operation"] == op_id
        assert headers["X-Nexus-Lifecycle-Status"] == op["status"]
        if op["status"] != "in_progress":
            return op
        await asyncio.sleep(0.05)
    raise AssertionError(f"operation {op_id} still in progress after {timeout} s")


async def chat(nx, model: str = MODEL, stream: bool = False) -> tuple[int, str, str]:
    """(status, backend that served, body text) of one chat request."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    async with (
        aiohttp.ClientSession() as session,
        session.post(nx.url + "/v1/chat/completions", json=body) as resp,
    ):
        return resp.status, resp.headers.get("X-Nexus-Backend", ""), await resp.text()


async def until(condition: Any, timeout: float = 10.0) -> None:
    """Wait (bounded) until condition() holds: a busy machine may take its time."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def chat_ok(status: int, text: str, stream: bool) -> bool:
    if status != 200:
        return False
    return text.rstrip().endswith("data: [DONE]") and '"error"' not in text if stream else True


# --- load and unload --------------------------------------------------------------------------


async def test_load_then_unload_over_http(stop_later, nexus_factory):
    (gpu,) = await start_fleet(stop_later, FleetOllama("gpu", load_delay=0.2))
    nx = await nexus_factory(backends_toml(gpu))
    _, models, _ = await call(nx, "GET", "/v1/models")
    assert models["data"][0]["loaded_on"] == []  # /api/ps says nothing is in memory
    status, op, headers = await call(
        nx, "POST", "/v1/models/load", {"model_id": MODEL, "backend_id": "gpu"}
    )
    assert status == 202, op
    assert set(op) >= {"operation_id", "model_id", "backend_id", "status"}
    assert (op["model_id"], op["backend_id"], op["status"]) == (MODEL, "gpu", "in_progress")
    assert headers["X-Nexus-Lifecycle-Status"] == "in_progress"
    assert headers["X-Nexus-Lifecycle-Operation"] == op["operation_id"]
    done = await wait_done(nx, op["operation_id"])
    assert done["status"] == "completed" and done["error"] is None
    assert gpu.loaded == {MODEL: 4 * GIB}
    assert gpu.generates[-1] == {"model": MODEL, "keep_alive": -1, "stream": False}
    assert nx.backend("gpu").loaded == {MODEL: 4 * GIB}  # size_vram, as /api/ps said
    _, models, _ = await call(nx, "GET", "/v1/models")
    assert models["data"][0]["loaded_on"] == ["gpu"]
    _, entry, _ = await call(nx, "GET", f"/v1/models/{MODEL}")
    assert entry["loaded_on"] == ["gpu"]
    _, stats, _ = await call(nx, "GET", "/v1/stats")
    assert stats["models"][0]["loaded_on"] == ["gpu"]

    status, op, _ = await call(nx, "DELETE", f"/v1/models/{MODEL}?backend_id=gpu")
    assert status == 202 and op["status"] == "in_progress" and op["backend_id"] == "gpu"
    done = await wait_done(nx, op["operation_id"])
    assert done["status"] == "completed"
    assert gpu.loaded == {} and gpu.generates[-1]["keep_alive"] == 0
    assert "prompt" not in gpu.generates[-1]
    _, models, _ = await call(nx, "GET", "/v1/models")
    assert models["data"][0]["loaded_on"] == []
    assert nx.registry.moving == 0


async def test_load_takes_keep_alive_and_an_alias(stop_later, nexus_factory):
    (gpu,) = await start_fleet(stop_later, FleetOllama("gpu"))
    nx = await nexus_factory(backends_toml(gpu) + f'[routing]\naliases = {{ fast = "{MODEL}" }}\n')
    body = {"model_id": "fast", "backend_id": "gpu", "keep_alive": "30m"}
    status, op, _ = await call(nx, "POST", "/v1/models/load", body)
    assert status == 202 and op["model_id"] == MODEL
    assert (await wait_done(nx, op["operation_id"]))["status"] == "completed"
    assert gpu.generates[-1]["keep_alive"] == "30m"
    status, error, _ = await call(
        nx, "POST", "/v1/models/load", {"model_id": MODEL, "backend_id": "gpu", "keep_alive": []}
    )
    assert status == 400 and error["error"]["param"] == "keep_alive"


async def test_an_operation_that_outlives_the_timeout_fails(stop_later, nexus_factory):
    (gpu,) = await start_fleet(stop_later, FleetOllama("gpu", load_delay=3.0))
    nx = await nexus_factory(backends_toml(gpu) + "[lifecycle]\ntimeout_seconds = 0.3\n")
    _, op, _ = await call(nx, "POST", "/v1/models/load", {"model_id": MODEL, "backend_id": "gpu"})
    done = await wait_done(nx, op["operation_id"])
    assert done["status"] == "failed"
    assert done["error"] == "loading on gpu: not done within 0.3 s (lifecycle.timeout_seconds)"
    assert nx.backend("gpu").loading == frozenset() and nx.registry.moving == 0


# --- migrate ----------------------------------------------------------------------------------


async def steady_stream(nx, stop: asyncio.Event, served: collections.Counter, failures: list):
    """Four clients streaming chats one after another until `stop` (at most 300 each)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}

    async def client(session: aiohttp.ClientSession) -> None:
        for _ in range(300):
            if stop.is_set():
                return
            async with session.post(nx.url + "/v1/chat/completions", json=body) as resp:
                text = await resp.text()
                if chat_ok(resp.status, text, stream=True):
                    served[resp.headers["X-Nexus-Backend"]] += 1
                else:
                    failures.append((resp.status, text[:200]))

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(session) for _ in range(4)))


async def test_migrate_under_a_steady_stream_drops_nothing(stop_later, nexus_factory):
    source, target = await start_fleet(
        stop_later,
        FleetOllama("a", loaded=(MODEL,), load_delay=0.3),
        FleetOllama("b", load_delay=0.3),
    )
    for backend in (source, target):
        backend.chunk_delay = 0.01  # each answer takes a few tens of ms: always some in flight
    nx = await nexus_factory(backends_toml(source, target))
    stop = asyncio.Event()
    served: collections.Counter = collections.Counter()
    failures: list = []
    stream = asyncio.create_task(steady_stream(nx, stop, served, failures))
    try:
        await until(lambda: served["a"] >= 8)
        assert served["b"] == 0  # warm before cold: b has not loaded it
        body = {"model_id": MODEL, "source_backend_id": "a", "target_backend_id": "b"}
        status, op, headers = await call(nx, "POST", "/v1/models/migrate", body)
        assert status == 202, op
        assert (op["source_backend_id"], op["target_backend_id"]) == ("a", "b")
        assert headers["X-Nexus-Lifecycle-Status"] == "in_progress"
        done = await wait_done(nx, op["operation_id"])
        before = served.copy()
        await until(lambda: served["b"] >= before["b"] + 8 or bool(failures))
    finally:
        stop.set()
        await asyncio.wait_for(stream, 30)
    assert done["status"] == "completed", done
    assert failures == []
    assert served["a"] == before["a"]  # after it: b alone
    assert source.loaded == {} and target.loaded == {MODEL: 4 * GIB}
    assert [g["keep_alive"] for g in source.generates] == [0]
    _, stats, _ = await call(nx, "GET", "/v1/stats")
    assert stats["requests"]["errors"] == 0
    _, models, _ = await call(nx, "GET", "/v1/models")
    assert models["data"][0]["loaded_on"] == ["b"]
    assert nx.registry.moving == 0


async def test_migrate_checks_both_ends(stop_later, nexus_factory, backend_factory):
    a, b = await start_fleet(stop_later, FleetOllama("a", loaded=(MODEL,)), FleetOllama("b"))
    vllm = await backend_factory("vllm", {MODEL: {}}, name="v")
    nx = await nexus_factory(backends_toml(a, b, vllm))
    cases = [
        ({"source_backend_id": "a", "target_backend_id": "a"}, 400, "target_backend_id"),
        ({"source_backend_id": "a", "target_backend_id": "v"}, 501, "target_backend_id"),
        ({"source_backend_id": "x", "target_backend_id": "b"}, 404, "source_backend_id"),
        ({"source_backend_id": "a"}, 400, "target_backend_id"),
    ]
    for ends, want, param in cases:
        status, error, _ = await call(nx, "POST", "/v1/models/migrate", {"model_id": MODEL, **ends})
        assert (status, error["error"]["param"]) == (want, param), error


# --- refusals ---------------------------------------------------------------------------------


async def test_a_load_that_would_eat_the_headroom_says_how_much_is_missing(
    stop_later, nexus_factory
):
    sizes = {"big": 8 * GIB, "medium": 6 * GIB, "small": 2 * GIB}
    (gpu,) = await start_fleet(stop_later, FleetOllama("gpu", sizes, loaded=("big",)))
    nx = await nexus_factory(backends_toml(gpu, gpu={"vram_gb": 16}))
    # 16 GB, 8 in use: medium leaves 2 GB free where the 20% headroom wants 3.2 GB.
    status, error, _ = await call(
        nx, "POST", "/v1/models/load", {"model_id": "medium", "backend_id": "gpu"}
    )
    assert status == 400
    assert error["error"]["code"] == "insufficient_vram"
    assert "1.2 GB missing" in error["error"]["message"]
    assert "20% headroom" in error["error"]["message"]
    assert error["error"]["context"]["missing_gb"] == 1.2
    assert [g["model"] for g in gpu.generates] == []  # nothing was sent
    status, op, _ = await call(
        nx, "POST", "/v1/models/load", {"model_id": "small", "backend_id": "gpu"}
    )
    assert status == 202
    # While small loads, its size counts: medium is further out of reach, not closer.
    status, error, _ = await call(
        nx, "POST", "/v1/models/load", {"model_id": "medium", "backend_id": "gpu"}
    )
    assert status == 400 and "3.2 GB missing" in error["error"]["message"]
    assert (await wait_done(nx, op["operation_id"]))["status"] == "completed"
    # A model already in memory takes nothing more: loading it again only renews keep_alive.
    status, _, _ = await call(
        nx, "POST", "/v1/models/load", {"model_id": "big", "backend_id": "gpu"}
    )
    assert status == 202


async def test_headroom_is_a_setting(stop_later, nexus_factory):
    sizes = {"big": 8 * GIB, "medium": 6 * GIB}
    (gpu,) = await start_fleet(stop_later, FleetOllama("gpu", sizes, loaded=("big",)))
    toml = backends_toml(gpu, gpu={"vram_gb": 16}) + "[lifecycle]\nvram_headroom_percent = 10\n"
    nx = await nexus_factory(toml)
    status, _, _ = await call(
        nx, "POST", "/v1/models/load", {"model_id": "medium", "backend_id": "gpu"}
    )
    assert status == 202  # 2 GB free is more than 10% of 16 GB


async def test_unload_with_requests_in_flight_is_409(stop_later, nexus_factory):
    (gpu,) = await start_fleet(stop_later, FleetOllama("gpu", loaded=(MODEL,)))
    gpu.reply = "one two three four five"
    gpu.chunk_delay = 0.3
    nx = await nexus_factory(backends_toml(gpu))
    streaming = asyncio.create_task(chat(nx, stream=True))
    await until(lambda: gpu.in_flight > 0)
    status, error, _ = await call(nx, "DELETE", f"/v1/models/{MODEL}?backend_id=gpu")
    assert status == 409
    assert error["error"]["code"] == "model_in_use"
    assert "1 request(s)" in error["error"]["message"]
    status, _, text = await streaming
    assert chat_ok(status, text, stream=True)  # the request in flight was not touched
    assert gpu.generates == []
    status, op, _ = await call(nx, "DELETE", f"/v1/models/{MODEL}?backend_id=gpu")
    assert status == 202
    assert (await wait_done(nx, op["operation_id"]))["status"] == "completed"


async def test_a_second_operation_on_the_same_model_and_backend_is_409(stop_later, nexus_factory):
    sizes = {MODEL: 4 * GIB, "other": GIB}
    (gpu,) = await start_fleet(stop_later, FleetOllama("gpu", sizes, load_delay=1.5))
    nx = await nexus_factory(backends_toml(gpu))
    load = {"model_id": MODEL, "backend_id": "gpu"}
    status, first, _ = await call(nx, "POST", "/v1/models/load", load)
    assert status == 202
    for method, path, body in (
        ("POST", "/v1/models/load", load),
        ("DELETE", f"/v1/models/{MODEL}?backend_id=gpu", None),
    ):
        status, error, _ = await call(nx, method, path, body)
        assert status == 409, error
        assert error["error"]["code"] == "operation_in_progress"
        assert error["error"]["context"]["operation_id"] == first["operation_id"]
        assert first["operation_id"] in error["error"]["message"]
    # Another model on the same backend is another operation.
    status, other, _ = await call(
        nx, "POST", "/v1/models/load", {"model_id": "other", "backend_id": "gpu"}
    )
    assert status == 202
    for op in (first, other):
        assert (await wait_done(nx, op["operation_id"]))["status"] == "completed"
    status, _, _ = await call(nx, "POST", "/v1/models/load", load)  # done: free again
    assert status == 202


async def test_unknown_backend_model_or_operation_is_404(stop_later, nexus_factory):
    (gpu,) = await start_fleet(stop_later, FleetOllama("gpu"))
    nx = await nexus_factory(backends_toml(gpu))
    cases = [
        ("POST", "/v1/models/load", {"model_id": MODEL, "backend_id": "nope"}, "backend_id"),
        ("POST", "/v1/models/load", {"model_id": "qwen:72b", "backend_id": "gpu"}, "model_id"),
        ("DELETE", f"/v1/models/{MODEL}?backend_id=nope", None, "backend_id"),
        ("DELETE", "/v1/models/qwen:72b?backend_id=gpu", None, "model_id"),
        ("GET", "/v1/operations/op-nothing", None, None),
    ]
    for method, path, body, param in cases:
        status, error, _ = await call(nx, method, path, body)
        assert status == 404, (path, error)
        assert set(error["error"]) >= {"message", "type", "param", "code"}
        assert error["error"]["param"] == param
    _, error, _ = await call(nx, "POST", "/v1/models/load", cases[1][2])
    assert "never pulls" in error["error"]["message"] and MODEL in error["error"]["message"]
    for body in ({"backend_id": "gpu"}, {"model_id": MODEL}, [1]):
        status, error, _ = await call(nx, "POST", "/v1/models/load", body)
        assert status == 400, error
    assert gpu.generates == []


@pytest.mark.parametrize("kind", ["vllm", "llamacpp", "lmstudio", "generic"])
async def test_types_without_a_load_api_answer_501_naming_the_type(
    backend_factory, nexus_factory, kind
):
    backend = await backend_factory(kind, {"m": {"context": 4096}}, name="box")
    nx = await nexus_factory(backends_toml(backend))
    status, error, _ = await call(
        nx, "POST", "/v1/models/load", {"model_id": "m", "backend_id": "box"}
    )
    assert status == 501
    assert error["error"]["code"] == "lifecycle_unsupported"
    assert f"type {kind}" in error["error"]["message"]
    status, error, _ = await call(nx, "DELETE", "/v1/models/m?backend_id=box")
    assert status == 501 and f"type {kind}" in error["error"]["message"]
    _, models, _ = await call(nx, "GET", "/v1/models")
    assert models["data"][0]["loaded_on"] == ["box"]  # it does not say: what it serves is warm


# --- a backend that dies mid-load ---------------------------------------------------------------


async def test_a_backend_dying_mid_load_fails_the_operation_not_the_traffic(
    stop_later, nexus_factory
):
    warm, dying = await start_fleet(
        stop_later, FleetOllama("warm", loaded=(MODEL,)), FleetOllama("dying", load_delay=0.4)
    )
    dying.die_on_load = True
    toml = backends_toml(warm, dying) + "[health_check]\ninterval_seconds = 0.2\n"
    nx = await nexus_factory(toml)
    stop = asyncio.Event()
    served: collections.Counter = collections.Counter()
    failures: list = []
    stream = asyncio.create_task(steady_stream(nx, stop, served, failures))
    try:
        status, op, _ = await call(
            nx, "POST", "/v1/models/load", {"model_id": MODEL, "backend_id": "dying"}
        )
        assert status == 202
        done = await wait_done(nx, op["operation_id"])
        await asyncio.sleep(0.3)
    finally:
        stop.set()
        await asyncio.wait_for(stream, 20)
    assert done["status"] == "failed"
    assert done["error"].startswith("loading on dying: ")
    assert len(done["error"]) > len("loading on dying: ") + 5  # and why
    assert failures == [] and served["warm"] > 0 and served["dying"] == 0
    assert nx.backend("dying").loading == frozenset() and nx.registry.moving == 0
    status, backend, _ = await chat(nx)
    assert (status, backend) == (200, "warm")


# --- warm before cold ---------------------------------------------------------------------------


def world(*specs: tuple[str, int, tuple[str, ...] | None]) -> Registry:
    """Backends serving model "m" as (name, priority, models loaded or None: does not say)."""
    registry = Registry()
    for name, priority, loaded in specs:
        backend = Backend(name=name, url=f"http://127.0.0.1:1/{name}", type="ollama")
        backend.status, backend.priority = "healthy", priority
        backend.models = {"m": Model(id="m")}
        backend.loaded = None if loaded is None else dict.fromkeys(loaded, GIB)
        registry.backends[name] = backend
    registry.reindex()
    return registry


def order(registry: Registry, strategy: str = "round_robin", rounds: int = 6) -> list[list[str]]:
    settings = Settings()
    settings.routing.strategy = strategy
    settings.routing.max_retries = 10
    needs = RequestNeeds(model="m")
    return [
        [a.backend.name for a in route(needs, registry, settings).attempts] for _ in range(rounds)
    ]


@pytest.mark.parametrize("strategy", ["round_robin", "smart", "priority_only", "random"])
def test_warm_goes_before_cold_of_the_same_priority(strategy):
    registry = world(
        ("cold1", 50, ()), ("warm1", 50, ("m",)), ("cold2", 50, ("other",)), ("silent", 50, None)
    )
    for names in order(registry, strategy):
        assert set(names[:2]) == {"warm1", "silent"}  # a backend that does not say is warm
        assert set(names[2:]) == {"cold1", "cold2"}
    firsts = {names[0] for names in order(registry, "round_robin", 8)}
    assert firsts == {"warm1", "silent"}  # equal warm backends still share the work


def test_warm_first_never_overrides_priority():
    registry = world(("cold-preferred", 10, ()), ("warm", 50, ("m",)), ("cold", 50, ()))
    for names in order(registry, "priority_only"):
        assert names == ["cold-preferred", "warm", "cold"]


def test_warm_first_keeps_each_priority_in_its_places():
    registry = world(("c10", 10, ()), ("w10", 10, ("m",)), ("c50", 50, ()), ("w50", 50, ("m",)))
    for names in order(registry, "priority_only"):
        assert names == ["w10", "c10", "w50", "c50"]


def test_a_backend_loading_the_model_is_no_candidate_and_a_draining_one_goes_last():
    registry = world(("a", 10, ("m",)), ("b", 50, ("m",)), ("c", 50, ("m",)))
    nexus.withhold(registry, registry.backends["b"], "loading", "m")
    nexus.withhold(registry, registry.backends["a"], "draining", "m")
    for names in order(registry, "priority_only"):
        assert names == ["c", "a"]
    nexus.give_back(registry, registry.backends["b"], "loading", "m")
    nexus.give_back(registry, registry.backends["a"], "draining", "m")
    assert registry.moving == 0
    for names in order(registry, "priority_only"):
        assert names[0] == "a" and sorted(names[1:]) == ["b", "c"]


@hypothesis_settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([0, 10, 50]), st.sampled_from(["warm", "cold", "silent"])),
        max_size=12,
    )
)
def test_warm_first_only_reorders_within_a_priority(specs):
    backends = []
    for i, (priority, state) in enumerate(specs):
        backend = Backend(name=f"b{i}", url=f"http://127.0.0.1:1/{i}", type="ollama")
        backend.priority = priority
        backend.loaded = {"warm": {"m": GIB}, "cold": {}, "silent": None}[state]
        backends.append(backend)
    ordered = list(backends)
    nexus.warm_first(ordered, "m")
    assert sorted(b.name for b in ordered) == sorted(b.name for b in backends)
    assert [b.priority for b in ordered] == [b.priority for b in backends]  # places kept
    for priority in {b.priority for b in backends}:
        group = [b for b in ordered if b.priority == priority]
        warmth = [b.is_warm("m") for b in group]
        assert warmth == sorted(warmth, reverse=True)  # warm (and silent) before cold
        before = [b for b in backends if b.priority == priority]
        assert [b for b in group if b.is_warm("m")] == [b for b in before if b.is_warm("m")]


def test_route_with_warm_ordering_stays_fast_at_1000_backends():
    registry = world(*((f"b{i}", 50, ("m",) if i % 3 else ()) for i in range(1000)))
    settings = Settings()
    needs = RequestNeeds(model="m", prompt_tokens=100)
    route(needs, registry, settings)
    times = []
    for _ in range(30):
        started = time.perf_counter()
        decision = route(needs, registry, settings)
        times.append(time.perf_counter() - started)
    assert decision.attempts[0].backend.is_warm("m")
    assert sorted(times)[len(times) // 2] < 0.005  # generous: a shared, busy machine (bench: 1 ms)


async def test_warm_before_cold_through_http(stop_later, nexus_factory):
    cold, warm = await start_fleet(
        stop_later, FleetOllama("cold"), FleetOllama("warm", loaded=(MODEL,))
    )
    nx = await nexus_factory(backends_toml(cold, warm))
    for _ in range(8):
        status, backend, _ = await chat(nx)
        assert (status, backend) == (200, "warm")
    assert cold.loaded == {}


class LmStudio(MockBackend):
    """LM Studio's /api/v0/models with each model's `state`, loaded or not-loaded."""

    def __init__(self, name: str, loaded: bool) -> None:
        super().__init__("lmstudio", {"phi-4": {"context": 16384}}, name)
        self.loaded = loaded

    async def lmstudio_models(self, request: web.Request) -> web.Response:
        state = "loaded" if self.loaded else "not-loaded"
        entry = {"id": "phi-4", "type": "llm", "state": state, "max_context_length": 16384}
        return web.json_response({"object": "list", "data": [entry]})


async def test_lm_studio_says_what_it_has_loaded(stop_later, nexus_factory):
    cold, warm = await LmStudio("cold", loaded=False).start(), await LmStudio("warm", True).start()
    stop_later.extend([cold, warm])
    nx = await nexus_factory(backends_toml(cold, warm))
    assert (nx.backend("cold").loaded, nx.backend("warm").loaded) == ({}, {"phi-4": 0})
    for _ in range(4):
        assert (await chat(nx, "phi-4"))[:2] == (200, "warm")
    _, models, _ = await call(nx, "GET", "/v1/models")
    assert models["data"][0]["loaded_on"] == ["warm"]


async def test_a_backend_loading_through_the_api_gets_no_request_until_loaded(
    stop_later, nexus_factory
):
    a, b = await start_fleet(
        stop_later, FleetOllama("a", loaded=(MODEL,)), FleetOllama("b", load_delay=1.5)
    )
    # Round-robin: once b is a candidate it gets turns (the smart strategy may rightly keep
    # preferring a, whose answers came faster).
    nx = await nexus_factory('[routing]\nstrategy = "round_robin"\n' + backends_toml(a, b))
    _, op, _ = await call(nx, "POST", "/v1/models/load", {"model_id": MODEL, "backend_id": "b"})
    assert nx.backend("b").loading == {MODEL}  # at once, not when the task first runs
    during: collections.Counter = collections.Counter()
    for _ in range(500):  # bounded: the load takes 1.5 s, a chat some ms
        if MODEL not in nx.backend("b").loading:
            break
        code, backend, _ = await chat(nx)
        assert code == 200
        during[backend] += 1
        await asyncio.sleep(0.02)
    assert (await wait_done(nx, op["operation_id"]))["status"] == "completed"
    assert during["a"] > 0
    served: collections.Counter = collections.Counter()
    for _ in range(20):  # bounded: b is warm now, and a candidate again
        served[(await chat(nx))[1]] += 1
        if served["b"]:
            break
    state = nx.backend("b")
    other = nx.backend("a")
    assert served["b"] > 0, (
        served,
        (state.status, state.loaded, state.loading, state.draining, state.in_flight),
        (state.latency_ema_ms, state.ttft_ema_ms, other.latency_ema_ms, other.ttft_ema_ms),
        (state.priority, other.priority, nx.app[nexus.REGISTRY].moving),
    )
    # Not one request reached b before it had loaded the model.
    assert b.chat_times and min(b.chat_times) > b.loaded_at[MODEL]


async def test_the_only_backend_loading_a_model_says_so(stop_later, nexus_factory):
    (gpu,) = await start_fleet(stop_later, FleetOllama("gpu", load_delay=3.0))
    nx = await nexus_factory(backends_toml(gpu))
    await call(nx, "POST", "/v1/models/load", {"model_id": MODEL, "backend_id": "gpu"})
    status, _, text = await chat(nx)
    assert status == 503
    assert "being loaded on gpu" in json.loads(text)["error"]["message"]


# --- the health poll and /api/ps ----------------------------------------------------------------


@pytest.mark.parametrize("answer", ["missing", "garbage", "slow"])
async def test_a_failing_api_ps_never_fails_the_poll(stop_later, nexus_factory, answer):
    (gpu,) = await start_fleet(stop_later, FleetOllama("gpu"))
    gpu.ps_answer = answer
    nx = await nexus_factory(backends_toml(gpu) + "[health_check]\ntimeout_seconds = 3\n")
    backend = nx.backend("gpu")
    assert backend.status == "healthy" and MODEL in backend.models
    assert backend.loaded is None  # it did not say: warm
    _, models, _ = await call(nx, "GET", "/v1/models")
    assert models["data"][0]["loaded_on"] == ["gpu"]


async def test_the_health_poll_reads_api_ps(stop_later, nexus_factory):
    (gpu,) = await start_fleet(stop_later, FleetOllama("gpu", loaded=(MODEL,)))
    nx = await nexus_factory(backends_toml(gpu) + "[health_check]\ninterval_seconds = 0.1\n")
    assert nx.backend("gpu").loaded == {MODEL: 4 * GIB}
    assert nx.backend("gpu").models[MODEL].size == 4 * GIB  # from /api/tags
    gpu.loaded.clear()  # Ollama let it expire
    await until(lambda: nx.backend("gpu").loaded == {})


async def test_an_api_ps_that_breaks_says_nothing_and_a_slow_one_keeps_what_was_known(
    stop_later, nexus_factory
):
    (gpu,) = await start_fleet(stop_later, FleetOllama("gpu", loaded=(MODEL,)))
    toml = "[health_check]\ninterval_seconds = 0.1\ntimeout_seconds = 3\n"
    nx = await nexus_factory(backends_toml(gpu) + toml)
    assert nx.backend("gpu").loaded == {MODEL: 4 * GIB}
    gpu.ps_answer = "slow"
    polls = gpu.polls
    await until(lambda: gpu.polls >= polls + 2)
    assert nx.backend("gpu").loaded == {MODEL: 4 * GIB}  # the last known state stays
    gpu.ps_answer = "reset"
    await until(lambda: nx.backend("gpu").loaded is None)  # broken: it does not say, warm
    assert nx.backend("gpu").status == "healthy"


async def test_api_ps_is_read_on_the_poll_s_own_connection(stop_later, nexus_factory):
    """/api/ps follows /api/tags on the same connection: knowing what is loaded costs a poll
    no connection of its own."""
    (gpu,) = await start_fleet(stop_later, FleetOllama("gpu", loaded=(MODEL,)))
    nx = await nexus_factory(backends_toml(gpu) + "[health_check]\ninterval_seconds = 0.1\n")
    await until(lambda: len(gpu.peers.get("ps", ())) >= 3)
    tags, ps = gpu.peers["tags"], gpu.peers["ps"]
    assert tags[: len(ps)] == ps[: len(tags)]  # each poll's two reads came from one address
    assert len(set(ps)) == len(ps)  # and each poll opened a connection of its own
    assert nx.backend("gpu").loaded == {MODEL: 4 * GIB}


async def test_api_ps_is_read_from_a_server_that_keeps_no_connection(stop_later, nexus_factory):
    (gpu,) = await start_fleet(stop_later, FleetOllama("gpu", loaded=(MODEL,)))
    gpu.close_after_tags = True
    nx = await nexus_factory(backends_toml(gpu) + "[health_check]\ninterval_seconds = 0.1\n")
    assert nx.backend("gpu").loaded == {MODEL: 4 * GIB}
    gpu.loaded.clear()
    await until(lambda: nx.backend("gpu").loaded == {})
    assert nx.backend("gpu").status == "healthy"


# --- who may call it ---------------------------------------------------------------------------


async def test_lifecycle_calls_follow_the_admin_rules(stop_later, nexus_factory):
    (gpu,) = await start_fleet(stop_later, FleetOllama("gpu"))
    nx = await nexus_factory(backends_toml(gpu))
    load = {"model_id": MODEL, "backend_id": "gpu"}
    for header in ({"X-Forwarded-For": "203.0.113.9"}, {"Forwarded": "for=203.0.113.9"}):
        for method, path, body in (
            ("POST", "/v1/models/load", load),
            ("DELETE", f"/v1/models/{MODEL}?backend_id=gpu", None),
            ("POST", "/v1/models/migrate", {"model_id": MODEL}),
            ("GET", "/v1/operations/op-x", None),
        ):
            status, error, _ = await call(nx, method, path, body, header)
            assert status == 403, (path, header)
            assert error["error"]["code"] == "admin_forbidden"
    assert gpu.generates == []


async def test_with_keys_lifecycle_calls_need_an_admin_key(stop_later, nexus_factory):
    (gpu,) = await start_fleet(stop_later, FleetOllama("gpu"))
    auth = (
        "[auth]\napi_keys = [\n"
        '  { name = "user", key_env = "NEXUS_TEST_USER" },\n'
        '  { name = "ops", key_env = "NEXUS_TEST_OPS", admin = true },\n]\n'
    )
    env = {"NEXUS_TEST_USER": "user-secret-123", "NEXUS_TEST_OPS": "ops-secret-456"}
    nx = await nexus_factory(backends_toml(gpu) + auth, env=env)
    load = {"model_id": MODEL, "backend_id": "gpu"}
    status, _, _ = await call(nx, "POST", "/v1/models/load", load)
    assert status == 401
    user = {"Authorization": "Bearer user-secret-123"}
    status, error, _ = await call(nx, "POST", "/v1/models/load", load, user)
    assert status == 403 and error["error"]["code"] == "admin_forbidden"
    ops = {"Authorization": "Bearer ops-secret-456"}
    status, op, _ = await call(nx, "POST", "/v1/models/load", load, ops)
    assert status == 202
    status, _, _ = await call(nx, "GET", f"/v1/operations/{op['operation_id']}", None, user)
    assert status == 403
    status, _, _ = await call(nx, "GET", f"/v1/operations/{op['operation_id']}", None, ops)
    assert status == 200


# --- settings -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[lifecycle]\ntimeout_seconds = 0\n", "lifecycle.timeout_seconds"),
        ("[lifecycle]\nvram_headroom_percent = 100\n", "lifecycle.vram_headroom_percent"),
        ("[lifecycle]\nvram_headroom_percent = -1\n", "lifecycle.vram_headroom_percent"),
        ("[lifecycle]\nheadroom = 5\n", "lifecycle.headroom"),
        ('[lifecycle]\ntimeout_seconds = "long"\n', "lifecycle.timeout_seconds"),
        (
            '[[backends]]\nname = "g"\nurl = "http://127.0.0.1:1"\ntype = "ollama"\nvram_gb = -2\n',
            "backends[0].vram_gb",
        ),
    ],
)
def test_lifecycle_settings_are_checked(tmp_path, toml, key):
    path = tmp_path / "nexus.toml"
    path.write_text(toml)
    with pytest.raises(nexus.ConfigError) as caught:
        nexus.load_settings(path, {}, {})
    assert caught.value.key == key


def test_lifecycle_settings_defaults_and_values(tmp_path):
    assert nexus.Settings().lifecycle.vram_headroom_percent == 20
    assert nexus.Settings().lifecycle.timeout_seconds == 300
    path = tmp_path / "nexus.toml"
    path.write_text(
        "[lifecycle]\nvram_headroom_percent = 15\ntimeout_seconds = 60\n"
        '[[backends]]\nname = "g"\nurl = "http://127.0.0.1:1"\ntype = "ollama"\nvram_gb = 24\n'
    )
    settings = nexus.load_settings(path, {}, {})
    assert (settings.lifecycle.vram_headroom_percent, settings.lifecycle.timeout_seconds) == (
        15,
        60,
    )
    assert Backend.from_settings(settings.backends[0]).vram_gb == 24


# --- the CLI ------------------------------------------------------------------------------------


async def test_cli_loads_unloads_and_migrates_against_a_running_nexus(stop_later, tmp_path):
    from test_cli import NEXUS, run_cli, wait_until_listed, wait_until_serving

    a, b = await start_fleet(stop_later, FleetOllama("a"), FleetOllama("b"))
    config = tmp_path / "nexus.toml"
    config.write_text(backends_toml(a, b) + "[health_check]\ninterval_seconds = 0.5\n")
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *NEXUS, "serve", "-c", str(config), "-p", str(port), "-H", "127.0.0.1", "--no-discovery"
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_until_serving(url)
        await wait_until_listed(url)
        code, out, err = await run_cli("models", "load", MODEL, "--backend", "a", "--url", url)
        assert code == 0, err
        assert f"load of {MODEL} on a: completed" in out
        assert a.loaded == {MODEL: 4 * GIB}
        code, out, _ = await run_cli("models", env={"NEXUS_URL": url})
        assert code == 0 and "LOADED ON" in out
        assert out.splitlines()[1].split()[-1] == "a"
        code, out, err = await run_cli(
            "models", "migrate", MODEL, "--from", "a", "--to", "b", env={"NEXUS_URL": url}
        )
        assert code == 0, err
        assert f"migrate of {MODEL} from a to b: completed" in out
        assert a.loaded == {} and b.loaded == {MODEL: 4 * GIB}
        code, out, _ = await run_cli("models", "--json", "--url", url)
        assert json.loads(out)["data"][0]["loaded_on"] == ["b"]
        code, out, err = await run_cli("models", "unload", MODEL, "--backend", "b", "--url", url)
        assert code == 0 and f"unload of {MODEL} from b: completed" in out, err
        assert b.loaded == {}
        # Refusals are one line, never a traceback.
        code, _, err = await run_cli("models", "load", "nope", "--backend", "a", "--url", url)
        assert code != 0 and "never pulls" in err and "Traceback" not in err
        # A failed operation ends the command with its reason and a non-zero exit.
        b.die_on_load = True
        code, out, err = await run_cli("models", "load", MODEL, "--backend", "b", "--url", url)
        assert code == 1 and f"load of {MODEL} on b: failed: loading on b: " in err
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 15)


# --- the dashboard ------------------------------------------------------------------------------


async def test_dashboard_shows_where_a_model_is_loaded(stop_later, nexus_factory):
    from browser import Chromium

    warm, cold = await start_fleet(
        stop_later, FleetOllama("warm", loaded=(MODEL,)), FleetOllama("cold")
    )
    nx = await nexus_factory(backends_toml(warm, cold))
    async with Chromium() as browser:
        await browser.navigate(nx.url + "/")
        await browser.wait_for("document.querySelectorAll('#models tbody .dot').length === 2")
        titles = await browser.evaluate(
            "[...document.querySelectorAll('#models tbody .dot')]"
            ".map((d) => d.className + '|' + d.title)"
        )
        assert browser.console_errors == []
    assert sorted(titles) == [
        f"dot cold|cold serves {MODEL} (healthy, not loaded)",
        f"dot |warm serves {MODEL} (healthy, loaded)",
    ]


# --- a real engine: llama-server in router mode ---------------------------------------------


async def test_load_chat_and_unload_on_a_real_llama_server_router(engine, nexus_factory, tmp_path):
    """llama-server started without a model runs models on demand: Nexus loads one through
    /models/load, routes a chat to it, and unloads it, reading each model's status."""
    from real_engine import LlamaServer, wait_until_ready

    models_dir = tmp_path / "models"
    models_dir.mkdir()
    (models_dir / "smol.gguf").symlink_to(engine.model)
    port = free_port()
    log_path = tmp_path / "router.log"
    command = [str(engine.server_binary), "--models-dir", str(models_dir), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--ctx-size", "512", "--threads", "1", "--parallel", "1"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    router = LlamaServer(name="router", port=port, process=process, log_path=log_path)
    try:
        await asyncio.to_thread(wait_until_ready, router)
        toml = f'[[backends]]\nname = "router"\nurl = "{router.url}"\ntype = "llamacpp"\n'
        nx = await nexus_factory(toml)
        assert nx.backend("router").loaded == {}  # a router: it says what it runs (nothing)
        _, models, _ = await call(nx, "GET", "/v1/models")
        assert [(m["id"], m["loaded_on"]) for m in models["data"]] == [("smol", [])]
        status, op, _ = await call(
            nx, "POST", "/v1/models/load", {"model_id": "smol", "backend_id": "router"}
        )
        assert status == 202, op
        done = await wait_done(nx, op["operation_id"], timeout=120)
        assert done["status"] == "completed", (done, router.log_tail())
        _, models, _ = await call(nx, "GET", "/v1/models")
        assert models["data"][0]["loaded_on"] == ["router"]
        body = {"model": "smol", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        status, _, text = await call_text(nx, "/v1/chat/completions", body)
        assert status == 200 and json.loads(text)["choices"][0]["message"]["content"] is not None
        status, op, _ = await call(nx, "DELETE", "/v1/models/smol?backend_id=router")
        assert status == 202
        done = await wait_done(nx, op["operation_id"], timeout=60)
        assert done["status"] == "completed", done
        _, models, _ = await call(nx, "GET", "/v1/models")
        assert models["data"][0]["loaded_on"] == []
    finally:
        router.stop()


async def call_text(nx, path: str, body: Any) -> tuple[int, dict[str, str], str]:
    async with aiohttp.ClientSession() as session, session.post(nx.url + path, json=body) as resp:
        return resp.status, dict(resp.headers), await resp.text()


async def test_ollama_clients_see_what_is_loaded_through_api_ps(stop_later, nexus_factory):
    """/api/ps through the Ollama door lists the models in memory somewhere on the fleet, with
    the bytes they hold: a model no backend has loaded is not running."""
    import ollama

    (gpu,) = await start_fleet(
        stop_later, FleetOllama("gpu", sizes={MODEL: 4 * GIB, "qwen:7b": 5 * GIB}, loaded=(MODEL,))
    )
    nx = await nexus_factory(backends_toml(gpu))
    client = ollama.AsyncClient(host=nx.url)
    running = await client.ps()
    assert [(m.model, m.size_vram) for m in running.models] == [(MODEL, 4 * GIB)]
    _, op, _ = await call(
        nx, "POST", "/v1/models/load", {"model_id": "qwen:7b", "backend_id": "gpu"}
    )
    assert (await wait_done(nx, op["operation_id"]))["status"] == "completed"
    running = await client.ps()
    assert sorted(m.model for m in running.models) == [MODEL, "qwen:7b"]
