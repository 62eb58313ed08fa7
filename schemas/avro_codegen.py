"""Compile an Avro schema into specialised Python encode/decode functions.

Why: fastavro interprets the schema for every datum (type-string dispatch,
dict lookups in the schema, one ``fo.read`` call per varint byte). For the
small flat records of the event catalog that costs 2-3x the work of straight-line
code that knows the layout. This module generates that code once per schema
(or per writer/reader pair) with ``exec``; tests/unit/test_codec_unit.py checks it
byte-for-byte and value-for-value against fastavro.

The generated decoder is also the place where garbage is caught: every length
and count is bounds-checked before use (no huge allocations, no partial reads),
varints are limited to 10 bytes, enum and union indexes are range-checked, and
the body must be consumed exactly.

Anything not handled raises :class:`Unsupported`; the codec then falls back to
fastavro for that schema.

Size: one code generator; its encoder and decoder emitters share the naming,
bounds checks and name escaping of the generated source, which is safest kept in one place.
"""

from __future__ import annotations

import copy
import re
import struct
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any
from uuid import UUID

PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
NAMED = frozenset({"record", "error", "enum", "fixed"})

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)
_ONE_US = timedelta(microseconds=1)
_DAYS_SHIFT = date(1970, 1, 1).toordinal()
INT_MIN, INT_MAX = -(1 << 31), (1 << 31) - 1
LONG_MIN, LONG_MAX = -(1 << 63), (1 << 63) - 1
# Logical types of the spec we do not generate code for; unknown names are
# ignored, as the spec says.
_SPEC_LOGICAL = frozenset(
    {
        "decimal",
        "big-decimal",
        "uuid",
        "date",
        "time-millis",
        "time-micros",
        "timestamp-millis",
        "timestamp-micros",
        "timestamp-nanos",
        "local-timestamp-millis",
        "local-timestamp-micros",
        "local-timestamp-nanos",
        "duration",
    }
)
# Cap for arrays/maps whose items may encode to zero bytes (e.g. array of null),
# where the remaining length cannot bound the count.
MAX_EMPTY_ITEMS = 1 << 16
# Items (array entries, map entries) one datum may decode to, over all its blocks: a
# writer schema of `array<null>` otherwise turns 300 bytes into millions of objects.
MAX_ITEMS = 10_000
# Avro's name grammar (the spec, "Names"): every name that reaches generated source
# is one of these, and is embedded with repr() besides.
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FULLNAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")

Encoder = Callable[[Any, bytearray], None]
Decoder = Callable[[bytes, int], Any]


class Unsupported(Exception):
    """The schema uses something this compiler does not generate code for."""


class InvalidSchema(ValueError):
    """A schema that breaks Avro's rules (a name outside its grammar): never compiled, never decoded."""


def _check_name(value: Any, what: str, full: bool = False) -> str:
    pattern = _FULLNAME if full else _NAME
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise InvalidSchema(f"{what} {str(value)[:80]!r} is not a valid Avro name")
    return value


class ResolutionError(Exception):
    """The reader schema cannot read data of the writer schema at all."""


class CorruptData(ValueError):
    """Raised by generated decoders: the bytes are not valid for the schema."""


class UnresolvableValue(ValueError):
    """Raised by generated decoders: valid data the reader cannot represent
    (an enum symbol or union branch unknown to the reader, without default)."""


# --------------------------------------------------------------------------
# Normalisation: resolve names, namespaces and references into a tree of dicts.


def normalize(schema: Any) -> dict[str, Any]:
    """Return a tree where every named reference is replaced by its definition."""
    return _Normalizer().node(schema, "")


