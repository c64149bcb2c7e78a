"""A prompt too long for every backend is the client's context error (SPEC §3 step 2, §4), in
each door's own words; what waiting can fix stays a 503 that says which need failed.

Driven by the official `openai` (chat and completions) and `anthropic` (Messages) clients
against vLLM-style mock backends that report their context length.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import anthropic
import openai
import pytest
from aiohttp import web
from conftest import backends_toml, free_port
from netns import isolated_namespace, requires_root

ROOT = Path(__file__).resolve().parent.parent
PNG_URL = "data:image/png;base64,iVBORw0KGgo="


OPENED: list[openai.AsyncOpenAI | anthropic.AsyncAnthropic] = []


@pytest.fixture(autouse=True)
async def close_clients():
    """Closes the clients a test opened, inside its event loop."""
    yield
    while OPENED:
        await OPENED.pop().close()


def openai_client(nx) -> openai.AsyncOpenAI:
    OPENED.append(openai.AsyncOpenAI(base_url=nx.url + "/v1", api_key="unused", max_retries=0))
    return OPENED[-1]


def anthropic_client(nx) -> anthropic.AsyncAnthropic:
    OPENED.append(anthropic.AsyncAnthropic(base_url=nx.url, api_key="unused", max_retries=0))
    return OPENED[-1]


def text_of(tokens: int) -> str:
    """A prompt Nexus estimates at about `tokens` tokens (four characters each)."""
    return "word " * (tokens * 4 // 5)


def chat_tokens(text: str) -> int:
    """Nexus's estimate of a one-message chat (and Messages) prompt: characters over four, plus
    four tokens for the message's framing."""
    return len(text) // 4 + 4


async def ask_chat(nx, text: str, **kw):
    return await openai_client(nx).chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": text}], **kw
    )


async def ask_completion(nx, text: str, **kw):
    return await openai_client(nx).completions.with_raw_response.create(
        model="m", prompt=text, **kw
    )


async def ask_messages(nx, text: str, max_tokens: int = 100, **kw):
    return await anthropic_client(nx).messages.with_raw_response.create(
        model="m", max_tokens=max_tokens, messages=[{"role": "user", "content": text}], **kw
    )


async def small_world(backend_factory, nexus_factory, extra: str = ""):
    """Model m on an 8k and a 4k backend, its fallback m-2k on a 2k one: nothing past 8k."""
    eight = await backend_factory("vllm", {"m": {"context": 8192}}, name="eight")
    four = await backend_factory("vllm", {"m": {"context": 4096}}, name="four")
    two = await backend_factory("vllm", {"m-2k": {"context": 2048}}, name="two")
    toml = '[routing]\nfallbacks = { "m" = ["m-2k"] }\n' + extra
    nx = await nexus_factory(toml + backends_toml(eight, four, two))
    return nx, (eight, four, two)


# --- beyond every context: the 400, never a 503 ----------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_chat_prompt_beyond_every_context_is_400_with_both_sizes(
    backend_factory, nexus_factory, stream
):
    nx, backends = await small_world(backend_factory, nexus_factory)
    text = text_of(21_000)
    with pytest.raises(openai.BadRequestError) as caught:
        await ask_chat(nx, text, stream=stream, max_tokens=32_000)
    error = caught.value.body
    assert caught.value.status_code == 400
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == "messages"
    prompt = chat_tokens(text)
    assert error["message"].startswith(
        f"This model's maximum context length is 8192 tokens, however you requested {prompt} tokens"
    )
    assert error["message"].endswith("Serve it with a larger context, or add a fallback with one.")
    assert error["context"] == {"prompt_tokens": prompt, "context_length": 8192}
    headers = caught.value.response.headers
    assert "Retry-After" not in headers
    assert headers["X-Request-Id"].startswith("req-")
    assert all(b.received == [] for b in backends)  # nothing was sent anywhere


