"""`python -m app.demo.stripe_emulator --port 12111`: the emulator on its own."""

from __future__ import annotations

import argparse
import logging

import uvicorn

from app.demo.stripe_emulator.app import create_emulator


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m app.demo.stripe_emulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=12111)
    parser.add_argument("--webhook-url", default=None, help="where events are POSTed")
    parser.add_argument("--webhook-secret", default="whsec_emulator", help="signs the events")
    parser.add_argument("--public-url", default=None, help="base of checkout page URLs")
    parser.add_argument("--api-key", default=None, help="accept only this secret key")
    parser.add_argument(
        "--control-key", default=None, help="ask for this key on the /_emulator/ controls"
    )
    parser.add_argument(
        "--shuffle-seed", type=int, default=None, help="deliver webhooks late and out of order"
    )
    parser.add_argument(
        "--max-delay", type=float, default=2.0, help="longest delay of a shuffled delivery (s)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app = create_emulator(
        webhook_url=args.webhook_url,
        webhook_secret=args.webhook_secret,
        public_url=args.public_url or f"http://{args.host}:{args.port}",
        api_key=args.api_key,
        control_key=args.control_key,
        webhook_shuffle_seed=args.shuffle_seed,
        webhook_max_delay=args.max_delay,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
