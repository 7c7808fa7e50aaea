from __future__ import annotations

import secrets

__all__ = ["new_id"]


def new_id(prefix: str) -> str:
    """`usr_…`, `sub_…`: the prefix tells a reader of logs what an id is about."""
    return f"{prefix}_{secrets.token_hex(12)}"
