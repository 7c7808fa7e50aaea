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
        ({"LOOKOUT_LOG_LEVEL": "verbose"}, "LOOKOUT_LOG_LEVEL"),
    ],
)
def test_a_bad_setting_names_its_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=variable) as caught:
        Settings.from_env({**BASE, **env})
    assert "\n" not in str(caught.value)


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
