"""Campaign simulator: realistic, deterministic event streams and their expected figures.

Scenarios
- ``hcmc-2021-06``: Hồ Chí Minh City (79), 19–23 June 2021. Three allocations
  before the campaign (30,000 armed_forces, 20,000 police, 786,000
  province_health; AstraZeneca) and 804,000 planned injections over five
  days, 97.5% AstraZeneca and 2.5% Sinopharm. 2% of them are second doses of
  people first vaccinated (AstraZeneca, 8–12 weeks earlier) in March–April;
  those earlier visits are emitted too, so the stream is self-consistent.
  ``doses_administered`` therefore also counts those earlier first doses.
- ``national``: all 63 provinces, ``daily_doses`` a day split by 2019
  population, for ``days`` days from ``start`` (default 1 Aug 2021). Mixed
  vaccines (some single-dose Janssen), first doses and second doses
  (≥ 29 days after the first, in the window or before it, the earlier visit
  emitted too); some second doses in a different province than the first;
  allocations per province and vaccine before the window.

Per person: VaccinationRegistered, AppointmentScheduled, HealthDeclarationSubmitted,
CheckedIn, DoseAdministered and now and then AdverseEventReported (a few
no-shows register, book and declare but get no dose). A second dose's visit
has no new registration. Corrections follow FHIR's entered-in-error:
- 0.5% of records of every type are voided and re-entered: the wrong record,
  later its RecordVoided plus the corrected copy (new event_id, the true
  occurred_at; either order). Some corrections change figures (wrong vaccine,
  dose number, time, symptoms, severity, allocation quantity);
- some doses are voided without re-entry: dose recorded for the wrong person,
  duplicate records (same occurred_at, sometimes from another province's site),
  and, nationally, a quarter of cross-province people lose their first dose,
  so their earliest-dose province moves when the void lands.

Stream order: allocations and earlier visits first (chronologically), then the
window slot by slot, each person's events together in causal order. Voids,
corrected copies and adverse events are held back until their own time, so
a void always follows its target. Voids are never voided.

Determinism: all randomness comes from ``random.Random`` instances seeded from
(seed, scenario); nothing reads the clock. Decisions that figures depend on
use one generator ("plan"), event ids and free-text detail another
("render"), so ``expected()`` can replay the plan alone without building
events. Figures come from the plan's ground truth (producers/figures.py).

Size: one scenario engine; its schedule, the events it emits and the ground truth it
counts independently must change together, so they are kept in one file.
"""

from __future__ import annotations

import argparse
import gc
import heapq
import math
import random
import sys
import time
from array import array
from bisect import bisect
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from itertools import accumulate
from pathlib import Path
from typing import Any

import orjson
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from producers.figures import NEVER, VACCINES, GroundTruth
from schemas.figures import FIGURES
from schemas.reference import provinces

SCENARIOS = ("hcmc-2021-06", "national")

AZ, PF, MO, SI, JA = (VACCINES.index(v) for v in ("astrazeneca", "pfizer", "moderna", "sinopharm", "janssen"))
# days between dose 1 and dose 2, inclusive bounds (≥ 29 so that any two slots are ≥ 4 weeks apart)
INTERVALS = {AZ: (56, 84), PF: (29, 42), MO: (29, 42), SI: (29, 35)}

NSLOTS = 20  # appointment slots start every 30 min from 07:30 to 17:00
SLOT_OFFSETS = [(7 * 60 + 30 + 30 * s) * 60 for s in range(NSLOTS)]
SLOT_WEIGHTS = [8, 10, 10, 10, 10, 9, 8, 6, 3, 3, 5, 7, 8, 8, 8, 7, 6, 5, 4, 3]

# rates
P_VOID = 0.005  # per record: voided and re-entered
P_WRONG_PERSON = 0.001  # per dose: voided, not re-entered
P_DUPLICATE = 0.002  # per dose: a duplicate record, later voided
P_EARLIEST_VOID = 0.25  # per cross-province person: first dose voided
P_SYMPTOMS = 0.03
P_CONTACT = 0.01
P_ALLOCATION_VOID = 0.05
HOUR, DAY = 3600, 86400

