"""The Lua scripts, kept as ``.lua`` files in this package (and shipped in the wheel)."""

from __future__ import annotations

from importlib import resources

__all__ = ["lua_script"]


def lua_script(name: str) -> str:
    """The text of ``name``, a ``.lua`` file next to this module."""
    return (resources.files(__package__) / name).read_text(encoding="utf-8")
