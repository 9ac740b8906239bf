"""A request's events, from the thread that makes them (the text engine, the image or the
speech worker) into the request's event loop; and their end when the server stops."""
from __future__ import annotations

import asyncio

from cake.server.errors import APIError

_END = object()  # put by end(): the server stops and waits no longer


DRAINING = "the server is shutting down; try again elsewhere or later"


class ShuttingDown(APIError):
    def __init__(self):
        super().__init__(503, DRAINING)


class EventQueue:
    def __init__(self, state):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        state.event_queues.add(self)  # a WeakSet: the request's end drops it

    def put(self, event) -> None:
        """From any thread."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    def put_for(self, index: int):
        """A callback that tags events with the choice they belong to (n > 1)."""
        return lambda event: self.put((index, event))

    def end(self) -> None:
        """From any thread: the waiting request raises ShuttingDown."""
        self.put(_END)

    async def get(self):
        event = await self.queue.get()
        if event is _END:
            raise ShuttingDown()
        return event