async def test_completions_prompt_beyond_every_context_names_prompt(backend_factory, nexus_factory):
    nx, backends = await small_world(backend_factory, nexus_factory)
    text = text_of(9000)
    with pytest.raises(openai.BadRequestError) as caught:
        await ask_completion(nx, text)
    error = caught.value.body
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == "prompt"
    assert error["context"] == {"prompt_tokens": len(text) // 4, "context_length": 8192}
    assert "maximum context length is 8192 tokens" in error["message"]
    assert f"you requested {len(text) // 4} tokens" in error["message"]
    assert "Retry-After" not in caught.value.response.headers
    assert all(b.received == [] for b in backends)


@pytest.mark.parametrize("stream", [False, True])
async def test_messages_prompt_beyond_every_context_is_prompt_too_long(
    backend_factory, nexus_factory, stream
):
    nx, backends = await small_world(backend_factory, nexus_factory)
    text = text_of(21_000)
    client = anthropic_client(nx)
    with pytest.raises(anthropic.BadRequestError) as caught:
        if stream:
            async with client.messages.stream(
                model="m", max_tokens=32_000, messages=[{"role": "user", "content": text}]
            ) as events:
                async for _ in events:
                    pass
        else:
            await ask_messages(nx, text, max_tokens=16_000)
    assert caught.value.status_code == 400
    assert caught.value.body == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": f"prompt is too long: {chat_tokens(text)} tokens > 8192 maximum",
        },
    }
    assert "Retry-After" not in caught.value.response.headers
    assert all(b.received == [] for b in backends)
    # count_tokens says the same size the error does, so a client can check before it sends
    counted = await client.messages.count_tokens(
        model="m", messages=[{"role": "user", "content": text}]
    )
    assert counted.input_tokens == chat_tokens(text)


async def test_beyond_every_context_is_400_even_with_the_largest_backend_down(
    backend_factory, nexus_factory
):
    """Health does not matter: no backend, up or down, could hold it, so waiting cannot help."""
    nx, (eight, _four, _two) = await small_world(backend_factory, nexus_factory)
    eight.healthy = False
    nx.backend("eight").status = "unhealthy"
    with pytest.raises(openai.BadRequestError) as caught:
        await ask_chat(nx, text_of(10_000))
    assert caught.value.body["code"] == "context_length_exceeded"
    assert caught.value.body["context"]["context_length"] == 8192  # the down one counts
    assert "Retry-After" not in caught.value.response.headers


# --- it fits after all: clamped, or on a fallback --------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_responses_prompt_beyond_every_context_is_400_naming_input(
    backend_factory, nexus_factory, stream
):
    nx, backends = await small_world(backend_factory, nexus_factory)
    text = text_of(21_000)
    with pytest.raises(openai.BadRequestError) as caught:
        await openai_client(nx).responses.create(model="m", input=text, stream=stream)
    error = caught.value.body
    assert caught.value.status_code == 400
    assert error["code"] == "context_length_exceeded" and error["param"] == "input"
    assert "maximum context length is 8192 tokens" in error["message"]
    assert error["context"]["context_length"] == 8192
    assert error["context"]["prompt_tokens"] > 8192
    assert "Retry-After" not in caught.value.response.headers
    assert all(b.received == [] for b in backends)


@pytest.mark.parametrize("stream", [False, True])
async def test_ollama_prompt_beyond_every_context_is_400_with_both_sizes(
    backend_factory, nexus_factory, stream
):
    import ollama

    nx, backends = await small_world(backend_factory, nexus_factory)
    text = text_of(21_000)
    client = ollama.AsyncClient(host=nx.url)
    with pytest.raises(ollama.ResponseError) as caught:
        answer = await client.chat(
            model="m", messages=[{"role": "user", "content": text}], stream=stream
        )
        if stream:
            [part async for part in answer]
    assert caught.value.status_code == 400
    message = caught.value.error
    assert "maximum context length is 8192 tokens" in message
    assert f"you requested {chat_tokens(text)} tokens" in message
    assert all(b.received == [] for b in backends)


async def test_prompt_that_fits_only_with_max_tokens_clamped_goes_through(
    backend_factory, nexus_factory
):
    nx, (eight, four, two) = await small_world(backend_factory, nexus_factory)
    text = text_of(6000)
    prompt = chat_tokens(text)
    raw = await ask_chat(nx, text, max_tokens=32_000)
    assert raw.parse().choices[0].message.content == "Hello from eight"
    assert int(raw.headers["X-Nexus-Max-Tokens-Clamped"]) == 8192 - prompt
    assert eight.received[-1][1]["max_tokens"] == 8192 - prompt

    raw = await ask_completion(nx, text, max_tokens=32_000)
    assert raw.parse().choices[0].text
    assert int(raw.headers["X-Nexus-Max-Tokens-Clamped"]) == 8192 - len(text) // 4

    raw = await ask_messages(nx, text, max_tokens=16_000)
    assert (await raw.parse()).content[0].text == "Hello from eight"
    assert int(raw.headers["X-Nexus-Max-Tokens-Clamped"]) == 8192 - prompt
    assert len(eight.received) == 3 and four.received == [] and two.received == []