class _Normalizer:
    def __init__(self) -> None:
        self.named: dict[str, dict[str, Any] | None] = {}  # None while being defined

    @staticmethod
    def _full(name: str, ns: str) -> str:
        return name if "." in name or not ns else f"{ns}.{name}"

    def node(self, s: Any, ns: str) -> dict[str, Any]:
        if isinstance(s, str):
            if s in PRIMITIVES:
                return {"type": s}
            for cand in (self._full(s, ns), s):
                if cand in self.named:
                    found = self.named[cand]
                    if found is None:
                        raise Unsupported(f"recursive type {cand}")
                    return found
            raise Unsupported(f"unknown type name {s!r}")
        if isinstance(s, list):
            return {"type": "union", "branches": [self.node(b, ns) for b in s]}
        if not isinstance(s, dict):
            raise Unsupported(f"not a schema: {s!r}")
        t = s.get("type")
        if isinstance(t, (list, dict)) or (isinstance(t, str) and t not in PRIMITIVES | NAMED | {"array", "map"}):
            # {"type": <schema>} wrapper or a reference written as {"type": "Name"}
            return self.node(t, ns)
        logical = s.get("logicalType")
        if t in PRIMITIVES:
            return {"type": t, "logical": logical} if logical else {"type": t}
        if t == "array":
            return {"type": "array", "items": self.node(s["items"], ns)}
        if t == "map":
            return {"type": "map", "values": self.node(s["values"], ns)}
        name = _check_name(s.get("name"), f"{t} name", full=True)
        if s.get("namespace"):
            _check_name(s["namespace"], "namespace", full=True)
        for alias in s.get("aliases", []):
            _check_name(alias, "alias", full=True)
        space = s.get("namespace", ns) if "." not in name else name.rpartition(".")[0]
        full = self._full(name, space) if "." not in name else name
        if full in self.named:
            raise Unsupported(f"type {full} defined twice")
        aliases = [self._full(a, space) for a in s.get("aliases", [])]
        self.named[full] = None
        if t in ("record", "error"):
            fields = []
            for f in s["fields"]:
                _check_name(f.get("name"), "field name")
                for alias in f.get("aliases", []):
                    _check_name(alias, "field alias")
                nf = {"name": f["name"], "type": self.node(f["type"], space), "aliases": list(f.get("aliases", []))}
                if "default" in f:
                    nf["default"] = f["default"]
                fields.append(nf)
            out = {"type": "record", "name": full, "aliases": aliases, "fields": fields}
        elif t == "enum":
            out = {
                "type": "enum",
                "name": full,
                "aliases": aliases,
                "symbols": [_check_name(x, "enum symbol") for x in s["symbols"]],
            }
            if "default" in s:
                out["default"] = s["default"]
        else:
            out = {"type": "fixed", "name": full, "aliases": aliases, "size": int(s["size"])}
            if logical:
                out["logical"] = logical
        self.named[full] = out
        return out


def _short(name: str) -> str:
    return name.rpartition(".")[2]


def _min_size(n: dict[str, Any]) -> int:
    """Fewest bytes a value of this type can encode to."""
    t = n["type"]
    if t == "null":
        return 0
    if t in ("float",):
        return 4
    if t == "double":
        return 8
    if t == "fixed":
        return n["size"]
    if t == "record":
        return sum(_min_size(f["type"]) for f in n["fields"])
    if t == "union":
        return 1 + min(_min_size(b) for b in n["branches"])
    return 1


def default_value(n: dict[str, Any], v: Any) -> Any:
    """Python value of a JSON default for type node n (Avro spec rules)."""
    t = n["type"]
    if t == "union":
        return default_value(n["branches"][0], v)
    if t in ("bytes", "fixed"):
        return v.encode("latin-1")
    if t in ("float", "double"):
        return float(v)
    if t == "array":
        return [default_value(n["items"], x) for x in v]
    if t == "map":
        return {k: default_value(n["values"], x) for k, x in v.items()}
    if t == "record":
        out = {}
        for f in n["fields"]:
            if f["name"] in v:
                out[f["name"]] = default_value(f["type"], v[f["name"]])
            elif "default" in f:
                out[f["name"]] = default_value(f["type"], f["default"])
            else:
                raise ResolutionError(f"default for {n['name']} lacks field {f['name']}")
        return out
    return v


# --------------------------------------------------------------------------
# Code generation helpers.


class _Gen:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.consts: dict[str, Any] = {}
        self.n = 0

    def var(self, prefix: str = "v") -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def const(self, value: Any, prefix: str = "K") -> str:
        name = self.var(prefix)
        self.consts[name] = value
        return name

    def emit(self, ind: int, line: str) -> None:
        self.lines.append("    " * ind + line)

    def build(self, fname: str, params: str, label: str) -> Callable:
        consts = dict(self.consts)
        names = ", ".join(consts)
        src = [f"def _factory({names}):", f"    def {fname}({params}):"]
        src += self.lines or ["        pass"]
        src.append(f"    return {fname}")
        code = compile("\n".join(src) + "\n", f"<avro {fname} {label}>", "exec")
        ns: dict[str, Any] = {}
        exec(code, _RUNTIME, ns)
        fn = ns["_factory"](**consts)
        fn.__source__ = "\n".join(src)  # type: ignore[attr-defined]
        return fn


def _ts_millis(v: Any) -> Any:
    if isinstance(v, datetime):
        if v.tzinfo is None:
            raise ValueError("naive datetime; give a timezone-aware datetime or epoch milliseconds")
        return (v - EPOCH) // _ONE_MS
    return v


def _ts_micros(v: Any) -> Any:
    if isinstance(v, datetime):
        if v.tzinfo is None:
            raise ValueError("naive datetime; give a timezone-aware datetime or epoch microseconds")
        return (v - EPOCH) // _ONE_US
    return v


def _date_days(v: Any) -> Any:
    if isinstance(v, date) and not isinstance(v, datetime):
        return v.toordinal() - _DAYS_SHIFT
    return v


def _uuid_str(v: Any) -> Any:
    return str(v) if isinstance(v, UUID) else v


