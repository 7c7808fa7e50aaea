"""Running the app under uvicorn, with a shutdown that tells open streams first; and
`lookout serve --workers N`: N such processes on one port (`run_workers`)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from multiprocessing.context import SpawnProcess
from types import FrameType

import uvicorn
from starlette.applications import Starlette
from starlette.types import ASGIApp

from app.application import create_app
from app.settings import Settings
from app.web.http_limits import ConnectionLimits, limited_protocol

__all__ = ["WorkerStartupFailed", "default_workers", "run_server", "run_workers", "server_config"]

logger = logging.getLogger(__name__)

# uvicorn waits this long for open connections after a signal; streams close well before.
GRACEFUL_SHUTDOWN_SECONDS = 5


class _Server(uvicorn.Server):
    """uvicorn waits for open connections before it runs the lifespan shutdown, and an SSE
    stream never ends by itself: so the signal must reach the streams directly."""

    def __init__(
        self,
        config: uvicorn.Config,
        app: Starlette,
        *,
        on_started: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(config)
        self._app = app
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        # Objects made during start-up live for the whole run: freezing them keeps the
        # collector from walking them again and again, which is most of the latency tail.
        gc.collect()
        gc.freeze()
        if self.started and self._on_started is not None:
            self._on_started()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn shuts down gracefully on SIGINT and SIGTERM; SIGHUP (the terminal was
        closed) must too. Once shut down, uvicorn raises the signal again for the caller's
        handler (`app.cli.main` turns it into an exception that stops the embedded servers)."""
        with super().capture_signals():
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = signal.signal(signal.SIGHUP, self.handle_exit)
            try:
                yield
            finally:
                signal.signal(signal.SIGHUP, previous)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        begin = getattr(self._app.state, "begin_shutdown", None)
        if begin is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(begin)
        super().handle_exit(sig, frame)


