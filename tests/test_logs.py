"""Logs (SPEC §7), read from a real `nexus serve` process: one line per inference request with
its metadata, JSON lines that all parse, no prompt or answer text unless `log_content = true`,
and never a key: not in a log line, not in any page Nexus serves."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import re
import secrets
import signal
import sys
import textwrap

import aiohttp
import pytest
from aiohttp import web
from conftest import ROOT, backends_toml, free_port

import nexus

NEXUS = [sys.executable, str(ROOT / "nexus.py")]
REQUEST_FIELDS = (
    "request_id",
    "model",
    "backend",
    "status",
    "latency_ms",
    "prompt_tokens",
    "completion_tokens",
    "route_reason",
    "retries",
)


class Served:
    """`nexus serve` as a process, its stderr read as it comes (a full pipe would stall it)."""

    def __init__(self, proc: asyncio.subprocess.Process, url: str) -> None:
        self.proc = proc
        self.url = url
        self.stderr = asyncio.create_task(proc.stderr.read())

    async def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(self.proc.wait(), 20) == 0
        return (await asyncio.wait_for(self.stderr, 5)).decode()


async def serve(tmp_path, config: str, env: dict[str, str], *flags: str) -> Served:
    path = tmp_path / "nexus.toml"
    path.write_text(config)
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *NEXUS,
        "serve",
        "-c",
        str(path),
        "-p",
        str(port),
        "-H",
        "127.0.0.1",
        "--no-discovery",
        *flags,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **env},
    )
    served = Served(proc, f"http://127.0.0.1:{port}")
    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            try:
                async with session.get(served.url + "/health") as resp:
                    if (await resp.json())["backends"]["healthy"] == 4:
                        return served
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    proc.kill()
    raise AssertionError("nexus did not become ready: " + (await served.stop()))


class Lab:
    """Three mock backends behind one Nexus: a local one, one that fails, and a cloud-style one
    whose key comes from the environment, plus the secrets and markers the checks look for."""

    def __init__(self) -> None:
        self.key = "sk-test-" + secrets.token_hex(16)  # the backend's key, from the environment
        self.client_key = "sk-client-" + secrets.token_hex(16)  # what a client sends
        self.prompt = "PROMPT-" + secrets.token_hex(6)
        self.answer = "ANSWER-" + secrets.token_hex(6)
        self.env = {
            "NEXUS_TEST_SECRET": self.key,
            "NEXUS_TEST_CLOUD_SECRET": self.key + "-c",
            "NEXUS_TEST_ANTHROPIC_SECRET": self.key + "-a",
        }

    async def start(self, backend_factory) -> None:
        self.local = await backend_factory("generic", {"m": {}}, name="local")
        self.local.reply = f"{self.answer} is the answer"
        self.broken = await backend_factory("vllm", {"flaky": {}}, name="broken")
        self.cloud = await backend_factory("openai", {"cloud-m": {}}, name="cloud")
        self.cloud.reply = f"{self.answer} from the cloud"
        self.cloud.api_key = self.key + "-c"  # the mock refuses any other
        self.claude = await backend_factory("anthropic", {"claude-m": {}}, name="claude")
        self.claude.reply = f"{self.answer} from Claude"
        self.claude.api_key = self.key + "-a"

    def config(self, extra: str = "") -> str:
        return extra + textwrap.dedent(f"""
            [[backends]]
            name = "local"
            url = "{self.local.url}"
            type = "generic"
            api_key_env = "NEXUS_TEST_SECRET"

            [[backends]]
            name = "broken"
            url = "{self.broken.url}"
            type = "vllm"

            [[backends]]
            name = "cloud"
            url = "{self.cloud.url}"
            type = "openai"
            api_key_env = "NEXUS_TEST_CLOUD_SECRET"

            [[backends]]
            name = "claude"
            url = "{self.claude.url}"
            type = "anthropic"
            api_key_env = "NEXUS_TEST_ANTHROPIC_SECRET"
            """)

    def secrets(self) -> tuple[str, ...]:
        return (self.key, self.key + "-c", self.key + "-a", self.client_key)

    async def exercise(self, url: str) -> tuple[dict[str, int], list[str]]:
        """Send one request of each kind; returns {request id: status} and every body seen."""

        async def fail(request: web.Request, body: dict) -> web.Response:
            return web.json_response({"error": "out of memory"}, status=500)

        self.broken.behaviours = [fail] * 5
        said = [{"role": "user", "content": f"Please repeat {self.prompt} back"}]
        requests = [
            ("/v1/chat/completions", {"model": "m", "messages": said}, 200),
            ("/v1/chat/completions", {"model": "m", "messages": said, "stream": True}, 200),
            ("/v1/completions", {"model": "m", "prompt": self.prompt}, 200),
            ("/v1/embeddings", {"model": "m", "input": self.prompt}, 200),
            ("/v1/chat/completions", {"model": "cloud-m", "messages": said}, 200),
            ("/v1/chat/completions", {"model": "nope", "messages": said}, 404),
            ("/v1/chat/completions", {"model": "flaky", "messages": said}, 502),
            ("/v1/chat/completions", f'{{"model": "m", "{self.prompt}', 400),
            ("/v1/messages", {"model": "m", "max_tokens": 64, "messages": said}, 200),
            ("/v1/messages", {"model": "m", "messages": said}, 400),
            ("/v1/chat/completions", {"model": "claude-m", "messages": said}, 200),
            ("/v1/messages", {"model": "claude-m", "max_tokens": 64, "messages": said}, 200),
        ]
        headers = {"Authorization": f"Bearer {self.client_key}"}
        seen: dict[str, int] = {}
        bodies: list[str] = []
        async with aiohttp.ClientSession(headers=headers) as session:
            for path, payload, status in requests:
                kw = {"json": payload} if isinstance(payload, dict) else {"data": payload}
                async with session.post(url + path, **kw) as resp:
                    assert resp.status == status, (path, payload, await resp.text())
                    seen[resp.headers["X-Request-Id"]] = status
                    bodies.append(await resp.text() + json.dumps(dict(resp.headers)))
            for path in ("/v1/stats", "/v1/backends", "/v1/models", "/health", "/metrics", "/"):
                async with session.get(url + path) as resp:
                    assert resp.status == 200, path
                    bodies.append(await resp.text())
        # The client's key is Nexus's business, never a backend's.
        for backend in (self.local, self.broken, self.cloud, self.claude):
            for _, _, got in backend.received:
                assert self.client_key not in json.dumps(got)
        return seen, bodies


@pytest.fixture
async def lab(backend_factory) -> Lab:
    lab = Lab()
    await lab.start(backend_factory)
    return lab


async def test_json_logs_one_line_per_request_no_content_no_keys(lab, tmp_path):
    # Debug level, and still no content: log_content is off by default.
    served = await serve(tmp_path, lab.config(), lab.env, "--log-format", "json", "-l", "debug")
    seen, bodies = await lab.exercise(served.url)
    stderr = await served.stop()

    lines = [json.loads(line) for line in stderr.splitlines()]  # every line is one JSON object
    assert all(isinstance(line, dict) for line in lines)
    assert all({"time", "level", "message"} <= line.keys() for line in lines)
    assert all(
        re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"]) for line in lines
    )
    listening = [line["message"] for line in lines if "listening on" in line["message"]]
    # uvloop wherever it is built (not Windows): the standard loop costs more per request.
    assert listening and listening[0].endswith(
        "asyncio loop)" if sys.platform == "win32" else "uvloop)"
    )
    assert lines[-1]["message"] == "stopped"

    per_request = [line for line in lines if "latency_ms" in line]  # the request lines
    assert collections.Counter(line["request_id"] for line in per_request) == dict.fromkeys(seen, 1)
    by_id = {line["request_id"]: line for line in per_request}
    for request_id, status in seen.items():
        line = by_id[request_id]
        assert set(REQUEST_FIELDS) <= line.keys()
        assert line["status"] == status and line["level"] == "info"
        assert line["logger"] == "nexus"
        assert line["latency_ms"] >= 0
    (chat, stream, completion, embedding, cloud, unknown, failed, bad, anthropic, refused) = (
        by_id[i] for i in list(seen)[:10]
    )
    claude, claude_native = (by_id[i] for i in list(seen)[10:])
    assert chat["model"] == "m" and chat["backend"] == "local"
    assert stream["model"] == "m" and stream["backend"] == "local"
    assert chat["route_reason"] == "capability-match" and chat["retries"] == 0
    assert (chat["prompt_tokens"], chat["completion_tokens"]) == (10, 4)
    assert completion["prompt_tokens"] == 3 and embedding["prompt_tokens"] == 2
    assert cloud["backend"] == "cloud" and cloud["completion_tokens"] == 4
    assert unknown["model"] == "nope" and unknown["backend"] is None
    assert failed["backend"] == "broken"
    assert bad["model"] == ""
    assert anthropic["model"] == "m" and anthropic["backend"] == "local"
    assert refused["status"] == 400
    assert claude["backend"] == "claude" and claude["model"] == "claude-m"
    assert claude_native["backend"] == "claude" and claude_native["completion_tokens"]

    everything = stderr + "".join(bodies)
    for secret in lab.secrets():
        assert secret not in everything
    assert lab.prompt not in stderr
    assert lab.answer not in stderr
    assert not any(line["message"].startswith("content ") for line in lines)
    # The cloud backends really were sent their keys (they refuse any other), so there were
    # keys to leak.
    assert lab.cloud.auth_failures == 0 and lab.claude.auth_failures == 0
    assert lab.cloud.received and lab.claude.received


async def test_pretty_logs_one_line_per_request_no_content_no_keys(lab, tmp_path):
    served = await serve(tmp_path, lab.config(), lab.env)
    seen, bodies = await lab.exercise(served.url)
    stderr = await served.stop()
    lines = stderr.splitlines()
    for request_id, status in seen.items():
        mine = [line for line in lines if f"request {request_id} " in line]
        assert len(mine) == 1, mine
        assert f"status={status} " in mine[0] and "latency_ms=" in mine[0]
        assert "reason=" in mine[0] and "retries=" in mine[0] and "tokens=" in mine[0]
        # laid out like every other line: local time to the millisecond, then the level
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO    request ", mine[0])
    listening = next(line for line in lines if "listening on" in line)
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO    Nexus ", listening)
    assert not any(line.lstrip().startswith("{") for line in lines)
    for secret in lab.secrets():
        assert secret not in stderr + "".join(bodies)
    assert lab.prompt not in stderr and lab.answer not in stderr


async def test_log_content_on_logs_prompt_and_answer_at_debug_never_keys(lab, tmp_path):
    config = lab.config("[logging]\nlog_content = true\n")
    served = await serve(tmp_path, config, lab.env, "--log-format", "json", "-l", "debug")
    seen, bodies = await lab.exercise(served.url)
    stderr = await served.stop()
    lines = [json.loads(line) for line in stderr.splitlines()]
    content = {line["request_id"]: line for line in lines if line["message"].startswith("content ")}
    chat_id, stream_id = list(seen)[:2]
    assert content[chat_id]["level"] == "debug"
    assert lab.prompt in json.dumps(content[chat_id]["prompt"])
    assert content[chat_id]["answer"] == f"{lab.answer} is the answer"
    assert lab.prompt in json.dumps(content[stream_id]["prompt"])
    assert content[stream_id]["answer"] is None  # a stream is relayed, never kept
    anthropic_id = list(seen)[8]
    assert lab.prompt in json.dumps(content[anthropic_id]["prompt"])
    assert content[anthropic_id]["answer"] == f"{lab.answer} is the answer"
    native_id = list(seen)[11]
    assert content[native_id]["answer"] == f"{lab.answer} from Claude"
    for secret in lab.secrets():
        assert secret not in stderr + "".join(bodies)


async def test_log_content_on_but_info_level_logs_no_content(lab, tmp_path):
    config = lab.config("[logging]\nlog_content = true\n")
    served = await serve(tmp_path, config, lab.env, "--log-format", "json")
    await lab.exercise(served.url)
    stderr = await served.stop()
    assert lab.prompt not in stderr and lab.answer not in stderr


async def test_foreign_log_lines_are_json_and_a_key_in_one_is_redacted(lab, tmp_path):
    """Lines from other libraries go through the same formatter, and a key that ends up in any
    message (here: in a backend URL that a failing request names) is masked."""
    served = await serve(tmp_path, lab.config(), lab.env, "--log-format", "json", "-l", "debug")
    async with aiohttp.ClientSession() as session:
        # A malformed HTTP request makes aiohttp's server log on its own logger.
        reader, writer = await asyncio.open_connection("127.0.0.1", int(served.url.rsplit(":")[-1]))
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        await asyncio.wait_for(reader.read(), 5)
        writer.close()
        # An admin-added backend whose URL carries the key: the answer may name it, logs never.
        async with session.post(
            served.url + "/v1/backends",
            json={"url": f"http://127.0.0.1:1/{lab.key}", "type": "generic", "name": "leaky"},
        ) as resp:
            assert resp.status in (201, 400)
    stderr = await served.stop()
    lines = [json.loads(line) for line in stderr.splitlines()]
    assert "aiohttp.server" in {line["logger"] for line in lines}
    assert lab.key not in stderr


async def test_client_leaving_mid_stream_is_logged_once(backend_factory, nexus_factory, caplog):
    backend = await backend_factory("generic", {"m": {}})
    backend.reply = "one two three four five six"
    backend.chunk_delay = 0.2
    nx = await nexus_factory(backends_toml(backend))
    caplog.set_level(logging.INFO, logger="nexus")
    payload = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
    async with aiohttp.ClientSession() as session:
        resp = await session.post(nx.url + "/v1/chat/completions", json=payload)
        request_id = resp.headers["X-Request-Id"]
        await resp.content.readline()  # the first chunk arrived; now the client goes away
        resp.close()
    mine: list[logging.LogRecord] = []
    for _ in range(100):
        mine = [r for r in caplog.records if request_id in r.getMessage()]
        if mine:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # room for a second line, if there were one
    mine = [r for r in caplog.records if request_id in r.getMessage()]
    assert len(mine) == 1
    assert mine[0].fields["status"] == 499
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_bad_setting_is_one_json_line_in_json_mode(tmp_path):
    config = tmp_path / "nexus.toml"
    config.write_text("[server]\nport = 70000\n")
    proc = await asyncio.create_subprocess_exec(
        *NEXUS, "serve", "-c", str(config), "--log-format", "json", stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    lines = err.decode().splitlines()
    assert len(lines) == 1
    line = json.loads(lines[0])
    assert line["level"] == "error" and "server.port" in line["message"]


def test_json_formatter_never_breaks_a_line():
    """A library's malformed log call or an odd field still gives one JSON object on one line."""
    formatter = nexus.RedactingFormatter(nexus.JsonLogFormatter(), ["sk-secret-value"])
    bad_args = logging.LogRecord("lib", logging.WARNING, "f.py", 1, "a %s %s", ("x",), None)
    odd = logging.LogRecord("nexus", logging.INFO, "f.py", 1, "key sk-secret-value\nend", (), None)
    odd.fields = {"when": {1, 2}}
    for record in (bad_args, odd):
        text = formatter.format(record)
        assert "\n" not in text and "sk-secret-value" not in text
        assert json.loads(text)["logger"] == record.name