def _wlong(out: bytearray, n: int) -> None:
    """Append zig-zagged value n (>= 0x80) as a varint; n must fit 64 bits."""
    if n < 0 or n >> 64:
        raise ValueError("integer out of the 64-bit long range")
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _check_int(v: int) -> None:
    if not INT_MIN <= v <= INT_MAX:
        raise ValueError(f"{v} out of the 32-bit int range")


_RUNTIME: dict[str, Any] = {
    "__builtins__": __builtins__,
    "CorruptData": CorruptData,
    "UnresolvableValue": UnresolvableValue,
    "_wlong": _wlong,
    "_check_int": _check_int,
    "_ts_millis": _ts_millis,
    "_ts_micros": _ts_micros,
    "_date_days": _date_days,
    "_uuid_str": _uuid_str,
    "EPOCH": EPOCH,
    "timedelta": timedelta,
    "UUID": UUID,
    "date": date,
    "DAYS_SHIFT": _DAYS_SHIFT,
    "deepcopy": copy.deepcopy,
    "unpack_f": struct.Struct("<f").unpack_from,
    "unpack_d": struct.Struct("<d").unpack_from,
    "pack_f": struct.Struct("<f").pack,
    "pack_d": struct.Struct("<d").pack,
    "INT_MIN": INT_MIN,
    "INT_MAX": INT_MAX,
    "ZZ": tuple((b >> 1) ^ -(b & 1) for b in range(128)),
    "LEN": tuple(b >> 1 if not b & 1 else 1 << 62 for b in range(128)),
    "NEGATIVE": 1 << 62,
}


# --------------------------------------------------------------------------
# Decoder.

_READ_LOGICAL = {
    ("long", "timestamp-millis"): "{t} = EPOCH + timedelta(milliseconds={t})",
    ("long", "timestamp-micros"): "{t} = EPOCH + timedelta(microseconds={t})",
    ("int", "date"): "{t} = date.fromordinal({t} + DAYS_SHIFT)",
    ("string", "uuid"): "{t} = UUID({t})",
}


def compile_decoder(writer: Any, reader: Any = None, *, logical_types: bool = False) -> Decoder:
    """``decode(buf, pos) -> value`` reading one datum of ``writer`` from
    ``buf[pos:]``, resolved to ``reader`` (None: same as writer). The datum must
    end exactly at ``len(buf)``.

    Raises IndexError, CorruptData, UnicodeDecodeError, ValueError or
    UnresolvableValue on bad input (the codec maps them to one error type).
    With logical_types, timestamp-millis/micros, date and uuid become datetime,
    date and UUID objects as fastavro returns them; otherwise the raw long/str.
    """
    w = normalize(writer)
    r = normalize(reader) if reader is not None else None
    if r is not None and r == w:
        r = None
    g = _Gen()
    d = _Decoder(g, logical_types)
    d.read(w, r, "result", 2)
    g.emit(2, "if pos != blen:")
    g.emit(3, "raise CorruptData(f'{blen - pos} unread trailing byte(s) after the datum')")
    g.emit(2, "return result")
    g.lines[0:0] = ["        blen = len(buf)", f"        room = {MAX_ITEMS}"]
    label = w.get("name", w["type"])
    return g.build("decode", "buf, pos", label)


