"""Hosts of their own on this machine: Linux network namespaces, each joined to this one by a
veth pair, so that an instance in one has its own addresses, its own loopback and no way to
reach this machine's 127.0.0.1 (PostgreSQL, Redis) but through the proxies it is given.

Making them needs root (CAP_NET_ADMIN) and iproute2's `ip`; without them the tests that use
them skip, saying so.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass

import pytest

from bench.chaos.proxy import fault_proxy, url_through

__all__ = ["Host", "forwarded", "hosts"]


@dataclass(frozen=True)
class Host:
    """A network namespace: ``address`` is its own, ``gateway`` this machine's end of its link
    (where it reaches what this machine forwards to it)."""

    netns: str
    address: str
    gateway: str


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _cannot() -> str | None:
    if shutil.which("ip") is None:
        return "no `ip` command: install iproute2 (apt-get install iproute2) to make hosts"
    if os.geteuid() != 0:
        return "making network namespaces needs root (CAP_NET_ADMIN): run the tests as root"
    return None


@contextlib.contextmanager
def hosts(count: int) -> Iterator[list[Host]]:
    """``count`` hosts, each on a /30 of 10.213.x.0 of its own, removed at the end."""
    why = _cannot()
    if why is not None:
        pytest.skip(why)
    tag = secrets.token_hex(3)
    base = secrets.randbelow(60) * 4  # a test run's subnets apart from another's
    made: list[Host] = []
    try:
        for i in range(count):
            netns, outside, inside = f"lookout-{tag}-{i}", f"lko{tag}{i}", f"lki{tag}{i}"
            net = f"10.213.{base + i}"
            try:
                _ip("netns", "add", netns)
            except subprocess.CalledProcessError as exc:
                pytest.skip(f"cannot make a network namespace here: {exc.stderr.strip()}")
            made.append(Host(netns, f"{net}.2", f"{net}.1"))
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", inside, "netns", netns)
            _ip("addr", "add", f"{net}.1/30", "dev", outside)
            _ip("link", "set", outside, "up")
            _ip("-n", netns, "addr", "add", f"{net}.2/30", "dev", inside)
            _ip("-n", netns, "link", "set", inside, "up")
            _ip("-n", netns, "link", "set", "lo", "up")
            _ip("-n", netns, "route", "add", "default", "via", f"{net}.1")
        yield made
    finally:
        for host in made:
            # Deleting the namespace deletes its end of the veth pair, and so the pair.
            subprocess.run(["ip", "netns", "del", host.netns], check=False, capture_output=True)


@contextlib.asynccontextmanager
async def forwarded(host: Host, urls: Mapping[str, str]) -> AsyncIterator[dict[str, str]]:
    """Each of ``urls`` (by name) as ``host`` reaches it: a proxy on its gateway in front of
    the server the URL names; answers the URLs to give the instance on ``host``."""
    async with contextlib.AsyncExitStack() as stack:
        found: dict[str, str] = {}
        for name, url in urls.items():
            proxy = await stack.enter_async_context(fault_proxy(name, url, host=host.gateway))
            found[name] = url_through(url, proxy.port, host=host.gateway)
        yield found