async def test_with_auth_the_key_name_is_logged_never_the_key(lab, tmp_path):
    config = lab.config(
        '[auth]\napi_keys = [{ name = "alice", key_env = "NEXUS_TEST_CLIENT_KEY" }]\n'
    )
    env = {**lab.env, "NEXUS_TEST_CLIENT_KEY": lab.client_key}
    served = await serve(tmp_path, config, env, "--log-format", "json")
    said = [{"role": "user", "content": lab.prompt}]
    seen: dict[str, int] = {}
    bodies = []
    async with aiohttp.ClientSession() as session:
        for key, status in ((lab.client_key, 200), (lab.client_key + "x", 401), (None, 401)):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            async with session.post(
                served.url + "/v1/chat/completions",
                json={"model": "m", "messages": said},
                headers=headers,
            ) as resp:
                assert resp.status == status
                seen[resp.headers["X-Request-Id"]] = status
                bodies.append(await resp.text() + json.dumps(dict(resp.headers)))
        for path in ("/metrics", "/v1/stats"):
            async with session.get(served.url + path) as resp:
                bodies.append(await resp.text())
    stderr = await served.stop()
    lines = [json.loads(line) for line in stderr.splitlines()]
    per_request = [line for line in lines if "latency_ms" in line]  # the request lines
    assert {line["request_id"]: line["status"] for line in per_request} == seen
    assert len(per_request) == len(seen)
    assert per_request[0]["key"] == "alice"
    for secret in lab.secrets():
        assert secret not in stderr + "".join(bodies)
    assert lab.prompt not in stderr
