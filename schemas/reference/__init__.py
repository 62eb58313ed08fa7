"""Province reference data (2008 codes, 2019 census populations), loaded from CSV.

The CSVs and their provenance (README.md beside this file) are data, not code:
replace them to reload populations without touching the projections.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

HERE = Path(__file__).resolve().parent


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
