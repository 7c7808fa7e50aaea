from __future__ import annotations

from pathlib import Path

import pytest

from app.settings import ConfigError, Settings

BASE = {
    "LOOKOUT_SECRET_KEY": "x" * 32,
    "STRIPE_API_KEY": "sk_test_1",
    "STRIPE_WEBHOOK_SECRET": "whsec_a",
}


def test_defaults_follow_the_contract() -> None:
    settings = Settings.from_env(BASE)
    assert settings.database_url is None
    assert settings.redis_url is None
    assert settings.data_dir == Path("./.lookout").absolute()
    assert settings.public_url == "http://127.0.0.1:8000"
    assert settings.stripe_api_base == "https://api.stripe.com"
    assert settings.environment == "development"
    assert settings.redis_prefix == "lookout:"
    assert settings.max_streams_per_user == 10
    assert settings.max_stream_seconds == 3600
    assert settings.trusted_proxies == ()
    assert settings.redis_cluster is False


def test_webhook_secrets_are_a_comma_separated_list_for_rotation() -> None:
    settings = Settings.from_env({**BASE, "STRIPE_WEBHOOK_SECRET": "whsec_old, whsec_new"})
    assert settings.stripe_webhook_secrets == ("whsec_old", "whsec_new")


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"LOOKOUT_SECRET_KEY": ""}, "LOOKOUT_SECRET_KEY"),
        ({"STRIPE_API_KEY": ""}, "STRIPE_API_KEY"),
        ({"STRIPE_WEBHOOK_SECRET": ""}, "STRIPE_WEBHOOK_SECRET"),
        ({"STRIPE_WEBHOOK_SECRET": "secret"}, "STRIPE_WEBHOOK_SECRET"),
        ({"REDIS_URL": "localhost:6379"}, "REDIS_URL"),
        ({"DATABASE_URL": "mysql://x/y"}, "DATABASE_URL"),
        ({"LOOKOUT_MAX_STREAMS_PER_USER": "many"}, "LOOKOUT_MAX_STREAMS_PER_USER"),
        ({"LOOKOUT_MAX_STREAM_SECONDS": "60"}, "LOOKOUT_MAX_STREAM_SECONDS"),
        ({"LOOKOUT_PUBLIC_URL": "ftp://x"}, "LOOKOUT_PUBLIC_URL"),
        ({"LOOKOUT_HEADER_TIMEOUT_SECONDS": "0"}, "LOOKOUT_HEADER_TIMEOUT_SECONDS"),
        ({"LOOKOUT_BODY_TIMEOUT_SECONDS": "1.5"}, "LOOKOUT_BODY_TIMEOUT_SECONDS"),
        ({"LOOKOUT_KEEP_ALIVE_SECONDS": "-1"}, "LOOKOUT_KEEP_ALIVE_SECONDS"),
        ({"LOOKOUT_MAX_CONNECTIONS": "lots"}, "LOOKOUT_MAX_CONNECTIONS"),
        ({"LOOKOUT_TRUSTED_PROXIES": "proxy.internal"}, "LOOKOUT_TRUSTED_PROXIES"),
        ({"LOOKOUT_TRUSTED_PROXIES": "*"}, "LOOKOUT_TRUSTED_PROXIES"),
        ({"LOOKOUT_TRUSTED_PROXIES": "10.0.0.1/8"}, "LOOKOUT_TRUSTED_PROXIES"),
        ({"LOOKOUT_REDIS_CLUSTER": "on"}, "LOOKOUT_REDIS_CLUSTER"),
        # A cluster is no embedded server, has database 0 only, and takes hash tags in braces.
        ({"LOOKOUT_REDIS_CLUSTER": "1"}, "REDIS_URL"),
        ({"LOOKOUT_REDIS_CLUSTER": "1", "REDIS_URL": "redis://h:6379/2"}, "REDIS_URL"),
        ({"LOOKOUT_REDIS_CLUSTER": "1", "REDIS_URL": "unix:///tmp/r.sock"}, "REDIS_URL"),
        (
            {"LOOKOUT_REDIS_CLUSTER": "1", "REDIS_URL": "redis://h", "LOOKOUT_REDIS_PREFIX": "{a}"},
            "LOOKOUT_REDIS_PREFIX",
        ),
        ({"LOOKOUT_LOG_LEVEL": "verbose"}, "LOOKOUT_LOG_LEVEL"),
    ],
)
def test_a_bad_setting_names_its_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=variable) as caught:
        Settings.from_env({**BASE, **env})
    assert "\n" not in str(caught.value)


def test_a_redis_cluster_is_named_by_any_node() -> None:
    settings = Settings.from_env(
        {**BASE, "LOOKOUT_REDIS_CLUSTER": "1", "REDIS_URL": "rediss://:pw@10.0.0.5:6379/0"}
    )
    assert settings.redis_cluster is True
    assert Settings.from_env({**BASE, "LOOKOUT_REDIS_CLUSTER": "0"}).redis_cluster is False


def test_demo_mode_generates_and_keeps_its_secret(tmp_path: Path) -> None:
    env = {"LOOKOUT_DATA_DIR": str(tmp_path)}
    first = Settings.from_env(env, demo=True)
    second = Settings.from_env(env, demo=True)
    assert len(first.secret_key) >= 32
    assert first.secret_key == second.secret_key
    assert first.stripe_webhook_secrets[0].startswith("whsec_")