SEVERITIES = ("mild", "moderate", "severe", "serious")
SERIOUS = SEVERITIES.index("serious")
SEVERITY_CUM = list(accumulate((0.80, 0.15, 0.04, 0.01)))
AE_SYMPTOMS = (
    (["injection_site_pain"], ["fatigue", "headache"], ["fever", "chills"], ["myalgia"]),
    (["fever", "myalgia"], ["headache", "nausea"], ["fever", "fatigue", "headache"]),
    (["high_fever", "vomiting"], ["dyspnoea"], ["tachycardia"]),
    (["anaphylaxis"], ["thrombosis_with_thrombocytopenia"], ["myocarditis"]),
)
DECL_SYMPTOMS = ("fever", "cough", "shortness_of_breath", "sore_throat", "loss_of_taste_or_smell", "fatigue")
CHANNELS = ("app", "web", "kiosk", "paper")
CHANNEL_CUM = list(accumulate((0.86, 0.08, 0.03, 0.03)))
CHANNEL_SOURCE = {
    "app": "so-suc-khoe-dien-tu/2.1",
    "web": "tiemchungcovid19.gov.vn",
    "kiosk": "kiosk",
    "paper": "paper-entry",
}
BOOKING_SOURCE = "tiemchungcovid19.gov.vn"
LOGISTICS_SOURCE = "logistics:moh-epi"
PRIORITY = (
    "health_worker",
    "frontline_worker",
    "armed_forces",
    "police",
    "elderly_65_plus",
    "chronic_condition",
    "essential_worker",
    "general",
)
PRIORITY_CUM = list(accumulate((0.03, 0.14, 0.037, 0.025, 0.09, 0.08, 0.33, 0.258)))
ELDERLY = PRIORITY.index("elderly_65_plus")
# AstraZeneca ABV…, Pfizer FF…, Moderna 7 digits, Sinopharm 2021MMBxxxx, Janssen XD…
LOTS = (
    [f"ABV{n}" for n in (5300, 5811, 2856, 9317, 4210, 6620, 1187, 3094, 7745, 8163, 2349, 5578)],
    [f"FF{n}" for n in (2593, 8841, 7612, 3321, 5180, 9047, 1276, 6633)],
    [str(n) for n in (3002183, 3002521, 3004667, 3003236, 3001652, 3004217)],
    [f"2021{m:02d}B{n}" for m, n in ((4, 2123), (5, 1376), (5, 2890), (6, 1044), (6, 3317), (7, 2210), (7, 4012))],
    [f"XD{n}" for n in (955, 177, 214, 902)],
)
VOID_REASONS = {
    "VaccinationRegistered": ("entered in error: wrong birth year", "entered in error: wrong priority group"),
    "HealthDeclarationSubmitted": ("entered in error: wrong symptoms", "entered in error: wrong contact answer"),
    "AppointmentScheduled": ("entered in error: wrong site",),
    "CheckedIn": ("entered in error: wrong site",),
    "DoseAdministered": (
        "entered in error: wrong lot number",
        "entered in error: wrong vaccine",
        "entered in error: wrong dose number",
        "entered in error: wrong time",
    ),
    "AdverseEventReported": ("entered in error: wrong severity",),
    "VaccineAllocated": ("entered in error: wrong quantity",),
}
REASON_WRONG_PERSON = "entered in error: dose recorded for the wrong person"
REASON_DUPLICATE = "entered in error: duplicate record"
# where people who were vaccinated away from home mostly had their first dose
CROSS_ORIGINS = (("79", 0.40), ("01", 0.20), ("74", 0.15), ("75", 0.10), ("48", 0.05), ("92", 0.05), ("31", 0.05))

# citizen_id = "0" + province code + a bijective scramble of the person's index
# (9 digits): unique without a lookup table. 3^18 is coprime with 10^9.
_CID_MUL, _CID_MOD = 387_420_489, 10**9

NEW1, NEWJ, HIST2, WIN2, NOSHOW = range(5)
_TZ = timezone(timedelta(hours=7))
_EPOCH_DAY = date(1970, 1, 1)


# ---------------------------------------------------------------- fast formatting


_HMS: list[str] = []
_DAY_PREFIX: dict[int, str] = {}


def _hms() -> list[str]:
    if not _HMS:
        _HMS.extend(f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}+07:00" for s in range(DAY))
    return _HMS


def _fmt(ts: int) -> str:
    """Epoch seconds → RFC 3339 in Vietnam's +07:00."""
    d, s = divmod(ts + 7 * HOUR, DAY)
    prefix = _DAY_PREFIX.get(d)
    if prefix is None:
        prefix = _DAY_PREFIX[d] = (_EPOCH_DAY + timedelta(days=d)).isoformat() + "T"
    return prefix + _HMS[s]


def _day_ts(d: date) -> int:
    """Epoch seconds of local (+07:00) midnight starting day d."""
    return (d - _EPOCH_DAY).days * DAY - 7 * HOUR


_V4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_V4_SET = (0x4000 << 64) | (0x8000 << 48)


def _v4(bits: int) -> int:
    """128 random bits → the integer of a version-4, RFC 4122-variant UUID."""
    return (bits & _V4_CLEAR) | _V4_SET


def _uuid_str(n: int) -> str:
    h = f"{n:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _apportion(total: int, weights: list[float]) -> list[int]:
    """Split total in proportion to weights (largest remainder; deterministic)."""
    s = sum(weights)
    if total <= 0 or s <= 0:
        return [0] * len(weights)
    raw = [total * w / s for w in weights]
    out = [int(r) for r in raw]
    rest = total - sum(out)
    for i in sorted(range(len(raw)), key=lambda i: (out[i] - raw[i], i))[:rest]:
        out[i] += 1
    return out


# ---------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class _Config:
    name: str
    day0: date
    day_counts: tuple[tuple[int, ...], ...]  # [window day][province index] planned doses
    p_hist2: float  # share of window doses that are second doses of people first vaccinated before it
    p_janssen: float
    p_noshow: float
    p_ae: float
    p_cross_hist: float  # second dose in another province than the first (earlier) one
    p_cross_win2: float
    p_dup_elsewhere: float  # a duplicate dose record comes from another province's site
    p_return: float  # a first dose in the window is followed by a second one, if it falls in the window
    new_cum: tuple[tuple[int, ...], tuple[float, ...]]  # first-dose vaccine mix (excluding the janssen share)
    hist_cum: tuple[tuple[int, ...], tuple[float, ...]]
    fixed_allocations: tuple[tuple[str, str, int], ...]  # (province, recipient, doses), hcmc only


