"""End to end against a real inference engine: llama.cpp's llama-server serving SmolLM2-135M.

First llama-server alone (so a change in its API shows up here, not as a Nexus bug), then Nexus
in front of two of them: model listing, chat completions streamed and not, token usage, the
Anthropic Messages API through the `anthropic` SDK, a prompt past the context, and failover
when a server is killed.
`tests/engine.sh` provisions the engine; the first run compiles it, later runs reuse the cache.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import openai
import pytest
from real_engine import (
    CONTEXT_SIZE,
    MODEL_ALIAS,
    PARALLEL_SLOTS,
    ROOT,
    LlamaServer,
    free_port,
    http_get,
)

# The fixtures engine, llama_pair and fresh_llama_pair come from real_engine (see conftest.py).
pytestmark = pytest.mark.engine

NEXUS_SCRIPT = ROOT / "nexus.py"
NEXUS_BINARY = ROOT / "dist" / "nexus"
NEXUS_READY_TIMEOUT_S = 30
REQUEST_TIMEOUT_S = 60
MAX_TOKENS = 20
PROMPT = [{"role": "user", "content": "Name three colours."}]


def get_json(url: str) -> dict:
    status, body = http_get(url, timeout=10.0)
    assert status == 200, body[:500]
    return json.loads(body)


def model_id(server: LlamaServer) -> str:
    return get_json(server.url + "/v1/models")["data"][0]["id"]


def is_real_text(text: str | None) -> bool:
    """Generated words, not an empty or whitespace answer."""
    return bool(text) and any(ch.isalpha() for ch in text)


def assert_usage(usage: openai.types.CompletionUsage | None) -> None:
    assert usage is not None
    assert usage.prompt_tokens > 0
    assert 0 < usage.completion_tokens <= MAX_TOKENS
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


# llama-server on its own ---------------------------------------------------------------------


def test_llama_server_health_props_and_models(llama_pair: list[LlamaServer]) -> None:
    """What Nexus's llamacpp adapter reads: the context is per slot, and only inside
    default_generation_settings (there is no top-level n_ctx in /props)."""
    per_slot = CONTEXT_SIZE // PARALLEL_SLOTS
    for server in llama_pair:
        assert get_json(server.url + "/health") == {"status": "ok"}
        props = get_json(server.url + "/props")
        assert "n_ctx" not in props
        assert props["default_generation_settings"]["n_ctx"] == per_slot
        assert props["total_slots"] == PARALLEL_SLOTS
        assert props["model_alias"] == MODEL_ALIAS
        assert props["modalities"]["vision"] is False
        models = get_json(server.url + "/v1/models")
        assert models["object"] == "list"
        assert [m["id"] for m in models["data"]] == [MODEL_ALIAS]
        assert models["data"][0]["owned_by"] == "llamacpp"
        assert models["data"][0]["meta"]["n_ctx"] == per_slot
        assert models["data"][0]["meta"]["n_ctx_train"] == 8192


def test_llama_server_chat(llama_pair: list[LlamaServer]) -> None:
    server = llama_pair[0]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    answer = client.chat.completions.create(
        model=model_id(server),
        messages=PROMPT,
        max_tokens=MAX_TOKENS,
        temperature=0,
        timeout=REQUEST_TIMEOUT_S,
    )
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.role == "assistant"
    assert is_real_text(answer.choices[0].message.content)
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert_usage(answer.usage)


def test_llama_server_stream_with_usage(llama_pair: list[LlamaServer]) -> None:
    server = llama_pair[1]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model=model_id(server),
        messages=PROMPT,
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        timeout=REQUEST_TIMEOUT_S,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert is_real_text(text)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert_usage(chunks[-1].usage)


def test_llama_server_refuses_a_prompt_over_its_context(llama_pair: list[LlamaServer]) -> None:
    """The error Nexus must recognise as a context overflow (it names n_ctx), before any stream."""
    server = llama_pair[0]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=MODEL_ALIAS,
            messages=[{"role": "user", "content": "word " * CONTEXT_SIZE}],
            max_tokens=MAX_TOKENS,
            stream=True,
            timeout=REQUEST_TIMEOUT_S,
        )
    error = refused.value.body
    assert isinstance(error, dict)
    assert error["type"] == "exceed_context_size_error"
    assert error["n_ctx"] == CONTEXT_SIZE // PARALLEL_SLOTS
    assert "context size" in error["message"]


# Nexus in front of two llama-servers -----------------------------------------------------------


def nexus_command(launcher: str) -> list[str]:
    if launcher == "binary":
        return [str(NEXUS_BINARY)]
    return [sys.executable, str(NEXUS_SCRIPT)]


def nexus_config(servers: list[LlamaServer]) -> str:
    """Static backends only, probed every second so a killed server is noticed quickly."""
    lines = [
        "[health_check]",
        "interval_seconds = 1",
        "timeout_seconds = 2",
        "",
        "[routing]",
        "max_retries = 2",
    ]
    for priority, server in enumerate(servers, start=1):
        lines += [
            "",
            "[[backends]]",
            f'name = "{server.name}"',
            f'url = "{server.url}"',
            'type = "llamacpp"',
            f"priority = {priority * 10}",
        ]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def running_nexus(
    launcher: str, servers: list[LlamaServer], workdir: Path
) -> Iterator[tuple[str, str]]:
    """`nexus serve` in front of the servers; yields (its URL, the model id it serves)."""
    config = workdir / "nexus.toml"
    config.write_text(nexus_config(servers))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = workdir / f"nexus-{launcher}.log"
    command = nexus_command(launcher)
    command += ["serve", "-c", str(config), "-p", str(port), "-H", "127.0.0.1", "--no-discovery"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "NEXUS_CONFIG": str(config)},
            cwd=workdir,
        )
    try:
        served = model_id(servers[0])
        deadline = time.monotonic() + NEXUS_READY_TIMEOUT_S
        while True:
            assert process.poll() is None, log_path.read_text(errors="replace")[-3000:]
            with contextlib.suppress(OSError, ValueError):
                status, body = http_get(url + "/v1/models", timeout=2.0)
                if status == 200 and served in [m["id"] for m in json.loads(body)["data"]]:
                    break
            assert time.monotonic() < deadline, (
                "Nexus did not list the model in time:\n"
                + log_path.read_text(errors="replace")[-3000:]
            )
            time.sleep(0.2)
        yield url, served
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


@pytest.fixture(
    scope="module",
    params=[
        "script",
        pytest.param(
            "binary",
            marks=[
                pytest.mark.binary,
                pytest.mark.skipif(not NEXUS_BINARY.exists(), reason="dist/nexus is not built"),
            ],
        ),
    ],
)
def nexus(
    request: pytest.FixtureRequest,
    llama_pair: list[LlamaServer],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, str]]:
    """Nexus (nexus.py, or the built dist/nexus) in front of the shared pair of llama-servers."""
    with running_nexus(request.param, llama_pair, tmp_path_factory.mktemp("nexus")) as served:
        yield served


def openai_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=url + "/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S
    )


def test_nexus_lists_the_real_model(
    nexus: tuple[str, str],
    llama_pair: list[LlamaServer],
) -> None:
    url, served = nexus
    listing = get_json(url + "/v1/models")
    entries = [m for m in listing["data"] if m["id"] == served]
    assert len(entries) == 1
    assert sorted(entries[0]["backends"]) == ["llama-a", "llama-b"]
    n_ctx = get_json(llama_pair[0].url + "/props")["default_generation_settings"]["n_ctx"]
    assert entries[0]["context_length"] == n_ctx
    assert [m.id for m in openai_client(url).models.list()].count(served) == 1


def test_nexus_chat_non_stream(nexus: tuple[str, str]) -> None:
    url, served = nexus
    raw = openai_client(url).chat.completions.with_raw_response.create(
        model=served, messages=PROMPT, max_tokens=MAX_TOKENS, temperature=0
    )
    answer = raw.parse()
    assert raw.headers["x-nexus-backend"] in ("llama-a", "llama-b")
    assert answer.model
    assert is_real_text(answer.choices[0].message.content)
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert_usage(answer.usage)


def test_nexus_chat_stream_with_usage(nexus: tuple[str, str]) -> None:
    url, served = nexus
    stream = openai_client(url).chat.completions.create(
        model=served,
        messages=PROMPT,
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert is_real_text(text)
    assert_usage(chunks[-1].usage)


def test_nexus_chat_stream_without_usage_has_none(nexus: tuple[str, str]) -> None:
    """Nexus may ask the backend for usage, but a client that did not ask never sees it."""
    url, served = nexus
    stream = openai_client(url).chat.completions.create(
        model=served, messages=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    chunks = list(stream)
    assert is_real_text("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)


def test_nexus_counts_the_engines_usage(nexus: tuple[str, str]) -> None:
    """The token counts Nexus records are the engine's own (backend numbers beat estimates),
    also for a stream whose client did not ask for usage."""
    url, served = nexus
    client = openai_client(url)
    raw = client.chat.completions.with_raw_response.create(
        model=served, messages=PROMPT, max_tokens=MAX_TOKENS, temperature=0
    )
    usage = raw.parse().usage
    assert usage is not None
    recent = {r["id"]: r for r in get_json(url + "/v1/stats")["recent"]}
    assert recent[raw.headers["x-request-id"]]["tokens"] == {
        "prompt": usage.prompt_tokens,
        "completion": usage.completion_tokens,
    }

    with client.chat.completions.with_streaming_response.create(
        model=served, messages=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=True
    ) as response:
        request_id = response.headers["x-request-id"]
        assert all(c.usage is None for c in response.parse())
    recent = {r["id"]: r for r in get_json(url + "/v1/stats")["recent"]}
    # temperature 0 and the same prompt: the same answer, so the same counts.
    assert recent[request_id]["tokens"] == {
        "prompt": usage.prompt_tokens,
        "completion": usage.completion_tokens,
    }


def test_nexus_anthropic_messages(nexus: tuple[str, str]) -> None:
    url, served = nexus
    client = anthropic.Anthropic(
        base_url=url, api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S
    )
    message = client.messages.create(model=served, max_tokens=MAX_TOKENS, messages=PROMPT)
    assert message.type == "message"
    assert message.role == "assistant"
    assert message.content[0].type == "text"
    assert is_real_text(message.content[0].text)
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.input_tokens > 0
    assert 0 < message.usage.output_tokens <= MAX_TOKENS


def test_nexus_anthropic_messages_stream(nexus: tuple[str, str]) -> None:
    url, served = nexus
    client = anthropic.Anthropic(
        base_url=url, api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S
    )
    with client.messages.stream(model=served, max_tokens=MAX_TOKENS, messages=PROMPT) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert is_real_text(text)
    assert final.content[0].text == text
    assert final.stop_reason in ("end_turn", "max_tokens")
    assert 0 < final.usage.output_tokens <= MAX_TOKENS


def test_nexus_answers_a_prompt_past_the_real_context_as_too_long(nexus: tuple[str, str]) -> None:
    """Past the engines' context by Nexus's own estimate: its 400, nothing sent. Under it by the
    estimate but past it by the engine's count (emoji are several tokens each): the engine's
    refusal, with the engine's sizes, in each door's words."""
    url, served = nexus
    per_slot = CONTEXT_SIZE // PARALLEL_SLOTS
    messages = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as caught:
        messages.messages.create(
            model=served,
            max_tokens=MAX_TOKENS,
            messages=[{"role": "user", "content": "word " * (2 * per_slot)}],
        )
    too_long = caught.value.body["error"]["message"]
    assert (
        too_long == f"prompt is too long: {2 * per_slot * 5 // 4 + 4} tokens > {per_slot} maximum"
    )

    emoji = [{"role": "user", "content": "\U0001f642" * (per_slot // 2)}]
    with pytest.raises(openai.BadRequestError) as refused:
        openai_client(url).chat.completions.create(
            model=served, messages=emoji, max_tokens=MAX_TOKENS
        )
    error = refused.value.body
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert error["context"]["context_length"] == per_slot
    assert error["context"]["prompt_tokens"] > per_slot  # the engine's count, not the estimate
    with (
        pytest.raises(anthropic.BadRequestError) as caught,
        messages.messages.stream(model=served, max_tokens=MAX_TOKENS, messages=emoji) as stream,
    ):
        "".join(stream.text_stream)
    prompt = error["context"]["prompt_tokens"]
    assert caught.value.body["error"]["message"] == (
        f"prompt is too long: {prompt} tokens > {per_slot} maximum"
    )


def test_nexus_fails_over_when_a_server_is_killed(
    fresh_llama_pair: list[LlamaServer],
    tmp_path: Path,
) -> None:
    """The preferred server dies: answers keep coming, from the other one, streamed or not."""
    first, second = fresh_llama_pair
    with running_nexus("script", fresh_llama_pair, tmp_path) as (url, served):
        client = openai_client(url)
        before = client.chat.completions.with_raw_response.create(
            model=served, messages=PROMPT, max_tokens=MAX_TOKENS, temperature=0
        )
        assert before.headers["x-nexus-backend"] == first.name

        first.kill()

        after = client.chat.completions.with_raw_response.create(
            model=served, messages=PROMPT, max_tokens=MAX_TOKENS, temperature=0
        )
        assert after.headers["x-nexus-backend"] == second.name
        assert is_real_text(after.parse().choices[0].message.content)
        assert_usage(after.parse().usage)

        with client.chat.completions.with_streaming_response.create(
            model=served,
            messages=PROMPT,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        ) as response:
            assert response.headers["x-nexus-backend"] == second.name
            chunks = list(response.parse())
        assert is_real_text("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
        assert_usage(chunks[-1].usage)


def test_engine_script_is_idempotent_and_quick_when_cached(llama_pair: list[LlamaServer]) -> None:
    """A second provisioning run finds everything in the cache and builds nothing."""
    started = time.monotonic()
    result = subprocess.run(
        ["bash", str(ROOT / "tests" / "engine.sh")],
        capture_output=True,
        timeout=120,
        check=True,
        cwd=ROOT,
    )
    assert time.monotonic() - started < 30
    assert "cached" in result.stderr.decode()
    assert b"LLAMA_SERVER=" in result.stdout and b"MODEL=" in result.stdout
