"""The Responses API front door (SPEC §2.1): POST /v1/responses through the `openai` SDK's
`client.responses`, over Ollama-, vLLM-, llama.cpp- and Anthropic-style backends, every object
and stream event checked against the SDK's own models; bad input; a stream cut mid-way."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from conftest import ROOT, backends_toml, chat_chunk, cloud_env, free_port, send_chunk, start_sse
from netns import isolated_namespace, requires_root
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

import nexus

KINDS = ["ollama", "vllm", "llamacpp", "anthropic"]
MODEL = "m"
EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
SCHEMA = {
    "type": "object",
    "properties": {"colour": {"type": "string"}},
    "required": ["colour"],
    "additionalProperties": False,
}


async def start(backend_factory, nexus_factory, kind: str = "vllm", name: str = "b"):
    backend = await backend_factory(kind, {MODEL: {"tools": True}}, name=name)
    nx = await nexus_factory(backends_toml(backend), env=cloud_env(backend))
    return backend, nx


def client(nx) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=nx.url + "/v1", api_key="unused", max_retries=0)


def strict_response(document: dict[str, Any]) -> Response:
    """The document as the SDK's Response, every required field present and of its type."""
    return Response.model_validate(document, strict=True)


async def post(nx, body: Any, raw: bytes | None = None) -> tuple[int, Any, bytes]:
    data = raw if raw is not None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(nx.url + "/v1/responses", data=data, headers=headers) as resp,
    ):
        return resp.status, resp.headers.copy(), await resp.read()


def parse_events(raw: bytes) -> list[dict[str, Any]]:
    """An SSE body as its events, each checked against the SDK's event models: the event name
    is the data's type, sequence numbers strictly increase, and it ends the Responses way."""
    events = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        lines = block.split("\n")
        assert lines[0].startswith("event: ") and lines[1].startswith("data: "), block
        data = json.loads(lines[1][6:])
        assert lines[0][7:] == data["type"]
        EVENTS.validate_python(data, strict=True)
        events.append(data)
    numbers = [e["sequence_number"] for e in events]
    assert numbers == sorted(set(numbers)), numbers
    assert events[-1]["type"] in ("response.completed", "response.incomplete", "response.failed")
    for event in events:
        if "response" in event:
            strict_response(event["response"])
    return events


def received_chat(backend) -> dict[str, Any]:
    """The last request the backend got (a chat request, or a Messages one for anthropic)."""
    return backend.received[-1][1]


# --- mock answers -----------------------------------------------------------------------------


def tool_call_answer(name: str, arguments: dict[str, Any]):
    """An OpenAI-style backend's answer that calls one tool (stream or not, as asked)."""
    text = json.dumps(arguments)

    async def answer(request: web.Request, body: dict) -> web.StreamResponse:
        call = {"id": "call_1", "type": "function", "function": {"name": name, "arguments": text}}
        if not body.get("stream"):
            message = {"role": "assistant", "content": None, "tool_calls": [call]}
            return web.json_response(
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "created": 1,
                    "model": body["model"],
                    "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}],
                    "usage": {"prompt_tokens": 30, "completion_tokens": 8, "total_tokens": 38},
                }
            )
        response = await start_sse(request)
        head = {"index": 0, **call, "function": {"name": name, "arguments": ""}}
        await send_chunk(response, chat_chunk(body["model"], {"tool_calls": [head]}, None))
        for piece in (text[:5], text[5:]):
            fragment = {"index": 0, "function": {"arguments": piece}}
            await send_chunk(response, chat_chunk(body["model"], {"tool_calls": [fragment]}, None))
        await send_chunk(response, chat_chunk(body["model"], {}, "tool_calls"))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    return answer


def stream_of(*deltas: dict[str, Any], finish: str = "stop", cut: bool = False):
    """A streamed chat answer of the given deltas; `cut` drops the connection after them."""

    async def answer(request: web.Request, body: dict) -> web.StreamResponse:
        response = await start_sse(request)
        for delta in deltas:
            await send_chunk(response, chat_chunk(body["model"], delta, None))
        if cut:
            request.transport.abort()
            return response
        await send_chunk(response, chat_chunk(body["model"], {}, finish))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    return answer


