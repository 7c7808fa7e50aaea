"""What the browser tests share: a step-holding backend, the server's view of an operation's
events, an EventSource spy, sign-in, and screenshots."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from httpx_sse import aconnect_sse

from provisioning import ProvisionerBackend, Step, StepContext
from provisioning.backend import OperationKind
from tests.provisioning.support import WrappedBackend
from tests.support.stack import Stack, wait_for

if TYPE_CHECKING:
    from playwright.async_api import Page

__all__ = [
    "README_SCREENSHOTS",
    "SSE_SPY",
    "GatedBackend",
    "ServerEvent",
    "by_testid",
    "credentials_shown",
    "distinct_steps",
    "operation_id_of",
    "screenshot",
    "server_events",
    "sign_in",
    "spied_streams",
]

README_SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"


def screenshots_dir() -> Path:
    """Where screenshots go: the README's folder with LOOKOUT_SCREENSHOTS=1 (to refresh it),
    else a temporary one, so that running the tests does not rewrite tracked files."""
    if os.environ.get("LOOKOUT_SCREENSHOTS") == "1":
        return README_SCREENSHOTS
    return Path(tempfile.gettempdir()) / "lookout-screenshots"


# Added to every page before its own scripts: records what each EventSource delivers (type and
# id, in order) and how often it opened and failed, without changing what the page sees. The
# page's own de-duplication would hide a doubled delivery; this sees the wire's order.
SSE_SPY = """
(() => {
  const Native = window.EventSource;
  const types = ["operation.started", "operation.progress", "operation.completed",
    "operation.failed", "operation.cancelled", "subscription.updated", "invoice.updated",
    "stream.reset", "message"];
  const streams = [];
  Object.defineProperty(window, "__sse", { value: streams });
  window.EventSource = class extends Native {
    constructor(url, init) {
      super(url, init);
      const record = { path: new URL(String(url), location.href).pathname, events: [],
                       opens: 0, errors: 0 };
      streams.push(record);
      for (const type of types) {
        this.addEventListener(type, (event) => record.events.push([event.type, event.lastEventId]));
      }
      this.addEventListener("open", () => { record.opens += 1; });
      this.addEventListener("error", () => { record.errors += 1; });
    }
  };
})();
"""


_STILL = ".op-bar::-webkit-progress-value { transition: none !important; }"


@dataclass(frozen=True)
class ServerEvent:
    id: str
    type: str
    data: dict[str, Any]


@dataclass
class _Gate:
    reached: anyio.Event
    release: anyio.Event


class GatedBackend(WrappedBackend):
    """Wraps a real backend; each step named in ``hold_after`` runs for real, then waits until
    the test opens its gate, so that a test can act while provisioning is under way."""

    def __init__(self, inner: ProvisionerBackend, hold_after: Sequence[str]) -> None:
        super().__init__(inner)
        self.gates = {name: _Gate(anyio.Event(), anyio.Event()) for name in hold_after}

    def steps(self, kind: OperationKind) -> Sequence[Step]:
        return [self._wrap(s) if s.name in self.gates else s for s in self.inner.steps(kind)]

    def _wrap(self, step: Step) -> Step:
        gate = self.gates[step.name]

        async def run(ctx: StepContext) -> None:
            await step.run(ctx)
            gate.reached.set()
            await gate.release.wait()

        return replace(step, run=run)

    async def held_at(self, step: str, *, within: float = 30) -> None:
        with anyio.fail_after(within):
            await self.gates[step].reached.wait()

    def release(self, step: str) -> None:
        self.gates[step].release.set()

    def release_all(self) -> None:
        for gate in self.gates.values():
            gate.release.set()


async def server_events(stack: Stack, operation_id: str) -> list[ServerEvent]:
    """The operation's whole stream as a late client reads it (it ends after the terminal
    event): the truth the browser's view is compared with."""
    events = []
    path = f"/v1/operations/{operation_id}/events"
    async with aconnect_sse(stack.http, "GET", path) as source:
        assert source.response.status_code == 200, source.response.status_code
        async for sse in source.aiter_sse():
            if sse.data:
                events.append(ServerEvent(sse.id, sse.event, json.loads(sse.data)))
    return events


def distinct_steps(events: Sequence[ServerEvent]) -> list[str]:
    steps: list[str] = []
    for event in events:
        step = event.data.get("step")
        if event.type.startswith("operation.") and step and step not in steps:
            steps.append(step)
    return steps


async def operation_id_of(stack: Stack, subscription_id: str) -> str:
    async def check() -> str | None:
        found: str | None = (await stack.subscription(subscription_id))["operation_id"]
        return found

    return await wait_for(check, what=f"{subscription_id} to have an operation")


def by_testid(testid: str) -> str:
    return f'[data-testid="{testid}"]'


async def sign_in(page: Page, api_key: str) -> None:
    """Fills in the sign-in form on the page already open, as a person would."""
    await page.locator(by_testid("api-key-input")).fill(api_key)
    await page.locator(by_testid("signin-submit")).click()
    await page.locator(by_testid("signin-form")).wait_for(state="detached")


async def spied_streams(page: Page, path: str) -> list[dict[str, Any]]:
    """The spy's records of the page's EventSources for ``path``, oldest first."""
    records: list[dict[str, Any]] = await page.evaluate(
        "(path) => JSON.parse(JSON.stringify(window.__sse.filter((s) => s.path === path)))", path
    )
    return records


async def screenshot(page: Page, name: str, *, full_page: bool = False) -> Path:
    folder = screenshots_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    # Animations (the spinners, the bar's fill) frozen or finished, so the picture is steady.
    await page.screenshot(
        path=str(target), full_page=full_page, animations="disabled", style=_STILL
    )
    assert target.stat().st_size > 0
    return target


async def credentials_shown(page: Page, subscription_id: str) -> dict[str, str]:
    panel = page.locator(by_testid(f"credentials-{subscription_id}"))
    await panel.wait_for()
    shown: dict[str, str] = await panel.evaluate(
        """(panel) => Object.fromEntries([...panel.querySelectorAll(".cred-row")].map((row) =>
             [row.querySelector("dt").textContent, row.querySelector("dd code").textContent]))"""
    )
    return shown
