"""`GET /openapi.json`: a valid OpenAPI 3.1 document that describes every route the app mounts,
and no route that neither exists nor is on its way."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from openapi_spec_validator import validate

from app.application import create_app
from app.settings import Settings
from app.web.openapi import EVENT_TYPES, openapi_document
from tests.api.routes import NOT_YET_MOUNTED, documented_operations, mounted_operations
from tests.support import live_server

pytestmark = pytest.mark.anyio


async def served_document(settings: Settings) -> dict[str, Any]:
    async with (
        live_server(create_app(settings)) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        answer = await http.get("/openapi.json")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/json"
    document: dict[str, Any] = answer.json()
    return document


async def test_the_served_document_is_valid_openapi_3_1(settings: Settings) -> None:
    document = await served_document(settings)
    validate(document)
    assert document["openapi"].startswith("3.1")
    # Absolute URLs come from LOOKOUT_PUBLIC_URL, never from the request's Host.
    assert document["servers"] == [{"url": settings.public_url}]


async def test_every_mounted_route_is_documented_and_every_documented_one_is_mounted_or_coming(
    settings: Settings,
) -> None:
    mounted = mounted_operations(create_app(settings))
    documented = documented_operations(openapi_document(settings.public_url))
    assert mounted - documented == set(), "mounted but not in app/web/openapi.py"
    assert documented - mounted - NOT_YET_MOUNTED == set(), "documented but not mounted"
    assert mounted & NOT_YET_MOUNTED == set(), "mounted now: remove it from NOT_YET_MOUNTED"


def test_errors_auth_and_streams_are_described() -> None:
    document = openapi_document("http://127.0.0.1:8000")
    paths = document["paths"]
    for path, item in paths.items():
        for method, operation in item.items():
            where = f"{method.upper()} {path}"
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")) and "content" in response:
                    schema = response["content"].get("application/json", {}).get("schema", {})
                    assert schema.get("$ref", "").endswith(("/Error", "/Unhealthy")), where
            if path.startswith("/v1/") and path not in ("/v1/plans", "/v1/webhooks/stripe"):
                assert {"apiKey": []} in operation["security"], where
                assert "401" in operation["responses"], where
    for stream in ("/v1/events", "/v1/operations/{operation_id}/events"):
        get = paths[stream]["get"]
        assert {"streamToken": []} in get["security"]
        ok = get["responses"]["200"]
        assert list(ok["content"]) == ["text/event-stream"]
        for event_type in EVENT_TYPES:
            assert f"`{event_type}`" in ok["description"]
    assert paths["/v1/webhooks/stripe"]["post"]["security"] == []