# --- text, whole and streamed -----------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_text_answer(backend_factory, nexus_factory, kind):
    backend, nx = await start(backend_factory, nexus_factory, kind)
    sdk = client(nx)
    raw = await sdk.responses.with_raw_response.create(
        model=MODEL, input="Say hello.", instructions="Be brief.", max_output_tokens=50
    )
    answer = raw.parse()
    assert answer.output_text == "Hello from b"
    assert answer.status == "completed" and answer.id.startswith("resp_")
    assert answer.usage is not None and answer.usage.input_tokens > 0
    assert answer.usage.total_tokens == answer.usage.input_tokens + answer.usage.output_tokens
    assert raw.headers["X-Nexus-Backend"] == "b"
    document = strict_response(json.loads(raw.content))
    message = document.output[-1]
    assert message.type == "message" and message.content[0].annotations == []
    sent = received_chat(backend)
    if kind == "anthropic":
        assert sent["system"] == "Be brief." and sent["max_tokens"] == 50
    else:
        assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
        assert sent["messages"][1] == {"role": "user", "content": "Say hello."}
        assert sent["max_tokens"] == 50
    await sdk.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_streamed_text(backend_factory, nexus_factory, kind):
    _backend, nx = await start(backend_factory, nexus_factory, kind)
    sdk = client(nx)
    async with sdk.responses.stream(model=MODEL, input="Say hello.") as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_response()
    await sdk.close()
    assert final.output_text == "Hello from b" and final.status == "completed"
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert kinds.count("response.output_text.delta") == 3
    status, headers, raw = await post(nx, {"model": MODEL, "input": "hi", "stream": True})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = parse_events(raw)
    done = [e for e in events if e["type"] == "response.output_item.done"]
    assert done[0]["item"]["content"][0]["text"] == "Hello from b"  # Codex reads it here
    completed = events[-1]["response"]
    assert completed["usage"]["output_tokens"] > 0
    assert completed["output"][0]["content"][0]["text"] == "Hello from b"


