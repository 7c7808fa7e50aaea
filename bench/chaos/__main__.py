"""`python -m bench.chaos --minutes N --instances 2 --seed S`: exit status 0 only if every
invariant holds."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from bench.chaos.schedule import KINDS
from bench.chaos.soak import SoakOptions, soak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__)
    parser.add_argument(
        "--minutes", type=float, default=2.0, help="faults and traffic last this long"
    )
    parser.add_argument("--instances", type=int, default=2, help="lookout serve processes (2 or 3)")
    parser.add_argument("--seed", type=int, default=1, help="seeds the fault schedule and traffic")
    parser.add_argument("--customers", type=int, default=6)
    parser.add_argument("--settle", type=float, default=150.0, help="seconds allowed to converge")
    parser.add_argument(
        "--kinds",
        default="all",
        help="comma-separated fault kinds, 'all' or 'none' (a control run): " + ", ".join(KINDS),
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the run's logs, Redis data and database"
    )
    args = parser.parse_args(argv)
    kinds: tuple[str, ...] = KINDS
    if args.kinds == "all":
        pass
    elif args.kinds == "none":
        kinds = ()
    else:
        kinds = tuple(k.strip() for k in args.kinds.split(","))
        unknown = [k for k in kinds if k not in KINDS]
        if unknown:
            parser.error(f"unknown fault kinds {unknown}; choose among {', '.join(KINDS)}")
    options = SoakOptions(
        minutes=args.minutes,
        instances=args.instances,
        seed=args.seed,
        customers=args.customers,
        settle_seconds=args.settle,
        keep=args.keep,
        kinds=kinds,
    )

    async def run() -> bool:
        # SIGTERM (a test's clean-up, an operator) cancels the soak so that its finally
        # blocks stop every process it started and drop its database.
        task = asyncio.ensure_future(soak(options, sys.stdout))
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, task.cancel)
        try:
            return await task
        except asyncio.CancelledError:
            print("chaos soak interrupted; everything it started is stopped", file=sys.stderr)
            return False

    return 0 if asyncio.run(run()) else 1


if __name__ == "__main__":
    sys.exit(main())
