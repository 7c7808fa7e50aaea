"""Where the CPU went during a run: the server's processes, PostgreSQL's, and the machine's.

    before = CpuSample.take(server_pid)
    ... the run ...
    used = CpuSample.take(server_pid) - before
    print(used.describe(operations=100))

On a machine shared with other work a latency says little by itself: these figures say how
much CPU each operation cost the server and PostgreSQL (which does not change with the load),
and how busy the machine was meanwhile (which does). Linux only (``/proc``); elsewhere every
figure is NaN. PostgreSQL is counted when it runs on this machine: its live processes plus what
the postmaster has reaped (a connection's backend that ended during the run), every database
of that server, other users' included.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CpuSample"]

_PROC = Path("/proc")
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid: int) -> list[str] | None:
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command may hold spaces and parentheses: the fields start after the last ')'.
    name = text[text.index("(") + 1 : text.rindex(")")]
    return [name, *text[text.rindex(")") + 2 :].split()]


def _processes() -> dict[int, list[str]]:
    found = {}
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None:
                found[int(entry.name)] = fields
    return found


def _seconds(fields: list[str], *, reaped: bool = False) -> float:
    # fields[0] is the name, then state (field 3 of proc(5)) is fields[1]: utime, stime are
    # fields 14 and 15, cutime and cstime 16 and 17.
    ticks = int(fields[12]) + int(fields[13])
    if reaped:
        ticks += int(fields[14]) + int(fields[15])
    return ticks / _TICK


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds used so far by the server's process tree, by PostgreSQL, by the whole
    machine (busy, all cores), and the wall clock."""

    server: float
    postgres: float
    machine: float
    wall: float

    @classmethod
    def take(cls, server_pid: int) -> CpuSample:
        if not _PROC.is_dir():
            return cls(math.nan, math.nan, math.nan, time.monotonic())
        processes = _processes()
        children: dict[int, list[int]] = {}
        for pid, fields in processes.items():
            children.setdefault(int(fields[2]), []).append(pid)
        server, stack = 0.0, [server_pid]
        while stack:
            pid = stack.pop()
            if pid in processes:
                server += _seconds(processes[pid], reaped=True)
                stack.extend(children.get(pid, ()))
        postgres = sum(
            # The postmaster (its parent is not postgres) counts the backends it reaped.
            _seconds(fields, reaped=processes.get(int(fields[2]), [""])[0] != "postgres")
            for fields in processes.values()
            if fields[0] == "postgres"
        )
        cpu = (_PROC / "stat").read_text().splitlines()[0].split()[1:]
        # user nice system idle iowait irq softirq steal: busy is all but idle and iowait.
        busy = (sum(int(v) for v in cpu[:8]) - int(cpu[3]) - int(cpu[4])) / _TICK
        return cls(server, postgres, busy, time.monotonic())

    def __sub__(self, other: CpuSample) -> CpuSample:
        return CpuSample(
            self.server - other.server,
            self.postgres - other.postgres,
            self.machine - other.machine,
            self.wall - other.wall,
        )

    def describe(self, *, operations: int) -> str:
        """The difference of two samples, in words."""
        per = max(1, operations)
        cores = os.cpu_count() or 1
        others = self.machine - self.server - self.postgres
        return (
            f"CPU over {self.wall:.1f} s: server {self.server:.2f} s"
            f" ({1000 * self.server / per:.1f} ms per operation), PostgreSQL"
            f" {self.postgres:.2f} s ({1000 * self.postgres / per:.1f} ms per operation);"
            f" machine {100 * self.machine / (self.wall * cores):.0f}% busy of {cores} cores,"
            f" {others:.2f} s of it other processes (this client, other users)"
        )

    def ceilings(self, *, requests: int, workers: int) -> str:
        """What the CPU each request cost bounds (the difference of two samples, over a run
        of `requests`): the requests/s one worker process can take on its core, and the
        machine's when PostgreSQL and the load client share its cores. Their ratio bounds what
        more workers can show here, however well they scale."""
        per = max(1, requests)
        cores = os.cpu_count() or 1
        server, postgres = self.server / per, self.postgres / per
        others = (self.machine - self.server - self.postgres) / per
        one_worker = 1 / server if server > 0 else math.inf
        machine = cores / (self.machine / per) if self.machine > 0 else math.inf
        return (
            f"CPU per request: server {1e6 * server:.0f} µs ({workers} worker(s)), PostgreSQL"
            f" {1e6 * postgres:.0f} µs, other processes (the load client) {1e6 * others:.0f} µs;"
            f" one worker takes at most {one_worker:,.0f}/s on its core, this machine's"
            f" {cores} cores at most {machine:,.0f}/s with all of them on it"
        )

    def at_rest(self) -> str:
        """The difference of two samples taken with nothing of the run going on, in words."""
        cores = os.cpu_count() or 1
        return (
            f"PostgreSQL {100 * self.postgres / self.wall:.0f}% of a core, machine"
            f" {100 * self.machine / (self.wall * cores):.0f}% busy of {cores} cores"
        )
