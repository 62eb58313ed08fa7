"""The analytics stores' parameters and URLs, without any engine (no clickhouse-server, no chDB).

The same SQL through both engines is tested in tests/stack/test_analytics_store.py.
"""

from __future__ import annotations

from datetime import date, datetime
from zoneinfo import ZoneInfo

import pytest

from projections.clickhouse.connect import open_store
from projections.clickhouse.store import AnalyticsStoreError, quote, render

HCM = ZoneInfo("Asia/Ho_Chi_Minh")


# -- parameters, without any engine --------------------------------------------------------


def test_quote_writes_literals_both_engines_read():
    assert quote(None) == "NULL" and quote(True) == "1" and quote(False) == "0"
    assert quote("a'b\\c\n") == "'a\\'b\\\\c\\n'"
    assert quote(datetime(2021, 8, 10, 20, 0, 5, 999, tzinfo=HCM)) == "toDateTime('2021-08-10 13:00:05', 'UTC')"
    assert quote(datetime(2021, 8, 10, 20, 0)) == "toDateTime('2021-08-10 20:00:00', 'UTC')"
    assert quote(date(2021, 8, 10)) == "toDate('2021-08-10')"
    assert quote((1, "a")) == "(1, 'a')" and quote([]) == "[]" and quote(()) == "(NULL)"
    assert quote(float("inf")) == "inf" and quote(float("nan")) == "nan"
    assert render("SELECT 100 %% 7, %(x)s", {"x": 1}) == "SELECT 100 % 7, 1"
    assert render("SELECT '%'") == "SELECT '%'"
    with pytest.raises(AnalyticsStoreError):
        quote(object())


def test_unsupported_urls_are_refused():
    with pytest.raises(AnalyticsStoreError, match="unsupported analytics URL"):
        open_store("postgresql://localhost/nhdp")
    with pytest.raises(AnalyticsStoreError, match="absolute folder"):
        open_store("chdb://relative/path")
