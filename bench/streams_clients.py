"""A load client of bench/streams_fanout.py: holds many SSE connections, records latencies.

Each event's SSE ``id`` is its Redis Stream id, whose first part is Redis's clock (ms) when it
accepted the event; the client records ``now - that`` for every event it receives: the hub's
part alone, not the event's wait in a publisher. Run by the orchestrator, which reads
``CONNECTED <n> <failed>`` on stdout, then writes ``STOP`` on stdin; the client then writes its
latencies (array of doubles) to ``--out`` and a JSON summary line to stdout.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import json
import sys
import time

import uvloop

ID = b"id: "  # a frame's first line; the bench's events hold no "id: " in their data


class Client(asyncio.Protocol):
    __slots__ = ("buf", "closed", "latencies", "ready", "request", "transport")

    def __init__(
        self, request: bytes, latencies: array.array[float], ready: asyncio.Future[None]
    ) -> None:
        self.request = request
        self.latencies = latencies
        self.ready = ready
        self.buf = b""
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        now = time.time()
        if not self.ready.done():
            self.ready.set_result(None)
        buf = self.buf + data if self.buf else data
        # The end of the last complete event ("\n\n", or "\r\n\r\n" from sse-starlette).
        end = max(buf.rfind(b"\n\n") + 2, buf.rfind(b"\r\n\r\n") + 4)
        if end < 4:
            self.buf = buf
            return
        chunk, self.buf = buf[:end], buf[end:]
        i = chunk.find(ID)
        while i != -1:
            j = chunk.find(b"-", i)
            self.latencies.append(now - int(chunk[i + 4 : j]) / 1000)
            i = chunk.find(ID, j)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("closed before the first byte"))


async def run(args: argparse.Namespace) -> tuple[array.array[float], int]:
    loop = asyncio.get_running_loop()
    latencies: array.array[float] = array.array("d")
    clients: list[Client] = []
    gate = asyncio.Semaphore(200)
    failed = 0

    async def open_one(index: int) -> None:
        nonlocal failed
        topic = f"{args.topic_prefix}{(args.offset + index) % args.topics}"
        request = f"GET /t/{topic}/events HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
        client = Client(request, latencies, loop.create_future())
        async with gate:
            try:
                await loop.create_connection(lambda: client, "127.0.0.1", args.port)
                await asyncio.wait_for(client.ready, 60)
                clients.append(client)
            except (OSError, TimeoutError, ConnectionError):
                failed += 1

    await asyncio.gather(*(open_one(i) for i in range(args.connections)))
    print(f"CONNECTED {len(clients)} {failed}", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    return latencies, sum(client.closed for client in clients)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, required=True)
    parser.add_argument("--topics", type=int, default=1)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--topic-prefix", default="b")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    latencies, closed = uvloop.run(run(args))
    with open(args.out, "wb") as out:
        latencies.tofile(out)
    print(json.dumps({"events": len(latencies), "closed": closed}), flush=True)


if __name__ == "__main__":
    main()
