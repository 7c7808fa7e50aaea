"""Real bugs, injected: a method that raises once, as a loop's unexpected error would, then
works again (what a supervisor must survive)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

__all__ = ["crash_once", "crash_once_sync"]


def crash_once(monkeypatch: pytest.MonkeyPatch, target: object, name: str) -> None:
    """The next call of ``target.name`` raises (a bug in the loop that calls it); later calls
    are the real method again."""
    original: Callable[..., Awaitable[Any]] = getattr(target, name)

    crashed = False

    async def broken(*args: Any, **kwargs: Any) -> Any:
        # Whoever holds this function (a supervisor holds the loop it restarts) gets the
        # real method from the second call on.
        nonlocal crashed
        monkeypatch.setattr(target, name, original)
        if crashed:
            return await original(*args, **kwargs)
        crashed = True
        raise RuntimeError(f"an unexpected bug in {name}")

    monkeypatch.setattr(target, name, broken)


def crash_once_sync(monkeypatch: pytest.MonkeyPatch, target: object, name: str) -> None:
    """``crash_once`` for a plain method."""
    original: Callable[..., Any] = getattr(target, name)

    def broken(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(target, name, original)
        raise RuntimeError(f"an unexpected bug in {name}")

    monkeypatch.setattr(target, name, broken)
