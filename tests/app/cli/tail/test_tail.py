"""`lookout tail OPERATION_ID` as a real child process, its stdout a pipe: it follows a
provisioning operation from its first event to its end, one line per event, and exits 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from app.cli.tail.command import render_line
from app.settings import Settings
from provisioning import GraphBackend, SharedRepositoryBackend
from tests.browser.support import server_events
from tests.provisioning.support import HoldingBackend
from tests.support.process import clean_environment
from tests.support.stack import running_stack, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(90)]

ROOT = Path(__file__).resolve().parents[4]


class Output:
    """What the child wrote so far, read as it comes."""

    def __init__(self, stream: anyio.abc.ByteReceiveStream) -> None:
        self.stream = stream
        self.data = b""

    @property
    def lines(self) -> list[str]:
        return self.data.decode().splitlines()

    async def until(self, text: str, *, within: float = 30) -> None:
        with anyio.fail_after(within):
            while text not in self.data.decode(errors="replace"):
                self.data += await self.stream.receive()

    async def to_end(self, *, within: float = 30) -> None:
        with anyio.fail_after(within):
            async for chunk in self.stream:
                self.data += chunk


async def test_tail_follows_an_operation_to_its_end_and_exits_0(settings: Settings) -> None:
    admin = settings.provisioning_servers[0].dsn
    holding = HoldingBackend(GraphBackend(admin), hold_at="create_role")
    backends: list[Any] = [holding, SharedRepositoryBackend(admin)]
    async with running_stack(settings, backends=backends) as stack:
        started = await stack.checkout("graph-standard", "tailed")
        await stack.pay(started["checkout_session_id"])

        async def operation_id() -> str | None:
            found: str | None = (await stack.subscription(started["subscription_id"]))[
                "operation_id"
            ]
            return found

        op_id = await wait_for(operation_id, what="the operation to start")
        # The key from the environment, the URL as an option.
        env = clean_environment(LOOKOUT_API_KEY=stack.api_key)
        command = [sys.executable, "-m", "app", "tail", op_id, "--url", stack.url]
        process = await anyio.open_process(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            assert process.stdout is not None and process.stderr is not None
            out, err = Output(process.stdout), Output(process.stderr)
            # It shows the history at once, while the operation is held mid-way...
            await out.until("Creating your graph's login role")
            assert process.returncode is None
            holding.release.set()
            # ...then follows it live to the end, and exits by itself.
            async with anyio.create_task_group() as tg:
                tg.start_soon(err.to_end)
                await out.to_end()
            with anyio.fail_after(15):
                code = await process.wait()
        finally:
            holding.release.set()
            if process.returncode is None:
                process.kill()
                await process.wait()

        assert code == 0, err.data.decode()
        events = await server_events(stack, op_id)
        # One plain line per event, exactly as the server sent them, in order.
        assert out.lines == [render_line(e.type, e.data) for e in events]
        assert out.lines[0].split()[:3] == [op_id, "started", "0%"]
        assert out.lines[-1].split()[:3] == [op_id, "completed", "100%"]
        steps = [e.data["step"] for e in events if e.type == "operation.progress"]
        for step in GraphBackend(admin).steps("provision"):
            assert step.name in steps
            assert sum(step.message in line for line in out.lines) == 1
        assert "\x1b[" not in out.data.decode()  # no terminal codes into a pipe


def test_tail_help_steers_the_key_to_the_environment(capsys: pytest.CaptureFixture[str]) -> None:
    from app.cli.main import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["tail", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "prefer setting LOOKOUT_API_KEY" in shown
    assert "visible to every local user in `ps`" in shown
