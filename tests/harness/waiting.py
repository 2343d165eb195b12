"""The one way a test waits: poll a condition until it holds, never sleep for a guessed time."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")

# Short enough that a test does not idle once its condition holds, long enough that polling a
# log file or an HTTP endpoint does not steal a core from the processes under test.
INTERVAL_S = 0.1


def _holds(value: object) -> bool:
    # None and False mean "not yet"; 0, "" and [] are answers a probe may well return.
    return value is not None and value is not False


def _expired(message: str, timeout: float, last: BaseException | None) -> TimeoutError:
    detail = f"; last check: {last}" if last is not None else ""
    return TimeoutError(f"not true after {timeout} s: {message}{detail}")


def eventually(
    condition: Callable[[], T | None],
    *,
    timeout: float = 60.0,
    message: str = "condition",
    interval: float = INTERVAL_S,
) -> T:
    """Call ``condition`` until it returns something other than None/False, and return that.

    An AssertionError from ``condition`` means "not yet" (its text is reported on timeout);
    any other exception (a process that exited) ends the wait at once.
    """
    deadline = time.monotonic() + timeout
    last: AssertionError | None = None
    while True:
        try:
            value = condition()
            if _holds(value):
                return value  # type: ignore[return-value]
        except AssertionError as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise _expired(message, timeout, last)
        time.sleep(interval)


@overload
async def eventually_async(
    condition: Callable[[], Awaitable[T | None]],
    *,
    timeout: float = ...,
    message: str = ...,
    interval: float = ...,
) -> T: ...


@overload
async def eventually_async(
    condition: Callable[[], T | None],
    *,
    timeout: float = ...,
    message: str = ...,
    interval: float = ...,
) -> T: ...


async def eventually_async(
    condition: Callable[[], Any],
    *,
    timeout: float = 60.0,
    message: str = "condition",
    interval: float = INTERVAL_S,
) -> Any:
    """:func:`eventually` for a test running an event loop; ``condition`` may be a coroutine
    function. It yields to the loop between checks, so the tasks it waits on make progress."""
    deadline = time.monotonic() + timeout
    last: AssertionError | None = None
    while True:
        try:
            value = condition()
            if inspect.isawaitable(value):
                value = await value
            if _holds(value):
                return value
        except AssertionError as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise _expired(message, timeout, last)
        await asyncio.sleep(interval)