def server_config(
    settings: Settings, app: ASGIApp, *, host: str, port: int, log_level: str = "info"
) -> uvicorn.Config:
    """uvicorn as Lookout serves it; the tests serve the app with the same configuration."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        # httptools, with the limits uvicorn lacks (app.web.http_limits).
        http=limited_protocol(ConnectionLimits.from_settings(settings)),
        ws="none",
        lifespan="on",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        timeout_keep_alive=settings.keep_alive_seconds,
        # uvicorn believes X-Forwarded-For from 127.0.0.1 unless told otherwise, which lets
        # anyone on the machine (or a proxy that passes the header through) pick the address
        # the rate limits count: only the configured proxies are believed.
        proxy_headers=bool(settings.trusted_proxies),
        forwarded_allow_ips=list(settings.trusted_proxies),
        access_log=False,
        log_level=log_level,
    )


def run_server(
    settings: Settings,
    *,
    host: str,
    port: int,
    app: Starlette | None = None,
    log_level: str = "info",
    sockets: list[socket.socket] | None = None,
    on_started: Callable[[], None] | None = None,
) -> None:
    """Serves until a signal; on ``sockets`` when given (a worker's, bound by `run_workers`),
    else on ``host``:``port``. ``on_started``: called once the lifespan has started and the
    server accepts connections."""
    app = app if app is not None else create_app(settings)
    gc.set_threshold(50_000, 20, 20)
    config = server_config(settings, app, host=host, port=port, log_level=log_level)
    _Server(config, app, on_started=on_started).run(sockets)


# -- lookout serve --workers N ------------------------------------------------------------------
#
# One process serves one core: its event loop runs the routes, the hub, the intake and the
# runner on one thread. N worker processes serve one port; each is a whole Lookout instance
# (its own pools, hub, intake, runner, sweeps and instance lock), coordinated with the others
# through PostgreSQL and Redis exactly as separate hosts are. The parent only binds, starts,
# restarts and stops them: it opens no connection to a server and serves nothing.
#
# The parent binds the sockets and keeps them: on Linux one per worker, all on the port with
# SO_REUSEPORT, so that the kernel spreads new connections evenly over the workers by their
# addresses' hash (with one shared socket, whichever worker wakes first accepts a burst: 500
# connections opened at once went 335 to one worker, 165 to the other). A worker that dies
# leaves its socket open in the parent: the connections the kernel queues on it wait for its
# replacement (a few seconds) instead of being refused. Elsewhere (macOS has no balancing
# SO_REUSEPORT) the workers share one socket.
#
# Why not uvicorn's own `--workers` (uvicorn.supervisors.Multiprocess): it pickles the Config to
# each child (Lookout's protocol class is made per settings, and its app needs the settings the
# embedded servers filled in), runs uvicorn's Server rather than `_Server` (no goodbye to open
# streams, no SIGHUP), restarts a dying worker at once without backoff, and answers SIGHUP
# by restarting every worker where the contract asks `serve` to stop.

# After the stop signal the workers get this long (uvicorn's graceful shutdown, then the
# lifespan's) before they are killed: the contract's 10 s also hold the embedded servers' stop.
WORKER_STOP_SECONDS = 8.0
# A worker that dies is started again after RESTART_BACKOFF_MIN s, doubling while each new one
# dies within RESTART_WINDOW_SECONDS of its start, up to RESTART_BACKOFF_MAX.
RESTART_BACKOFF_MIN = 0.5
RESTART_BACKOFF_MAX = 30.0
RESTART_WINDOW_SECONDS = 60.0
# How often a worker checks that its parent is alive: a parent killed with SIGKILL cannot stop
# its workers, which then stop themselves (as after SIGTERM).
PARENT_CHECK_SECONDS = 0.5
# uvicorn's listen backlog, set here in the parent so that connections wait for a worker
# restarting rather than being refused.
LISTEN_BACKLOG = 2048

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_spawn = multiprocessing.get_context("spawn")


class WorkerStartupFailed(Exception):
    """A worker exited before it served: the same cause would stop every restart."""


def default_workers() -> int:
    """The cores this process may run on (its CPU affinity, where the system has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def _listeners(host: str, port: int, workers: int) -> list[socket.socket]:
    """The sockets of the workers, by index (several may be one)."""
    if sys.platform != "linux":
        return [_bind(host, port, reuse_port=False)] * workers
    return [_bind(host, port, reuse_port=True) for _ in range(workers)]


def _bind(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(LISTEN_BACKLOG)
    sock.set_inheritable(True)
    return sock


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_SECONDS)
    logger.warning("the parent of this worker is gone: stopping")
    os.kill(os.getpid(), signal.SIGTERM)


def _worker_main(
    settings: Settings,
    listener: socket.socket,
    ready: multiprocessing.connection.Connection,
    parent: int,
    prepare: Callable[[], None],
) -> None:
    """A worker process (spawned: a fresh interpreter that inherits only the socket and the
    pipe on which it says it serves)."""
    prepare()
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()

    def started() -> None:
        ready.send(os.getpid())
        ready.close()

    host, port = listener.getsockname()[:2]
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: the parent reports the stop
        run_server(settings, host=host, port=port, sockets=[listener], on_started=started)


@dataclass
class _Worker:
    index: int
    process: SpawnProcess
    ready: multiprocessing.connection.Connection  # the parent's end: a pid once serving
    started_at: float
    serving: bool = False


class _Workers:
    def __init__(
        self,
        settings: Settings,
        listeners: Sequence[socket.socket],
        prepare: Callable[[], None],
    ) -> None:
        self._settings = settings
        self._listeners = listeners
        self._count = len(listeners)
        self._prepare = prepare
        self._workers: dict[int, _Worker] = {}
        self._served: set[int] = set()  # the indexes that have served at least once
        self._restart_at: dict[int, float] = {}  # index -> time.monotonic() to start it again
        self._young_deaths: dict[int, int] = {}  # index -> deaths in a row, each soon after start
        self.stop_signal: int | None = None

    def start(self, index: int) -> None:
        ours, theirs = _spawn.Pipe(duplex=False)
        process = _spawn.Process(
            target=_worker_main,
            args=(
                replace(self._settings, worker=index),
                self._listeners[index],
                theirs,
                os.getpid(),
                self._prepare,
            ),
            name=f"lookout-worker-{index}",
            daemon=False,
        )
        process.start()
        theirs.close()
        self._workers[index] = _Worker(index, process, ours, time.monotonic())

    def run(self) -> None:
        """Starts the workers and keeps them running until ``stop_signal`` is set."""
        for index in range(self._count):
            self.start(index)
        while self.stop_signal is None:
            waitables: list[object] = [w.process.sentinel for w in self._workers.values()]
            waitables += [w.ready for w in self._workers.values() if not w.serving]
            multiprocessing.connection.wait(waitables, timeout=0.2)  # type: ignore[arg-type]
            for worker in list(self._workers.values()):
                self._look_at(worker)
            now = time.monotonic()
            for index, due in list(self._restart_at.items()):
                if due <= now and self.stop_signal is None:
                    del self._restart_at[index]
                    self.start(index)

    def _look_at(self, worker: _Worker) -> None:
        if not worker.serving and worker.ready.poll():
            with contextlib.suppress(EOFError, OSError):  # EOF: it died before serving
                worker.ready.recv()
                worker.serving = True
                self._served.add(worker.index)
                logger.info("worker %d (pid %s) is serving", worker.index, worker.process.pid)
        code = worker.process.exitcode
        if code is None:
            return
        worker.ready.close()
        del self._workers[worker.index]
        if self.stop_signal is not None:
            return
        ended = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited ({code})"
        if len(self._served) < self._count:
            # Not all have served yet: a configuration, a server or the code is wrong, and
            # every restart would fail the same way.
            raise WorkerStartupFailed(
                f"worker {worker.index} {ended} before every worker served; the log above says why"
            )
        lived = time.monotonic() - worker.started_at
        young = self._young_deaths.get(worker.index, 0) + 1 if lived < RESTART_WINDOW_SECONDS else 1
        self._young_deaths[worker.index] = young
        delay = min(RESTART_BACKOFF_MAX, RESTART_BACKOFF_MIN * 2 ** (young - 1))
        logger.warning(
            "worker %d (pid %s) %s after %.0f s; starting another in %.1f s",
            worker.index,
            worker.process.pid,
            ended,
            lived,
            delay,
        )
        self._restart_at[worker.index] = time.monotonic() + delay

    def stop(self) -> None:
        """SIGTERM to every worker (each closes its streams and its lifespan), SIGKILL to any
        still running after WORKER_STOP_SECONDS."""
        self._restart_at.clear()
        workers = [w for w in self._workers.values() if w.process.exitcode is None]
        for worker in workers:
            with contextlib.suppress(ProcessLookupError):
                worker.process.terminate()
        deadline = time.monotonic() + WORKER_STOP_SECONDS
        for worker in workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.exitcode is None:
                logger.warning("worker %d did not stop in time: killed", worker.index)
                worker.process.kill()
                worker.process.join()
        for worker in self._workers.values():
            worker.ready.close()
        self._workers.clear()


def run_workers(
    settings: Settings,
    *,
    host: str,
    port: int,
    workers: int,
    prepare: Callable[[], None],
) -> None:
    """Serves with ``workers`` processes on one port until SIGINT, SIGTERM or SIGHUP; then
    stops them all and raises that signal again for the caller's handler (as `_Server` does:
    `app.cli.main` turns it into the exit that stops the embedded servers). ``prepare`` runs
    first in each worker (logging: a spawned process starts with nothing configured).

    Raises `WorkerStartupFailed` when a worker exits before all of them have served once."""
    listeners = _listeners(host, port, workers)
    supervisor = _Workers(settings, listeners, prepare)

    def stop(signum: int, _frame: FrameType | None) -> None:
        supervisor.stop_signal = signum

    previous = {sig: signal.signal(sig, stop) for sig in _STOP_SIGNALS}
    logger.info("serving on %s:%d with %d workers", host, port, workers)
    try:
        supervisor.run()
    finally:
        supervisor.stop()
        for listener in listeners:
            listener.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if supervisor.stop_signal is not None:
        signal.raise_signal(supervisor.stop_signal)