async def test_prompt_that_fits_only_a_fallback_goes_to_the_fallback(
    backend_factory, nexus_factory
):
    small = await backend_factory("vllm", {"m": {"context": 8192}}, name="small")
    big = await backend_factory("vllm", {"m-32k": {"context": 32768}}, name="big")
    toml = '[routing]\nfallbacks = { "m" = ["m-32k"] }\n'
    nx = await nexus_factory(toml + backends_toml(small, big))
    text = text_of(21_000)

    raw = await ask_chat(nx, text)
    assert raw.parse().choices[0].message.content == "Hello from big"
    assert raw.headers["X-Nexus-Fallback-Model"] == "m-32k"
    raw = await ask_completion(nx, text)
    assert raw.headers["X-Nexus-Fallback-Model"] == "m-32k"
    raw = await ask_messages(nx, text)
    assert (await raw.parse()).content[0].text == "Hello from big"
    assert raw.headers["X-Nexus-Fallback-Model"] == "m-32k"
    assert small.received == [] and len(big.received) == 3

    # Past the fallback's context too: the 400 names the largest context, the fallback's.
    with pytest.raises(anthropic.BadRequestError) as caught:
        await ask_messages(nx, text_of(40_000))
    message = caught.value.body["error"]["message"]
    assert message == f"prompt is too long: {chat_tokens(text_of(40_000))} tokens > 32768 maximum"


# --- the backend counted more than Nexus estimated ------------------------------------------

# How llama.cpp's llama-server and vLLM refuse a prompt past their context, word for word.
LLAMA_TOO_LONG = {
    "error": {
        "code": 400,
        "message": "request (9731 tokens) exceeds the available context size (8192 tokens), "
        "try increasing it",
        "type": "exceed_context_size_error",
        "n_prompt_tokens": 9731,
        "n_ctx": 8192,
    }
}
VLLM_TOO_LONG = {
    "object": "error",
    "message": "This model's maximum context length is 8192 tokens. However, you requested "
    "9731 tokens (9631 in the messages, 100 in the completion). Please reduce the length of "
    "the messages or completion.",
    "type": "BadRequestError",
    "param": None,
    "code": 400,
}


def refuse(document: dict):
    """A behaviour answering one request with this 400."""

    async def behaviour(request, body):
        return web.json_response(document, status=400)

    return behaviour


@pytest.mark.parametrize("document", [LLAMA_TOO_LONG, VLLM_TOO_LONG], ids=["llamacpp", "vllm"])
async def test_backend_counting_past_its_context_is_the_context_error_with_its_sizes(
    backend_factory, nexus_factory, document
):
    """Nexus's estimate fit, the backend's own count did not: the client still gets the
    context error in its door's words, with the backend's sizes."""
    backend = await backend_factory("vllm", {"m": {"context": 8192}}, name="eight")
    nx = await nexus_factory(backends_toml(backend))
    text = text_of(7000)  # under 8192 by Nexus's estimate
    backend.behaviours = [refuse(document), refuse(document)]
    with pytest.raises(openai.BadRequestError) as caught:
        await ask_chat(nx, text)
    error = caught.value.body
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == "messages"
    assert error["context"] == {"prompt_tokens": 9731, "context_length": 8192}
    assert error["message"].startswith(
        "This model's maximum context length is 8192 tokens, however you requested 9731 tokens"
    )
    assert "Retry-After" not in caught.value.response.headers
    with pytest.raises(anthropic.BadRequestError) as caught:
        await ask_messages(nx, text)
    assert caught.value.body["error"] == {
        "type": "invalid_request_error",
        "message": "prompt is too long: 9731 tokens > 8192 maximum",
    }
    backend.behaviours = [refuse(document)]
    with pytest.raises(anthropic.BadRequestError) as caught:
        async with anthropic_client(nx).messages.stream(
            model="m", max_tokens=100, messages=[{"role": "user", "content": text}]
        ) as events:
            async for _ in events:
                pass
    assert caught.value.body["error"]["message"] == "prompt is too long: 9731 tokens > 8192 maximum"
    assert len(backend.received) == 3  # each asked once: a refusal is not retried


