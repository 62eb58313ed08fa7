"""The ClickHouse sink: `health.events` → ClickHouse facts, points and rollups.

    python -m streams.sink                 # what `nhdp up` starts (`nhdp sink` in the foreground)

Each arrow, what it guarantees and why (Snuba's way of writing it down):

Kafka → sink: at least once.
    A librdkafka consumer (confluent-kafka: it fetches and parses on its own
    threads, outside the GIL) in its own group (`nhdp-analytics`), with
    auto-commit off. Offsets are committed only after ClickHouse has
    acknowledged every write of the batch, so a crash re-delivers the batch
    and never skips one. Why not a Faust agent: Faust commits the offsets of
    acknowledged events on its own schedule (`broker_commit_every`), the
    ClickHouse calls are blocking, and in chDB mode the sink must run in the
    process that owns the chDB folder; an explicit poll/insert/commit loop
    says exactly when an offset is committed, and pauses the partitions
    (keeps polling, so it stays in the group) while ClickHouse is down.

batching: ≥ 10,000 messages or 0.4 s after the batch's oldest message
    reached Kafka (its timestamp, not when a poll returned it), whichever
    comes first (BATCH_ROWS, BATCH_WITHIN_S); when catching up, the messages
    already fetched join the batch up to 50,000. One INSERT per table per
    batch. Each stage hands its batch on within 10 ms of finishing (HANDOFF_S).

decode: the worker's Router (codec + semantic checks) and the projector's own
    `_prepare`, so exactly the events the PostgreSQL projections count reach
    the figures. Undecodable or invalid messages are skipped here (the
    worker sends them to the DLQ, with the reason); an unreachable registry
    is retried, never skipped. It runs in NHDP_SINK_DECODERS (2) spawned
    processes, which return each batch pickled: decoding and shaping were
    half of the sink's Python, and one process runs Python on one core. The
    rows only they make (events, event_index, voids) come encoded as Native
    blocks, inserted as they are.

the pipeline: three stages at once, each in log order. The decoders decode
    batch k+2; this process's thread plans batch k+1 (steps 1–2 below); a
    writer thread writes batch k (step 3; mostly ClickHouse's own work, so
    it overlaps). Planning k+1 while k is written reads ClickHouse for
    batches up to k-1, whose writes have returned, and takes k's rows from
    memory (Sink.plan's `writing`). Writes still go one batch at a time, and
    k+1's offsets are committed after k's, so a crash loses only batches
    that were never committed, which are delivered again.

rollups: recomputed on a third thread with its own connection, beside the
    writes, every 15 s and after each lull (ROLLUP_EVERY_S, LULL_S). A
    recompute marks hours clean with the version of the last batch whose
    write returned (Sink.refresh_version); every batch still being written
    has a higher version, so the hours it touches stay dirty and are read
    from the raw rows. On the loop, as before, each recompute held the
    batches behind it, and under a steady stream it never ran at all.

ClickHouse down: back-pressure. The batch is held, the partitions are
    paused, and the writes are retried with backoff until they succeed;
    nothing is committed meanwhile, so nothing is lost.

chDB: the sink process owns the folder and answers for it. chDB lets one
    process open a folder, so in chDB mode this process also serves the
    analytics calls of every other process (the API, `nhdp verify-analytics`)
    on 127.0.0.1 at POST /call/<method> (the URL is in <run>/sink.url;
    projections.clickhouse.remote has both ends). The other choice,
    the API running the sink in a thread, was rejected: the API is meant to
    run as several instances behind a balancer (DESIGN §6), and ingestion
    would then stop with every API restart or depend on which instance owns
    the folder. With a server (clickhouse://), every process connects itself
    and nothing is forwarded.
"""
