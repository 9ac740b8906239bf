"""Blocking (non-streamed) requests: wait for the result unless the client leaves first, in
which case its work is cancelled so a departed client costs nothing more."""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

from fastapi import Request


class ClientGone(Exception):
    """The client disconnected before its result was ready (answered 499)."""


async def wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def result_unless_gone(request: Request, work: Awaitable, cancel: Callable[[], None]):
    """The result of work; if the client disconnects first, call cancel() and raise
    ClientGone."""
    result = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(wait_disconnect(request))
    try:
        await asyncio.wait([result, gone], return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not result.done():
            cancel()
            result.cancel()
            result.add_done_callback(lambda f: f.cancelled() or f.exception())  # no warning
    if not result.done() or result.cancelled():
        raise ClientGone()
    return result.result()
