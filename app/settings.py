"""Settings, read from the environment once, frozen afterwards."""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

from provisioning.servers import ProvisioningServer, parse_servers, split_server_dsns

__all__ = ["ConfigError", "Settings", "log_level_from_env"]

STRIPE_DEFAULT_API_BASE = "https://api.stripe.com"
MIN_STREAM_SECONDS = 300
LOG_LEVELS = ("debug", "info", "warning", "error")


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


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no"):
        return False
    if raw in ("1", "true", "yes"):
        return True
    raise ConfigError(f"{name} must be 1 or 0, got {raw!r}")


def _check_cluster(redis_url: str | None, prefix: str) -> None:
    """What a Redis Cluster cannot take: no embedded server (a single node), no unix socket or
    database number, and no brace in the prefix (it would take the hash tag of every key)."""
    if redis_url is None:
        raise ConfigError(
            "LOOKOUT_REDIS_CLUSTER=1 needs REDIS_URL naming a node of the cluster, e.g. "
            "redis://10.0.0.5:6379 (the embedded server is a single node)"
        )
    parts = urlsplit(redis_url)
    if parts.scheme == "unix":
        raise ConfigError("REDIS_URL must be redis:// or rediss:// with LOOKOUT_REDIS_CLUSTER=1")
    if parts.path.strip("/") not in ("", "0"):
        raise ConfigError(
            f"REDIS_URL names database {parts.path.strip('/')!r}; a Redis Cluster has "
            "database 0 only: drop it from the URL (or set LOOKOUT_REDIS_CLUSTER=0)"
        )
    if "{" in prefix or "}" in prefix:
        raise ConfigError(
            "LOOKOUT_REDIS_PREFIX must have no braces with LOOKOUT_REDIS_CLUSTER=1: each "
            "topic's name in braces is the hash tag that keeps its keys in one slot"
        )


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
    # PROVISIONER_DATABASE_URL's DSNs as given (their ?lookout_* parameters included); empty:
    # the server of DATABASE_URL. `provisioning_servers` reads them.
    provisioner_database_urls: tuple[str, ...]
    environment: str
    redis_prefix: str
    max_streams_per_user: int
    max_stream_seconds: int
    # Unset: /metrics is open (behind a private network, say); set: Bearer <token> only.
    metrics_token: str | None
    demo: bool = False
    # How long an operation waits out an unreachable provisioning server before it fails.
    provisioner_retry_seconds: int = 900
    # Connection limits of `lookout serve` (app.web.http_limits, docs/OPERATIONS.md).
    header_timeout_seconds: int = 10
    body_timeout_seconds: int = 30
    keep_alive_seconds: int = 5
    max_connections: int = 1000
    # Peers whose X-Forwarded-For/-Proto are believed: addresses or networks; none by default.
    trusted_proxies: tuple[str, ...] = ()
    # LOOKOUT_ALLOWED_HOSTS as given; empty: the defaults of `allowed_hosts`, which follow
    # public_url (the demo and the tests set that after reading the environment).
    allowed_hosts_given: tuple[str, ...] = ()
    # How often an open stream asks again whether the credential it was opened with still
    # holds (a revoked API key closes its streams within this plus one hub tick). Not an
    # environment setting: the contract promises 30 s; tests make it short.
    access_recheck_seconds: float = 10.0
    # How long `past_due` keeps its resource before it is suspended (issue 13).
    past_due_grace_days: int = 7
    # REDIS_URL names a node of a Redis (or Valkey) Cluster: keys hash-tagged per topic, sharded
    # pub/sub (streams.cluster).
    redis_cluster: bool = False
    # LOOKOUT_LOG_LEVEL: the level of Lookout's own loggers (app, streams, provisioning), not
    # the libraries'; None leaves them at the root's (app.cli.main.configure_logging).
    log_level: str | None = None
    # Which worker of `lookout serve --workers N` this process is (0 to N-1; 0 when it serves
    # alone): /healthz and /metrics name it. Not an environment setting: the server sets it.
    worker: int = 0
    # Graph databases kept made ahead of demand per provisioning server (issue 15). 4: a
    # handful of payments at once (the runner's concurrency) each get one at once, for about
    # 4 x 8 MB of disk; a server expecting bursts sets the largest burst it expects.
    warm_pool_size: int = 4

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
            # Generated per data dir, never fixed strings: the emulator's controls and webhooks
            # take these as proof, so a page on the web must not be able to know them.
            secret_key = secret_key or _demo_secret(data_dir, "secret_key")
            stripe_api_key = stripe_api_key or _demo_secret(
                data_dir, "stripe_api_key", prefix="sk_test_"
            )
            webhook_secrets = webhook_secrets or (
                _demo_secret(data_dir, "stripe_webhook_secret", prefix="whsec_"),
            )
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
        redis_url = _url(env, "REDIS_URL", ("redis", "rediss", "unix"))
        redis_prefix = env.get("LOOKOUT_REDIS_PREFIX", "lookout:")
        redis_cluster = _flag(env, "LOOKOUT_REDIS_CLUSTER")
        if redis_cluster:
            _check_cluster(redis_url, redis_prefix)
        return cls(
            database_url=_url(env, "DATABASE_URL", ("postgresql", "postgres")),
            redis_url=redis_url,
            data_dir=data_dir,
            secret_key=secret_key,
            public_url=public_url.rstrip("/"),
            stripe_api_key=stripe_api_key,
            stripe_webhook_secrets=webhook_secrets,
            stripe_api_base=(
                _url(env, "STRIPE_API_BASE", ("http", "https")) or STRIPE_DEFAULT_API_BASE
            ).rstrip("/"),
            provisioner_database_urls=_provisioner_dsns(env),
            environment=environment,
            redis_prefix=redis_prefix,
            max_streams_per_user=_int(env, "LOOKOUT_MAX_STREAMS_PER_USER", 10, 1),
            max_stream_seconds=_int(env, "LOOKOUT_MAX_STREAM_SECONDS", 3600, MIN_STREAM_SECONDS),
            metrics_token=_metrics_token(env),
            demo=demo,
            provisioner_retry_seconds=_int(env, "LOOKOUT_PROVISIONER_RETRY_SECONDS", 900, 0),
            header_timeout_seconds=_int(env, "LOOKOUT_HEADER_TIMEOUT_SECONDS", 10, 1),
            body_timeout_seconds=_int(env, "LOOKOUT_BODY_TIMEOUT_SECONDS", 30, 1),
            keep_alive_seconds=_int(env, "LOOKOUT_KEEP_ALIVE_SECONDS", 5, 1),
            max_connections=_int(env, "LOOKOUT_MAX_CONNECTIONS", 1000, 1),
            trusted_proxies=_trusted_proxies(env),
            allowed_hosts_given=_allowed_hosts(env),
            past_due_grace_days=_int(env, "LOOKOUT_PAST_DUE_GRACE_DAYS", 7, 0),
            redis_cluster=redis_cluster,
            log_level=log_level_from_env(env),
            warm_pool_size=_int(env, "LOOKOUT_WARM_POOL_SIZE", 4, 0),
        )

    def with_servers(self, database_url: str, redis_url: str) -> Settings:
        """The same settings once the embedded servers (if any) have given their URLs."""
        return replace(self, database_url=database_url, redis_url=redis_url)

    @property
    def provisioning_servers(self) -> tuple[ProvisioningServer, ...]:
        """The servers that receive customer databases, in the order given; the server of
        DATABASE_URL when PROVISIONER_DATABASE_URL is unset (none before it is known)."""
        dsns = self.provisioner_database_urls or ((self.database_url,) if self.database_url else ())
        return parse_servers(dsns)

    @property
    def allowed_hosts(self) -> tuple[str, ...]:
        """The Host names the server answers to (lower case, no port)."""
        if self.allowed_hosts_given:
            return self.allowed_hosts_given
        public_host = (urlsplit(self.public_url).hostname or "").lower()
        return tuple(dict.fromkeys(h for h in (public_host, "127.0.0.1", "localhost") if h))


