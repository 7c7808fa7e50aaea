"""Stripe's form encoding: bracket notation into nested dicts and lists, and back.

Stripe accepts `a[b]=1`, `items[0][price]=p`, `keys[]=x` and `keys[0]=x`; an empty value for a
hash (`metadata=`) means "empty". Keys under `metadata` are never turned into list indexes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from app.demo.stripe_emulator.errors import StripeError

_SEGMENT = re.compile(r"\[([^\[\]]*)\]")
_HASHES_WITH_FREE_KEYS = frozenset({"metadata"})


def _split_key(key: str) -> list[str]:
    head, _, rest = key.partition("[")
    if not rest:
        return [head]
    segments = _SEGMENT.findall("[" + rest)
    if "[" + rest != "".join(f"[{s}]" for s in segments):
        raise StripeError.invalid(f"Invalid parameter name: {key}", param=key)
    return [head, *segments]


def parse_pairs(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Turn decoded form pairs into Stripe's nested parameters."""
    root: dict[str, Any] = {}
    append_counter = 0
    for key, value in pairs:
        parts = _split_key(key)
        node: dict[str, Any] = root
        for name in parts[:-1]:
            if name == "":
                append_counter += 1
                name = f"{append_counter:09d}"
            child = node.get(name)
            if not isinstance(child, dict):
                child = {}
                node[name] = child
            node = child
        last = parts[-1]
        if last == "":
            append_counter += 1
            last = f"{append_counter:09d}"
        node[last] = value
    converted = _lists(root, parent="")
    assert isinstance(converted, dict)
    return converted


def _lists(node: Any, parent: str) -> Any:
    if not isinstance(node, dict):
        return node
    converted = {k: _lists(v, parent=k) for k, v in node.items()}
    if converted and parent not in _HASHES_WITH_FREE_KEYS and all(k.isdigit() for k in converted):
        return [converted[k] for k in sorted(converted, key=int)]
    return converted


def as_dict(value: Any, param: str) -> dict[str, Any]:
    """A hash parameter; `""` (Stripe's way of unsetting) is an empty hash."""
    if value is None or value == "":
        return {}
    if not isinstance(value, dict):
        raise StripeError.invalid(f"Invalid object: {param} must be a hash.", param=param)
    return value


def as_str_dict(value: Any, param: str) -> dict[str, str]:
    result = as_dict(value, param)
    for key, item in result.items():
        if not isinstance(item, str):
            raise StripeError.invalid(f"Invalid string: {param}[{key}].", param=f"{param}[{key}]")
    return dict(result)


def as_list(value: Any, param: str) -> list[Any]:
    if value is None or value == "":
        return []
    if isinstance(value, list):
        return value
    if isinstance(value, str):
        return [value]
    raise StripeError.invalid(f"Invalid array: {param}.", param=param)


def as_int(value: Any, param: str, default: int | None = None) -> int | None:
    if value is None or value == "":
        return default
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value):
        return int(value)
    raise StripeError.invalid(
        f"Invalid integer: {value}", param=param, code="parameter_invalid_integer"
    )


def as_bool(value: Any, param: str, default: bool = False) -> bool:
    if value is None or value == "":
        return default
    if value in ("true", "false"):
        return bool(value == "true")
    raise StripeError.invalid(f"Invalid boolean: {value}", param=param)


def as_str(value: Any, param: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise StripeError.invalid(f"Invalid string: {param} must be a string.", param=param)
    return value


def required_str(params: dict[str, Any], param: str) -> str:
    value = as_str(params.get(param), param)
    if value is None:
        raise StripeError.missing(param)
    return value


def reject_unknown(params: dict[str, Any], allowed: Iterable[str]) -> None:
    known = set(allowed) | {"expand"}
    for key in params:
        if key not in known:
            raise StripeError.invalid(
                f"Received unknown parameter: {key}", param=key, code="parameter_unknown"
            )