class _Decoder:
    def __init__(self, g: _Gen, logical_types: bool) -> None:
        self.g = g
        self.logical_types = logical_types

    def varint(self, t: str, ind: int, kind: str = "long", table: str = "ZZ") -> None:
        """Read a zig-zag varint into t.

        One-byte values go through a table; longer ones (timestamps are 6 bytes,
        a 64-char subject_id's length 2) through code unrolled up to the 10-byte
        maximum, which is about twice as fast as a loop in CPython.
        """
        e, g = self.g.emit, self.g
        b, n = g.var("b"), g.var("n")
        e(ind, f"{b} = buf[pos]")
        e(ind, f"if {b} < 0x80:")
        e(ind + 1, f"{t} = {table}[{b}]")
        e(ind + 1, "pos += 1")
        e(ind, "else:")
        e(ind + 1, f"{n} = {b} & 0x7F")
        level = ind + 1
        for k in range(1, 10):
            e(level, f"{b} = buf[pos + {k}]")
            e(level, f"{n} |= ({b} & 0x7F) << {7 * k}")
            e(level, f"if {b} < 0x80:")
            e(level + 1, f"pos += {k + 1}")
            e(level, "else:")
            level += 1
        e(level, "raise CorruptData('varint longer than 10 bytes')")
        e(ind + 1, f"if {n} >> 64:")
        e(ind + 2, "raise CorruptData('varint exceeds 64 bits')")
        e(ind + 1, f"{t} = ({n} >> 1) ^ -({n} & 1)")
        if table == "LEN":
            e(ind + 1, f"if {t} < 0:")
            e(ind + 2, f"{t} = NEGATIVE")
        if kind == "int":  # one-byte values are always in range
            e(ind + 1, f"if {t} < INT_MIN or {t} > INT_MAX:")
            e(ind + 2, f"raise CorruptData(f'int value {{{t}}} out of the 32-bit range')")

    def length(self, t: str, ind: int, what: str) -> str:
        """Read a byte length into t, check it against what is left; return end var.

        Negative lengths map to a huge value so one comparison rejects both.
        """
        g = self.g
        end = g.var("e")
        self.varint(t, ind, table="LEN")
        g.emit(ind, f"{end} = pos + {t}")
        g.emit(ind, f"if {end} > blen:")
        g.emit(
            ind + 1,
            f"raise CorruptData(f'{what} length prefix at byte {{pos}} is negative or runs past the end ({{blen}} bytes)')",
        )
        return end

    def enum_index(self, t: str, ind: int, values: list, what: str) -> None:
        """Read an enum index into t as values[index].

        Writers emit indexes < 64 as one byte, so the raw byte maps straight to
        the value through a 256-entry table (None = not a valid index).
        """
        g, e = self.g, self.g.emit
        if len(values) > 64:
            raise Unsupported(f"{what} with more than 64 symbols")
        table = [None] * 256
        for i, v in enumerate(values):
            table[i << 1] = v
        b = g.var("b")
        k = g.const(tuple(table), "IDX")
        e(ind, f"{b} = buf[pos]")
        e(ind, "pos += 1")
        e(ind, f"{t} = {k}[{b}]")
        e(ind, f"if {t} is None:")
        e(ind + 1, f"raise CorruptData({what!r} + f' index byte {{{b}}} at {{pos - 1}} is out of range')")

    def union_index(self, ind: int, n: int, what: str) -> str:
        """Read a union index byte; return the variable holding 2 * index."""
        g, e = self.g, self.g.emit
        if n > 64:
            raise Unsupported(f"{what} with more than 64 branches")
        b = g.var("b")
        e(ind, f"{b} = buf[pos]")
        e(ind, "pos += 1")
        return b

    def read(self, w: dict, r: dict | None, t: str, ind: int) -> None:
        """Emit code reading a w-datum resolved to r (None = no resolution) into t."""
        if r is not None and r == w:
            r = None
        if r is not None:
            self.resolve(w, r, t, ind)
            return
        g, e = self.g, self.g.emit
        typ = w["type"]
        if typ == "null":
            e(ind, f"{t} = None")
        elif typ == "boolean":
            b = g.var("b")
            e(ind, f"{b} = buf[pos]")
            e(ind, "pos += 1")
            e(ind, f"if {b} > 1:")
            e(ind + 1, f"raise CorruptData(f'boolean byte {{{b}}} is neither 0 nor 1')")
            e(ind, f"{t} = {b} == 1")
        elif typ in ("int", "long"):
            self.varint(t, ind, typ)
        elif typ == "float":
            e(ind, f"{t}, = unpack_f(buf, pos)")
            e(ind, "pos += 4")
        elif typ == "double":
            e(ind, f"{t}, = unpack_d(buf, pos)")
            e(ind, "pos += 8")
        elif typ in ("bytes", "string"):
            n = g.var("n")
            end = self.length(n, ind, typ)
            e(ind, f"{t} = buf[pos:{end}]" + (".decode()" if typ == "string" else ""))
            e(ind, f"pos = {end}")
        elif typ == "fixed":
            e(ind, f"if pos + {w['size']} > blen:")
            e(ind + 1, f"raise CorruptData({'fixed ' + w['name'] + ' runs past the end'!r})")
            e(ind, f"{t} = buf[pos:pos + {w['size']}]")
            e(ind, f"pos += {w['size']}")
        elif typ == "enum":
            self.enum_index(t, ind, w["symbols"], f"enum {w['name']}")
        elif typ == "array":
            self.block_loop(w["items"], r and r["items"], t, ind, is_map=False)
        elif typ == "map":
            self.block_loop(w["values"], r and r["values"], t, ind, is_map=True)
        elif typ == "union":
            branches = w["branches"]
            b = self.union_index(ind, len(branches), "union")
            for k, br in enumerate(branches):
                e(ind, f"{'if' if k == 0 else 'elif'} {b} == {k << 1}:")
                self.read(br, None, t, ind + 1)
            e(ind, "else:")
            e(
                ind + 1,
                f"raise CorruptData(f'union index byte {{{b}}} at {{pos - 1}} is out of range (0..{len(branches) - 1})')",
            )
        elif typ == "record":
            names = []
            for f in w["fields"]:
                v = g.var("f")
                self.read(f["type"], None, v, ind)
                names.append(f"{f['name']!r}: {v}")
            e(ind, f"{t} = {{{', '.join(names)}}}")
        else:  # pragma: no cover - normalize() admits nothing else
            raise Unsupported(typ)
        self.logical(w, t, ind)

    def logical(self, w: dict, t: str, ind: int) -> None:
        lt = w.get("logical")
        if not lt or not self.logical_types:
            return
        tmpl = _READ_LOGICAL.get((w["type"], lt))
        if tmpl is not None:
            self.g.emit(ind, tmpl.format(t=t))
        elif lt in _SPEC_LOGICAL:
            raise Unsupported(f"logical type {lt} on {w['type']}")

    def block_loop(self, wi: dict, ri: dict | None, t: str, ind: int, is_map: bool) -> None:
        g, e = self.g, self.g.emit
        c, x, k, sz = g.var("c"), g.var("x"), g.var("k"), g.var("z")
        e(ind, f"{t} = {{}}" if is_map else f"{t} = []")
        self.varint(c, ind)
        e(ind, f"while {c}:")
        e(ind + 1, f"if {c} < 0:")
        e(ind + 2, f"{c} = -{c}")
        self.varint(sz, ind + 2)
        per_item = _min_size(wi) + (1 if is_map else 0)
        if per_item:
            e(ind + 1, f"if {c} * {per_item} > blen - pos:")
        else:
            e(ind + 1, f"if {c} > {MAX_EMPTY_ITEMS}:")
        e(ind + 2, f"raise CorruptData(f'block of {{{c}}} items cannot fit in the {{blen - pos}} bytes left')")
        e(ind + 1, f"room -= {c}")
        e(ind + 1, "if room < 0:")
        e(ind + 2, f"raise CorruptData('more than {MAX_ITEMS} array or map items in one message')")
        e(ind + 1, f"for _ in range({c}):")
        if is_map:
            n = g.var("n")
            end = self.length(n, ind + 2, "map key")
            e(ind + 2, f"{k} = buf[pos:{end}].decode()")
            e(ind + 2, f"pos = {end}")
        self.read(wi, ri, x, ind + 2)
        e(ind + 2, f"{t}[{k}] = {x}" if is_map else f"{t}.append({x})")
        self.varint(c, ind + 1)

    # -- schema resolution -------------------------------------------------

    def resolve(self, w: dict, r: dict, t: str, ind: int) -> None:
        _g, e = self.g, self.g.emit
        if w["type"] == "union":
            b = self.union_index(ind, len(w["branches"]), "union")
            for k, br in enumerate(w["branches"]):
                e(ind, f"{'if' if k == 0 else 'elif'} {b} == {k << 1}:")
                target = _first_match(br, r)
                if target is None:
                    e(
                        ind + 1,
                        f"raise UnresolvableValue({_describe(br) + ' is not in the reader union ' + _describe(r)!r})",
                    )
                else:
                    self.read(br, target, t, ind + 1)
            e(ind, "else:")
            e(
                ind + 1,
                f"raise CorruptData(f'union index byte {{{b}}} at {{pos - 1}} is out of range (0..{len(w['branches']) - 1})')",
            )
            return
        if r["type"] == "union":
            target = _first_match(w, r)
            if target is None:
                raise ResolutionError(f"{_describe(w)} is not in the reader union {_describe(r)}")
            self.read(w, target, t, ind)
            return
        if not _matches(w, r):
            raise ResolutionError(f"reader {_describe(r)} cannot read writer {_describe(w)}")
        wt, rt = w["type"], r["type"]
        if wt == "record":
            self.resolve_record(w, r, t, ind)
        elif wt == "enum":
            mapping = []
            for s in w["symbols"]:
                if s in r["symbols"]:
                    mapping.append(s)
                elif r.get("default") is not None:
                    mapping.append(r["default"])
                else:
                    mapping.append(None)
            # Unresolvable symbols map to a marker tuple so None keeps meaning "bad index".
            marked = [m if m is not None else (s,) for m, s in zip(mapping, w["symbols"])]
            self.enum_index(t, ind, marked, f"enum {w['name']}")
            if None in mapping:
                e(ind, f"if {t}.__class__ is tuple:")
                e(
                    ind + 1,
                    f"raise UnresolvableValue(f'enum symbol {{{t}[0]}} is unknown to reader ' + {r['name']!r}"
                    " + ' and it has no default')",
                )
        elif wt == "fixed":
            self.read(w, None, t, ind)
        elif wt == "array":
            self.block_loop(w["items"], r["items"], t, ind, is_map=False)
        elif wt == "map":
            self.block_loop(w["values"], r["values"], t, ind, is_map=True)
        elif wt == rt or (wt, rt) in (("int", "long"), ("float", "double")):
            self.read(w, None, t, ind)
        elif wt in ("int", "long") and rt in ("float", "double"):
            self.read(w, None, t, ind)
            e(ind, f"{t} = float({t})")
        elif (wt, rt) == ("string", "bytes"):
            self.read({"type": "bytes"}, None, t, ind)
        elif (wt, rt) == ("bytes", "string"):
            self.read({"type": "string"}, None, t, ind)
        else:  # pragma: no cover - _matches() admits nothing else
            raise ResolutionError(f"reader {_describe(r)} cannot read writer {_describe(w)}")

    def resolve_record(self, w: dict, r: dict, t: str, ind: int) -> None:
        g, e = self.g, self.g.emit
        by_name: dict[str, dict] = {}
        for f in r["fields"]:
            by_name.setdefault(f["name"], f)
        for f in r["fields"]:
            for a in f["aliases"]:
                by_name.setdefault(a, f)
        got: dict[str, str] = {}
        for wf in w["fields"]:
            rf = by_name.get(wf["name"])
            v = g.var("f")
            if rf is None or rf["name"] in got:
                self.read(wf["type"], None, v, ind)  # skipped: read and dropped
            else:
                self.read(wf["type"], rf["type"], v, ind)
                got[rf["name"]] = v
        items = []
        for rf in r["fields"]:
            if rf["name"] in got:
                items.append(f"{rf['name']!r}: {got[rf['name']]}")
            elif "default" in rf:
                val = default_value(rf["type"], rf["default"])
                k = g.const(val, "D")
                expr = f"deepcopy({k})" if isinstance(val, (list, dict)) else k
                items.append(f"{rf['name']!r}: {expr}")
            else:
                raise ResolutionError(
                    f"reader field {r['name']}.{rf['name']} has no default and is absent from the writer"
                )
        e(ind, f"{t} = {{{', '.join(items)}}}")


