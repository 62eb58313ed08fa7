"""Province reference data (2008 codes, 2019 census populations), loaded from CSV.

The CSVs and their provenance (README.md beside this file) are data, not code:
replace them to reload populations without touching the projections.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

HERE = Path(__file__).resolve().parent
K = TypeVar("K")


@dataclass(frozen=True)
class Province:
    code: str
    name_vi: str
    name_ascii: str
    region: str
    population: int


@lru_cache(maxsize=1)
def provinces() -> dict[str, Province]:
    with open(HERE / "provinces_2008.csv", newline="", encoding="utf-8") as f:
        return {
            row["code"]: Province(row["code"], row["name_vi"], row["name_ascii"], row["region"], int(row["population"]))
            for row in csv.DictReader(f)
        }


def province_codes() -> list[str]:
    return sorted(provinces())


def regions() -> list[str]:
    return sorted({p.region for p in provinces().values()})


# -- the two schemes of provincial units ---------------------------------------------------------------
# Events keep the 2008 code they were recorded with; the 2025 units (Resolution 202/2025/QH15) are a
# mapping applied when answering. Every 2008 unit is in exactly one 2025 unit, so each figure of a
# 2025 unit is the sum of its parts, people too: a person is counted in the unit of their earliest
# dose, which lies in exactly one unit under either scheme.
SCHEMES = ("2008", "2025")
DEFAULT_SCHEME = "2008"


@dataclass(frozen=True)
class Unit:
    code: str
    name_vi: str
    parts: tuple[str, ...]  # the 2008 codes it is made of
    population: int
    region: str | None  # a 2008 region; None for a 2025 unit whose parts lie in two regions


class UnknownScheme(ValueError):
    def __init__(self, value: object):
        super().__init__(f"{value!r} is not a scheme of provincial units; use 2008 (63 units) or 2025 (34 units)")


def scheme_of(value: str | None) -> str:
    """The scheme a request names (None: the default); UnknownScheme if it names none."""
    if value is None or value == "":
        return DEFAULT_SCHEME
    if value.strip() not in SCHEMES:
        raise UnknownScheme(value)
    return value.strip()


@lru_cache(maxsize=2)
def units(scheme: str = DEFAULT_SCHEME) -> dict[str, Unit]:
    """The provincial units of a scheme by code, populations summed from their 2008 parts."""
    old = provinces()
    if scheme == "2008":
        return {c: Unit(c, p.name_vi, (c,), p.population, p.region) for c, p in old.items()}
    if scheme != "2025":
        raise UnknownScheme(scheme)
    out = {}
    with open(HERE / "merger_2025.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            parts = tuple(row["old_codes"].split("|"))
            region = {old[c].region for c in parts}
            out[row["new_code"]] = Unit(
                row["new_code"],
                row["new_name_vi"],
                parts,
                sum(old[c].population for c in parts),
                region.pop() if len(region) == 1 else None,
            )
    return dict(sorted(out.items()))


@lru_cache(maxsize=2)
def unit_of(scheme: str = DEFAULT_SCHEME) -> dict[str, str]:
    """2008 code → the code of the unit it belongs to under `scheme`."""
    return {part: u.code for u in units(scheme).values() for part in u.parts}


def fold(by_code: Mapping[str, Mapping[K, int]], scheme: str) -> dict[str, dict[K, int]]:
    """Per-2008-unit figures summed into the units of `scheme` (additive figures only)."""
    into = unit_of(scheme)
    out: dict[str, dict[K, int]] = {}
    for code, values in by_code.items():
        acc = out.setdefault(into.get(code, code), {})
        for k, v in values.items():
            acc[k] = acc.get(k, 0) + v
    return out


def unknown_unit(code: str, scheme: str, quoted: bool = False) -> str:
    """The one wording of an unknown unit code, for every answer that names one."""
    what = code if quoted else repr(code)
    return (
        f"unknown province code {what} in scheme {scheme}; codes are the {len(units(scheme))} "
        f"two-digit {scheme} codes, e.g. 01, 79"
    )
