"""The pure pieces: specs, DSNs, password verifiers, error classification, retries."""

from __future__ import annotations

import base64
import hashlib
import hmac

import asyncpg
import pytest

from provisioning import ProvisioningError, ResourceSpec, RetryPolicy
from provisioning.errors import is_transient
from provisioning.pgadmin import (
    credentials_dsn,
    quote_ident,
    scram_sha256_verifier,
    validate_resource_id,
)


def test_resource_spec_round_trips_through_json() -> None:
    spec = ResourceSpec("graph", "graph_pro", {"max_resources": 2, "max_connections": 20})
    assert ResourceSpec.from_json(spec.to_json()) == spec
    with pytest.raises(TypeError):
        spec.limits["max_resources"] = 3  # type: ignore[index]


def test_credentials_dsn_keeps_the_server_and_replaces_the_login() -> None:
    dsn = credentials_dsn(
        "postgresql://admin:adminpw@db.internal:6543/postgres?sslmode=require&user=x",
        database="lookout_gr_1",
        user="lookout_gr_1",
        password="a/b:c@d",
    )
    assert dsn == (
        "postgresql://lookout_gr_1:a%2Fb%3Ac%40d@db.internal:6543/lookout_gr_1?sslmode=require"
    )
    assert "adminpw" not in dsn


def test_scram_verifier_matches_rfc_7677_keys() -> None:
    salt = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
    verifier = scram_sha256_verifier("pencil", salt=salt)
    method, rest = verifier.split("$", 1)
    iterations_salt, keys = rest.split("$")
    stored, server = (base64.b64decode(k) for k in keys.split(":"))
    assert method == "SCRAM-SHA-256" and iterations_salt.startswith("4096:")
    # RFC 7677's exchange: the server signature it gives must follow from our ServerKey.
    auth = (
        b"n=user,r=rOprNGfwEbeRWgbNEkqO,"
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,"
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
    )
    signature = hmac.new(server, auth, hashlib.sha256).digest()
    assert base64.b64encode(signature) == b"6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
    proof = base64.b64decode("dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    client_signature = hmac.new(stored, auth, hashlib.sha256).digest()
    client_key = bytes(a ^ b for a, b in zip(proof, client_signature, strict=True))
    assert hashlib.sha256(client_key).digest() == stored


def test_identifiers_are_checked_and_quoted() -> None:
    assert validate_resource_id("gr_" + "0" * 24) == "gr_" + "0" * 24
    with pytest.raises(ValueError, match="24 hex"):
        validate_resource_id('gr_x"; DROP DATABASE postgres; --')
    assert quote_ident('a"b') == '"a""b"'


def test_transient_errors_are_those_another_attempt_may_not_meet() -> None:
    assert is_transient(ConnectionRefusedError())
    assert is_transient(asyncpg.TooManyConnectionsError())
    assert is_transient(asyncpg.exceptions.ConnectionDoesNotExistError())
    assert not is_transient(asyncpg.InsufficientPrivilegeError())
    assert not is_transient(ProvisioningError("Your plan allows no graph."))
    assert not is_transient(ValueError())


@pytest.mark.anyio
async def test_a_backend_terminated_inside_a_transaction_is_transient(database_url: str) -> None:
    """Found by the chaos soak: a step's `async with conn.transaction()` whose backend was
    terminated raised InterfaceError on the way out, and the paid provision failed for good."""
    admin = await asyncpg.connect(database_url)
    conn = await asyncpg.connect(database_url)

    async def step() -> None:
        async with conn.transaction():
            await admin.execute("SELECT pg_terminate_backend($1)", conn.get_server_pid())
            await conn.execute("SELECT 1")

    try:
        with pytest.raises(asyncpg.InterfaceError) as caught:
            await step()
        assert is_transient(caught.value)
        with pytest.raises(asyncpg.InterfaceError) as misuse:
            await conn.execute("SELECT 1")  # the connection is closed: transient too
        assert is_transient(misuse.value)
    finally:
        await admin.close()
        await conn.close()
    assert not is_transient(asyncpg.InterfaceError("cannot perform operation: another operation"))


@pytest.mark.anyio
async def test_retry_policy_retries_transient_errors_only() -> None:
    policy = RetryPolicy(attempts=3, initial_delay=0.001, max_delay=0.001)
    calls: list[int] = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError
        return "ok"

    assert await policy.call(flaky, what="flaky") == "ok" and len(calls) == 3

    async def broken() -> None:
        calls.append(1)
        raise ValueError("a bug")

    calls.clear()
    with pytest.raises(ValueError, match="a bug"):
        await policy.call(broken, what="broken")
    assert len(calls) == 1

    async def down() -> None:
        calls.append(1)
        raise ConnectionRefusedError

    calls.clear()
    with pytest.raises(ConnectionRefusedError):
        await policy.call(down, what="down")
    assert len(calls) == 3