def _cum(pairs: dict[int, float]) -> tuple[tuple[int, ...], tuple[float, ...]]:
    keys = tuple(pairs)
    total = sum(pairs.values())
    return keys, tuple(accumulate(pairs[k] / total for k in keys))


def _config(scenario: str, scale: float, days: int, daily_doses: int, start: date | None) -> _Config:
    codes = sorted(provinces())
    if scenario == "hcmc-2021-06":
        total = max(1, round(804_000 * scale))
        per_day = _apportion(total, [0.15, 0.20, 0.22, 0.22, 0.21])
        i79 = codes.index("79")
        counts = tuple(tuple(n if i == i79 else 0 for i in range(len(codes))) for n in per_day)
        allocs = tuple(
            ("79", recipient, max(1, round(doses * scale)))
            for recipient, doses in (("armed_forces", 30_000), ("police", 20_000), ("province_health", 786_000))
        )
        return _Config(
            name=scenario,
            day0=date(2021, 6, 19),
            day_counts=counts,
            p_hist2=0.02,
            p_janssen=0.0,
            p_noshow=0.03,
            p_ae=0.002,
            p_cross_hist=0.0,
            p_cross_win2=0.0,
            p_dup_elsewhere=0.0,
            p_return=0.0,
            new_cum=_cum({AZ: 0.975, SI: 0.025}),
            hist_cum=_cum({AZ: 1.0}),
            fixed_allocations=allocs,
        )
    if scenario == "national":
        if days < 1:
            raise ValueError("days must be at least 1")
        pops = [provinces()[c].population for c in codes]
        per_day = max(1, round(daily_doses * scale))
        split = tuple(_apportion(per_day, pops))
        return _Config(
            name=scenario,
            day0=start or date(2021, 8, 1),
            day_counts=(split,) * days,
            p_hist2=0.30,
            p_janssen=0.01,
            p_noshow=0.03,
            p_ae=0.003,
            p_cross_hist=0.05,
            p_cross_win2=0.03,
            p_dup_elsewhere=0.5,
            p_return=0.9,
            new_cum=_cum({AZ: 0.42, SI: 0.33, PF: 0.13, MO: 0.12}),
            hist_cum=_cum({AZ: 0.60, MO: 0.15, PF: 0.10, SI: 0.15}),
            fixed_allocations=(),
        )
    raise ValueError(f"unknown scenario {scenario!r}; expected one of {', '.join(SCENARIOS)}")


# ---------------------------------------------------------------- the generator


