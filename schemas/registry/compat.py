"""Avro parsing, canonical form and compatibility rules of the registry.

The verdict always comes from Apache Avro's `ReaderWriterCompatibilityChecker`.
Its result keeps messages and locations as unordered sets that cannot be paired
back up once several problems are merged, so to *explain* a refusal we re-run
the same checker field by field (see `explain`) and name each offending field.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache

import avro.schema
from avro.compatibility import (
    ReaderWriterCompatibilityChecker,
    SchemaCompatibilityType,
    SchemaIncompatibilityType,
    lookup_writer_field,
    schema_name_equals,
)
from avro.schema import ArraySchema, Field, MapSchema, RecordSchema, Schema, UnionSchema

LEVELS = (
    "NONE",
    "BACKWARD",
    "BACKWARD_TRANSITIVE",
    "FORWARD",
    "FORWARD_TRANSITIVE",
    "FULL",
    "FULL_TRANSITIVE",
)
DEFAULT_LEVEL = "BACKWARD_TRANSITIVE"


class InvalidSchema(ValueError):
    """Not JSON, or not a valid Avro schema; the message is the parser's."""


@dataclass(frozen=True)
class Canonical:
    text: str  # sorted keys, no whitespace; arrays (fields, symbols, unions) keep their order
    fingerprint: bytes  # sha256 of text: the identity of a schema across subjects