_PROMOTIONS = {
    ("int", "long"),
    ("int", "float"),
    ("int", "double"),
    ("long", "float"),
    ("long", "double"),
    ("float", "double"),
    ("string", "bytes"),
    ("bytes", "string"),
}


def _names_match(w: dict, r: dict) -> bool:
    wn, rn = w["name"], r["name"]
    return wn == rn or _short(wn) == _short(rn) or wn in r.get("aliases", ())


def _matches(w: dict, r: dict) -> bool:
    wt, rt = w["type"], r["type"]
    if wt == rt:
        if wt in ("record", "enum"):
            return _names_match(w, r)
        if wt == "fixed":
            return _names_match(w, r) and w["size"] == r["size"]
        return True  # arrays and maps match whatever their items; those resolve recursively
    return (wt, rt) in _PROMOTIONS


def _first_match(w: dict, r: dict) -> dict | None:
    if r["type"] != "union":
        return r if _matches(w, r) else None
    for b in r["branches"]:  # exact type first, then promotions (Avro spec order)
        if b["type"] == w["type"] and _matches(w, b):
            return b
    for b in r["branches"]:
        if _matches(w, b):
            return b
    return None


def _describe(n: dict) -> str:
    if n["type"] == "union":
        return "[" + ", ".join(_describe(b) for b in n["branches"]) + "]"
    return n.get("name", n["type"])


