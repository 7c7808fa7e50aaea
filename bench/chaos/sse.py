"""SSE clients that read as a browser's EventSource does: they reconnect with Last-Event-ID,
wait what `retry:` says, stop on 204, and here also drop the connection at random."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass, field

import httpx

__all__ = ["Received", "SseClient"]

_TERMINAL = frozenset({"operation.completed", "operation.failed", "operation.cancelled"})


@dataclass(frozen=True)
class Received:
    """One event as the client saw it; `asked` is the Last-Event-ID of its connection."""

    id: str
    type: str
    asked: str | None


@dataclass
class SseClient:
    """Follows `path` (`/v1/events` or an operation's stream) through the load balancer."""

    base_url: str
    path: str
    api_key: str
    topic: str
    rng: random.Random
    mean_drop_seconds: float = 8.0
    log: list[Received] = field(default_factory=list)
    connections: int = 0
    reconnects: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    finished: bool = False  # answered 204: the stream has said its last word
    last_id: str | None = None
    retry_ms: int = 1000
    # Wall clock (as Stream ids) of the 200 of its latest connection without Last-Event-ID:
    # what it is owed starts there (a browser with no id to resume from starts afresh).
    opened_ms: int | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def operation(self) -> bool:
        return self.topic.startswith("op:")

    def stop(self) -> None:
        self._stop.set()

    def _count(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1

    async def run(self) -> None:
        async with httpx.AsyncClient(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {self.api_key}"},
            timeout=httpx.Timeout(10.0, read=35.0),  # keep-alive comes every 15 s at most
        ) as http:
            while not self._stop.is_set() and not self.finished:
                drop_after = self.rng.expovariate(1 / self.mean_drop_seconds)
                wait = await self._connect(http, drop_after)
                if self.finished or self._stop.is_set():
                    break
                await self._sleep(wait)
                self.reconnects += 1

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _connect(self, http: httpx.AsyncClient, drop_after: float | None) -> float:
        """One connection; answers how long to wait before the next."""
        headers = {"Accept": "text/event-stream"}
        if self.last_id is not None:
            headers["Last-Event-ID"] = self.last_id
        self.connections += 1
        try:
            async with http.stream("GET", self.path, headers=headers) as answer:
                if answer.status_code == 204:
                    self.finished = True
                    return 0
                if answer.status_code != 200:
                    self._count(f"http {answer.status_code}")
                    retry_after = answer.headers.get("Retry-After", "")
                    return float(retry_after) if retry_after.isdigit() else self.retry_ms / 1000
                if self.last_id is None:
                    self.opened_ms = int(time.time() * 1000)
                reading = asyncio.ensure_future(self._read(answer))
                stopper = asyncio.ensure_future(self._stop.wait())
                done, _ = await asyncio.wait(
                    {reading, stopper},
                    timeout=drop_after,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for task in (reading, stopper):
                    task.cancel()
                for task in (reading, stopper):
                    try:
                        await task
                    except (asyncio.CancelledError, httpx.HTTPError) as exc:
                        if isinstance(exc, httpx.HTTPError):
                            self._count(type(exc).__name__)
                if not done:
                    self._count("dropped by the client")
        except httpx.HTTPError as exc:
            self._count(type(exc).__name__)
        return self.retry_ms / 1000

    async def _read(self, answer: httpx.Response) -> None:
        asked = self.last_id
        event_id: str | None = None
        event_type = "message"
        data = False
        async for line in answer.aiter_lines():
            if line == "":
                if data:
                    self.log.append(Received(event_id or "", event_type, asked))
                    if event_id:
                        self.last_id = event_id
                event_id, event_type, data = None, "message", False
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "id":
                event_id = value
            elif name == "event":
                event_type = value
            elif name == "data":
                data = True
            elif name == "retry" and value.isdigit():
                self.retry_ms = int(value)

    async def catch_up(self, last_id: str | None, within: float) -> bool:
        """After the soak: resume once more and read until `last_id` (the Stream's last entry)
        has arrived or the stream ends; answers whether it did."""
        self._stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        async with httpx.AsyncClient(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {self.api_key}"},
            timeout=httpx.Timeout(10.0, read=20.0),
        ) as http:
            while loop.time() < deadline:
                if self.finished or last_id is None or self.last_id in (None, last_id):
                    return True  # (one that never received anything is judged apart)
                if self.last_id is not None and _after(self.last_id, last_id):
                    return True
                remaining = deadline - loop.time()
                watcher = asyncio.ensure_future(self._watch_for(last_id, remaining))
                await self._connect(http, remaining)
                watcher.cancel()
                if not self.finished:
                    await asyncio.sleep(min(self.retry_ms / 1000, 1.0))
        return self.finished or self.last_id == last_id

    async def _watch_for(self, last_id: str, within: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while loop.time() < deadline:
            if self.last_id == last_id or self.finished:
                self._stop.set()
                return
            await asyncio.sleep(0.1)

    @property
    def saw_terminal(self) -> bool:
        return any(r.type in _TERMINAL for r in self.log)


def stream_position(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def _after(a: str, b: str) -> bool:
    try:
        return stream_position(a) > stream_position(b)
    except ValueError:
        return False
