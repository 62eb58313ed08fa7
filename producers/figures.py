"""Expected figures (DESIGN §4) from a simulator's ground truth: the second computation.

The simulator records what it *decided* (each figure-relevant record: when it
occurred, where, when it was voided, if ever) as compact facts here, and the
figures are computed from those facts, never by re-reading the event stream.
Exactness tests compare the stream projections against these numbers.

Conventions (the query API returns the same shapes):
- every figure of §4 under its exact name; every one of the 63 provinces
  appears, untouched ones with zeros; national = sum over provinces, with the
  percentages recomputed from the national sums and the national population;
- ``doses_by_number`` is keyed "1".."5" and ``doses_by_vaccine`` by vaccine
  name, each holding only non-zero keys;
- ``coverage_pct = people * 100 / population``: the correctly rounded IEEE
  double of that rational (Python int true division), not rounded further.
  Compare with an absolute tolerance of 1e-9;
- ``as_of=T`` keeps facts with occurred_at < T; a void counts iff it occurred
  before T. Times are whole seconds, so T is taken up to the next second.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from schemas.figures import SCALAR_FIGURES

NEVER = 1 << 62  # "not voided" / "no cut-off": later than any event time (epoch seconds)

VACCINES: tuple[str, ...] = ("astrazeneca", "pfizer", "moderna", "sinopharm", "janssen")
JANSSEN = VACCINES.index("janssen")


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_M64 = (1 << 64) - 1


def cutoff(as_of: datetime | str | None) -> int:
    """Integer cut-off c with: event time t (whole seconds) counts iff t < c."""
    if as_of is None:
        return NEVER
    if isinstance(as_of, str):
        as_of = datetime.fromisoformat(as_of)
    if as_of.tzinfo is None or as_of.utcoffset() is None:
        raise ValueError("as_of must carry a UTC offset (RFC 3339), e.g. 2021-06-20T00:00:00+07:00")
    us = (as_of - _EPOCH) // timedelta(microseconds=1)
    return -((-us) // 1_000_000)  # t < us/1e6  <=>  t < ceil(us/1e6) for integer t


class _Facts:
    """Facts of one counted kind: occurred_at, voided_at (NEVER), province index, value."""

    __slots__ = ("occ", "void", "prov", "val")

    def __init__(self) -> None:
        self.occ = array("q")
        self.void = array("q")
        self.prov = array("B")
        self.val = array("q")

    def add(self, occ: int, void: int, prov: int, val: int) -> None:
        self.occ.append(occ)
        self.void.append(void)
        self.prov.append(prov)
        self.val.append(val)

    def __len__(self) -> int:
        return len(self.occ)

    def tally(self, cut: int, n: int) -> tuple[list[int], list[int]]:
        count, total = [0] * n, [0] * n
        for o, v, p, x in zip(self.occ, self.void, self.prov, self.val):
            if o < cut and v >= cut:
                count[p] += 1
                total[p] += x
        return count, total


class GroundTruth:
    """What the simulator decided, kept compactly enough for millions of records.

    Counted kinds take one value each: registrations 1, declarations 1 if with
    symptoms, adverse events 1 if serious, allocations the number of doses.
    Doses keep person, vaccine, dose number and event id (as two 64-bit
    halves) for the earliest-dose rule.
    """

    def __init__(self, codes: Sequence[str], populations: Sequence[int]):
        self.codes = list(codes)
        self.populations = list(populations)
        self.registrations = _Facts()
        self.declarations = _Facts()
        self.adverse_events = _Facts()
        self.allocations = _Facts()
        self.d_occ = array("q")
        self.d_void = array("q")
        self.d_prov = array("B")
        self.d_person = array("q")
        self.d_vac = array("B")
        self.d_num = array("B")
        self.d_hi = array("Q")
        self.d_lo = array("Q")
        self.max_person = -1

    def dose(self, occ: int, void: int, prov: int, person: int, vaccine: int, number: int, event_id: int) -> None:
        self.d_occ.append(occ)
        self.d_void.append(void)
        self.d_prov.append(prov)
        self.d_person.append(person)
        self.d_vac.append(vaccine)
        self.d_num.append(number)
        self.d_hi.append(event_id >> 64)
        self.d_lo.append(event_id & _M64)
        if person > self.max_person:
            self.max_person = person

    @property
    def n_doses(self) -> int:
        return len(self.d_occ)

    def figures(self, as_of: datetime | str | None = None) -> dict[str, Any]:
        cut = cutoff(as_of)
        n = len(self.codes)
        reg, _ = self.registrations.tally(cut, n)
        decl, decl_sym = self.declarations.tally(cut, n)
        ae, ae_serious = self.adverse_events.tally(cut, n)
        _, allocated = self.allocations.tally(cut, n)

        nv = len(VACCINES)
        doses = [0] * n
        by_num = [0] * (n * 6)
        by_vac = [0] * (n * nv)
        persons = self.max_person + 1
        count = bytearray(persons)  # valid doses per person, saturating at 2
        janssen = bytearray(persons)
        best_occ = array("q", [NEVER]) * persons
        best_hi = array("Q", [0]) * persons
        best_lo = array("Q", [0]) * persons
        best_prov = bytearray(persons)
        for o, v, p, pe, va, nu, hi, lo in zip(
            self.d_occ, self.d_void, self.d_prov, self.d_person, self.d_vac, self.d_num, self.d_hi, self.d_lo
        ):
            if o >= cut or v < cut:
                continue
            doses[p] += 1
            by_num[p * 6 + nu] += 1
            by_vac[p * nv + va] += 1
            if count[pe] < 2:
                count[pe] += 1
            if va == JANSSEN:
                janssen[pe] = 1
            bo = best_occ[pe]
            # earliest dose by (occurred_at, event_id); uuid text order = integer order
            if o < bo or (o == bo and (hi, lo) < (best_hi[pe], best_lo[pe])):
                best_occ[pe] = o
                best_hi[pe] = hi
                best_lo[pe] = lo
                best_prov[pe] = p
        people = [0] * n
        fully = [0] * n
        for c, j, p in zip(count, janssen, best_prov):
            if c:
                people[p] += 1
                if c >= 2 or j:
                    fully[p] += 1

        provinces: dict[str, dict[str, Any]] = {}
        for i, code in enumerate(self.codes):
            provinces[code] = _summary(
                self.populations[i],
                registrations=reg[i],
                declarations=decl[i],
                declarations_with_symptoms=decl_sym[i],
                doses=doses[i],
                by_num={str(k): by_num[i * 6 + k] for k in range(1, 6)},
                by_vac={VACCINES[k]: by_vac[i * nv + k] for k in range(nv)},
                people=people[i],
                fully=fully[i],
                allocated=allocated[i],
                ae=ae[i],
                ae_serious=ae_serious[i],
            )
        return {"national": national(provinces, sum(self.populations)), "provinces": provinces}


def _summary(
    population: int,
    *,
    registrations: int,
    declarations: int,
    declarations_with_symptoms: int,
    doses: int,
    by_num: dict[str, int],
    by_vac: dict[str, int],
    people: int,
    fully: int,
    allocated: int,
    ae: int,
    ae_serious: int,
) -> dict[str, Any]:
    return {
        "registrations": registrations,
        "declarations": declarations,
        "declarations_with_symptoms": declarations_with_symptoms,
        "doses_administered": doses,
        "doses_by_number": {k: v for k, v in sorted(by_num.items(), key=lambda kv: int(kv[0])) if v},
        "doses_by_vaccine": {k: v for k, v in sorted(by_vac.items()) if v},
        "people_vaccinated": people,
        "people_fully_vaccinated": fully,
        "coverage_pct": people * 100 / population,
        "full_coverage_pct": fully * 100 / population,
        "doses_allocated": allocated,
        "doses_remaining": allocated - doses,
        "adverse_events": ae,
        "serious_adverse_events": ae_serious,
    }


def national(provinces: dict[str, dict[str, Any]], population: int) -> dict[str, Any]:
    """National figures: the sum over provinces, percentages from the sums."""
    by_num: dict[str, int] = {}
    by_vac: dict[str, int] = {}
    tot = dict.fromkeys(SCALAR_FIGURES, 0)
    for f in provinces.values():
        for k in tot:
            tot[k] += f[k]
        for k, v in f["doses_by_number"].items():
            by_num[k] = by_num.get(k, 0) + v
        for k, v in f["doses_by_vaccine"].items():
            by_vac[k] = by_vac.get(k, 0) + v
    return _summary(
        population,
        registrations=tot["registrations"],
        declarations=tot["declarations"],
        declarations_with_symptoms=tot["declarations_with_symptoms"],
        doses=tot["doses_administered"],
        by_num=by_num,
        by_vac=by_vac,
        people=tot["people_vaccinated"],
        fully=tot["people_fully_vaccinated"],
        allocated=tot["doses_allocated"],
        ae=tot["adverse_events"],
        ae_serious=tot["serious_adverse_events"],
    )
