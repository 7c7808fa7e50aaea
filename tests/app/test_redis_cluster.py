"""The whole service on a Redis Cluster (LOOKOUT_REDIS_CLUSTER=1): a purchase streamed by key
and by stream token, resumed; rate limits, the per-user stream limit and readiness, all counted
on the cluster; readiness that names a primary that does not answer; and start-up that refuses
a mismatch between the setting and the server."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from app.application import create_app
from app.cli.main import StartupError, preflight
from app.settings import Settings
from tests.app.web.routes.test_streams import event_ids, finished_operation
from tests.streams.sse_client import wait_until
from tests.support.live import live_server
from tests.support.redis_cluster import LocalCluster, local_cluster
from tests.support.stack import running_stack

pytestmark = pytest.mark.anyio


@pytest.fixture
def cluster_settings(settings: Settings, redis_cluster: LocalCluster) -> Settings:
    # Any node names the cluster; the test's own prefix keeps its keys apart.
    return replace(settings, redis_url=redis_cluster.nodes[-1].url, redis_cluster=True)


async def test_a_purchase_is_streamed_resumed_and_limited_on_a_cluster(
    cluster_settings: Settings,
) -> None:
    async with running_stack(replace(cluster_settings, max_streams_per_user=1)) as stack:
        operation_id = await finished_operation(stack, "sharded")
        token = (await stack.http.post("/v1/stream-tokens")).json()["token"]
        path = f"/v1/operations/{operation_id}/events"
        everything = await event_ids(stack.anonymous, f"{path}?token={token}")
        assert len(everything) >= 3
        rest = await event_ids(stack.http, path, **{"Last-Event-ID": everything[0]})
        assert rest == everything[1:]
        done = await stack.http.get(path, headers={"Last-Event-ID": everything[-1]})
        assert done.status_code == 204

        # Counted on the cluster: a limiter that cannot be asked lets requests through bare.
        first = await stack.http.get("/v1/subscriptions")
        second = await stack.http.get("/v1/subscriptions")
        remaining = [int(r.headers["X-RateLimit-Remaining"]) for r in (first, second)]
        assert remaining[1] == remaining[0] - 1

        async with stack.http.stream("GET", "/v1/events") as held:
            assert held.status_code == 200
            refused = await stack.http.get("/v1/events")
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "too_many_streams"

        ready = await stack.anonymous.get("/readyz")
        assert ready.status_code == 200, ready.text


async def test_start_up_checks_that_the_setting_matches_the_server(
    settings: Settings, cluster_settings: Settings
) -> None:
    await preflight(cluster_settings)
    with pytest.raises(StartupError, match="set LOOKOUT_REDIS_CLUSTER=1"):
        await preflight(replace(cluster_settings, redis_cluster=False))
    assert settings.redis_url is not None
    single = settings.redis_url.rsplit("/", 1)[0]  # database 0, as Settings requires
    with pytest.raises(StartupError, match=r"REDIS_URL: .*[Cc]luster mode is not enabled"):
        # The single Redis of the other tests, taken for a cluster.
        await preflight(replace(settings, redis_url=single, redis_cluster=True))


async def test_readyz_names_the_primary_that_does_not_answer(
    settings: Settings, tmp_path: Path
) -> None:
    # A cluster of its own: its primaries are paused and killed.
    with local_cluster(tmp_path / "cluster", persistence="none") as cluster:
        app = create_app(replace(settings, redis_url=cluster.url, redis_cluster=True))
        async with live_server(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:

            async def ready() -> bool:
                return (await http.get("/readyz")).status_code == 200

            assert (await http.get("/readyz")).status_code == 200
            victim = cluster.primaries[1]
            name = f"redis primary 127.0.0.1:{victim.port}: unavailable"
            others = [f"127.0.0.1:{p.port}" for p in cluster.primaries if p is not victim]

            # Paused (SIGSTOP): its connections stay open and nothing answers; the check's
            # timeout answers for it.
            victim.pause()
            try:
                paused = await http.get("/readyz")
            finally:
                victim.resume()
            assert paused.status_code == 503, paused.text
            message = paused.json()["error"]["message"]
            assert name in message
            assert not any(other in message for other in others), message
            await wait_until(ready)

            # Killed (SIGKILL): refused at once; ready again once it is back with its slots.
            victim.kill()
            killed = await http.get("/readyz")
            assert killed.status_code == 503, killed.text
            assert name in killed.json()["error"]["message"]
            victim.start()
            cluster.wait_ok()
            await wait_until(ready, within=30)


async def test_readyz_asks_the_new_primary_after_a_failover(
    settings: Settings, tmp_path: Path
) -> None:
    with local_cluster(tmp_path / "cluster", replicas=1, persistence="none") as cluster:
        app = create_app(replace(settings, redis_url=cluster.url, redis_cluster=True))
        async with live_server(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:

            async def ready() -> bool:
                return (await http.get("/readyz")).status_code == 200

            assert await ready()
            victim = cluster.primaries[1]
            [replica] = cluster.replicas[1]
            victim.kill()
            answer = await http.get("/readyz")
            assert answer.status_code == 503, answer.text
            assert f"127.0.0.1:{victim.port}" in answer.json()["error"]["message"]
            # Its replica takes over: readiness asks it, and no more the primary that died.
            await wait_until(
                lambda: cluster.primary_of_slot(_first_slot(cluster, 1)) is replica, within=30
            )
            await wait_until(ready, within=30)


def _first_slot(cluster: LocalCluster, index: int) -> int:
    """The first slot the ``index``-th primary was given (LocalCluster shares them evenly)."""
    return index * (16384 // len(cluster.primaries))
