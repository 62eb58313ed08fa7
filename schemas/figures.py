"""The figures of DESIGN §4, in the order every summary lists them.

Part of the API's contract, so defined once: the PostgreSQL read models, the
ClickHouse comparison and the simulator's independent expected figures all
name them from here. Only the names are shared, never the arithmetic.
"""

from __future__ import annotations

FIGURES: tuple[str, ...] = (
    "registrations",
    "declarations",
    "declarations_with_symptoms",
    "doses_administered",
    "doses_by_number",
    "doses_by_vaccine",
    "people_vaccinated",
    "people_fully_vaccinated",
    "coverage_pct",
    "full_coverage_pct",
    "doses_allocated",
    "doses_remaining",
    "adverse_events",
    "serious_adverse_events",
)

# Of those, the ones stored as counts (the rest are derived: percentages, doses remaining).
SCALAR_FIGURES: tuple[str, ...] = (
    "registrations",
    "declarations",
    "declarations_with_symptoms",
    "doses_administered",
    "people_vaccinated",
    "people_fully_vaccinated",
    "doses_allocated",
    "adverse_events",
    "serious_adverse_events",
)
KEYED_FIGURES: tuple[str, ...] = ("doses_by_number", "doses_by_vaccine")
