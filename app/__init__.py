"""Lookout: HTTP API, billing and the command line, on top of `streams` and `provisioning`."""

from __future__ import annotations

from app.application import create_app
from app.settings import ConfigError, Settings

__all__ = ["ConfigError", "Settings", "create_app"]
