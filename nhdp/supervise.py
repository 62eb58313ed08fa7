"""`python -m nhdp.supervise`: the local stack's supervisor process (the loop is infra/supervisor.py).

`nhdp up` starts it last, once every service of `nhdp.stack.steps` is ready,
and `nhdp down` stops it first. It watches exactly those services (the servers
included), each restarted with its own `Managed` and without the step's set-up
hooks: initdb, the Kafka storage format, topics, migrations and the catalog are
done once by `up` and outlive a process. Extra services started beside them (a
benchmark's second worker) are not watched.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from infra.settings import get_settings
from infra.supervisor import Supervisor
from nhdp.stack import steps, supervisor_state_path

log = logging.getLogger("nhdp.supervisor")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nhdp.supervise", description=__doc__.splitlines()[0])
    parser.add_argument("--nhdp-data", help=argparse.SUPPRESS)  # the process manager's marker
    parser.add_argument("--poll", type=float, default=0.5, help="seconds between two looks at the services")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    services = [step.service for step in steps(settings)]
    supervisor = Supervisor(
        services, supervisor_state_path(settings), start_timeout_s=settings.start_timeout_s, poll_s=args.poll
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    log.info("supervising %s", ", ".join(svc.name for svc in services))
    supervisor.run(stop)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
