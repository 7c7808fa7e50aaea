"""A small SSE reader over a real socket that keeps what EventSource hides (comments, retry)."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx

__all__ = ["SSEItem", "collect", "read_sse", "wait_until"]


@dataclass
class SSEItem:
    kind: str  # "event", "comment" or "retry"
    id: str | None = None
    event: str | None = None
    data: str = ""
    text: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def json(self) -> Any:
        return json.loads(self.data)


async def read_sse(response: httpx.Response) -> AsyncIterator[SSEItem]:
    current: SSEItem | None = None
    async for line in response.aiter_lines():
        if line == "":
            if current is not None:
                yield current
            current = None
            continue
        if line.startswith(":"):
            yield SSEItem("comment", text=line[1:].strip())
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "retry":
            yield SSEItem("retry", text=value)
            continue
        current = current or SSEItem("event")
        if name == "id":
            current.id = value
        elif name == "event":
            current.event = value
        elif name == "data":
            current.data = value if not current.data else current.data + "\n" + value
        else:
            current.extra[name] = value


async def collect(
    client: httpx.AsyncClient, url: str, *, headers: dict[str, str] | None = None
) -> tuple[int, list[SSEItem]]:
    """Read a stream to its end (for streams that the server ends)."""
    async with client.stream("GET", url, headers=headers) as response:
        if response.status_code != 200:
            return response.status_code, []
        return 200, [item async for item in read_sse(response)]


async def wait_until(check: Callable[[], Awaitable[bool] | bool], *, within: float = 10) -> None:
    """Poll ``check`` until it holds; fails the test after ``within`` seconds."""
    with anyio.fail_after(within):
        for _ in itertools.count():
            result = check()
            if result if isinstance(result, bool) else await result:
                return
            await anyio.sleep(0.02)
