"""Throughput of the Confluent wire-format codec on one core.

    .venv/bin/python bench/bench_codec.py                      # schemas from a pre-filled cache
    .venv/bin/python bench/bench_codec.py --registry http://127.0.0.1:8081

Measures Codec.encode_many and Codec.decode_many on realistic DoseAdministered
events (made the way the gateway makes them: validated JSON -> to_avro_record),
in batches, best of --repeat runs. For reference it measures fastavro's
schemaless writer/reader per message and, when a registry is given and
confluent-kafka is installed, confluent-kafka's AvroSerializer/AvroDeserializer
(what a province's stock consumer runs). Prints results; writes no files.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fastavro
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from infra.settings import get_settings
from schemas import catalog
from schemas.codec import Codec
from schemas.models import VACCINES, to_avro_record, validate_event
from schemas.registry_client import RegistryClient

EVENT_TYPE = "DoseAdministered"
console = Console()


def realistic_records(n: int, seed: int = 7) -> list[tuple[str, dict[str, Any]]]:
    """n DoseAdministered records as the gateway produces them."""
    rng = random.Random(seed)
    provinces = ["01", "79", "48", "92", "31", "27", "75", "74"]
    out = []
    base_ms = 1_628_553_600_000  # 10 Aug 2021, the national peak day
    for i in range(n):
        province = rng.choice(provinces)
        ms = base_ms + rng.randrange(86_400_000)
        ev = {
            "event_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "event_type": EVENT_TYPE,
            "occurred_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z",
            "province_code": province,
            "source": f"site-system-{province}-{rng.randrange(400):03d}",
            "payload": {
                "citizen_id": f"{rng.randrange(10**12):012d}",
                "site_id": f"{province}-{rng.randrange(1000):03d}-{rng.randrange(10000):04d}",
                "vaccine": rng.choice(VACCINES[:5]),
                "lot_number": f"{rng.choice('ABCDEFGH')}{rng.randrange(10**6):06d}",
                "dose_number": rng.choice((1, 1, 2, 2, 3)),
                **({"vaccinator_id": f"HW-{rng.randrange(10**5):05d}"} if i % 3 else {}),
            },
        }
        validated, errors = validate_event(ev)
        assert validated is not None, errors
        subject = f"{rng.getrandbits(256):064x}"
        out.append((EVENT_TYPE, to_avro_record(validated, subject)))
    return out


def batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def measure(
    label: str, fn: Callable[[Sequence[Any]], Any], items: Sequence[Any], batch: int, repeat: int, progress: Progress
) -> tuple[float, list[Any]]:
    """Best events/s over repeat runs of fn on each batch; also the last run's output."""
    chunks = batches(items, batch)
    best = 0.0
    result: list[Any] = []
    task = progress.add_task(label, total=len(items) * repeat)
    for _ in range(repeat):
        result = []
        elapsed = 0.0
        for chunk in chunks:
            start = time.perf_counter()
            out = fn(chunk)
            elapsed += time.perf_counter() - start
            result.extend(out)
            progress.advance(task, len(chunk))
        best = max(best, len(items) / elapsed)
    return best, result


def fastavro_encoder(ids: dict[str, int]) -> Callable[[Sequence[tuple[str, dict]]], list[bytes]]:
    parsed = catalog.parsed_schema(EVENT_TYPE)
    header = b"\x00" + ids[EVENT_TYPE].to_bytes(4, "big")

    def encode(chunk: Sequence[tuple[str, dict]]) -> list[bytes]:
        out = []
        for _, record in chunk:
            buf = io.BytesIO()
            buf.write(header)
            fastavro.schemaless_writer(buf, parsed, record)
            out.append(buf.getvalue())
        return out

    return encode


def fastavro_decoder() -> Callable[[Sequence[bytes]], list[dict]]:
    parsed = catalog.parsed_schema(EVENT_TYPE)

    def decode(chunk: Sequence[bytes]) -> list[dict]:
        out = []
        for data in chunk:
            buf = io.BytesIO(data)
            buf.seek(5)
            out.append(fastavro.schemaless_reader(buf, parsed))
        return out

    return decode