def test_settings_are_frozen() -> None:
    settings = Settings.from_env(BASE)
    with pytest.raises(AttributeError):
        settings.environment = "production"  # type: ignore[misc]


def test_the_provisioner_retry_window_is_15_minutes_unless_set() -> None:
    assert Settings.from_env(BASE).provisioner_retry_seconds == 900
    env = {**BASE, "LOOKOUT_PROVISIONER_RETRY_SECONDS": "60"}
    assert Settings.from_env(env).provisioner_retry_seconds == 60
    with pytest.raises(ConfigError, match="LOOKOUT_PROVISIONER_RETRY_SECONDS"):
        Settings.from_env({**BASE, "LOOKOUT_PROVISIONER_RETRY_SECONDS": "-1"})


def test_the_warm_pool_keeps_4_databases_unless_set() -> None:
    assert Settings.from_env(BASE).warm_pool_size == 4
    assert Settings.from_env({**BASE, "LOOKOUT_WARM_POOL_SIZE": "0"}).warm_pool_size == 0
    assert Settings.from_env({**BASE, "LOOKOUT_WARM_POOL_SIZE": "100"}).warm_pool_size == 100
    for bad in ("-1", "many"):
        with pytest.raises(ConfigError, match="LOOKOUT_WARM_POOL_SIZE"):
            Settings.from_env({**BASE, "LOOKOUT_WARM_POOL_SIZE": bad})


def test_connection_limits_have_defaults_and_can_be_set() -> None:
    defaults = Settings.from_env(BASE)
    assert (
        defaults.header_timeout_seconds,
        defaults.body_timeout_seconds,
        defaults.keep_alive_seconds,
        defaults.max_connections,
    ) == (10, 30, 5, 1000)
    env = {
        **BASE,
        "LOOKOUT_HEADER_TIMEOUT_SECONDS": "5",
        "LOOKOUT_BODY_TIMEOUT_SECONDS": "60",
        "LOOKOUT_KEEP_ALIVE_SECONDS": "75",
        "LOOKOUT_MAX_CONNECTIONS": "200",
    }
    chosen = Settings.from_env(env)
    assert (
        chosen.header_timeout_seconds,
        chosen.body_timeout_seconds,
        chosen.keep_alive_seconds,
        chosen.max_connections,
    ) == (5, 60, 75, 200)


def test_trusted_proxies_are_addresses_or_networks() -> None:
    env = {**BASE, "LOOKOUT_TRUSTED_PROXIES": " 10.0.0.2, 10.1.0.0/16,::1 "}
    assert Settings.from_env(env).trusted_proxies == ("10.0.0.2", "10.1.0.0/16", "::1")


def test_the_log_level_of_lookout_s_loggers_is_left_alone_unless_set() -> None:
    assert Settings.from_env(BASE).log_level is None
    assert Settings.from_env({**BASE, "LOOKOUT_LOG_LEVEL": " DEBUG "}).log_level == "debug"


def test_provisioning_servers_default_to_the_server_of_database_url() -> None:
    settings = Settings.from_env(
        {**BASE, "DATABASE_URL": "postgresql://lookout:pw@db.internal:5433/lookout"}
    )
    assert settings.provisioner_database_urls == ()
    (only,) = settings.provisioning_servers
    assert only.name == "db.internal:5433"
    assert only.dsn == "postgresql://lookout:pw@db.internal:5433/lookout"


def test_provisioning_servers_are_a_comma_separated_list_with_weights() -> None:
    env = {
        **BASE,
        "PROVISIONER_DATABASE_URL": (
            "postgresql://admin:p,w@pg-a:5432/postgres?sslmode=require&lookout_weight=500,"
            " postgres://admin:pw@pg-b1:5432,pg-b2:5432/postgres?lookout_name=b,"
            "postgresql://admin:pw@[::1]/postgres"
        ),
    }
    servers = Settings.from_env(env).provisioning_servers
    assert [(s.name, s.weight) for s in servers] == [
        ("pg-a:5432", 500),
        ("b", 1000),
        ("[::1]:5432", 1000),
    ]
    # Lookout's parameters are taken out of what asyncpg connects with.
    assert servers[0].dsn == "postgresql://admin:p,w@pg-a:5432/postgres?sslmode=require"
    assert servers[1].dsn == "postgres://admin:pw@pg-b1:5432,pg-b2:5432/postgres"


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("mysql://root:secret@db/x", "server 1 (mysql://root:***@db/x) must start with"),
        (
            "postgresql://a:secret@h1/x,postgresql://a:secret@h2/x?lookout_weight=0",
            "server 2 (postgresql://a:***@h2/x) has lookout_weight='0'",
        ),
        ("postgresql://a:secret@h1/x?lookout_wieght=5", "unknown parameter(s) lookout_wieght"),
        ("postgresql://a:secret@h1:54x/x", "has a port that is not a number"),
        ("postgresql://a@h1/x,postgresql://b@h1:5432/y", "server 2 is named h1:5432 like an"),
    ],
)
def test_a_malformed_provisioning_server_is_named_without_its_password(
    value: str, said: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({**BASE, "PROVISIONER_DATABASE_URL": value})
    message = str(raised.value)
    assert message.startswith("PROVISIONER_DATABASE_URL ")
    assert said in message
    assert "secret" not in message