# --- what waiting can fix: a 503 that says which need failed ---------------------------------


async def vision_world(backend_factory, nexus_factory):
    """Model m on a vision backend (down) and a text-only one (up)."""
    eyes = await backend_factory("ollama", {"m": {"context": 8192, "vision": True}}, name="eyes")
    text = await backend_factory("ollama", {"m": {"context": 8192}}, name="text")
    nx = await nexus_factory(backends_toml(eyes, text))
    eyes.healthy = False
    nx.backend("eyes").status = "unhealthy"
    return nx, eyes, text


async def test_vision_request_with_no_vision_backend_healthy_is_503_saying_vision(
    backend_factory, nexus_factory
):
    nx, eyes, text = await vision_world(backend_factory, nexus_factory)
    content = [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": PNG_URL}},
    ]
    with pytest.raises(openai.InternalServerError) as caught:
        await openai_client(nx).chat.completions.create(
            model="m", messages=[{"role": "user", "content": content}]
        )
    assert caught.value.status_code == 503
    error = caught.value.body
    assert error["code"] == "no_backend_available"
    assert error["message"] == (
        "No backend can serve model 'm' now: it needs vision, which no healthy backend serving "
        "it has (eyes: down; text: no vision)."
    )
    assert "context" not in error["message"].split(":", 1)[1]  # no list of every reason
    assert error["context"]["backends"] == [
        {"backend": "eyes", "model": "m", "failed": ["down"]},
        {"backend": "text", "model": "m", "failed": ["vision"]},
    ]
    assert error["context"]["available_nodes"] == ["text"]
    assert eyes.received == [] and text.received == []


async def test_messages_vision_request_with_no_vision_backend_healthy_is_overloaded_vision(
    backend_factory, nexus_factory
):
    nx, _eyes, _text = await vision_world(backend_factory, nexus_factory)
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "x"}}
    with pytest.raises(anthropic.APIStatusError) as caught:
        await anthropic_client(nx).messages.create(
            model="m",
            max_tokens=10,
            messages=[{"role": "user", "content": [image, {"type": "text", "text": "what?"}]}],
        )
    assert caught.value.status_code == 503
    assert caught.value.body["error"]["type"] == "overloaded_error"
    assert "it needs vision" in caught.value.body["error"]["message"]


async def test_prompt_that_fits_only_a_backend_that_is_down_is_503_saying_context(
    backend_factory, nexus_factory
):
    """The one backend with room is down: waiting can fix that, so it is a 503, not the 400."""
    small = await backend_factory("vllm", {"m": {"context": 8192}}, name="small")
    big = await backend_factory("vllm", {"m": {"context": 32768}}, name="big")
    nx = await nexus_factory(backends_toml(small, big))
    big.healthy = False
    nx.backend("big").status = "unhealthy"
    text = text_of(10_000)
    with pytest.raises(openai.InternalServerError) as caught:
        await ask_chat(nx, text)
    error = caught.value.body
    assert caught.value.status_code == 503
    assert error["message"] == (
        f"No backend can serve model 'm' now: it needs a context over {chat_tokens(text)} "
        "tokens, which no healthy backend serving it has (small: a context of 8192 tokens; "
        "big: down)."
    )
    assert error["context"]["backends"] == [
        {"backend": "small", "model": "m", "failed": ["context"], "context_length": 8192},
        {"backend": "big", "model": "m", "failed": ["down"]},
    ]


async def test_every_backend_down_says_down(backend_factory, nexus_factory):
    a = await backend_factory("vllm", {"m": {"context": 8192}}, name="a")
    nx = await nexus_factory(backends_toml(a))
    a.healthy = False
    nx.backend("a").status = "unhealthy"
    with pytest.raises(openai.InternalServerError) as caught:
        await ask_chat(nx, "hello")
    error = caught.value.body
    assert error["message"] == (
        "No backend can serve model 'm' now: every backend serving it is down (a: down)."
    )
    assert error["context"]["backends"] == [{"backend": "a", "model": "m", "failed": ["down"]}]


# --- the real Claude Code CLI against a context too small for it ------------------------------