def normalize_level(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    level = value.strip().upper()
    return level if level in LEVELS else None


@lru_cache(maxsize=4096)
def canonicalize(text: str) -> Canonical:
    """Validate `text` as Avro and return its canonical form.

    Cached on the raw text: clients send the same string again and again
    (serializer start-up, lookups), and parsing is the expensive part.
    """
    if not isinstance(text, str) or not text.strip():
        raise InvalidSchema("Empty schema")
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise InvalidSchema(f"Invalid schema: not JSON: {exc}") from None
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    parse(canonical)
    return Canonical(canonical, hashlib.sha256(canonical.encode()).digest())


@lru_cache(maxsize=1024)
def parse(canonical: str) -> Schema:
    try:
        return avro.schema.parse(canonical)
    except Exception as exc:  # avro raises several unrelated types for bad input
        raise InvalidSchema(f"Invalid schema: {exc}") from None


# -- compatibility -----------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    kind: str  # READER_FIELD_MISSING_DEFAULT_VALUE, TYPE_MISMATCH, ...
    location: str  # JSON-pointer-like path into the reader schema, e.g. /fields/5
    field: str  # dotted field path resolved from location ("" at the root)
    detail: str  # the checker's own message


def is_compatible(reader: Schema, writer: Schema) -> bool:
    result = ReaderWriterCompatibilityChecker().get_compatibility(reader, writer)
    return result.compatibility is SchemaCompatibilityType.compatible


def explain(reader: Schema, writer: Schema) -> list[Problem]:
    """Why `reader` cannot read data written with `writer`; [] if it can."""
    if is_compatible(reader, writer):
        return []
    problems = _explain(reader, writer, "", reader)
    if not problems:  # our decomposition disagreed with the checker: report it raw
        result = ReaderWriterCompatibilityChecker().get_compatibility(reader, writer)
        problems = _leaf(result, "", reader)
    return problems


def _explain(reader: Schema, writer: Schema, loc: str, root: Schema) -> list[Problem]:
    if isinstance(reader, RecordSchema) and isinstance(writer, RecordSchema):
        out: list[Problem] = []
        if not schema_name_equals(reader, writer):
            out.append(_problem("NAME_MISMATCH", f"{loc}/name", f"expected: {writer.fullname}", root))
        for i, rfield in enumerate(reader.fields):
            floc = f"{loc}/fields/{i}"
            wfield = lookup_writer_field(writer_schema=writer, reader_field=rfield)
            if wfield is None:
                if rfield.has_default:
                    continue
                if rfield.type.type == "enum" and rfield.type.props.get("default"):
                    out += _explain(rfield.type, writer, f"{floc}/type", root)
                else:
                    out.append(_problem("READER_FIELD_MISSING_DEFAULT_VALUE", floc, rfield.name, root))
            else:
                out += _explain(rfield.type, wfield.type, f"{floc}/type", root)
        return out
    if isinstance(reader, ArraySchema) and isinstance(writer, ArraySchema):
        return _explain(reader.items, writer.items, f"{loc}/items", root)
    if isinstance(reader, MapSchema) and isinstance(writer, MapSchema):
        return _explain(reader.values, writer.values, f"{loc}/values", root)
    result = ReaderWriterCompatibilityChecker().get_compatibility(reader, writer)
    if result.compatibility is SchemaCompatibilityType.compatible:
        return []
    return _leaf(result, loc, root)


def _leaf(result, loc: str, root: Schema) -> list[Problem]:
    # The checker restarts locations at "/" inside unions; such paths are
    # relative to the union branch, so we report the enclosing location instead.
    locs = sorted({loc + sub if sub != "/" and sub.startswith("/") else (loc or "/") for sub in result.locations})
    kinds = [k.name.upper() for k in dict.fromkeys(result.incompatibilities)]
    if len(kinds) == 1 and len(locs) == 1 and len(result.messages) == 1:
        return [_problem(kinds[0], locs[0], next(iter(result.messages)), root)]
    detail = "; ".join(sorted(result.messages))
    return [_problem("+".join(kinds) or "INCOMPATIBLE", ", ".join(locs), detail, root)]


def _problem(kind: str, location: str, detail: str, root: Schema) -> Problem:
    location = location or "/"
    return Problem(kind, location, field_path(root, location.split(",")[0]), detail)


def field_path(schema: Schema, location: str) -> str:
    """`/fields/2/type/fields/0` → `address.city`, walking the reader schema."""
    tokens = [t for t in location.split("/") if t]
    names: list[str] = []
    node: object = schema
    i = 0
    try:
        while i < len(tokens):
            tok = tokens[i]
            if tok == "fields" and isinstance(node, RecordSchema) and i + 1 < len(tokens):
                node = node.fields[int(tokens[i + 1])]
                names.append(node.name)
                i += 2
                continue
            if tok == "type" and isinstance(node, Field):
                node = node.type
            elif tok == "items" and isinstance(node, ArraySchema):
                node = node.items
            elif tok == "values" and isinstance(node, MapSchema):
                node = node.values
            elif tok.isdigit() and isinstance(node, UnionSchema):
                node = node.schemas[int(tok)]
            else:
                break  # name, symbols, size: attributes of the node we are at
            i += 1
    except (IndexError, ValueError):
        pass
    return ".".join(names)


_TYPE_MISMATCH = re.compile(r"reader type: (\S+) not compatible with writer type: (\S+)")


def describe(p: Problem, reader_label: str, writer_label: str) -> str:
    """One human-readable sentence, led by the checker's incompatibility kind."""
    where = f"field '{p.field}' at {p.location}" if p.field else f"{p.location}"
    if p.kind == SchemaIncompatibilityType.reader_field_missing_default_value.name.upper():
        return (
            f"{p.kind}: {where} has no default value in the {reader_label} schema "
            f"and is missing from the {writer_label} schema"
        )
    if p.kind == "TYPE_MISMATCH":
        m = _TYPE_MISMATCH.search(p.detail)
        if m:
            return (
                f"{p.kind}: {where}: type {m.group(1)} in the {reader_label} schema "
                f"cannot read type {m.group(2)} of the {writer_label} schema"
            )
    if p.kind == "MISSING_ENUM_SYMBOLS":
        return (
            f"{p.kind}: {where}: the {reader_label} schema lacks enum symbols {p.detail} of the {writer_label} schema"
        )
    if p.kind == "MISSING_UNION_BRANCH":
        return (
            f"{p.kind}: {where}: {p.detail} (the {reader_label} schema's union cannot read the {writer_label} schema's)"
        )
    if p.kind == "NAME_MISMATCH":
        return (
            f"{p.kind}: {where}: the {reader_label} schema's name differs from the {writer_label} schema's ({p.detail})"
        )
    if p.kind == "FIXED_SIZE_MISMATCH":
        return (
            f"{p.kind}: {where}: fixed size differs between the {reader_label} and {writer_label} schemas ({p.detail})"
        )
    return f"{p.kind}: {where}: {p.detail}"


def check(level: str, new: Schema, previous: list[tuple[int, Schema]]) -> list[str]:
    """Messages explaining why `new` breaks `level` against `previous`
    ((version, schema) oldest first, deleted versions already left out); [] if it does not."""
    if level == "NONE" or not previous:
        return []
    against = previous if level.endswith("_TRANSITIVE") else previous[-1:]
    backward = level.startswith(("BACKWARD", "FULL"))
    forward = level.startswith(("FORWARD", "FULL"))
    messages: list[str] = []
    for version, old in reversed(against):  # newest first: the most relevant break
        old_label = f"old (version {version})" if version else "old"
        if backward:
            messages += [describe(p, "new", old_label) for p in explain(new, old)]
        if forward:
            messages += [describe(p, old_label, "new") for p in explain(old, new)]
    return list(dict.fromkeys(messages))
