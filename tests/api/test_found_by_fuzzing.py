"""What schemathesis found, each pinned by a plain test."""

from __future__ import annotations

import httpx
import pytest

from app.application import create_app
from app.settings import Settings
from tests.support import live_server

pytestmark = pytest.mark.anyio


async def test_a_405_allows_every_method_of_every_route_on_the_path(settings: Settings) -> None:
    # GET and DELETE of /v1/operations/{id} are two routes; Starlette's 405 named only the
    # first one's methods, so `Allow` said DELETE did not exist.
    async with (
        live_server(create_app(settings)) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        answer = await http.request("PUT", "/v1/operations/op_missing")
    assert answer.status_code == 405
    assert answer.headers["allow"] == "DELETE, GET, HEAD"
    assert answer.json()["error"]["code"] == "method_not_allowed"
