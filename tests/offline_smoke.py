"""The built executable used as a user would, on a machine with no network: run by
tests/test_binary.py inside a network namespace that has only loopback.

    python tests/offline_smoke.py NEXUS_EXECUTABLE WORKDIR

Starts a mock OpenAI-style server (a local model "m", and "gpt-4o" as a cloud OpenAI backend
that reports no usage, so Nexus must count its tokens itself), starts the executable in front
of it, lists models and completes chats (stream and not) with the openai SDK, then stops it
with SIGTERM. Prints one JSON report line; the test judges it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import aiohttp
import openai
from aiohttp import web

KEY = "sk-offline-smoke-0123456789"
PROMPT = "Count these words exactly, offline: naïve café, 1234 tokens?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def mock_backend(port: int, model: str, key: str | None) -> web.AppRunner:
    """A server for one model; with a key, it refuses any request without that Bearer key."""
    cloud = key is not None

    def refused(request: web.Request) -> bool:
        return cloud and request.headers.get("Authorization") != f"Bearer {key}"

    async def models(request: web.Request) -> web.Response:
        if refused(request):
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        data = [{"id": model, "object": "model", "owned_by": "mock"}]
        return web.json_response({"object": "list", "data": data})

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if refused(request):
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        words = ["Hello", " from", " the", " mock"]
        if not body.get("stream"):
            answer = {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(words)},
                        "finish_reason": "stop",
                    }
                ],
            }
            if not cloud:
                answer["usage"] = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
            return web.json_response(answer)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for word in [*words, None]:
            chunk = {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "delta": {"content": word} if word else {},
                        "finish_reason": None if word else "stop",
                    }
                ],
            }
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def main(executable: str, workdir: Path) -> dict:
    local_port, cloud_port, nexus_port = free_port(), free_port(), free_port()
    runners = [
        await mock_backend(local_port, "m", None),
        await mock_backend(cloud_port, "gpt-4o", KEY),
    ]
    config = workdir / "nexus.toml"
    config.write_text(
        f'[[backends]]\nname = "local"\nurl = "http://127.0.0.1:{local_port}"\n'
        'type = "generic"\n'
        f'[[backends]]\nname = "cloud"\nurl = "http://127.0.0.1:{cloud_port}/v1"\n'
        'type = "openai"\napi_key_env = "SMOKE_OPENAI_KEY"\n'
    )
    tmp = workdir / "tmp"
    tmp.mkdir()
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        executable,
        "serve",
        "-c",
        str(config),
        "-p",
        str(nexus_port),
        "--no-discovery",
        env={**os.environ, "TMPDIR": str(tmp), "SMOKE_OPENAI_KEY": KEY},
        stderr=asyncio.subprocess.PIPE,
    )
    report: dict = {}
    client = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{nexus_port}/v1", api_key="unused", max_retries=0
    )
    try:
        for _ in range(300):  # up to 30 s for both backends to be listed
            try:
                listed = sorted(m.id for m in (await client.models.list()).data)
                if listed == ["gpt-4o", "m"]:
                    break
            except openai.APIConnectionError:
                pass
            await asyncio.sleep(0.1)
        report["start_to_models_s"] = round(time.monotonic() - started, 3)
        report["models"] = sorted(m.id for m in (await client.models.list()).data)
        answer = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}]
        )
        report["chat"] = answer.choices[0].message.content
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        report["stream"] = "".join(
            [c.choices[0].delta.content or "" async for c in stream if c.choices]
        )
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=[{"role": "user", "content": PROMPT}]
        )
        report["cloud_chat"] = raw.parse().choices[0].message.content
        report["cloud_cost"] = raw.headers.get("X-Nexus-Cost-Estimated")
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{nexus_port}/v1/stats") as resp,
        ):
            stats = await resp.json()
        report["cloud_tokens"] = stats["recent"][-1]["tokens"]
        report["unpacked_while_running"] = len(list(tmp.iterdir()))
    finally:
        await client.close()
        proc.send_signal(signal.SIGTERM)
        report["exit"] = await asyncio.wait_for(proc.wait(), 30)
        stderr = (await proc.stderr.read()).decode(errors="replace")
        report["traceback"] = "Traceback" in stderr
        report["key_in_logs"] = KEY in stderr
        report["unpacked_after_exit"] = len(list(tmp.iterdir()))
        for runner in runners:
            await runner.cleanup()
    return report


if __name__ == "__main__":
    result = asyncio.run(main(sys.argv[1], Path(sys.argv[2])))
    print(json.dumps(result))
