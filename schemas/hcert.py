"""Vaccination certificates in the EU DCC (HCERT) format: the payload, and its checks.

A certificate is a CWT with the issuing country (`iss`), issue time, expiry
and `-260: {1: payload}`, where the payload follows the EU DCC schema 1.3.0:
the holder's name (with its ICAO 9303 transliteration), date of birth, and one
vaccination entry, the latest valid dose, numbered among the holder's valid
doses (a voided dose is neither certified nor counted). It is sealed as
schemas/cose_tokens.py does: COSE_Sign1 ES256, zlib, Base45, `HC1:`.

Our vaccines map onto the EU value sets through their encoding instructions
(ehn-dcc-valuesets `vaccine-encoding-instructions.json`): every vaccine the edge
accepts has an entry there; `unknown` (what an Avro reader makes of a vaccine
added to the catalog after it) is refused until it gets one. Doses
recorded as `astrazeneca` are certified as Vaxzevria; Vietnam also received
Covishield (SII's AstraZeneca vaccine, its own EU code), which the event
catalog does not tell apart.

WHO DDCC:VS requires the lot number, which the EU payload has no field for:
it travels in a private-use CWT claim (below -65536, RFC 8392 §9.1), so EU
verifiers ignore it and the EU payload stays valid against the schema.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import unicodedata
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone

from schemas.bounds import HCM_OFFSET_S
from schemas.cose_tokens import EXP, IAT, ISS, Refused, check_times, open_signed, seal
from schemas.signing_keys import PublicKey

PREFIX = "HC1:"
CLAIM_HCERT = -260
CLAIM_LOT = -65537  # private use: WHO DDCC:VS's vaccine batch number
SCHEMA_VERSION = "1.3.0"
COUNTRY = "VN"
ISSUER = "Ministry of Health of Viet Nam"
TTL = timedelta(days=365)
COVID_19 = "840539006"  # SNOMED CT, the EU value set disease-agent-targeted
VIETNAM_TIME = timezone(timedelta(seconds=HCM_OFFSET_S))  # dt is the local date of vaccination
_UVCI_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class Product:
    """A vaccine's EU codes: medicinal product, marketing authorisation holder, type; and its primary series."""

    mp: str
    ma: str
    vp: str
    series: int


# From the EU encoding instructions (value sets of 2023-01-25); `vp` is the specific SNOMED type each lists.
PRODUCTS: dict[str, Product] = {
    "pfizer": Product("EU/1/20/1528", "ORG-100030215", "1119349007", 2),  # Comirnaty
    "moderna": Product("EU/1/20/1507", "ORG-100031184", "1119349007", 2),  # Spikevax
    "astrazeneca": Product("EU/1/21/1529", "ORG-100001699", "29061000087103", 2),  # Vaxzevria
    "janssen": Product("EU/1/20/1525", "ORG-100001417", "29061000087103", 1),  # Jcovden
    "sinopharm": Product("BBIBP-CorV", "ORG-100020693", "1157024006", 2),
    "sputnik_v": Product("Sputnik-V", "Gamaleya-Research-Institute", "29061000087103", 2),
    "abdala": Product("Abdala", "CIGB", "28531000087107", 3),  # its only listed type; a 3-dose series
    "hayat_vax": Product("Hayat-Vax", "ORG-100023050", "1157024006", 2),
    "covaxin": Product("Covaxin", "Bharat-Biotech", "1157024006", 2),
    "novavax": Product("EU/1/21/1618", "ORG-100032020", "1162643001", 2),  # Nuvaxovid
}

# ICAO 9303 part 3 §6: letters transliterated to more than one letter; the rest lose their diacritics.
_ICAO_MULTI = {"Ä": "AE", "Æ": "AE", "Å": "AA", "Ö": "OE", "Ø": "OE", "Œ": "OE", "Ü": "UE", "ß": "SS", "Þ": "TH"}
_ICAO_SINGLE = {"Đ": "D", "Ð": "D", "Ł": "L", "Ħ": "H", "Ŧ": "T", "Ŋ": "N"}


def icao(name: str) -> str:
    """A name as ICAO 9303 machine-readable text: A-Z, and '<' for each space or hyphen.

    Vietnamese letters lose their diacritics (Nguyễn → NGUYEN, Đặng → DANG);
    apostrophes and other marks are dropped, as in the schema's own example."""
    out = []
    for ch in name.upper():
        if ch in _ICAO_MULTI:
            out.append(_ICAO_MULTI[ch])
        elif ch in _ICAO_SINGLE:
            out.append(_ICAO_SINGLE[ch])
        elif ch in " -,":
            out.append("<")
        else:
            base = unicodedata.normalize("NFKD", ch)[0]
            if "A" <= base <= "Z":
                out.append(base)
    text = "".join(out)
    while "<<" in text:
        text = text.replace("<<", "<")
    return text.strip("<")[:80]


def new_uvci() -> str:
    """A unique certificate identifier (UVCI option 3, opaque): URN:UVCI:01:VN:<26 characters>."""
    n = int.from_bytes(secrets.token_bytes(16))
    digits = []
    for _ in range(26):
        n, r = divmod(n, 36)
        digits.append(_UVCI_ALPHABET[r])
    return f"URN:UVCI:01:{COUNTRY}:" + "".join(digits)


