"""Server-sent events: the stream a worker thread produces, handed to the event loop that sends it."""

from __future__ import annotations

import asyncio
import json


class StreamSink:
    """The worker puts (kind, value) events; the response's generator awaits them. `closed` is set
    when the client has gone, so the worker stops generating for nobody."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.closed = False

    def put(self, kind: str, value=None) -> None:
        if not self.closed:
            try:
                self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
            except RuntimeError:       # the loop has shut down
                self.closed = True


def event(data: dict) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


DONE = b"data: [DONE]\n\n"