# --------------------------------------------------------------------------
# Encoder.

_WRITE_LOGICAL = {
    ("long", "timestamp-millis"): "_ts_millis",
    ("long", "timestamp-micros"): "_ts_micros",
    ("int", "date"): "_date_days",
    ("string", "uuid"): "_uuid_str",
}


def compile_encoder(schema: Any) -> Encoder:
    """``encode(datum, out)`` appending the Avro binary encoding to bytearray out.

    Accepts what fastavro accepts for our types, including datetime/UUID for
    logical types. Raises (TypeError, ValueError, KeyError, ...) on a datum that
    does not fit; :func:`explain` names the offending field.
    """
    n = normalize(schema)
    g = _Gen()
    _Encoder(g).write(n, "datum", 2)
    return g.build("encode", "datum, out", n.get("name", n["type"]))


class _Encoder:
    def __init__(self, g: _Gen) -> None:
        self.g = g

    def long(self, v: str, ind: int, kind: str) -> None:
        g, e = self.g, self.g.emit
        z = g.var("z")
        if kind == "int":
            e(ind, f"if {v} < INT_MIN or {v} > INT_MAX:")
            e(ind + 1, f"_check_int({v})")
        e(ind, f"{z} = ({v} << 1) ^ ({v} >> 63)")
        e(ind, f"if {z} < 0x80:")
        e(ind + 1, f"out.append({z})")
        e(ind, "else:")
        e(ind + 1, f"_wlong(out, {z})")

    def write(self, n: dict, v: str, ind: int) -> None:
        g, e = self.g, self.g.emit
        typ = n["type"]
        lt = n.get("logical")
        conv = _WRITE_LOGICAL.get((typ, lt)) if lt else None
        if conv is not None:
            plain = "str" if typ == "string" else "int"
            e(ind, f"if {v}.__class__ is not {plain}:")
            e(ind + 1, f"{v} = {conv}({v})")
        elif lt in _SPEC_LOGICAL:
            raise Unsupported(f"logical type {lt} on {typ}")
        if typ == "null":
            e(ind, f"if {v} is not None:")
            e(ind + 1, f"raise TypeError('expected null, got ' + type({v}).__name__)")
        elif typ == "boolean":
            e(ind, f"if {v} is True:")
            e(ind + 1, "out.append(1)")
            e(ind, f"elif {v} is False:")
            e(ind + 1, "out.append(0)")
            e(ind, "else:")
            e(ind + 1, f"raise TypeError('expected boolean, got ' + type({v}).__name__)")
        elif typ in ("int", "long"):
            self.long(v, ind, typ)
        elif typ == "float":
            e(ind, f"out += pack_f({v})")
        elif typ == "double":
            e(ind, f"out += pack_d({v})")
        elif typ in ("string", "bytes"):
            b, ln = g.var("b"), g.var("L")
            if typ == "bytes":
                e(ind, f"if not isinstance({v}, (bytes, bytearray, memoryview)):")
                e(ind + 1, f"raise TypeError('expected bytes, got ' + type({v}).__name__)")
            e(ind, f"{b} = {v}.encode()" if typ == "string" else f"{b} = bytes({v})")
            e(ind, f"{ln} = len({b})")
            e(ind, f"if {ln} < 64:")
            e(ind + 1, f"out.append({ln} << 1)")
            e(ind, "else:")
            e(ind + 1, f"_wlong(out, {ln} << 1)")
            e(ind, f"out += {b}")
        elif typ == "fixed":
            e(ind, f"if not isinstance({v}, (bytes, bytearray)) or len({v}) != {n['size']}:")
            e(ind + 1, f"raise TypeError({'expected ' + str(n['size']) + ' bytes for fixed ' + n['name']!r})")
            e(ind, f"out += {v}")
        elif typ == "enum":
            table = {s: _varint_bytes(i) for i, s in enumerate(n["symbols"])}
            k = g.const(table, "ENUM")
            e(ind, f"out += {k}[{v}]")
        elif typ in ("array", "map"):
            ln, x, k = g.var("L"), g.var("x"), g.var("k")
            e(ind, f"{ln} = len({v})")
            e(ind, f"if {ln}:")
            self.long(ln, ind + 1, "long")
            if typ == "array":
                e(ind + 1, f"if isinstance({v}, (str, bytes, dict)):")
                e(ind + 2, f"raise TypeError('expected a list, got ' + type({v}).__name__)")
                e(ind + 1, f"for {x} in {v}:")
                self.write(n["items"], x, ind + 2)
            else:
                e(ind + 1, f"for {k}, {x} in {v}.items():")
                e(ind + 2, f"if {k}.__class__ is not str:")
                e(ind + 3, "raise TypeError('map keys must be strings')")
                self.write({"type": "string"}, k, ind + 2)
                self.write(n["values"], x, ind + 2)
            e(ind, "out.append(0)")
        elif typ == "union":
            self.union(n, v, ind)
        elif typ == "record":
            for f in n["fields"]:
                x = g.var("x")
                ft = f["type"]
                if "default" in f:
                    d = g.const(default_value(ft, f["default"]), "D")
                    e(ind, f"{x} = {v}.get({f['name']!r}, {d})")
                elif ft["type"] == "union" and any(b["type"] == "null" for b in ft["branches"]):
                    e(ind, f"{x} = {v}.get({f['name']!r})")
                else:
                    e(ind, f"{x} = {v}[{f['name']!r}]")
                self.write(ft, x, ind)
        else:  # pragma: no cover
            raise Unsupported(typ)

    def union(self, n: dict, v: str, ind: int) -> None:
        e = self.g.emit
        branches = n["branches"]
        checks = [_union_check(b, v, branches) for b in branches]
        if any(c is None for c in checks):
            raise Unsupported(f"union {_describe(n)} needs value-based branch selection")
        for k, (b, check) in enumerate(zip(branches, checks)):
            e(ind, f"{'if' if k == 0 else 'elif'} {check}:")
            e(ind + 1, f"out.append({k << 1})" if k < 64 else f"_wlong(out, {k << 1})")
            if b["type"] != "null":
                self.write(b, v, ind + 1)
        e(ind, "else:")
        e(ind + 1, f"raise TypeError('value of type ' + type({v}).__name__ + {' fits no branch of ' + _describe(n)!r})")


