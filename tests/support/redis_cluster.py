"""A local Redis Cluster of the test's own: primaries (and replicas) on free ports, from the
same server binary as ``tests.support.redis_server`` (the embedded default's valkey-server, or
redis-server on PATH).

The cluster is made without a CLI, as ``redis-cli --cluster create`` makes it: each primary
takes its range of the 16384 slots (``CLUSTER ADDSLOTSRANGE``), the first node meets the
others (``CLUSTER MEET``), replicas follow their primary (``CLUSTER REPLICATE``), and the
cluster is ready once every node says ``cluster_state:ok`` and agrees on who serves each slot.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from tests.support.live import free_port
from tests.support.redis_server import Persistence, RedisProcess

__all__ = ["LocalCluster", "local_cluster"]

# Short, so that a killed primary's replica takes over within a few seconds.
NODE_TIMEOUT_MS = 1000


class LocalCluster:
    """``primaries`` primaries, each with ``replicas`` replicas, under ``data``; ``options``:
    more server options for every node."""

    def __init__(
        self,
        data: Path,
        *,
        primaries: int = 3,
        replicas: int = 0,
        persistence: Persistence = "aof",
        options: Sequence[str] = (),
    ) -> None:
        self.data = data
        self.persistence: Persistence = persistence
        self.options = tuple(options)
        self.bus_ports: dict[int, int] = {}
        self.primaries: list[RedisProcess] = []
        self.replicas: dict[int, list[RedisProcess]] = {}
        for index in range(primaries):
            self.primaries.append(self._node(f"p{index}"))
            self.replicas[index] = [self._node(f"p{index}r{n}") for n in range(replicas)]

    def _node(self, name: str) -> RedisProcess:
        data = self.data / name
        bus = free_port()
        extra = [
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            # Of its own: the default (port + 10000) may be past 65535 or taken.
            "--cluster-port", str(bus),
            "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
            # A replica may take over however long it was cut off: the tests kill on purpose.
            "--cluster-replica-validity-factor", "0",
            "--logfile", str(data / "server.log"),
            *self.options,
        ]  # fmt: skip
        node = RedisProcess(data, persistence=self.persistence, extra=extra)
        self.bus_ports[node.port] = bus
        return node

    @property
    def nodes(self) -> list[RedisProcess]:
        return [*self.primaries, *(r for rs in self.replicas.values() for r in rs)]

    @property
    def url(self) -> str:
        """A URL of one node: what ``REDIS_URL`` names with ``LOOKOUT_REDIS_CLUSTER=1``."""
        return self.primaries[0].url

    def client(self, **kwargs: object) -> RedisCluster:
        return RedisCluster.from_url(self.url, **kwargs)

    def start(self, *, within: float = 30) -> None:
        for node in self.nodes:
            node.start()
        deadline = time.monotonic() + within
        for node in self.nodes:
            _wait(lambda node=node: _ask(node, "PING"), deadline)
        share = REDIS_CLUSTER_HASH_SLOTS // len(self.primaries)
        for index, node in enumerate(self.primaries):
            first = index * share
            last = first + share - 1
            if index == len(self.primaries) - 1:
                last = REDIS_CLUSTER_HASH_SLOTS - 1
            _ask(node, "CLUSTER ADDSLOTSRANGE", first, last)
        for node in self.nodes[1:]:
            meet = ("CLUSTER MEET", "127.0.0.1", node.port, self.bus_ports[node.port])
            _ask(self.primaries[0], *meet)
        total = len(self.nodes)
        for node in self.nodes:
            _wait(lambda node=node: _known_nodes(node) == total, deadline)
        for index, replicas in self.replicas.items():
            primary_id = _ask(self.primaries[index], "CLUSTER MYID")
            for replica in replicas:
                _ask(replica, "CLUSTER REPLICATE", primary_id)
        self.wait_ok(within=max(deadline - time.monotonic(), 1))

    def wait_ok(self, *, within: float = 30) -> None:
        """Until every node that runs says the cluster is ok and serves every slot."""
        deadline = time.monotonic() + within
        for node in self.nodes:
            if node.running:
                _wait(lambda node=node: _cluster_ok(node), deadline)

    def primary_of(self, key: str | bytes) -> RedisProcess:
        """The node that serves ``key``'s slot now."""
        return self.primary_of_slot(key_slot(key.encode() if isinstance(key, str) else key))

    def primary_of_slot(self, slot: int) -> RedisProcess:
        for node in self.nodes:
            if not node.running:
                continue
            for first, last, *owners in _ask(node, "CLUSTER SLOTS"):
                if first <= slot <= last:
                    port = int(owners[0][1])
                    return next(n for n in self.nodes if n.port == port)
        raise LookupError(f"no running node serves slot {slot}")

    def node_id(self, node: RedisProcess) -> str:
        return str(_ask(node, "CLUSTER MYID").decode())

    def migrate_slot(self, slot: int, to: RedisProcess) -> None:
        """Moves ``slot`` with its keys to the primary ``to``, as ``redis-cli --cluster
        reshard`` does: IMPORTING, MIGRATING, MIGRATE the keys, then every node is told."""
        source = self.primary_of_slot(slot)
        _ask(to, "CLUSTER SETSLOT", slot, "IMPORTING", self.node_id(source))
        _ask(source, "CLUSTER SETSLOT", slot, "MIGRATING", self.node_id(to))
        while keys := _ask(source, "CLUSTER GETKEYSINSLOT", slot, 100):
            _ask(source, "MIGRATE", "127.0.0.1", to.port, "", 0, 5000, "KEYS", *keys)
        for node in self.primaries:
            if node.running:
                _ask(node, "CLUSTER SETSLOT", slot, "NODE", self.node_id(to))

    def wait_replicated(self, primary: RedisProcess) -> None:
        """Until every replica of ``primary`` has all it wrote (before a failover)."""
        replicas = sum(len(rs) for i, rs in self.replicas.items() if self.primaries[i] is primary)
        assert int(_ask(primary, "WAIT", replicas, 5000)) == replicas

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


def _sync(node: RedisProcess) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=5)


def _ask(node: RedisProcess, *command: str | int) -> Any:
    """One command to one node, answered as redis-py parses it."""
    with _sync(node) as client:
        return client.execute_command(*command)


def _known_nodes(node: RedisProcess) -> int:
    return int(_ask(node, "CLUSTER INFO")["cluster_known_nodes"])


def _cluster_ok(node: RedisProcess) -> bool:
    info = _ask(node, "CLUSTER INFO")
    return info["cluster_state"] == "ok" and int(info["cluster_slots_ok"]) == 16384


def _wait(check: object, deadline: float) -> None:
    assert callable(check)
    while True:
        try:
            if check():
                return
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(
                "the local Redis Cluster did not come up; see its nodes' server.log files"
            )
        time.sleep(0.05)


@contextlib.contextmanager
def local_cluster(
    data: Path,
    *,
    primaries: int = 3,
    replicas: int = 0,
    persistence: Persistence = "aof",
    options: Sequence[str] = (),
) -> Iterator[LocalCluster]:
    """A started ``LocalCluster``, every node killed at the end."""
    cluster = LocalCluster(
        data, primaries=primaries, replicas=replicas, persistence=persistence, options=options
    )
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