# A host name, an IPv4 address or a bracketed IPv6 one; `*` alone, or leading a domain.
_HOST_PATTERN = re.compile(r"(\*|(\*\.)?[a-z0-9]([a-z0-9.-]*[a-z0-9])?|\[[0-9a-f:.]+\])")


def _allowed_hosts(env: Mapping[str, str]) -> tuple[str, ...]:
    raw = env.get("LOOKOUT_ALLOWED_HOSTS", "")
    hosts = tuple(h.strip().lower() for h in raw.split(",") if h.strip())
    for host in hosts:
        if not _HOST_PATTERN.fullmatch(host):
            raise ConfigError(
                f"LOOKOUT_ALLOWED_HOSTS must be comma-separated host names without scheme or "
                f"port (e.g. lookout.example.com,127.0.0.1), got {host!r}"
            )
    return hosts


def log_level_from_env(env: Mapping[str, str] | None = None) -> str | None:
    """LOOKOUT_LOG_LEVEL, lower case, or None when unset. Also read on its own, before the rest
    of the settings: logging is configured before a command reads them."""
    env = os.environ if env is None else env
    level = env.get("LOOKOUT_LOG_LEVEL", "").strip().lower()
    if not level:
        return None
    if level not in LOG_LEVELS:
        raise ConfigError(
            f"LOOKOUT_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {level!r}"
        )
    return level


def _provisioner_dsns(env: Mapping[str, str]) -> tuple[str, ...]:
    name = "PROVISIONER_DATABASE_URL"
    dsns = tuple(split_server_dsns(env.get(name, "")))
    try:
        parse_servers(dsns)
    except ValueError as exc:
        raise ConfigError(
            f"{name} must be one or more postgresql:// DSNs, comma-separated: {exc}"
        ) from None
    return dsns


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


def _trusted_proxies(env: Mapping[str, str]) -> tuple[str, ...]:
    """Addresses (or networks) only: a name or `*` would believe any peer that claims it."""
    name = "LOOKOUT_TRUSTED_PROXIES"
    entries = tuple(e.strip() for e in env.get(name, "").split(",") if e.strip())
    for entry in entries:
        try:
            if "/" in entry:
                ipaddress.ip_network(entry)
            else:
                ipaddress.ip_address(entry)
        except ValueError:
            raise ConfigError(
                f"{name} must be IP addresses or networks of your proxies, comma-separated"
                f" (e.g. 10.0.0.2,10.1.0.0/16), got {entry!r}"
            ) from None
    return entries


def _demo_secret(data_dir: Path, name: str, *, prefix: str = "") -> str:
    """Demo mode keeps each generated secret in a file of the data dir (0600), so that tokens,
    the emulator's key and its signatures survive restarts."""
    path = data_dir / name
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    key = prefix + secrets.token_urlsafe(32)
    # Created 0600 from the start: a chmod after the write would leave a window.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process of this data dir was first
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(key)
    return key