def _python_kinds(b: dict, branches: list[dict]) -> set[str]:
    """Python value kinds a union branch accepts when encoding."""
    t, lt = b["type"], b.get("logical")
    if t in ("int", "long"):
        return (
            {"int", "datetime"}
            if lt in ("timestamp-millis", "timestamp-micros")
            else {"int", "date"}
            if lt == "date"
            else {"int"}
        )
    if t in ("float", "double"):
        has_int = any(x["type"] in ("int", "long") for x in branches)
        return {"float"} if has_int else {"float", "int"}
    return {
        "null": {"none"},
        "boolean": {"bool"},
        "string": {"str", "uuid"} if lt == "uuid" else {"str"},
        "enum": {"str"},
        "bytes": {"bytes"},
        "fixed": {"bytes"},
        "array": {"list"},
        "map": {"dict"},
        "record": {"dict"},
    }[t]


_KIND_TESTS = {
    "none": "{v} is None",
    "bool": "{v} is True or {v} is False",
    "int": "(isinstance({v}, int) and {v}.__class__ is not bool)",
    "datetime": "isinstance({v}, datetime)",
    "date": "isinstance({v}, date)",
    "float": "isinstance({v}, float)",
    "str": "isinstance({v}, str)",
    "uuid": "isinstance({v}, UUID)",
    "bytes": "isinstance({v}, (bytes, bytearray))",
    "list": "isinstance({v}, (list, tuple))",
    "dict": "isinstance({v}, dict)",
}


