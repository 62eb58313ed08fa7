"""`python -m streams.sink` (`nhdp sink`): the sink process, and in chDB mode the owner of the folder."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time

from infra.settings import get_settings
from projections.clickhouse.connect import open_store
from projections.clickhouse.queries import Analytics
from projections.clickhouse.remote import serve_queries, sink_secret, sink_url_path
from projections.clickhouse.store import AnalyticsStoreError
from projections.clickhouse.writer import Sink
from schemas.topics import ANALYTICS_GROUP
from streams.sink.runner import Runner, ready_path

log = logging.getLogger("nhdp.sink")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nhdp sink", description="Kafka → ClickHouse analytics sink")
    parser.add_argument("--nhdp-data", help=argparse.SUPPRESS)  # the process manager's marker
    parser.add_argument("--group", default=ANALYTICS_GROUP)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = get_settings()
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    url = settings.analytics_url()

    store = None
    delay = 0.5
    while store is None:  # ClickHouse not up yet: wait, do not die
        try:
            store = open_store(
                url,
                purpose="nhdp sink (owns the folder; answers analytics over HTTP)",
                password=settings.analytics_password(),
            )
            sink = Sink(store)
        except AnalyticsStoreError as exc:
            if store is not None:
                store.close()
                store = None
            if not exc.retryable:
                raise
            log.warning("ClickHouse not reachable (%s); retrying in %.1fs", exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10)

    runner = Runner(settings, sink, group=args.group, ready_file=ready_path(settings, os.getpid()))
    server = None
    url_file = sink_url_path(settings)
    if url.startswith("chdb:"):
        query_store = open_store(url)  # a second session on the folder this process owns
        server = serve_queries(Analytics(query_store), sink_secret(settings))
        tmp = url_file.with_suffix(".tmp")
        tmp.write_text(f"http://127.0.0.1:{server.server_address[1]}\n")
        tmp.replace(url_file)

    def stop(*_):
        runner.stop_event.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        runner.run()
    finally:
        if server is not None:
            url_file.unlink(missing_ok=True)
            server.shutdown()
        ready_path(settings, os.getpid()).unlink(missing_ok=True)
        store.close()
    return 0