# A vLLM-style mock backend serving claude-sonnet-4-5 with an 8,192-token context, in a process
# of its own inside the namespace; it prints "ready" once it listens.
SMALL_BACKEND = """
import asyncio, sys
sys.path.insert(0, sys.argv[2])
from aiohttp import web
from conftest import MockBackend

async def main():
    backend = MockBackend("vllm", {"claude-sonnet-4-5": {"context": 8192}}, "small")
    runner = web.AppRunner(backend.build_app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", int(sys.argv[1])).start()
    print("ready", flush=True)
    await asyncio.sleep(300)

asyncio.run(main())
"""
CLAUDE_TIMEOUT = 90.0  # seconds for one `claude -p`: it ends in seconds; its retries take minutes


@pytest.fixture(scope="module")
def claude_cli() -> str:
    """The pinned Claude Code CLI, installed from npm into the cache by tests/clients.sh."""
    done = subprocess.run(
        ["bash", str(ROOT / "tests" / "clients.sh")],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"tests/clients.sh failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1].removeprefix("CLAUDE=")


def wait_for_model(ns, url: str, model: str, timeout: float = 15.0) -> None:
    """Until Nexus lists the model (its backend polled healthy), at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = ns.wait_http(url + "/v1/models", timeout=timeout)
        if status == 200 and any(m["id"] == model for m in json.loads(body)["data"]):
            return
        time.sleep(0.1)
    raise AssertionError(f"{model} not listed by Nexus within {timeout}s")


@requires_root
def test_claude_code_with_a_too_small_context_prints_prompt_too_long_once(claude_cli, tmp_path):
    """Claude Code's opening request (about 22k tokens) against an 8k backend: it is told the
    prompt is too long, says so once and stops; it does not retry an "overloaded" Nexus."""
    backend_port, nexus_port = free_port(), free_port()
    config = tmp_path / "nexus.toml"
    config.write_text(
        "[discovery]\nenabled = false\n[[backends]]\n"
        f'name = "small"\nurl = "http://127.0.0.1:{backend_port}"\ntype = "vllm"\n'
    )
    home = tmp_path / "home"
    home.mkdir()
    url = f"http://127.0.0.1:{nexus_port}"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": url,
        "ANTHROPIC_API_KEY": "sk-ant-dummy",
        "ANTHROPIC_MODEL": "claude-sonnet-4-5",
        "ANTHROPIC_SMALL_FAST_MODEL": "claude-sonnet-4-5",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "DISABLE_AUTOUPDATER": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    }
    with isolated_namespace() as ns:
        backend = ns.python(SMALL_BACKEND, str(backend_port), str(ROOT / "tests"))
        assert backend.read_line(timeout=15) == "ready"
        nexus_args = ["serve", "-c", str(config), "-H", "127.0.0.1", "-p", str(nexus_port)]
        ns.popen([sys.executable, str(ROOT / "nexus.py"), *nexus_args], stdout=subprocess.DEVNULL)
        wait_for_model(ns, url, "claude-sonnet-4-5")
        with (tmp_path / "out.txt").open("w") as out:
            claude = ns.popen(
                [claude_cli, "-p", "hello"], env=env, cwd=str(home), stdout=out, text=True
            )
            try:
                code: int | None = claude.wait(timeout=CLAUDE_TIMEOUT)
            except subprocess.TimeoutExpired:  # still retrying: the stats below say how often
                claude.stop()
                code = None
        printed = (tmp_path / "out.txt").read_text() + claude.stderr_text()
        status, body = ns.http("GET", url + "/v1/stats")
        assert status == 200
    stats = json.loads(body)
    asked = stats["requests"]["total"]  # every POST /v1/messages (count_tokens is not counted)
    assert code is not None, f"claude -p still running after {CLAUDE_TIMEOUT}s, {asked} requests"
    assert code != 0, printed
    assert printed.lower().count("prompt is too long") == 1, printed
    assert "8192" in printed, printed  # the limit, from the error Nexus sent
    assert "overloaded" not in printed.lower() and "retrying" not in printed.lower(), printed
    assert 1 <= asked <= 3, stats
    assert {r["status"] for r in stats["recent"]} == {400}, stats["recent"]
    assert stats["backends"][0]["requests"] == 0  # nothing was sent to the small backend
