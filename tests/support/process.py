"""`lookout serve` as a real child process, to be killed with SIGKILL."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

import anyio
import httpx

from app.demo.stripe_emulator import create_emulator
from app.settings import Settings
from tests.support.live import free_port, live_server
from tests.support.webhook_order import webhook_order

__all__ = ["ProcessStripe", "ServeProcess", "clean_environment", "process_stripe", "serve_process"]


@dataclass
class ServeProcess:
    url: str
    process: subprocess.Popen[bytes]

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as when a machine dies."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)


def clean_environment(**settings: str) -> dict[str, str]:
    """This process's environment without any Lookout setting, plus `settings`: a child
    process sees only what its test gives it."""
    ours = ("LOOKOUT_", "STRIPE_", "DATABASE_URL", "REDIS_URL", "PROVISIONER_DATABASE_URL")
    return {k: v for k, v in os.environ.items() if not k.startswith(ours)} | settings


def environment(settings: Settings, url: str) -> dict[str, str]:
    assert settings.database_url is not None and settings.redis_url is not None
    env = clean_environment()
    env.update(
        DATABASE_URL=settings.database_url,
        REDIS_URL=settings.redis_url,
        LOOKOUT_SECRET_KEY=settings.secret_key,
        LOOKOUT_PUBLIC_URL=url,
        LOOKOUT_REDIS_PREFIX=settings.redis_prefix,
        LOOKOUT_ENVIRONMENT=settings.environment,
        STRIPE_API_KEY=settings.stripe_api_key,
        STRIPE_WEBHOOK_SECRET=",".join(settings.stripe_webhook_secrets),
        STRIPE_API_BASE=settings.stripe_api_base,
        LOOKOUT_HEADER_TIMEOUT_SECONDS=str(settings.header_timeout_seconds),
        LOOKOUT_BODY_TIMEOUT_SECONDS=str(settings.body_timeout_seconds),
        LOOKOUT_KEEP_ALIVE_SECONDS=str(settings.keep_alive_seconds),
        LOOKOUT_MAX_CONNECTIONS=str(settings.max_connections),
        LOOKOUT_TRUSTED_PROXIES=",".join(settings.trusted_proxies),
        LOOKOUT_WARM_POOL_SIZE=str(settings.warm_pool_size),
    )
    if settings.allowed_hosts_given:
        env["LOOKOUT_ALLOWED_HOSTS"] = ",".join(settings.allowed_hosts_given)
    if settings.provisioner_database_urls:
        env["PROVISIONER_DATABASE_URL"] = ",".join(settings.provisioner_database_urls)
    return env


@contextlib.asynccontextmanager
async def serve_process(
    settings: Settings,
    *,
    port: int | None = None,
    workers: int = 1,
    public_url: str | None = None,
    host: str = "127.0.0.1",
    netns: str | None = None,
    debug_log: Path | None = None,
) -> AsyncIterator[ServeProcess]:
    """`lookout serve` on ``host``:``port``; one process unless ``workers`` says otherwise, so
    that `ServeProcess.kill` kills the whole instance. ``public_url``: its LOOKOUT_PUBLIC_URL,
    when that is not its own address (a load balancer's). ``netns``: run in that network
    namespace (tests.support.netns), as on a host of its own; `ip netns exec` execs the
    command, so the process is still the instance. ``debug_log``: the server logs at debug
    level into that file (the event-loop stall stacks of app.loop_lag among it)."""
    port = port or free_port()
    url = f"http://{host}:{port}"
    env = environment(settings, public_url or url)
    log: int | IO[bytes] = subprocess.DEVNULL
    if debug_log is not None:
        env["LOOKOUT_LOG_LEVEL"] = "debug"
        log = debug_log.open("ab")
    command = [sys.executable, "-m", "app", "serve", "--host", host, "--port", str(port)]
    command += ["--workers", str(workers)]
    if netns is not None:
        command = ["ip", "netns", "exec", netns, *command]
    process = subprocess.Popen(  # noqa: ASYNC220 (a handle is needed, to SIGKILL it)
        command,
        env=env,
        stdout=log,
        stderr=log,
    )
    if not isinstance(log, int):
        log.close()  # the child holds its own copy
    try:
        async with httpx.AsyncClient(base_url=url) as http:
            with anyio.fail_after(30):
                while True:
                    if process.poll() is not None:
                        raise RuntimeError(f"lookout serve exited with {process.returncode}")
                    with contextlib.suppress(httpx.TransportError):
                        if (await http.get("/readyz")).status_code == 200:
                            break
                    await anyio.sleep(0.1)
        yield ServeProcess(url=url, process=process)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@dataclass
class ProcessStripe:
    """The Stripe emulator of a test of `lookout serve` processes."""

    settings: Settings  # the test's, pointed at the emulator and its webhook secret
    port: int  # where its webhooks go: the port to serve a process on
    secret: str  # its webhook signing secret
    control: httpx.AsyncClient  # to the emulator (its /_emulator controls)


@contextlib.asynccontextmanager
async def process_stripe(settings: Settings) -> AsyncIterator[ProcessStripe]:
    port, emulator_port = free_port(), free_port()
    url, emulator_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{emulator_port}"
    secret = f"whsec_{secrets.token_hex(8)}"
    emulator = create_emulator(
        webhook_url=f"{url}/v1/webhooks/stripe",
        webhook_secret=secret,
        public_url=emulator_url,
        api_key=settings.stripe_api_key,
        webhook_retry_base=0.2,
        **webhook_order(),
    )
    settings = replace(settings, stripe_api_base=emulator_url, stripe_webhook_secrets=(secret,))
    async with (
        live_server(emulator, port=emulator_port),
        httpx.AsyncClient(base_url=emulator_url) as control,
    ):
        yield ProcessStripe(settings, port, secret, control)
