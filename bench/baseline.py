"""The baseline: the "notebook design" that sumstream is measured against.

One ASGI endpoint calls the model through the anthropic SDK and relays the stream as SSE,
with the same ``token`` / ``done`` event shapes as sumstream's gateway so one client measures
both. It is written the way a minimal service usually is: SDK defaults (two retries with
backoff that honours ``retry-after``), no queue, no admission, no error event: when the SDK
raises mid-request the response simply ends, which is what clients of such a service see.

    python -m bench.baseline --port 8100 --sim-url http://127.0.0.1:8088
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from anthropic import AsyncAnthropic
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

MODEL = "claude-haiku-4-5"
DEFAULT_MAX_TOKENS = 1024


def prompt(document: str) -> str:
    """The user message: the document inside ``<document>`` tags, as sumstream's prompt has it."""
    return f"Summarize the following document.\n\n<document>\n{document}\n</document>"


def create_app(sim_url: str, *, model: str = MODEL) -> Starlette:
    """The baseline ASGI app calling the Anthropic-compatible API at ``sim_url``."""
    state: dict[str, AsyncAnthropic] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        client = AsyncAnthropic(base_url=sim_url, api_key="baseline")
        state["client"] = client
        try:
            yield
        finally:
            await client.close()

    async def summaries(request: Request) -> Response:
        body = await request.json()
        document = str(body["document"])
        max_tokens = int(body.get("max_output_tokens") or DEFAULT_MAX_TOKENS)
        started = time.perf_counter()

        async def events() -> AsyncIterator[dict[str, Any]]:
            parts: list[str] = []
            first_token_ms: float | None = None
            async with state["client"].messages.stream(
                model=model,
                max_tokens=max_tokens,
                messages=[{"role": "user", "content": prompt(document)}],
            ) as stream:
                async for text in stream.text_stream:
                    if first_token_ms is None:
                        first_token_ms = (time.perf_counter() - started) * 1000.0
                    parts.append(text)
                    seq = len(parts)
                    yield {
                        "event": "token",
                        "id": str(seq),
                        "data": _dumps({"text": text, "seq": seq}),
                    }
                final = await stream.get_final_message()
            done = {
                "status": "DONE",
                "summary": "".join(parts),
                "usage": {
                    "input_tokens": final.usage.input_tokens,
                    "output_tokens": final.usage.output_tokens,
                },
                "latency": {
                    "first_token_ms": first_token_ms,
                    "total_ms": (time.perf_counter() - started) * 1000.0,
                },
            }
            yield {"event": "done", "data": _dumps(done)}

        return EventSourceResponse(events())

    async def healthz(_request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/v1/summaries", summaries, methods=["POST"]),
            Route("/healthz", healthz),
        ],
        lifespan=lifespan,
    )


def _dumps(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--sim-url", default="http://127.0.0.1:8088")
    args = parser.parse_args()
    uvicorn.run(
        create_app(args.sim_url),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