# --- function calls ---------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("kind", KINDS)
async def test_function_call_round_trip(backend_factory, nexus_factory, kind, stream):
    backend, nx = await start(backend_factory, nexus_factory, kind)
    if kind == "anthropic":
        backend.reply = "Let me look."
        backend.tool_call = {"name": "get_weather", "input": {"city": "Paris"}}
        backend.stop_reason = "tool_use"
    else:
        backend.behaviours.append(tool_call_answer("get_weather", {"city": "Paris"}))
    sdk = client(nx)
    question = {"role": "user", "content": "Weather in Paris?"}
    if stream:
        async with sdk.responses.stream(model=MODEL, input=[question], tools=[WEATHER]) as events:
            kinds = [event.type async for event in events]
            first = await events.get_final_response()
        assert "response.function_call_arguments.delta" in kinds
        assert "response.function_call_arguments.done" in kinds
    else:
        first = await sdk.responses.create(model=MODEL, input=[question], tools=[WEATHER])
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments) == {"city": "Paris"}
    sent = received_chat(backend)
    if kind == "anthropic":
        assert sent["tools"][0]["name"] == "get_weather"
    else:
        assert sent["tools"] == [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "parameters": WEATHER["parameters"],
                    "description": WEATHER["description"],
                },
            }
        ]
    backend.tool_call = None
    backend.reply = "Sunny in Paris"
    history = [item.model_dump(exclude_none=True) for item in first.output]
    output = {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"}
    second = await sdk.responses.create(
        model=MODEL, input=[question, *history, output], tools=[WEATHER]
    )
    await sdk.close()
    assert second.output_text == "Sunny in Paris"
    sent = received_chat(backend)
    if kind == "anthropic":
        used = sent["messages"][1]["content"][-1]
        assert used["type"] == "tool_use" and used["id"] == calls[0].call_id
        result = sent["messages"][2]["content"][0]
        assert result["type"] == "tool_result" and result["tool_use_id"] == calls[0].call_id
    else:
        assistant, tool = sent["messages"][1], sent["messages"][2]
        assert assistant["role"] == "assistant"
        assert assistant["tool_calls"][0]["id"] == calls[0].call_id
        assert json.loads(assistant["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
        assert tool == {"role": "tool", "tool_call_id": calls[0].call_id, "content": "sunny"}


async def test_streamed_function_call_events_validate(backend_factory, nexus_factory):
    backend, nx = await start(backend_factory, nexus_factory)
    backend.behaviours.append(tool_call_answer("get_weather", {"city": "Oslo"}))
    body = {"model": MODEL, "input": "Weather?", "tools": [WEATHER], "stream": True}
    _, _, raw = await post(nx, body)
    events = parse_events(raw)
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert done[0]["type"] == "function_call" and done[0]["status"] == "completed"
    assert json.loads(done[0]["arguments"]) == {"city": "Oslo"}
    assert events[-1]["response"]["tools"][0]["name"] == "get_weather"


# --- text.format, and what is translated how --------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_text_format_json_schema(backend_factory, nexus_factory, kind):
    backend, nx = await start(backend_factory, nexus_factory, kind)
    backend.reply = '{"colour": "blue"}'
    sdk = client(nx)
    form = {"type": "json_schema", "name": "colour", "schema": SCHEMA, "strict": True}
    answer = await sdk.responses.create(
        model=MODEL, input="A colour, as JSON.", text={"format": form}
    )
    await sdk.close()
    assert json.loads(answer.output_text) == {"colour": "blue"}
    assert answer.text is not None and answer.text.format.type == "json_schema"
    if kind != "anthropic":  # Anthropic's API has no such field: the request goes without
        assert received_chat(backend)["response_format"] == {
            "type": "json_schema",
            "json_schema": {"name": "colour", "schema": SCHEMA, "strict": True},
        }


async def test_what_a_codex_turn_becomes(backend_factory, nexus_factory):
    """Developer messages join the instructions in one leading system message; reasoning items
    are dropped; hosted tools are not offered; prompt_cache_key rides along for routing."""
    backend, nx = await start(backend_factory, nexus_factory)
    body = {
        "model": MODEL,
        "instructions": "You are a coding agent.",
        "input": [
            {
                "type": "message",
                "role": "developer",
                "content": [{"type": "input_text", "text": "Sandbox: none."}],
            },
            {
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "Look at this:"},
                    {"type": "input_image", "image_url": "data:image/png;base64,AAAA"},
                ],
            },
            {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "xyz"},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Seen."}],
            },
            {"role": "user", "content": "Now fix it."},
        ],
        "tools": [
            {"type": "web_search"},
            {"type": "namespace", "name": "mcp", "description": "tools", "tools": []},
            {"type": "custom", "name": "apply_patch", "format": {"type": "text"}},
            WEATHER,
        ],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "prompt_cache_key": "session-42",
        "store": False,
        "include": ["reasoning.encrypted_content"],
        "reasoning": {"effort": "medium"},
    }
    status, _, raw = await post(nx, body)
    assert status == 200, raw
    strict_response(json.loads(raw))
    sent = received_chat(backend)
    assert sent["messages"] == [
        {"role": "system", "content": "You are a coding agent.\n\nSandbox: none."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Look at this:"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
        },
        {"role": "assistant", "content": "Seen."},
        {"role": "user", "content": "Now fix it."},
    ]
    assert [t["function"]["name"] for t in sent["tools"]] == ["get_weather"]
    assert sent["tool_choice"] == "auto" and sent["parallel_tool_calls"] is False
    assert sent["prompt_cache_key"] == "session-42"
    for left_out in ("store", "include", "reasoning", "input", "instructions"):
        assert left_out not in sent