def _union_check(b: dict, v: str, branches: list[dict]) -> str | None:
    """Python test selecting branch b; None when another branch accepts the same values
    (fastavro then picks by validating the value, which generated code does not do)."""
    mine = _python_kinds(b, branches)
    if any(o is not b and mine & _python_kinds(o, branches) for o in branches):
        return None
    return " or ".join(_KIND_TESTS[k].format(v=v) for k in sorted(mine))


_RUNTIME["datetime"] = datetime


def _varint_bytes(v: int) -> bytes:
    out = bytearray()
    z = (v << 1) ^ (v >> 63)
    if z < 0x80:
        out.append(z)
    else:
        _wlong(out, z)
    return bytes(out)


# --------------------------------------------------------------------------
# Slow path: say which field of a datum does not fit the schema.


def explain(schema: Any, datum: Any) -> str | None:
    """First reason the datum cannot be encoded with schema, as ``path: reason``;
    None if it fits. Used only after an encoder raised, to word the error."""
    return _explain(normalize(schema), datum, "")


def _at(path: str) -> str:
    return path or "(record)"


def _explain(n: dict, v: Any, path: str) -> str | None:
    t = n["type"]
    lt = n.get("logical")
    got = type(v).__name__
    if t == "null":
        return None if v is None else f"{_at(path)}: expected null, got {got}"
    if t == "boolean":
        return None if isinstance(v, bool) else f"{_at(path)}: expected boolean, got {got}"
    if t in ("int", "long"):
        if lt in ("timestamp-millis", "timestamp-micros") and isinstance(v, datetime):
            return None if v.tzinfo is not None else f"{_at(path)}: naive datetime, give a timezone-aware one"
        if not isinstance(v, int):
            return f"{_at(path)}: expected {t}, got {got}"
        lo, hi = (INT_MIN, INT_MAX) if t == "int" else (LONG_MIN, LONG_MAX)
        return None if lo <= v <= hi else f"{_at(path)}: {v} out of the {t} range"
    if t in ("float", "double"):
        return (
            None if isinstance(v, (int, float)) and not isinstance(v, bool) else f"{_at(path)}: expected {t}, got {got}"
        )
    if t == "string":
        ok = isinstance(v, str) or (lt == "uuid" and isinstance(v, UUID))
        return None if ok else f"{_at(path)}: expected string, got {got}"
    if t == "bytes":
        return None if isinstance(v, (bytes, bytearray, memoryview)) else f"{_at(path)}: expected bytes, got {got}"
    if t == "fixed":
        ok = isinstance(v, (bytes, bytearray)) and len(v) == n["size"]
        return None if ok else f"{_at(path)}: expected {n['size']} bytes"
    if t == "enum":
        if isinstance(v, str) and v in n["symbols"]:
            return None
        return f"{_at(path)}: {v!r} is not a symbol of {n['name']} ({', '.join(n['symbols'])})"
    if t == "array":
        if not isinstance(v, (list, tuple)):
            return f"{_at(path)}: expected a list, got {got}"
        for i, x in enumerate(v):
            why = _explain(n["items"], x, f"{path}.{i}" if path else str(i))
            if why:
                return why
        return None
    if t == "map":
        if not isinstance(v, dict):
            return f"{_at(path)}: expected a map, got {got}"
        for k, x in v.items():
            if not isinstance(k, str):
                return f"{_at(path)}: map key {k!r} is not a string"
            why = _explain(n["values"], x, f"{path}.{k}" if path else k)
            if why:
                return why
        return None
    if t == "union":
        reasons = [_explain(b, v, path) for b in n["branches"]]
        if any(r is None for r in reasons):
            return None
        return f"{_at(path)}: {got} value fits no branch of {_describe(n)}"
    if t == "record":
        if not isinstance(v, dict):
            return f"{_at(path)}: expected a record (dict), got {got}"
        for f in n["fields"]:
            sub = f"{path}.{f['name']}" if path else f["name"]
            ft = f["type"]
            if f["name"] not in v:
                nullable = ft["type"] == "union" and any(b["type"] == "null" for b in ft["branches"])
                if "default" in f or nullable:
                    continue
                return f"{sub}: missing (required, no default)"
            why = _explain(ft, v[f["name"]], sub)
            if why:
                return why
        return None
    return None
