"""Safe to expose (issue 17), each attack tried on the real app over a real socket: a foreign
Host, a page framed or sniffed, a spoofed Host reflected in a link, text planted in the
checkout return page, error text from /readyz."""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from app.demo.stripe_emulator.checkout_page import _STYLE
from app.settings import ConfigError, Settings
from app.web.headers import CONTENT_SECURITY_POLICY
from app.web.hosts import host_name
from tests.support.redis_server import redis_process
from tests.support.stack import Stack, running_stack, wait_for

pytestmark = pytest.mark.anyio

SECURITY_HEADERS = ("content-security-policy", "x-content-type-options", "referrer-policy")


def port_of(stack: Stack) -> int:
    return int(stack.url.rsplit(":", 1)[1])


def test_allowed_hosts_default_to_the_public_url_and_loopback() -> None:
    def env(**given: str) -> dict[str, str]:
        return {"LOOKOUT_SECRET_KEY": "k" * 32, **given}  # no secret file written

    public = Settings.from_env(env(LOOKOUT_PUBLIC_URL="https://lookout.example.com/"), demo=True)
    assert public.allowed_hosts == ("lookout.example.com", "127.0.0.1", "localhost")
    given = Settings.from_env(
        env(LOOKOUT_ALLOWED_HOSTS=" Lookout.Example.com, 10.0.0.5,*.internal "), demo=True
    )
    assert given.allowed_hosts == ("lookout.example.com", "10.0.0.5", "*.internal")
    for bad in ("https://lookout.example.com", "lookout.example.com:8000", "a b"):
        with pytest.raises(ConfigError, match="LOOKOUT_ALLOWED_HOSTS"):
            Settings.from_env(env(LOOKOUT_ALLOWED_HOSTS=bad), demo=True)
    assert host_name("Example.COM:8000") == "example.com"
    assert host_name("[::1]:8000") == "[::1]"
    assert host_name("[::1]") == "[::1]"


async def test_a_foreign_host_gets_400_on_every_route(settings: Settings) -> None:
    """DNS rebinding: evil.example resolves to 127.0.0.1, the browser sends Host: evil.example."""
    async with running_stack(settings) as stack:
        port = port_of(stack)
        for path, method in [
            ("/", "GET"),
            ("/v1/plans", "GET"),
            ("/v1/subscriptions", "GET"),
            ("/v1/events", "GET"),  # served ahead of the middleware
            ("/v1/webhooks/stripe", "POST"),  # likewise
            ("/readyz", "GET"),
        ]:
            answer = await stack.http.request(
                method, path, headers={"Host": f"evil.example:{port}"}
            )
            assert answer.status_code == 400, path
            error = answer.json()["error"]
            assert error["code"] == "host_not_allowed"
            assert "LOOKOUT_ALLOWED_HOSTS" in error["message"]
            assert "evil.example" in error["message"]  # what to add, if it was meant
        odd = await stack.http.get("/v1/plans", headers={"Host": "<script>"})
        assert odd.status_code == 400 and "<script>" not in odd.text
        for good in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST"):
            answer = await stack.http.get("/v1/subscriptions", headers={"Host": good})
            assert answer.status_code == 200, good


async def test_an_operator_names_the_hosts(settings: Settings) -> None:
    """`lookout demo --host 0.0.0.0` reached as 192.168.1.5 works once that name is set."""
    named = replace(settings, allowed_hosts_given=("192.168.1.5", "*.lookout.example"))
    async with running_stack(named) as stack:
        for host, status in [
            ("192.168.1.5:8000", 200),
            ("eu.lookout.example", 200),
            ("lookout.example", 400),
            ("127.0.0.1", 400),  # the list replaces the defaults
        ]:
            answer = await stack.anonymous.get("/v1/plans", headers={"Host": host})
            assert answer.status_code == status, host


