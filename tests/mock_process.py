"""One MockBackend in a process of its own, so a test can kill it for real (SIGKILL).

    python tests/mock_process.py NAME PORT CHUNK_DELAY REPLY [DIE_WHEN_BUSY]

Serves the generic OpenAI API for model "m" on 127.0.0.1:PORT with a deep accept queue,
prints "ready" once it listens, and exits by itself after LIFETIME_SECONDS at the latest.
With DIE_WHEN_BUSY, it kills itself (SIGKILL, no goodbye on any socket) shortly after that
many requests are in flight on it, so answers are cut mid-stream at a point the test knows.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import MockBackend

LIFETIME_SECONDS = 180.0
DIE_DELAY_SECONDS = 0.3  # after the threshold: long enough for the answers to be under way


async def serve(name: str, port: int, chunk_delay: float, reply: str, die_when_busy: int) -> None:
    backend = MockBackend("generic", {"m": {}}, name)
    backend.chunk_delay = chunk_delay
    backend.reply = reply
    runner = web.AppRunner(backend.build_app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    print("ready", flush=True)
    deadline = time.monotonic() + LIFETIME_SECONDS
    while time.monotonic() < deadline:
        if die_when_busy and backend.in_flight >= die_when_busy:
            await asyncio.sleep(DIE_DELAY_SECONDS)
            os.kill(os.getpid(), signal.SIGKILL)
        await asyncio.sleep(0.01)
    await runner.cleanup()


if __name__ == "__main__":
    die_when_busy = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    asyncio.run(
        serve(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], die_when_busy)
    )