async def test_a_length_stop_is_incomplete(backend_factory, nexus_factory):
    backend, nx = await start(backend_factory, nexus_factory)
    backend.behaviours.append(stream_of({"content": "Once upon"}, finish="length"))
    _, _, raw = await post(nx, {"model": MODEL, "input": "A story.", "stream": True})
    events = parse_events(raw)
    assert events[-1]["type"] == "response.incomplete"
    final = events[-1]["response"]
    assert final["status"] == "incomplete"
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["output"][0]["content"][0]["text"] == "Once upon"


async def test_reasoning_streams_as_a_reasoning_item(backend_factory, nexus_factory):
    backend, nx = await start(backend_factory, nexus_factory)
    backend.behaviours.append(
        stream_of({"reasoning_content": "Think"}, {"reasoning_content": "ing."}, {"content": "Hi"})
    )
    _, _, raw = await post(nx, {"model": MODEL, "input": "hi", "stream": True})
    events = parse_events(raw)
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert [item["type"] for item in done] == ["reasoning", "message"]
    assert done[0]["content"][0]["text"] == "Thinking."
    assert done[1]["content"][0]["text"] == "Hi"
    assert events[-1]["response"]["usage"]["output_tokens_details"]["reasoning_tokens"] >= 0


# --- bad input and broken backends ------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "hi"}, "model"),
        ({"model": MODEL}, "input"),
        ({"model": MODEL, "input": 5}, "input"),
        ({"model": MODEL, "input": []}, "input"),
        ({"model": MODEL, "input": [7]}, "input"),
        ({"model": MODEL, "input": [{"role": "robot", "content": "x"}]}, "input"),
        ({"model": MODEL, "input": [{"role": "user", "content": 7}]}, "input"),
        (
            {"model": MODEL, "input": [{"role": "user", "content": [{"type": "input_file"}]}]},
            "input",
        ),
        ({"model": MODEL, "input": [{"type": "item_reference", "id": "msg_1"}]}, "input"),
        ({"model": MODEL, "input": [{"type": "function_call", "name": "f"}]}, "input"),
        ({"model": MODEL, "input": "hi", "previous_response_id": "resp_1"}, "previous_response_id"),
        ({"model": MODEL, "input": "hi", "stream": "yes"}, "stream"),
        ({"model": MODEL, "input": "hi", "tools": "all"}, "tools"),
        ({"model": MODEL, "input": "hi", "tools": [{"type": "function"}]}, "tools"),
        ({"model": MODEL, "input": "hi", "max_output_tokens": "many"}, "max_output_tokens"),
        ({"model": MODEL, "input": "hi", "temperature": "hot"}, "temperature"),
        ({"model": MODEL, "input": "hi", "instructions": ["x"]}, "instructions"),
        ({"model": MODEL, "input": "hi", "text": {"format": {"type": "xml"}}}, "text"),
    ],
)
async def test_bad_input_is_a_400_naming_the_field(backend_factory, nexus_factory, body, param):
    backend, nx = await start(backend_factory, nexus_factory)
    status, headers, raw = await post(nx, body)
    assert status == 400, raw
    error = json.loads(raw)["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert param.split(".")[0] in error["message"]
    assert not backend.received
    assert headers["X-Request-Id"].startswith("req-")
    status, _, _ = await post(nx, {"model": MODEL, "input": "still there?"})
    assert status == 200


async def test_previous_response_id_through_the_sdk(backend_factory, nexus_factory):
    _backend, nx = await start(backend_factory, nexus_factory)
    sdk = client(nx)
    with pytest.raises(openai.BadRequestError) as refused:
        await sdk.responses.create(model=MODEL, input="more", previous_response_id="resp_1")
    await sdk.close()
    assert refused.value.param == "previous_response_id"


async def test_malformed_json_and_unknown_models(backend_factory, nexus_factory):
    _backend, nx = await start(backend_factory, nexus_factory)
    status, _, raw = await post(nx, None, raw=b'{"model": "m", "input": ')
    assert status == 400 and "JSON" in json.loads(raw)["error"]["message"]
    status, _, raw = await post(nx, None, raw=b"[1, 2]")
    assert status == 400 and json.loads(raw)["error"]["type"] == "invalid_request_error"
    sdk = client(nx)
    with pytest.raises(openai.NotFoundError) as missing:
        await sdk.responses.create(model="no-such-model", input="hi")
    await sdk.close()
    error = missing.value.body
    assert isinstance(error, dict) and error["code"] == "model_not_found"
    assert error["param"] == "model" and MODEL in error["message"]


async def test_a_backend_dying_mid_stream_ends_it_failed(backend_factory, nexus_factory):
    backend, nx = await start(backend_factory, nexus_factory)
    backend.behaviours.append(stream_of({"content": "Hello"}, {"content": " wor"}, cut=True))
    _, _, raw = await post(nx, {"model": MODEL, "input": "hi", "stream": True})
    events = parse_events(raw)
    assert events[-1]["type"] == "response.failed"
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert "broke" in failed["error"]["message"]
    assert failed["output"][0]["content"][0]["text"] == "Hello wor"  # what came before the cut
    assert nx.backend("b").errors == 1
    assert nx.app[nexus.STATS].errors == 1


async def test_a_backend_refusal_reaches_the_client_in_openai_shape(backend_factory, nexus_factory):
    backend, nx = await start(backend_factory, nexus_factory)

    async def refuse(request: web.Request, body: dict) -> web.Response:
        error = {"message": "temperature too high", "type": "invalid_request_error"}
        return web.json_response({"error": error}, status=400)

    backend.behaviours.append(refuse)
    sdk = client(nx)
    with pytest.raises(openai.BadRequestError) as refused:
        await sdk.responses.create(model=MODEL, input="hi")
    await sdk.close()
    assert "temperature too high" in refused.value.message
    assert refused.value.response.headers["X-Nexus-Backend"] == "b"


# --- the real Codex CLI -----------------------------------------------------------------------

CODEX_SCRIPT = ROOT / "tests" / "codex.sh"
CODEX_TIMEOUT_S = 120
CODEX_REPLY = "Nexus relayed this from the local backend."
# A chat-only backend in the namespace: answers every request with CODEX_REPLY, prints "ready",
# then each request it gets as a JSON line; it ends by itself after a minute at most.
CHAT_BACKEND = """
import asyncio, json, sys
sys.path.insert(0, sys.argv[1])
from aiohttp import web
from conftest import MockBackend

async def main():
    backend = MockBackend("generic", {"m": {"context": 32768}}, "local")
    backend.reply = sys.argv[3]
    runner = web.AppRunner(backend.build_app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", int(sys.argv[2])).start()
    print("ready", flush=True)
    seen = 0
    for _ in range(6000):
        for path, body, _ in backend.received[seen:]:
            print(json.dumps({"path": path, "body": body}), flush=True)
        seen = len(backend.received)
        await asyncio.sleep(0.01)

asyncio.run(main())
"""


@pytest.fixture(scope="session")
def codex_cli() -> Path:
    """The pinned Codex CLI, installed from npm by tests/codex.sh (cached after the first run)."""
    done = subprocess.run(
        ["bash", str(CODEX_SCRIPT)], capture_output=True, timeout=900, check=False, cwd=ROOT
    )
    if done.returncode != 0:
        raise RuntimeError("tests/codex.sh failed:\n" + done.stderr.decode(errors="replace"))
    paths = dict(line.split("=", 1) for line in done.stdout.decode().splitlines() if "=" in line)
    return Path(paths["CODEX"])


def codex_config(home: Path, nexus_port: int) -> None:
    """Codex's config: a custom model provider, Nexus, spoken to with the Responses API."""
    home.mkdir()
    (home / "config.toml").write_text(
        'model = "m"\n'
        'model_provider = "nexus"\n'
        "\n"
        "[model_providers.nexus]\n"
        'name = "Nexus"\n'
        f'base_url = "http://127.0.0.1:{nexus_port}/v1"\n'
        'wire_api = "responses"\n'
    )


@requires_root
@pytest.mark.netns
def test_codex_cli_answers_through_nexus(codex_cli: Path, tmp_path: Path) -> None:
    """`codex exec` in a namespace with loopback only, against Nexus in front of a chat-only
    backend: it prints that backend's answer after one turn (no retries)."""
    backend_port, nexus_port = free_port(), free_port()
    config = tmp_path / "nexus.toml"
    config.write_text(
        "[health_check]\ninterval_seconds = 1\n\n[[backends]]\n"
        f'name = "local"\nurl = "http://127.0.0.1:{backend_port}"\ntype = "generic"\n'
    )
    codex_config(tmp_path / "codex-home", nexus_port)
    work = tmp_path / "work"
    work.mkdir()
    with isolated_namespace() as ns:
        backend = ns.python(CHAT_BACKEND, str(ROOT / "tests"), str(backend_port), CODEX_REPLY)
        assert backend.read_line(15) == "ready"
        serve = ["serve", "-c", str(config), "-p", str(nexus_port), "-H", "127.0.0.1"]
        nexus_process = ns.python(ROOT / "nexus.py", *serve, "--no-discovery")
        url = f"http://127.0.0.1:{nexus_port}"
        for _ in range(100):  # bounded: 10 s for the backend to be healthy
            status, models = ns.wait_http(url + "/v1/models", timeout=10)
            if status == 200 and b'"m"' in models:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(nexus_process.stderr_text())
        done = ns.run(
            [
                "env",
                f"CODEX_HOME={tmp_path / 'codex-home'}",
                str(codex_cli),
                "exec",
                "--skip-git-repo-check",
                "--ephemeral",
                "-C",
                str(work),
                "Say hello.",
            ],
            timeout=CODEX_TIMEOUT_S,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.strip().splitlines()[-1] == CODEX_REPLY
        turn = backend.read_json(5)
        with pytest.raises(TimeoutError):
            backend.read_json(1)  # one turn, one request: Codex did not retry it
    assert turn["path"] == "/v1/chat/completions"
    chat = turn["body"]
    assert chat["model"] == "m" and chat["stream"] is True
    assert chat["messages"][0]["role"] == "system"  # instructions and developer messages
    assert chat["messages"][-1]["role"] == "user" and "Say hello." in str(chat["messages"][-1])
    assert all(tool["type"] == "function" for tool in chat.get("tools", []))
    assert isinstance(chat.get("prompt_cache_key"), str)


# --- the real llama-server --------------------------------------------------------------------


@pytest.mark.engine
async def test_real_llama_server_through_the_responses_api(llama_pair, nexus_factory):
    """SmolLM2 on llama-server behind Nexus, whole and streamed, usage the engine's own."""
    server = llama_pair[0]
    nx = await nexus_factory(
        f'[[backends]]\nname = "llama"\nurl = "{server.url}"\ntype = "llamacpp"\n'
    )
    model = next(iter(nx.backend("llama").models))
    sdk = openai.AsyncOpenAI(base_url=nx.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    question = "Name three colours."
    answer = await sdk.responses.create(
        model=model, input=question, max_output_tokens=16, temperature=0
    )
    assert any(ch.isalpha() for ch in answer.output_text)
    assert answer.status in ("completed", "incomplete")
    assert answer.usage is not None and answer.usage.input_tokens > 0
    assert 0 < answer.usage.output_tokens <= 16
    stream = await sdk.responses.create(
        model=model, input=question, max_output_tokens=16, temperature=0, stream=True
    )
    events = [event async for event in stream]
    await sdk.close()
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert events[-1].type == f"response.{answer.status}"  # a length stop is incomplete
    final = events[-1].response
    assert "".join(deltas) == final.output_text == answer.output_text  # temperature 0
    assert final.usage is not None and final.usage.output_tokens == answer.usage.output_tokens


async def test_content_logging_reads_a_response_object(backend_factory, nexus_factory):
    """With log_content on, the answer logged is the response's text."""
    _backend, nx = await start(backend_factory, nexus_factory)
    _, _, raw = await post(nx, {"model": MODEL, "input": "hi"})
    assert nexus.answer_text(web.Response(body=raw)) == "Hello from b"
