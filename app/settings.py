"""Settings, read from the environment once, frozen afterwards."""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

__all__ = ["ConfigError", "Settings"]

STRIPE_DEFAULT_API_BASE = "https://api.stripe.com"
MIN_STREAM_SECONDS = 300


class ConfigError(Exception):
    """A setting is missing or malformed; the message names the variable and what it expects."""


def _url(env: Mapping[str, str], name: str, schemes: tuple[str, ...]) -> str | None:
    value = env.get(name, "").strip()
    if not value:
        return None
    parts = urlsplit(value)
    if parts.scheme not in schemes:
        raise ConfigError(
            f"{name} must be a URL starting with {' or '.join(s + '://' for s in schemes)},"
            f" got {parts.scheme + '://' if parts.scheme else 'no scheme'}"
        )
    if not parts.netloc and not parts.query:
        raise ConfigError(f"{name} must name a host, e.g. {schemes[0]}://127.0.0.1/")
    return value


def _int(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str | None
    redis_url: str | None
    data_dir: Path
    secret_key: str
    public_url: str
    stripe_api_key: str
    stripe_webhook_secrets: tuple[str, ...]
    stripe_api_base: str
    provisioner_database_url: str | None
    environment: str
    redis_prefix: str
    max_streams_per_user: int
    max_stream_seconds: int
    # Unset: /metrics is open (behind a private network, say); set: Bearer <token> only.
    metrics_token: str | None
    demo: bool = False
    # How long an operation waits out an unreachable provisioning server before it fails.
    provisioner_retry_seconds: int = 900
    # How long `past_due` keeps its resource before it is suspended (issue 13).
    past_due_grace_days: int = 7

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, demo: bool = False) -> Settings:
        """Build settings; in demo mode the secrets get local values instead of being required."""
        env = os.environ if env is None else env
        data_dir = Path(env.get("LOOKOUT_DATA_DIR", "").strip() or "./.lookout").absolute()
        public_url = _url(env, "LOOKOUT_PUBLIC_URL", ("http", "https")) or "http://127.0.0.1:8000"
        webhook_secrets = tuple(
            s.strip() for s in env.get("STRIPE_WEBHOOK_SECRET", "").split(",") if s.strip()
        )
        for secret in webhook_secrets:
            if not secret.startswith("whsec_"):
                raise ConfigError(
                    "STRIPE_WEBHOOK_SECRET must be one or more whsec_… values, comma-separated"
                )
        secret_key = env.get("LOOKOUT_SECRET_KEY", "").strip()
        stripe_api_key = env.get("STRIPE_API_KEY", "").strip()
        if demo:
            secret_key = secret_key or _demo_secret(data_dir)
            stripe_api_key = stripe_api_key or "sk_test_lookout_demo"
            webhook_secrets = webhook_secrets or ("whsec_lookout_demo",)
        else:
            if not secret_key:
                raise ConfigError(
                    "LOOKOUT_SECRET_KEY is required outside demo mode: set a long random string"
                )
            if len(secret_key) < 16:
                raise ConfigError("LOOKOUT_SECRET_KEY must be at least 16 characters long")
            if not stripe_api_key:
                raise ConfigError(
                    "STRIPE_API_KEY is required outside demo mode: set it to your sk_… key"
                )
            if not webhook_secrets:
                raise ConfigError(
                    "STRIPE_WEBHOOK_SECRET is required outside demo mode: set your whsec_… secret"
                )
        environment = env.get("LOOKOUT_ENVIRONMENT", "").strip() or "development"
        return cls(
            database_url=_url(env, "DATABASE_URL", ("postgresql", "postgres")),
            redis_url=_url(env, "REDIS_URL", ("redis", "rediss", "unix")),
            data_dir=data_dir,
            secret_key=secret_key,
            public_url=public_url.rstrip("/"),
            stripe_api_key=stripe_api_key,
            stripe_webhook_secrets=webhook_secrets,
            stripe_api_base=(
                _url(env, "STRIPE_API_BASE", ("http", "https")) or STRIPE_DEFAULT_API_BASE
            ).rstrip("/"),
            provisioner_database_url=_url(
                env, "PROVISIONER_DATABASE_URL", ("postgresql", "postgres")
            ),
            environment=environment,
            redis_prefix=env.get("LOOKOUT_REDIS_PREFIX", "lookout:"),
            max_streams_per_user=_int(env, "LOOKOUT_MAX_STREAMS_PER_USER", 10, 1),
            max_stream_seconds=_int(env, "LOOKOUT_MAX_STREAM_SECONDS", 3600, MIN_STREAM_SECONDS),
            metrics_token=_metrics_token(env),
            demo=demo,
            provisioner_retry_seconds=_int(env, "LOOKOUT_PROVISIONER_RETRY_SECONDS", 900, 0),
            past_due_grace_days=_int(env, "LOOKOUT_PAST_DUE_GRACE_DAYS", 7, 0),
        )

    def with_servers(self, database_url: str, redis_url: str) -> Settings:
        """The same settings once the embedded servers (if any) have given their URLs."""
        return replace(self, database_url=database_url, redis_url=redis_url)

    @property
    def is_production(self) -> bool:
        return self.environment == "production"


def _metrics_token(env: Mapping[str, str]) -> str | None:
    token = env.get("LOOKOUT_METRICS_TOKEN", "").strip()
    if not token:
        return None
    if len(token) < 16 or not token.isascii() or not token.isprintable() or " " in token:
        raise ConfigError(
            "LOOKOUT_METRICS_TOKEN must be at least 16 printable ASCII characters without "
            "spaces (Prometheus sends it as Authorization: Bearer <token>)"
        )
    return token


def _demo_secret(data_dir: Path) -> str:
    """Demo mode keeps one generated key in the data dir so that tokens survive restarts."""
    path = data_dir / "secret_key"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(32)
    path.write_text(key)
    path.chmod(0o600)
    return key