def confluent_pair(url: str) -> tuple[Callable, Callable] | None:
    try:
        from confluent_kafka.schema_registry import SchemaRegistryClient, topic_record_subject_name_strategy
        from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
        from confluent_kafka.serialization import MessageField, SerializationContext
    except ImportError:
        return None
    import json

    settings = get_settings()  # as NHDP_PRINCIPAL (admin on the local stack)
    client = SchemaRegistryClient({"url": url, "basic.auth.user.info": f"{settings.principal}:{settings.password}"})
    ser = AvroSerializer(
        client,
        json.dumps(catalog.current_schema(EVENT_TYPE)),
        conf={"subject.name.strategy": topic_record_subject_name_strategy},
    )
    des = AvroDeserializer(client)
    ctx = SerializationContext(catalog.TOPIC, MessageField.VALUE)

    def encode(chunk: Sequence[tuple[str, dict]]) -> list[bytes]:
        return [ser(record, ctx) for _, record in chunk]

    def decode(chunk: Sequence[bytes]) -> list[dict]:
        return [des(data, ctx) for data in chunk]

    return encode, decode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=200_000, help="events per run (default 200000)")
    ap.add_argument("--batch", type=int, default=10_000, help="events per encode_many/decode_many call")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best counts")
    ap.add_argument("--registry", help="registry URL; without it the codec uses a pre-filled schema cache")
    ap.add_argument("--logical-types", action="store_true", help="decode timestamps/uuids to datetime/UUID")
    ap.add_argument("--cpu", type=int, default=None, help="pin to this CPU (default: the first allowed)")
    ap.add_argument("--no-reference", action="store_true", help="skip the fastavro and confluent-kafka rows")
    args = ap.parse_args(argv)

    if hasattr(os, "sched_setaffinity"):
        cpu = args.cpu if args.cpu is not None else min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        where = f"pinned to CPU {cpu}"
    else:
        where = "not pinned"

    console.print(
        f"[bold]NHDP codec benchmark[/]: {args.events:,} {EVENT_TYPE} events, batches of "
        f"{args.batch:,}, best of {args.repeat}, one core ({where}), Python {sys.version.split()[0]}"
    )
    with console.status("building realistic events (validate + to_avro_record)"):
        records = realistic_records(args.events)

    if args.registry:
        settings = get_settings()
        registry = RegistryClient(args.registry, auth=(settings.principal, settings.password))
        codec = Codec(registry, logical_types=args.logical_types)
        source = f"registry {args.registry}"
    else:
        known = {i + 1: catalog.current_schema(t) for i, t in enumerate(catalog.EVENT_TYPES)}
        codec = Codec.with_known_schemas(known, logical_types=args.logical_types)
        source = "pre-filled schema cache"
    ids = codec.register_catalog()
    console.print(f"schemas from {source}; {EVENT_TYPE} has id {ids[EVENT_TYPE]}")

    rows: list[tuple[str, str, float, str]] = []
    columns = (TextColumn("{task.description:<44}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        enc_rate, encoded = measure(
            "nhdp Codec.encode_many", codec.encode_many, records, args.batch, args.repeat, progress
        )
        dec_rate, decoded = measure(
            "nhdp Codec.decode_many", codec.decode_many, encoded, args.batch, args.repeat, progress
        )
        if not args.logical_types:
            assert decoded == [r for _, r in records], "decode_many did not return the encoded records"
        size = sum(map(len, encoded)) / len(encoded)
        rows += [
            ("nhdp Codec", "encode_many", enc_rate, f"{size:.0f} B/event"),
            ("nhdp Codec", "decode_many", dec_rate, "ints/str" if not args.logical_types else "datetime/UUID"),
        ]

        if not args.no_reference:
            rate, fa_encoded = measure(
                "fastavro schemaless_writer (per message)",
                fastavro_encoder(ids),
                records,
                args.batch,
                args.repeat,
                progress,
            )
            assert fa_encoded == encoded, "fastavro and the codec disagree on the bytes"
            rows.append(("fastavro", "schemaless_writer", rate, "same bytes"))
            rate, _ = measure(
                "fastavro schemaless_reader (per message)",
                fastavro_decoder(),
                encoded,
                args.batch,
                args.repeat,
                progress,
            )
            rows.append(("fastavro", "schemaless_reader", rate, "datetime/UUID"))

            if args.registry:
                pair = confluent_pair(args.registry)
                if pair is None:
                    console.print("[yellow]confluent-kafka is not importable: no reference row for it[/]")
                else:
                    rate, ck_encoded = measure(
                        "confluent-kafka AvroSerializer", pair[0], records, args.batch, args.repeat, progress
                    )
                    rows.append(("confluent-kafka", "AvroSerializer", rate, ""))
                    rate, _ = measure(
                        "confluent-kafka AvroDeserializer", pair[1], encoded, args.batch, args.repeat, progress
                    )
                    rows.append(("confluent-kafka", "AvroDeserializer (our bytes)", rate, "datetime/UUID"))
                    # A stock deserializer must read what the codec writes and the other way round.
                    pair[1](encoded[:100])
                    codec.decode_many(ck_encoded[:100])
            else:
                console.print("[dim]confluent-kafka reference needs --registry URL[/]")

    table = Table(title="events/s on one core (best run)")
    table.add_column("implementation")
    table.add_column("operation")
    table.add_column("events/s", justify="right")
    table.add_column("µs/event", justify="right")
    table.add_column("note")
    for impl, op, rate, note in rows:
        table.add_row(impl, op, f"{rate:,.0f}", f"{1e6 / rate:.2f}", note)
    console.print(table)
    target = 150_000
    ok = enc_rate >= target and dec_rate >= target
    console.print(
        ("[green]" if ok else "[red]") + f"target {target:,}/s each way: "
        f"{'met' if ok else 'NOT met'} (encode {enc_rate:,.0f}/s, decode {dec_rate:,.0f}/s)[/]"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
