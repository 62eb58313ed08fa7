"""The registry's basic-auth cache and rules, without services: real argon2 hashes, a clock we move."""

from __future__ import annotations

import asyncio
import base64

import pytest
from argon2 import PasswordHasher

from schemas.principals import ADMIN, PRODUCER, READER, Principal
from schemas.registry.auth import Authenticator, Denied, VerifiedCache, needed_kinds, parse_basic


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def principals(**passwords: tuple[str, str]) -> dict[str, Principal]:
    hasher = PasswordHasher()
    return {name: Principal(name, kind, hasher.hash(pw)) for name, (kind, pw) in passwords.items()}


def authenticator(table: dict[str, Principal], cache: VerifiedCache) -> tuple[Authenticator, list[str]]:
    looked_up: list[str] = []

    async def lookup(name: str) -> Principal | None:
        looked_up.append(name)
        return table.get(name)

    return Authenticator(lookup, cache), looked_up


def test_a_verified_password_is_trusted_for_the_ttl_then_checked_again():
    clock = Clock()
    table = principals(worker=(READER, "right"))
    auth, looked_up = authenticator(table, VerifiedCache(ttl_s=60, clock=clock))
    assert asyncio.run(auth.kind_of("worker", "right")) == READER
    assert asyncio.run(auth.kind_of("worker", "right")) == READER
    assert looked_up == ["worker"]  # the second answer came from the cache

    # Rotated: within the TTL the old password still works, after it no longer does.
    table.update(principals(worker=(READER, "rotated")))
    clock.now += 59
    assert asyncio.run(auth.kind_of("worker", "right")) == READER
    clock.now += 2
    with pytest.raises(Denied) as info:
        asyncio.run(auth.kind_of("worker", "right"))
    assert info.value.status == 401 and info.value.code == 40101
    assert asyncio.run(auth.kind_of("worker", "rotated")) == READER


def test_a_wrong_password_is_never_accepted_even_beside_a_cached_right_one():
    clock = Clock()
    auth, looked_up = authenticator(principals(admin=(ADMIN, "secret")), VerifiedCache(ttl_s=60, clock=clock))
    assert asyncio.run(auth.kind_of("admin", "secret")) == ADMIN
    for wrong in ("", "secret ", "Secret", "secre", "secret" * 2):
        with pytest.raises(Denied) as info:
            asyncio.run(auth.kind_of("admin", wrong))
        assert "wrong user name or password" in info.value.message
    # Failures are not cached: each one went to the table and argon2 again.
    assert looked_up == ["admin"] * 6
    with pytest.raises(Denied):
        asyncio.run(auth.kind_of("nobody", "secret"))


def test_revoked_principal_stops_after_the_ttl():
    clock = Clock()
    table = principals(province_79=(READER, "pw"))
    auth, _ = authenticator(table, VerifiedCache(ttl_s=5, clock=clock))
    assert asyncio.run(auth.kind_of("province_79", "pw")) == READER
    del table["province_79"]
    clock.now += 5
    with pytest.raises(Denied):
        asyncio.run(auth.kind_of("province_79", "pw"))


def test_the_cache_is_bounded():
    cache = VerifiedCache(ttl_s=60, max_entries=3)
    for i in range(5):
        cache.put(f"p{i}", "pw", READER)
    assert [cache.get(f"p{i}", "pw") for i in range(5)] == [None, None, READER, READER, READER]


def test_basic_header_parsing_names_what_is_wrong():
    def header(text: str) -> bytes:
        return b"Basic " + base64.b64encode(text.encode())

    assert parse_basic(header("gateway:a:b")) == ("gateway", "a:b")  # a password may hold colons
    for bad, words in [
        (None, "no credentials"),
        (b"Bearer abc", "'Bearer' scheme"),
        (b"Basic !!!", "not valid base64"),
        (header("no-colon"), "user:password"),
        (header(":pw"), "user:password"),
    ]:
        with pytest.raises(Denied) as info:
            parse_basic(bad)
        assert info.value.status == 401 and words in info.value.message, (bad, info.value.message)


@pytest.mark.parametrize(
    "method, path, kinds",
    [
        ("GET", "/subjects", None),
        ("GET", "/schemas/ids/1", None),
        ("POST", "/subjects/s-value", None),  # lookup is a read
        ("POST", "/subjects/s-value/versions", {PRODUCER, ADMIN}),
        ("POST", "/compatibility/subjects/s-value/versions/latest", {PRODUCER, ADMIN}),
        ("DELETE", "/subjects/s-value", {ADMIN}),
        ("DELETE", "/subjects/s-value/versions/1", {ADMIN}),
        ("PUT", "/config", {ADMIN}),
        ("PUT", "/config/s-value", {ADMIN}),
        ("DELETE", "/config", {ADMIN}),
        ("PUT", "/mode", {ADMIN}),
    ],
)
def test_rights_by_method_and_path(method, path, kinds):
    allowed, _ = needed_kinds(method, path)
    assert allowed == (frozenset(kinds) if kinds is not None else None)
