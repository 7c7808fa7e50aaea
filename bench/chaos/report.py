"""The closing table: faults by kind, traffic handled, each invariant, recovery times."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import TextIO

from bench.chaos.invariants import Invariant
from bench.chaos.schedule import FaultRecord

__all__ = ["print_report"]

_SHOWN = 12


def _times(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return f"p50 {statistics.median(values):5.1f} s   max {max(values):5.1f} s"


def print_report(
    out: TextIO,
    *,
    header: str,
    faults: Sequence[FaultRecord],
    handled: Mapping[str, int | str],
    invariants: Sequence[Invariant],
    timings: Mapping[str, float],
    started: float,
    resumed: Sequence[float] = (),
    never_resumed: int = 0,
) -> None:
    w = out.write
    w(f"\n{header}\n{'=' * len(header)}\n\n")
    w("Faults injected                         count   recovery (lifted -> healthy)\n")
    by_kind: dict[str, list[FaultRecord]] = {}
    for f in faults:
        by_kind.setdefault(f.kind, []).append(f)
    for kind, records in sorted(by_kind.items()):
        rec = [r.recovery for r in records if r.recovery is not None]
        never = sum(1 for r in records if r.recovery is None)
        note = f"   ({never} never healthy again)" if never else ""
        w(f"  {kind:<38}{len(records):>5}   {_times(rec)}{note}\n")
    every = [r.recovery for r in faults if r.recovery is not None]
    w(f"  {'all':<38}{len(faults):>5}   {_times(every)}\n")
    w(
        f"  {'kill -9 -> in-flight operation moving':<38}{len(resumed):>5}   {_times(resumed)}"
        + (f"   ({never_resumed} published nothing more)" if never_resumed else "")
        + "\n\n"
    )
    w("Handled\n")
    for what, n in handled.items():
        w(f"  {what:<52}{n:>8}\n")
    w("\nTimings\n")
    for what, seconds in timings.items():
        w(f"  {what:<52}{seconds:>7.1f} s\n")
    w("\nInvariants\n")
    for inv in invariants:
        verdict = "PASS" if inv.ok else f"FAIL ({len(inv.violations)})"
        w(f"  [{verdict:^10}] {inv.name}  (checked {inv.checked})\n")
        for note, n in inv.notes.items():
            w(f"      (not checked: {n} x {note})\n")
        for v in inv.violations[:_SHOWN]:
            w(f"      - {v}\n")
        if len(inv.violations) > _SHOWN:
            w(f"      ... and {len(inv.violations) - _SHOWN} more\n")
    ok = all(inv.ok for inv in invariants)
    w(f"\nResult: {'every invariant holds' if ok else 'INVARIANTS VIOLATED'}\n")
    w("\nFault log (seconds from the start)\n")
    t0 = started
    for f in faults:
        lifted = f"{f.lifted - t0:6.1f}" if f.lifted is not None else "     -"
        healthy = f"{f.healthy_at - t0:6.1f}" if f.healthy_at is not None else "     -"
        w(
            f"  {f.started - t0:6.1f} -> {lifted} -> healthy {healthy}"
            f"  {f.kind} [{f.target}] {f.detail}\n"
        )
    out.flush()
