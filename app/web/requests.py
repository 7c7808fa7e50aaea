"""Reading request bodies: every bad input gets a 4xx that names what is wrong."""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.requests import Request

from app.web.errors import APIError

__all__ = ["MAX_WEBHOOK_BYTES", "read_capped_body", "read_json", "require_string"]

MAX_JSON_BYTES = 64 * 1024
MAX_WEBHOOK_BYTES = 1024 * 1024


async def read_json(request: Request, *, limit: int = MAX_JSON_BYTES) -> dict[str, Any]:
    content_type = request.headers.get("content-type", "")
    if content_type and "json" not in content_type.split(";")[0]:
        raise APIError(415, "unsupported_media_type", "Send the body as application/json.")
    size = 0
    chunks: list[bytes] = []
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, "payload_too_large", f"The body may be at most {limit} bytes.")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise APIError(400, "invalid_json", "The body is empty; send a JSON object.")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "invalid_json", "The body is not valid JSON.") from None
    except RecursionError:
        # json.loads recurses once per level: 64 KiB of "[" is past Python's recursion limit.
        raise APIError(400, "invalid_json", "The body is nested too deeply.") from None
    if not isinstance(body, dict):
        raise APIError(400, "invalid_json", "The body must be a JSON object.")
    return body


def require_string(
    body: dict[str, Any],
    name: str,
    *,
    pattern: re.Pattern[str] | None = None,
    hint: str = "",
    label: str | None = None,
) -> str:
    """`body[name]`, a string matching `pattern`. The messages speak of `label`, the customer's
    word for the field (the field's name with spaces by default), never of the JSON key; the
    error code names the key, for programs."""
    value = body.get(name)
    words = label or name.replace("_", " ")
    if value is None:
        raise APIError(400, f"missing_{name}", f"The {words} is required. {hint}".strip())
    if not isinstance(value, str) or (pattern is not None and not pattern.fullmatch(value)):
        raise APIError(400, f"invalid_{name}", f"The {words} is not valid. {hint}".strip())
    return value


async def read_capped_body(request: Request, limit: int = MAX_WEBHOOK_BYTES) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, "payload_too_large", f"A webhook body may be at most {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(
                413, "payload_too_large", f"A webhook body may be at most {limit} bytes."
            )
        chunks.append(chunk)
    return b"".join(chunks)
