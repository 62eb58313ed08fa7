"""The two schemes of provincial units (schemas.reference): the 2025 units as sums of their 2008 parts."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.reference import (
    UnknownScheme,
    fold,
    provinces,
    scheme_of,
    unit_of,
    units,
    unknown_unit,
)


def test_2025_has_34_units_that_partition_the_63():
    merged = units("2025")
    assert len(merged) == 34 and len(units("2008")) == 63
    parts = [p for u in merged.values() for p in u.parts]
    assert sorted(parts) == sorted(provinces())  # each 2008 unit in exactly one 2025 unit
    assert sum(u.population for u in merged.values()) == sum(p.population for p in provinces().values())
    assert merged["79"].name_vi == "Thành phố Hồ Chí Minh" and merged["79"].parts == ("74", "77", "79")
    assert merged["79"].population == sum(provinces()[c].population for c in ("74", "77", "79"))


def test_the_seat_code_is_kept_even_where_the_name_is_not():
    # 24 Bắc Ninh = 24 (old Bắc Giang) + 27 (old Bắc Ninh): the seat's code, the other's name
    assert units("2025")["24"].name_vi == "Bắc Ninh" and units("2025")["24"].parts == ("24", "27")
    assert unit_of("2025")["27"] == "24"
    # Tiền Giang (82) is all in Đồng Tháp at province level (a few wards went to Tây Ninh)
    assert unit_of("2025")["82"] == "82" and units("2025")["82"].name_vi == "Đồng Tháp"


def test_a_unit_spanning_two_regions_has_none():
    assert units("2025")["24"].region is None  # Red River Delta + Northern Midlands
    assert units("2025")["01"].region == provinces()["01"].region
    assert all(u.region for u in units("2008").values())


def test_2008_is_the_identity():
    assert all(u.parts == (c,) for c, u in units("2008").items())
    assert unit_of("2008") == {c: c for c in provinces()}


@pytest.mark.parametrize("value,scheme", [(None, "2008"), ("", "2008"), ("2008", "2008"), (" 2025 ", "2025")])
def test_scheme_of(value, scheme):
    assert scheme_of(value) == scheme


@pytest.mark.parametrize("value", ["2021", "34", "new", "2025,2008"])
def test_an_unknown_scheme_names_the_allowed_ones(value):
    with pytest.raises(UnknownScheme, match="use 2008 .63 units. or 2025 .34 units."):
        scheme_of(value)


def test_unknown_unit_wording_counts_the_scheme():
    assert "the 34 two-digit 2025 codes" in unknown_unit("02", "2025")
    assert "the 63 two-digit 2008 codes" in unknown_unit("00", "2008")


@given(
    st.dictionaries(
        st.sampled_from(sorted(provinces())),
        st.dictionaries(st.sampled_from(["doses", "people", "serious"]), st.integers(-5, 10**6)),
    )
)
def test_fold_keeps_every_total_and_puts_each_part_in_its_unit(by_code):
    folded = fold(by_code, "2025")
    assert set(folded) <= set(units("2025"))
    for key in ("doses", "people", "serious"):
        assert sum(v.get(key, 0) for v in folded.values()) == sum(v.get(key, 0) for v in by_code.values())
    for code, unit in units("2025").items():
        for key in ("doses", "people"):
            expected = sum(by_code.get(p, {}).get(key, 0) for p in unit.parts)
            assert folded.get(code, {}).get(key, 0) == expected
    assert fold(by_code, "2008") == {c: dict(v) for c, v in by_code.items()}