async def test_answers_carry_the_security_headers(settings: Settings) -> None:
    async with running_stack(settings) as stack:
        for path in ("/", "/checkout/return?session_id=cs_x", "/static/app.js", "/v1/plans"):
            answer = await stack.anonymous.get(path)
            assert answer.status_code == 200, path
            for name in SECURITY_HEADERS:
                assert name in answer.headers, (path, name)
            assert answer.headers["x-content-type-options"] == "nosniff"
            assert answer.headers["x-frame-options"] == "DENY"
            policy = answer.headers["content-security-policy"]
            assert policy == CONTENT_SECURITY_POLICY
        directives = dict(
            d.strip().split(" ", 1) for d in CONTENT_SECURITY_POLICY.split(";") if d.strip()
        )
        assert directives["frame-ancestors"] == "'none'"
        assert directives["connect-src"] == "'self'"
        assert directives["script-src"] == "'self'"  # no inline script
        assert "unsafe" not in CONTENT_SECURITY_POLICY
        missing = await stack.anonymous.get("/nowhere")
        assert missing.status_code == 404
        assert missing.headers["x-content-type-options"] == "nosniff"

        # The emulator's hosted checkout page has one inline style: its own policy allows
        # exactly that, by hash.
        started = await stack.checkout("graph-standard", "headers")
        page = await stack.anonymous.get(started["checkout_url"])
        assert page.status_code == 200
        digest = base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()
        policy = page.headers["content-security-policy"]
        assert f"style-src 'sha256-{digest}'" in policy
        assert "frame-ancestors 'none'" in policy
        assert "<script" not in page.text
        assert page.headers["x-content-type-options"] == "nosniff"


async def test_a_spoofed_host_is_not_reflected_in_events_url(settings: Settings) -> None:
    # Even a server told to answer any Host builds its links from LOOKOUT_PUBLIC_URL.
    async with running_stack(replace(settings, allowed_hosts_given=("*",))) as stack:
        started = await stack.checkout("graph-standard", "links")
        await stack.pay(started["checkout_session_id"])
        await stack.wait_for_status(started["subscription_id"], "active")
        answer = await stack.http.get(
            f"/v1/checkout/{started['checkout_session_id']}",
            headers={
                "Host": "evil.example",
                "X-Forwarded-Proto": "https",
                "X-Forwarded-Host": "evil.example",
            },
        )
        assert answer.status_code == 200
        events_url = answer.json()["events_url"]
        assert events_url.startswith(f"{stack.settings.public_url}/v1/"), events_url
        assert "evil" not in answer.text


async def test_the_checkout_answer_does_not_repeat_the_session_id(settings: Settings) -> None:
    planted = "Your-account-is-locked-call-555-0100"
    async with running_stack(settings) as stack:
        answer = await stack.http.get(f"/v1/checkout/{planted}")
        assert answer.status_code == 404
        assert planted not in answer.text
        assert answer.json()["error"]["message"] == "There is no such checkout of yours."
    # The page says it in its own words: tests/browser/test_security.py.


async def test_readyz_names_what_is_down_without_its_error_text(
    settings: Settings, tmp_path: Path
) -> None:
    with redis_process(tmp_path / "redis") as server:
        await server.wait_ready()
        async with running_stack(replace(settings, redis_url=server.url)) as stack:
            assert (await stack.anonymous.get("/readyz")).status_code == 200
            server.kill()

            async def down() -> httpx.Response | None:
                answer = await stack.anonymous.get("/readyz")
                return answer if answer.status_code == 503 else None

            answer = await wait_for(down, within=20, what="/readyz to answer 503")
            assert answer.json() == {
                "status": "unavailable",
                "error": {"code": "not_ready", "message": "redis: unavailable"},
                "failing_tasks": [],
                "pid": os.getpid(),
                "worker": 0,
            }
            port = server.url.rsplit(":", 1)[1].split("/")[0]
            for leak in ("Error", "refused", port, "127.0.0.1"):
                assert leak not in answer.text, leak
            server.start()
            await server.wait_ready()
