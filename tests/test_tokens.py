"""The tokenizer registry (SPEC §6): exact where it matters, lazy, and never for local-only
traffic."""

from __future__ import annotations

import aiohttp
import pytest
from conftest import backends_toml

import nexus


@pytest.mark.parametrize(
    ("backend_type", "model", "expected"),
    [
        ("openai", "gpt-4o", ("o200k_base", True)),
        ("openai", "gpt-4.1-mini", ("o200k_base", True)),
        ("openai", "o3", ("o200k_base", True)),
        ("openai", "gpt-5", ("o200k_base", True)),
        ("openai", "gpt-4", ("cl100k_base", True)),
        ("openai", "gpt-3.5-turbo", ("cl100k_base", True)),
        ("anthropic", "claude-sonnet-4-5", ("cl100k_base", False)),
        ("ollama", "llama3:8b", ("cl100k_base", False)),
        # A local server's model name says nothing certain about its tokenizer.
        ("vllm", "gpt-4o", ("cl100k_base", False)),
    ],
)
def test_tokenizer_registry(backend_type, model, expected):
    assert nexus.tokenizer_for(backend_type, model) == expected


async def test_local_only_traffic_never_loads_an_encoding(
    backend_factory, nexus_factory, monkeypatch
):
    monkeypatch.setattr(nexus, "_loaded_encodings", {})
    ollama = await backend_factory("ollama", {"llama3:8b": {"context": 64}}, name="gpu")
    vllm = await backend_factory("vllm", {"qwen": {"context": 8192}}, name="vl")
    nx = await nexus_factory(backends_toml(ollama, vllm))
    near_limit = "word " * 60  # about the context of llama3:8b here
    async with aiohttp.ClientSession() as session:
        for model in ("llama3:8b", "qwen"):
            for stream in (False, True):
                for text in ("hi", near_limit):
                    body = {
                        "model": model,
                        "messages": [{"role": "user", "content": text}],
                        "stream": stream,
                    }
                    url = nx.url + "/v1/chat/completions"
                    async with session.post(url, json=body) as resp:
                        await resp.read()
                        assert resp.headers.get("X-Nexus-Cost-Estimated", "0") == "0"
        body = {"model": "qwen", "prompt": "def f(", "stream": False}
        async with session.post(nx.url + "/v1/completions", json=body) as resp:
            assert resp.status == 200
        body = {"model": "qwen", "input": ["a", "b"]}
        async with session.post(nx.url + "/v1/embeddings", json=body) as resp:
            assert resp.status == 200
    assert nexus._loaded_encodings == {}


def test_chat_prompt_counted_as_openai_bills_it():
    payload = {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "Hello, world!"}]},
        ]
    }
    texts, framing = nexus.payload_texts("chat", payload)
    assert texts == ["system", "You are terse.", "user", "Hello, world!"]
    assert framing == 2 * nexus.CHAT_MESSAGE_TOKENS + nexus.CHAT_REPLY_TOKENS
    encoding = nexus.load_encoding("o200k_base")
    expected = sum(len(encoding.encode_ordinary(t)) for t in texts)
    assert nexus.count_texts(texts, "o200k_base") == expected


async def test_long_texts_are_counted_off_the_event_loop(monkeypatch):
    import threading

    seen: list[bool] = []
    original = nexus.count_texts

    def spy(texts, encoding):
        seen.append(threading.current_thread() is threading.main_thread())
        return original(texts, encoding)

    monkeypatch.setattr(nexus, "count_texts", spy)
    nexus.load_encoding("cl100k_base")
    assert await nexus.count_texts_async(["short"], "cl100k_base") == 1
    long_text = "token " * (nexus.EXACT_INLINE_CHARS // 5)
    assert await nexus.count_texts_async([long_text], "cl100k_base") > 1000
    assert seen == [True, False]


async def test_exact_count_decides_near_a_context_limit(backend_factory, nexus_factory):
    from conftest import cloud_env

    cloud = await backend_factory(
        "openai", {"gpt-4": {"context": 100}, "gpt-4-32k": {"context": 32768}}, name="oai"
    )
    toml = backends_toml(cloud) + '[routing]\nfallbacks = { "gpt-4" = ["gpt-4-32k"] }\n'
    nx = await nexus_factory(toml, env=cloud_env(cloud))
    encoding = nexus.load_encoding("cl100k_base")

    async def ask(text: str) -> str:
        body = {"model": "gpt-4", "messages": [{"role": "user", "content": text}]}
        url = nx.url + "/v1/chat/completions"
        async with aiohttp.ClientSession() as session, session.post(url, json=body) as resp:
            assert resp.status == 200, await resp.text()
        return cloud.received[-1][1]["model"]

    # 540 characters estimate to 135 tokens, over the context; exactly they are 90: it fits.
    words = " hello" * 90
    assert len(encoding.encode_ordinary(words)) == 90
    assert await ask(words) == "gpt-4"
    # 100 emoji estimate to 29 tokens, well inside; exactly they are far more: the larger model.
    emoji = "🎉" * 100
    assert len(encoding.encode_ordinary(emoji)) > 100
    assert await ask(emoji) == "gpt-4-32k"


RSS_SCRIPT = """
import gc, json, sys
sys.path.insert(0, sys.argv[1])

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024

import nexus
before = rss_mb()
count = nexus.count_tokens("Hello, world!", sys.argv[2])[0]
gc.collect()
print(json.dumps({"before": before, "after": rss_mb(), "count": count}))
"""


def rss_around_first_exact_count(model: str) -> dict:
    """RSS (MB) of a fresh process with Nexus imported, before and after its first exact count
    for the model: what loading that model's encoding costs."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    result = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(ROOT), model],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(result.stdout)


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="Linux only")
def test_memory_of_the_first_exact_count():
    o200k = rss_around_first_exact_count("gpt-4o")
    cl100k = rss_around_first_exact_count("gpt-4")
    assert o200k["count"] == 4 and cl100k["count"] == 4
    # Tens of MB, as SPEC §9 says; the Python copy of the ranks is not kept.
    assert o200k["after"] - o200k["before"] < 60
    assert cl100k["after"] - cl100k["before"] < 40