class _Run:
    """One deterministic pass. With render=False only the plan (and ground truth) is made."""

    def __init__(self, sim: Simulation, render: bool):
        cfg = self.cfg = sim._cfg
        self.render = render
        tag = f"nhdp-sim/{cfg.name}/{sim.seed}"
        self._sched_seed = f"{tag}/schedule"
        self.rp = random.Random(f"{tag}/plan")
        self.rr = random.Random(f"{tag}/render")
        refs = provinces()
        self.codes = sorted(refs)
        self.np = len(self.codes)
        self.truth = GroundTruth(self.codes, [refs[c].population for c in self.codes])
        self.count = 0
        self.out: list[dict[str, Any]] = []
        self.heap: list[tuple[int, int, dict[str, Any]]] = []
        self.hseq = 0
        self.appt_seq = 0
        self.slot_text: dict[int, str] = {}
        self.cid_add = (sim.seed * 2_654_435_761) % _CID_MOD
        self.day0_ts = _day_ts(cfg.day0)
        ndays = len(cfg.day_counts)
        origin_idx = [self.codes.index(c) for c, _ in CROSS_ORIGINS]
        self.cross_origins = (origin_idx, list(accumulate(w for _, w in CROSS_ORIGINS)))
        # ~150 doses per site per day; at least 3 sites per province
        self.sites = []
        for p, code in enumerate(self.codes):
            avg = sum(day[p] for day in cfg.day_counts) / ndays
            n = min(9999, max(3, round(avg / 150)))
            self.sites.append([f"{code}-S{k:04d}" for k in range(1, n + 1)])
        if render:
            _hms()

    # -- helpers

    def _uuid(self) -> str:
        return _uuid_str(_v4(self.rr.getrandbits(128)))

    def _plan_uuid(self) -> int:
        return _v4(self.rp.getrandbits(128))

    def _other_province(self, p: int, rng: random.Random) -> int:
        q = int(rng.random() * (self.np - 1))
        return q + 1 if q >= p else q

    def _cross_origin(self, p: int) -> int:
        idx, cum = self.cross_origins
        rp = self.rp.random
        for _ in range(8):
            q = idx[min(bisect(cum, rp() * cum[-1]), len(idx) - 1)]
            if q != p:
                return q
        return self._other_province(p, self.rp)

    def _void_plan(self, t: int, nreasons: int) -> tuple[int, int] | None:
        """None, or (void time, reason index) for a record voided and re-entered."""
        rp = self.rp.random
        if rp() >= P_VOID:
            return None
        return t + 600 + int(rp() * 3 * DAY), int(rp() * nreasons)

    def _push(self, ts: int, ev: dict[str, Any]) -> None:
        self.hseq += 1
        heapq.heappush(self.heap, (ts, self.hseq, ev))

    def _flush(self, ts: int) -> None:
        heap, out = self.heap, self.out
        while heap and heap[0][0] <= ts:
            out.append(heapq.heappop(heap)[2])

    def _event(self, eid: str, et: str, ts: int, code: str, source: str, payload: dict) -> dict[str, Any]:
        return {
            "event_id": eid,
            "event_type": et,
            "occurred_at": _fmt(ts),
            "province_code": code,
            "source": source,
            "payload": payload,
        }

    def _void(self, target: dict[str, Any], tv: int, reason: str) -> None:
        self._push(
            tv,
            self._event(
                self._uuid(),
                "RecordVoided",
                tv,
                target["province_code"],
                target["source"],
                {"voided_event_id": target["event_id"], "reason": reason},
            ),
        )

    def _put(
        self,
        et: str,
        ts: int,
        code: str,
        source: str,
        payload: dict,
        void: tuple[int, int] | None,
        wrong: dict | None = None,
        wrong_ts: int | None = None,
        eid: str | None = None,
        eid2: str | None = None,
    ) -> str:
        """Emit a record; with `void`, emit `wrong` now and, at the void's time, its void and this record."""
        if void is None:  # the common path, inlined
            if eid is None:
                h = "%032x" % ((self.rr.getrandbits(128) & _V4_CLEAR) | _V4_SET)
                eid = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
            self.out.append(
                {
                    "event_id": eid,
                    "event_type": et,
                    "occurred_at": _fmt(ts),
                    "province_code": code,
                    "source": source,
                    "payload": payload,
                }
            )
            return eid
        tv, reason = void
        bad = self._event(
            eid or self._uuid(), et, ts if wrong_ts is None else wrong_ts, code, source, {**payload, **(wrong or {})}
        )
        self.out.append(bad)
        good = self._event(eid2 or self._uuid(), et, ts, code, source, payload)
        if self.rr.random() < 0.5:
            self._push(tv, good)
            self._void(bad, tv, VOID_REASONS[et][reason])
        else:
            self._void(bad, tv, VOID_REASONS[et][reason])
            self._push(tv, good)
        return good["event_id"]

    # -- the schedule: which dose goes where; replayed identically on each pass

    def _schedule(self) -> Iterator[tuple[int, int, int, int, int, Any]]:
        """(day, slot, province, kind, vaccine, link) per planned dose (and no-show), in slot order.

        link: the person counter for NEW1/NEWJ/NOSHOW (NEW1: plus its second dose's (day, province) or
        None), the history index for HIST2, (counter, first province, vaccine) for WIN2.
        """
        cfg = self.cfg
        rng = random.Random(self._sched_seed)
        rnd = rng.random
        ndays = len(cfg.day_counts)
        new_keys, new_cum = cfg.new_cum
        hist_keys, hist_cum = cfg.hist_cum
        p_hist2, p_new = cfg.p_hist2, cfg.p_hist2 + cfg.p_janssen
        pending: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
        c = h = 0
        for d in range(ndays):
            state: list[list[Any] | None] = []
            for p in range(self.np):
                due = pending.pop((d, p), [])
                n = max(cfg.day_counts[d][p], len(due))
                state.append([_apportion(n, SLOT_WEIGHTS), n, due] if n else None)
            for s in range(NSLOTS):
                for p, st in enumerate(state):
                    if st is None:
                        continue
                    for _ in range(st[0][s]):
                        due = st[2]
                        if due and rnd() * st[1] < len(due):
                            entry = due.pop()
                            yield d, s, p, WIN2, entry[2], entry
                        else:
                            u = rnd()
                            if u < p_hist2:
                                yield d, s, p, HIST2, hist_keys[bisect(hist_cum, rnd() * hist_cum[-1])], h
                                h += 1
                            elif u < p_new:
                                yield d, s, p, NEWJ, JA, (c, None)
                                c += 1
                            else:
                                v = new_keys[min(bisect(new_cum, rnd() * new_cum[-1]), len(new_keys) - 1)]
                                lo, hi = INTERVALS[v]
                                d2 = d + lo + int(rnd() * (hi - lo + 1))
                                link = None
                                if d2 < ndays and rnd() < cfg.p_return:
                                    p2 = self._other_province(p, rng) if rnd() < cfg.p_cross_win2 else p
                                    pending.setdefault((d2, p2), []).append((c, p, v))
                                    link = (d2, p2)
                                yield d, s, p, NEW1, v, (c, link)
                                c += 1
                        st[1] -= 1
                        if rnd() < cfg.p_noshow:
                            yield d, s, p, NOSHOW, -1, (c, None)
                            c += 1

    # -- one person's visit

    def _flow(self, pid: int, p: int, slot_ts: int, first: bool, vac: int, num: int, later_ts: int, cid_p: int) -> None:
        """[registration,] appointment, declaration[, check-in, dose[, duplicate], adverse event].

        vac < 0: a no-show. later_ts: when this person's second dose in another province is due (first
        dose may then be voided), else 0. All plan draws happen whether or not we render.
        """
        rp = self.rp.random
        truth = self.truth
        void_plan = self._void_plan
        n_events = 0
        # -- plan
        slot_len = 1800 + 900 * int(rp() * 3)
        checkin_t = slot_ts + int(rp() * slot_len)
        decl_t = checkin_t - 600 - int(rp() * 71400)
        if first:
            reg_t = slot_ts - 129600 - int(rp() * 907200)  # 1.5–12 days before
            appt_t = reg_t + int(rp() * (slot_ts - DAY - reg_t))
            v_reg = void_plan(reg_t, 2)
            truth.registrations.add(reg_t, v_reg[0] if v_reg else NEVER, p, 1)
            if v_reg:
                truth.registrations.add(reg_t, NEVER, p, 1)
                n_events += 3
            else:
                n_events += 1
        else:
            appt_t = slot_ts - DAY - int(rp() * 6 * DAY)
        v_appt = void_plan(appt_t, 1)
        n_events += 3 if v_appt else 1
        sym = rp() < P_SYMPTOMS
        v_decl = void_plan(decl_t, 2)
        if v_decl:
            truth.declarations.add(decl_t, v_decl[0], p, (not sym) if v_decl[1] == 0 else sym)
            n_events += 3
        else:
            n_events += 1
        truth.declarations.add(decl_t, NEVER, p, sym)
        if vac >= 0:
            v_chk = void_plan(checkin_t, 1)
            n_events += 3 if v_chk else 1
            dose_t = checkin_t + 300 + int(rp() * 2100)
            eid = self._plan_uuid()
            eid2 = 0
            gone = 0  # void time of a dose voided without re-entry
            u = rp()
            if u < P_VOID:
                reason = int(rp() * 4)
                bad_vac, bad_num, bad_t = vac, num, dose_t
                if reason == 1:
                    bad_vac = (vac + 1 + int(rp() * (len(VACCINES) - 1))) % len(VACCINES)
                elif reason == 2:
                    bad_num = num + 1 if num < 5 else num - 1
                elif reason == 3:
                    off = 300 + int(rp() * 5100)
                    bad_t = dose_t + off if rp() < 0.5 else dose_t - off
                tv = max(bad_t, dose_t) + 600 + int(rp() * 3 * DAY)
                v_dose = (tv, reason)
                eid2 = self._plan_uuid()
                truth.dose(bad_t, tv, p, pid, bad_vac, bad_num, eid)
                truth.dose(dose_t, NEVER, p, pid, vac, num, eid2)
                n_events += 3
            else:
                v_dose = None
                if u < P_VOID + P_WRONG_PERSON:
                    gone, reason_gone = dose_t + 600 + int(rp() * 3 * DAY), REASON_WRONG_PERSON
                elif later_ts and rp() < P_EARLIEST_VOID:
                    gone, reason_gone = later_ts - 3 * DAY + int(rp() * 7 * DAY), REASON_WRONG_PERSON
                truth.dose(dose_t, gone or NEVER, p, pid, vac, num, eid)
                n_events += 2 if gone else 1
            dup = None
            if rp() < P_DUPLICATE:
                pd = self._other_province(p, self.rp) if rp() < self.cfg.p_dup_elsewhere else p
                dup = (pd, dose_t + HOUR + int(rp() * 5 * DAY), self._plan_uuid())
                truth.dose(dose_t, dup[1], pd, pid, vac, num, dup[2])
                n_events += 2
            ae = None
            if not gone and rp() < self.cfg.p_ae:
                ae_t = dose_t + 900 + int(rp() * 2 * DAY)
                sev = min(bisect(SEVERITY_CUM, rp()), len(SEVERITIES) - 1)
                v_ae = void_plan(ae_t, 1)
                bad_sev = sev
                if v_ae:
                    bad_sev = (sev + 1 + int(rp() * 3)) % 4
                    truth.adverse_events.add(ae_t, v_ae[0], p, bad_sev == SERIOUS)
                    n_events += 3
                else:
                    n_events += 1
                truth.adverse_events.add(ae_t, NEVER, p, sev == SERIOUS)
                ae = (ae_t, sev, bad_sev, v_ae)
        self.count += n_events
        if not self.render:
            return

        # -- render
        rr = self.rr.random
        put = self._put
        code = self.codes[p]
        cid = f"0{self.codes[cid_p]}{(pid * _CID_MUL + self.cid_add) % _CID_MOD:09d}"
        sites = self.sites[p]
        site = sites[int(rr() * len(sites))]
        site_src = "site:" + site
        if first:
            grp = min(bisect(PRIORITY_CUM, rr() * PRIORITY_CUM[-1]), len(PRIORITY) - 1)
            by = 1931 + int(rr() * 26) if grp == ELDERLY else 1961 + int(rr() * 43)
            ch = CHANNELS[min(bisect(CHANNEL_CUM, rr() * CHANNEL_CUM[-1]), 3)]
            pl = {
                "citizen_id": cid,
                "birth_year": by,
                "sex": "female" if rr() < 0.51 else "male",
                "priority_group": PRIORITY[grp],
                "channel": ch,
            }
            wrong = None
            if v_reg:
                wrong = (
                    {"birth_year": by + 1 + int(rr() * 9)}
                    if v_reg[1] == 0
                    else {"priority_group": PRIORITY[(grp + 1) % len(PRIORITY)]}
                )
            put("VaccinationRegistered", reg_t, code, CHANNEL_SOURCE[ch], pl, v_reg, wrong)
        self.appt_seq += 1
        appt_id = f"{code}-AP{self.appt_seq:09d}"
        slot_end = slot_ts + slot_len
        slot_text = self.slot_text  # slot bounds repeat for thousands of people
        a = slot_text.get(slot_ts) or slot_text.setdefault(slot_ts, _fmt(slot_ts))
        b = slot_text.get(slot_end) or slot_text.setdefault(slot_end, _fmt(slot_end))
        pl = {
            "citizen_id": cid,
            "appointment_id": appt_id,
            "site_id": site,
            "slot_start": a,
            "slot_end": b,
            "dose_number": max(num, 1),
        }
        wrong = {"site_id": sites[int(rr() * len(sites))]} if v_appt else None
        put("AppointmentScheduled", appt_t, code, BOOKING_SOURCE, pl, v_appt, wrong)
        ch = CHANNELS[min(bisect(CHANNEL_CUM, rr() * CHANNEL_CUM[-1]), 3)]
        symptoms = sorted(set(DECL_SYMPTOMS[int(rr() * 6)] for _ in range(1 + int(rr() * 2)))) if sym else []
        contact = rr() < P_CONTACT
        pl = {"citizen_id": cid, "symptoms": symptoms, "contact_with_confirmed_case": contact, "channel": ch}
        wrong = None
        if v_decl:
            wrong = (
                {"symptoms": [] if sym else [DECL_SYMPTOMS[int(rr() * 6)]]}
                if v_decl[1] == 0
                else {"contact_with_confirmed_case": not contact}
            )
        put("HealthDeclarationSubmitted", decl_t, code, CHANNEL_SOURCE[ch], pl, v_decl, wrong)
        if vac < 0:
            return
        pl = {"citizen_id": cid, "site_id": site, "appointment_id": appt_id}
        wrong = {"site_id": sites[int(rr() * len(sites))]} if v_chk else None
        put("CheckedIn", checkin_t, code, site_src, pl, v_chk, wrong)
        lots = LOTS[vac]
        lot = lots[int(rr() * len(lots))]
        pl = {"citizen_id": cid, "site_id": site, "vaccine": VACCINES[vac], "lot_number": lot, "dose_number": num}
        dose_id = _uuid_str(eid)
        if v_dose:
            if v_dose[1] == 0:
                wrong = {"lot_number": lots[(lots.index(lot) + 1) % len(lots)]}
            elif v_dose[1] == 1:
                bad_lots = LOTS[bad_vac]
                wrong = {"vaccine": VACCINES[bad_vac], "lot_number": bad_lots[int(rr() * len(bad_lots))]}
            elif v_dose[1] == 2:
                wrong = {"dose_number": bad_num}
            else:
                wrong = None
            valid_id = put(
                "DoseAdministered", dose_t, code, site_src, pl, v_dose, wrong, bad_t, dose_id, _uuid_str(eid2)
            )
            if ae and ae[0] < v_dose[0]:
                valid_id = dose_id  # reported before the correction existed
        else:
            valid_id = put("DoseAdministered", dose_t, code, site_src, pl, None, eid=dose_id)
            if gone:
                self._void(self.out[-1], gone, reason_gone)
        if dup:
            pd = dup[0]
            dsites = self.sites[pd]
            dsite = dsites[int(rr() * len(dsites))]
            ev = self._event(
                _uuid_str(dup[2]), "DoseAdministered", dose_t, self.codes[pd], "site:" + dsite, {**pl, "site_id": dsite}
            )
            self.out.append(ev)
            self._void(ev, dup[1], REASON_DUPLICATE)
        if ae:
            ae_t, sev, bad_sev, v_ae = ae
            opts = AE_SYMPTOMS[sev]
            pl = {
                "citizen_id": cid,
                "severity": SEVERITIES[sev],
                "dose_event_id": valid_id,
                "symptoms": list(opts[int(rr() * len(opts))]),
            }
            wrong = {"severity": SEVERITIES[bad_sev]} if v_ae else None
            # the AE is reported after its dose; it waits in the heap for its own time
            out, self.out = self.out, []
            put("AdverseEventReported", ae_t, code, site_src if rr() < 0.6 else CHANNEL_SOURCE["app"], pl, v_ae, wrong)
            for ev in self.out:
                self._push(ae_t, ev)
            self.out = out

    # -- allocations

    def _plan_allocations(
        self, window_tally: list[list[int]], hist_tally: list[list[int]], first_hist_ts: int
    ) -> list[tuple[int, int, int, str, int, int]]:
        """[(ts, province, vaccine, recipient, doses, wrong doses or 0, void time)] in time order."""
        rp = self.rp.random
        wanted: list[tuple[int, int, str, int, int]] = []  # (earliest ts, province, recipient, vaccine, doses)
        if self.cfg.fixed_allocations:
            for code, recipient, doses in self.cfg.fixed_allocations:
                wanted.append((self.day0_ts - 4 * DAY, self.codes.index(code), recipient, AZ, doses))
        else:
            for p in range(self.np):
                for v in range(len(VACCINES)):
                    if hist_tally[p][v]:
                        wanted.append(
                            (
                                first_hist_ts - 10 * DAY,
                                p,
                                "province_health",
                                v,
                                100 * math.ceil(hist_tally[p][v] * 1.1 / 100),
                            )
                        )
                    if window_tally[p][v]:
                        total = 100 * math.ceil(window_tally[p][v] * 1.15 / 100)
                        shares = (
                            (("armed_forces", 0.04), ("police", 0.03), ("other_unit", 0.02)) if total >= 1000 else ()
                        )
                        rest = total
                        for recipient, share in shares:
                            k = int(total * share) // 10 * 10
                            if k:
                                wanted.append((self.day0_ts - 7 * DAY, p, recipient, v, k))
                                rest -= k
                        wanted.append((self.day0_ts - 7 * DAY, p, "province_health", v, rest))
        plans = []
        for base, p, recipient, v, doses in wanted:
            ts = base + int(rp() * 3) * DAY + 8 * HOUR + int(rp() * 9 * HOUR)  # office hours
            tv = 0
            if rp() < P_ALLOCATION_VOID:
                tv = ts + HOUR + int(rp() * 2 * DAY)
                wrong = doses * 10 if rp() < 0.5 else max(1, doses // 10)
                self.truth.allocations.add(ts, tv, p, wrong)
                self.count += 3
            else:
                wrong = 0
                self.count += 1
            self.truth.allocations.add(ts, NEVER, p, doses)
            plans.append((ts, p, v, recipient, doses, wrong, tv))
        plans.sort()
        return plans

    def _allocation(self, i: int, plan: tuple[int, int, int, str, int, int, int]) -> None:
        ts, p, v, recipient, doses, wrong, tv = plan
        code = self.codes[p]
        pl = {
            "allocation_id": f"AL-{code}-{_fmt(ts)[:10].replace('-', '')}-{i:05d}",
            "vaccine": VACCINES[v],
            "doses": doses,
            "recipient": recipient,
        }
        self._put(
            "VaccineAllocated",
            ts,
            code,
            LOGISTICS_SOURCE,
            pl,
            (tv, 0) if wrong else None,
            {"doses": wrong} if wrong else None,
        )

    # -- the whole pass

    def batches(self, size: int = 10_000) -> Iterator[list[dict[str, Any]]]:
        cfg = self.cfg
        rp = self.rp.random
        nv = len(VACCINES)
        # pre-pass over the schedule: who needs an earlier first dose, and how much vaccine each province gets
        h_day2, h_prov2, h_vac = array("i"), array("B"), array("B")
        window_tally = [[0] * nv for _ in range(self.np)]
        for d, s, p, kind, v, link in self._schedule():
            if kind == HIST2:
                h_day2.append(d)
                h_prov2.append(p)
                h_vac.append(v)
            if v >= 0:
                window_tally[p][v] += 1
        k_hist = len(h_day2)
        # history: where and when the first dose was (≥ 29 days before the second)
        h_prov1, h_day1, h_slot1 = array("B"), array("i"), array("B")
        hist_tally = [[0] * nv for _ in range(self.np)]
        for h in range(k_hist):
            p2, v = h_prov2[h], h_vac[h]
            p1 = self._cross_origin(p2) if rp() < cfg.p_cross_hist else p2
            lo, hi = INTERVALS[v]
            h_prov1.append(p1)
            h_day1.append(h_day2[h] - lo - int(rp() * (hi - lo + 1)))
            h_slot1.append(int(rp() * NSLOTS))
            hist_tally[p1][v] += 1
        first_hist_ts = self.day0_ts + (min(h_day1) if k_hist else 0) * DAY
        allocations = self._plan_allocations(window_tally, hist_tally, first_hist_ts)

        day0 = self.day0_ts
        flow = self._flow
        render = self.render

        def hist_items() -> Iterator[tuple[int, int, int]]:
            order = sorted(range(k_hist), key=lambda h: h_day1[h] * NSLOTS + h_slot1[h])
            for h in order:
                yield day0 + h_day1[h] * DAY + SLOT_OFFSETS[h_slot1[h]], 1, h

        alloc_items = ((plan[0], 0, i) for i, plan in enumerate(allocations))
        for ts, tag, i in heapq.merge(alloc_items, hist_items()):
            if render:
                self._flush(ts)
            if tag == 0:
                if render:
                    self._allocation(i, allocations[i])
            else:
                later = 0
                if h_prov1[i] != h_prov2[i]:
                    later = day0 + h_day2[i] * DAY
                flow(i, h_prov1[i], ts, True, h_vac[i], 1, later, h_prov1[i])
            if len(self.out) >= size:
                yield self.out
                self.out = []

        # the window, slot by slot
        for d, s, p, kind, v, link in self._schedule():
            slot_ts = day0 + d * DAY + SLOT_OFFSETS[s]
            if render:
                self._flush(slot_ts)
            if kind == NEW1:
                c, nxt = link
                later = day0 + nxt[0] * DAY if nxt and nxt[1] != p else 0
                flow(k_hist + c, p, slot_ts, True, v, 1, later, p)
            elif kind == HIST2:
                flow(link, p, slot_ts, False, v, 2, 0, h_prov1[link])
            elif kind == WIN2:
                c1, p1, v1 = link
                flow(k_hist + c1, p, slot_ts, False, v1, 2, 0, p1)
            else:  # NEWJ or NOSHOW
                flow(k_hist + link[0], p, slot_ts, True, v, 1, 0, p)
            if len(self.out) >= size:
                yield self.out
                self.out = []
        if render:
            self._flush(NEVER)
        if self.out:
            yield self.out
            self.out = []


# ---------------------------------------------------------------- public API


class Simulation:
    """A scenario with its parameters. Cheap to create; events are made on demand.

    events() regenerates the identical stream on every call; expected() and
    total_events replay only the plan (a fraction of the cost) once, then cache.
    """

    def __init__(self, scenario: str, seed: int, scale: float, days: int, daily_doses: int, start: date | None):
        if scale <= 0:
            raise ValueError("scale must be positive")
        self.scenario = scenario
        self.seed = seed
        self.scale = scale
        self.days = days if scenario == "national" else 5
        self.daily_doses = daily_doses
        self._cfg = _config(scenario, scale, days, daily_doses, start)
        self.start = self._cfg.day0
        self._truth: GroundTruth | None = None
        self._total: int | None = None

    @property
    def window(self) -> tuple[datetime, datetime]:
        """[first day 00:00, day after the last 00:00) in +07:00."""
        a = datetime.combine(self.start, datetime.min.time(), _TZ)
        return a, a + timedelta(days=self.days)

    @property
    def planned_doses(self) -> int:
        """Doses planned in the window (before any voids)."""
        return sum(sum(day) for day in self._cfg.day_counts)

    def batches(self, size: int = 10_000) -> Iterator[list[dict[str, Any]]]:
        """The events in lists of about `size` (convenient for POST /v1/events)."""
        run = _Run(self, render=True)
        yield from run.batches(size)
        if self._truth is None:
            self._truth, self._total = run.truth, run.count

    def events(self) -> Iterator[dict[str, Any]]:
        """Every event, in the JSON form producers post (DESIGN §2)."""
        for batch in self.batches():
            yield from batch

    def _plan(self) -> GroundTruth:
        if self._truth is None:
            run = _Run(self, render=False)
            for _ in run.batches():
                pass
            self._truth, self._total = run.truth, run.count
        return self._truth

    @property
    def ground_truth(self) -> GroundTruth:
        return self._plan()

    @property
    def total_events(self) -> int:
        """Exact number of events events() yields (plans the run once if needed)."""
        self._plan()
        assert self._total is not None
        return self._total

    def expected(self, as_of: datetime | str | None = None) -> dict[str, Any]:
        """{"national": {...}, "provinces": {code: {...}}} per DESIGN §4, optionally as of a time."""
        return self._plan().figures(as_of)

    def describe(self) -> dict[str, Any]:
        a, b = self.window
        return {
            "scenario": self.scenario,
            "seed": self.seed,
            "scale": self.scale,
            "days": self.days,
            "daily_doses": self.daily_doses if self.scenario == "national" else None,
            "window": [a.isoformat(), b.isoformat()],
            "planned_doses": self.planned_doses,
        }


def simulate(
    scenario: str,
    seed: int = 2021,
    scale: float = 1.0,
    days: int = 1,
    daily_doses: int = 1_400_000,
    start: date | None = None,
) -> Simulation:
    """A deterministic campaign. `days`, `daily_doses` and `start` apply to "national" only;
    `scale` multiplies people, doses and (hcmc) allocations."""
    return Simulation(scenario, seed, scale, days, daily_doses, start)


def write(sim: Simulation, out_dir: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Write events.jsonl (one event per line) and expected.json; return a summary."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    events_path, expected_path = out / "events.jsonl", out / "expected.json"
    total = sim.total_events
    dumps = orjson.dumps
    n = 0
    t0 = time.perf_counter()
    # events hold no reference cycles: the cyclic collector would only cost ~10% here
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        with (
            open(events_path, "wb") as f,
            Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                disable=not progress,
            ) as bar,
        ):
            task = bar.add_task(f"{sim.scenario} events", total=total)
            for batch in sim.batches(20_000):
                f.write(b"\n".join(map(dumps, batch)) + b"\n")
                n += len(batch)
                bar.update(task, completed=n)
    finally:
        if gc_was_enabled:
            gc.enable()
    seconds = time.perf_counter() - t0
    expected = {"scenario": sim.describe(), **sim.expected()}
    expected_path.write_bytes(orjson.dumps(expected, option=orjson.OPT_INDENT_2))
    return {
        **sim.describe(),
        "events": n,
        "seconds": round(seconds, 3),
        "events_per_s": round(n / seconds),
        "events_path": str(events_path),
        "expected_path": str(expected_path),
        "national": expected["national"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m producers.simulator", description=__doc__.splitlines()[0])
    ap.add_argument("scenario", choices=SCENARIOS)
    ap.add_argument("--seed", type=int, default=2021)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--days", type=int, default=1)
    ap.add_argument("--daily-doses", type=int, default=1_400_000)
    ap.add_argument("--start", type=date.fromisoformat, default=None)
    ap.add_argument("--out", type=Path, default=Path(".nhdp/sim"))
    args = ap.parse_args(argv)
    sim = simulate(args.scenario, args.seed, args.scale, args.days, args.daily_doses, args.start)
    summary = write(sim, args.out)
    nat = summary.pop("national")
    sys.stdout.write(
        orjson.dumps({**summary, "national": {k: nat[k] for k in FIGURES}}, option=orjson.OPT_INDENT_2).decode() + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
