"""The Lua scripts, kept as ``.lua`` files in this package (and shipped in the wheel)."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any

from redis.exceptions import NoScriptError

if TYPE_CHECKING:
    from .cluster import RedisClient

__all__ = ["LuaScript", "lua_script"]


def lua_script(name: str) -> str:
    """The text of ``name``, a ``.lua`` file next to this module."""
    return (resources.files(__package__) / name).read_text(encoding="utf-8")


class LuaScript:
    """``name``'s script, run by its SHA (EVALSHA) on ``redis``.

    redis-py answers NOSCRIPT (a Redis whose script cache is empty: restarted, failed over)
    by loading the script and trying once more. A Redis that restarts between that load and
    that retry is empty again and answers NOSCRIPT a second time, which redis-py raises: a
    `ResponseError`, not a connection error, so callers would take it for a bug. Loading once
    more covers it; a third NOSCRIPT in a row is raised."""

    def __init__(self, redis: RedisClient, name: str) -> None:
        self._script = redis.register_script(lua_script(name))

    async def __call__(self, keys: Sequence[Any], args: Sequence[Any] = ()) -> Any:
        try:
            return await self._script(keys=keys, args=args)
        except NoScriptError:
            return await self._script(keys=keys, args=args)
