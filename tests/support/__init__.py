"""Helpers shared by the tests: a live server on a real socket, ports, users."""

from __future__ import annotations

from tests.support.live import database_dsn, free_port, live_server

__all__ = ["database_dsn", "free_port", "live_server"]