def uci_hash(ci: str) -> str:
    """The EU DCC revocation lists' UCI hash: SHA-256 of the identifier, first 16 bytes, base64."""
    return base64.b64encode(hashlib.sha256(ci.encode()).digest()[:16]).decode()


def series_numbers(ordinal: int, product: Product) -> tuple[int, int]:
    """(dn, sd) of the ordinal-th valid dose: a booster after a one-dose series is n/1, after a longer one n/n
    (the EU encoding instructions)."""
    if ordinal <= product.series or product.series == 1:
        return ordinal, product.series
    return ordinal, ordinal


@dataclass(frozen=True)
class Holder:
    family_name: str
    given_name: str
    birth_date: str  # YYYY-MM-DD, YYYY-MM or YYYY, as the schema allows


def payload(holder: Holder, dose: dict, ordinal: int, ci: str) -> dict:
    """The EU DCC 1.3.0 payload certifying one valid dose (a citizen record's dose entry)."""
    product = PRODUCTS.get(dose["vaccine"])
    if product is None:
        raise Refused("uncertifiable", f"a dose of vaccine {dose['vaccine']!r} has no EU DCC product code")
    dn, sd = series_numbers(ordinal, product)
    at = datetime.fromisoformat(dose["occurred_at"].replace("Z", "+00:00")).astimezone(VIETNAM_TIME)
    name = {"fn": holder.family_name, "fnt": icao(holder.family_name)}
    if holder.given_name:
        name |= {"gn": holder.given_name, "gnt": icao(holder.given_name)}
    entry = {"tg": COVID_19, "vp": product.vp, "mp": product.mp, "ma": product.ma, "dn": dn, "sd": sd}
    entry |= {"dt": at.date().isoformat(), "co": COUNTRY, "is": ISSUER, "ci": ci}
    return {"ver": SCHEMA_VERSION, "nam": name, "dob": holder.birth_date, "v": [entry]}


def sign(dcc: dict, lot: str | None, key: PublicKey, private, now: datetime | None = None) -> tuple[str, int, int]:
    """(HC1 text, iat, exp): the payload signed with the key, valid TTL from now."""
    now = now or datetime.now(UTC)
    iat = int(now.timestamp())
    exp = int((now + TTL).timestamp())
    claims: dict = {ISS: COUNTRY, IAT: iat, EXP: exp, CLAIM_HCERT: {1: dcc}}
    if lot:
        claims[CLAIM_LOT] = lot
    return seal(PREFIX, claims, key.kid, private), iat, exp


@dataclass(frozen=True)
class Verified:
    kid: bytes
    issuer: str
    issued_at: int
    expires_at: int
    dcc: dict
    lot: str | None

    @property
    def vaccination(self) -> dict:
        return self.dcc["v"][0]


def verify(text: str, key_for, now: int, revoked: frozenset[str] | set[str] = frozenset()) -> Verified:
    """The certificate if it verifies against the trusted keys, is current and is not revoked; Refused otherwise.

    key_for(kid): the trusted hcert key of that id, or None (a trust list)."""
    key, claims = open_signed(PREFIX, text, key_for)
    iat, exp = check_times(claims, key, now)
    container = claims.get(CLAIM_HCERT)
    dcc = container.get(1) if isinstance(container, dict) else None
    if not isinstance(dcc, dict) or not isinstance(dcc.get("v"), list) or len(dcc["v"]) != 1:
        raise Refused("claims", "the certificate carries no EU DCC vaccination payload (-260/1 with one v entry)")
    ci = dcc["v"][0].get("ci")
    if not isinstance(ci, str):
        raise Refused("claims", "the certificate has no identifier (v/ci)")
    if uci_hash(ci) in revoked:
        raise Refused("revoked", f"certificate {ci} is revoked: a dose it certifies was voided")
    lot = claims.get(CLAIM_LOT)
    return Verified(key.kid, str(claims.get(ISS)), iat, exp, dcc, lot if isinstance(lot, str) else None)


def birth_date_problem(text: str) -> str | None:
    """Why a date of birth is not one the EU schema accepts (YYYY, YYYY-MM or YYYY-MM-DD in 1900–2099), or None."""
    parts = text.split("-")
    try:
        if not 1 <= len(parts) <= 3 or len(parts[0]) != 4 or any(len(p) != 2 for p in parts[1:]):
            raise ValueError
        year, month, day = int(parts[0]), int(parts[1]) if len(parts) > 1 else 1, int(parts[2]) if len(parts) > 2 else 1
        born = date(year, month, day)
    except ValueError:
        return "date_of_birth: must be YYYY-MM-DD (or YYYY-MM, or YYYY when only that is known)"
    if not 1900 <= year <= 2099:
        return "date_of_birth: the year must be between 1900 and 2099 (EU DCC schema)"
    if born > datetime.now(VIETNAM_TIME).date():
        return "date_of_birth: is in the future"
    return None
