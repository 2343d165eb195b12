"""When each token frame of a simulated stream goes out: the first after ``ttft_ms``, then one
every ``token_delay_ms``, on a fixed schedule that a loaded server catches up on."""

from __future__ import annotations

import asyncio

from pipeline.core.settings import SimulatorSettings
from pipeline.llm.simulator import asgi
from pipeline.llm.simulator.asgi import Send
from pipeline.llm.simulator.stats import StreamRecord


async def pace(
    send: Send, frames: list[bytes], knobs: SimulatorSettings, stream: StreamRecord
) -> None:
    """Send token frames on schedule: the first after ttft, then one every token_delay."""
    loop = asyncio.get_running_loop()
    delay = knobs.token_delay_ms / 1000
    first = loop.time() + knobs.ttft_ms / 1000
    if not frames:
        await asyncio.sleep(knobs.ttft_ms / 1000)
    sent = 0
    while sent < len(frames):
        wait = first + sent * delay - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        # Everything due by now goes in one write, so a loaded server catches up on its
        # schedule instead of drifting behind it one sleep at a time.
        due = len(frames) if delay == 0 else int((loop.time() - first) / delay) + 1
        end = min(len(frames), max(sent + 1, due))
        await asgi.send_body(send, b"".join(frames[sent:end]), more=True)
        stream.tokens = sent = end
