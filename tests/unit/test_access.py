"""The API's rights and tokens as pure logic (schemas/access.py, schemas/tokens.py); the stack tests
check them through the real API (tests/stack/test_api_access.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from schemas.access import ROLES, Caller, Right, ScopeError, may_void
from schemas.tokens import TokenError, TokenKeys, parse_ttl

KEYS = TokenKeys("unit-test secret")


def test_each_role_has_the_rights_of_the_issue():
    assert ROLES["national"] == {Right.READ_ALL, Right.METRICS}
    assert ROLES["province"] == {Right.READ_PROVINCE}
    assert Right.WRITE_EVENTS not in ROLES["auditor"] and Right.AUDIT in ROLES["auditor"]
    assert ROLES["producer"] == {Right.WRITE_EVENTS}
    assert Right.ADMIN in ROLES["admin"] and all(Right.ADMIN not in r for k, r in ROLES.items() if k != "admin")


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"role": "root"}, "must be one of"),
        ({"role": "province"}, "exactly one province"),
        ({"role": "national", "province": "79"}, "exactly one province"),
        ({"role": "producer", "provinces": frozenset({"79"})}, "names its source"),
        ({"role": "producer", "source": "s"}, "names the provinces"),
        ({"role": "national", "provinces": frozenset({"79"})}, "only producer and site"),
        ({"role": "producer", "source": "audit:x", "provinces": frozenset({"79"})}, "reserved for corrections"),
    ],
)
def test_a_role_gets_only_a_scope_that_fits(kwargs, problem):
    with pytest.raises(ScopeError, match=problem):
        Caller(name="x", **kwargs)


def test_event_rules_per_role():
    site = Caller(name="s", role="producer", source="site-1", provinces=frozenset({"79", "01"}))
    assert site.event_problem("DoseAdministered", "site-1", "79") is None
    assert "must be 'site-1'" in site.event_problem("DoseAdministered", "site-2", "79")
    assert "(01, 79)" in site.event_problem("DoseAdministered", "site-1", "48")
    everywhere = Caller(name="s", role="producer", source="app", provinces=frozenset({"*"}))
    assert everywhere.event_problem("CheckedIn", "app", "48") is None
    auditor = Caller(name="ann", role="auditor")
    assert auditor.event_problem("RecordVoided", "audit:ann", "79") is None
    assert "may post only RecordVoided" in auditor.event_problem("DoseAdministered", "audit:ann", "79")
    assert "'audit:ann'" in auditor.event_problem("RecordVoided", "audit:bob", "79")
    assert "may not publish" in Caller(name="n", role="national").event_problem("RecordVoided", "x", "79")


def test_the_void_rule():
    assert may_void("site-1", "site-1")
    assert not may_void("site-2", "site-1")
    assert may_void("audit:ann", "site-1")
    assert not may_void("auditor", "site-1")


def test_a_province_reads_only_its_own():
    p79 = Caller(name="p", role="province", province="79")
    assert p79.may_read_province("79") and not p79.may_read_province("01")
    assert Caller(name="n", role="national").may_read_province("01")
    assert not Caller(name="s", role="producer", source="x", provinces=frozenset({"79"})).may_read_province("79")


def test_a_token_round_trips_its_scope():
    who = Caller(name="site-7", role="producer", source="site-7", provinces=frozenset({"79", "74"}))
    issued = KEYS.issue(who, timedelta(hours=1))
    back = KEYS.verify(issued.token)
    assert (back.name, back.role, back.source, back.provinces, back.token_id) == (
        "site-7",
        "producer",
        "site-7",
        frozenset({"79", "74"}),
        issued.jti,
    )
    assert back.expires_at == pytest.approx(issued.expires_at.timestamp(), abs=1)


def test_tokens_that_name_no_one():
    who = Caller(name="n", role="national")
    with pytest.raises(TokenError, match="has expired"):
        KEYS.verify(KEYS.issue(who, timedelta(minutes=1), now=datetime.now(UTC) - timedelta(hours=1)).token)
    with pytest.raises(TokenError, match="does not know"):
        KEYS.verify(TokenKeys("another secret").issue(who, timedelta(hours=1)).token)
    token = KEYS.issue(who, timedelta(hours=1)).token
    header, claims, signature = token.split(".")
    with pytest.raises(TokenError, match="Signature verification failed"):
        KEYS.verify(f"{header}.{claims}.{signature[:-4]}AAAA")
    with pytest.raises(TokenError, match="not a JWT"):
        KEYS.verify("garbage")


def test_ttl():
    assert parse_ttl("90s") == timedelta(seconds=90)
    assert parse_ttl("30d") == timedelta(days=30)
    for bad in ("1w", "0s", "1000d", "h", ""):
        with pytest.raises(ValueError, match="ttl"):
            parse_ttl(bad)
