"""`python -m schemas.registry --host H --port P [--nhdp-data PATH]`.

The PostgreSQL DSN comes from infra.settings (NHDP_POSTGRES_DSN overrides).
`--nhdp-data` is only the marker the process manager finds us by.
"""

from __future__ import annotations

import argparse
import logging

import uvicorn

from infra.settings import get_settings
from schemas.registry.app import create_app


def main(argv: list[str] | None = None) -> None:
    settings = get_settings()
    parser = argparse.ArgumentParser(prog="python -m schemas.registry", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=settings.registry_host)
    parser.add_argument("--port", type=int, default=settings.registry_port)
    parser.add_argument("--dsn", default=None, help="PostgreSQL DSN (default: from NHDP_* settings)")
    parser.add_argument("--nhdp-data", default=None, help="ignored; marks the process for `nhdp` to find")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(args.dsn or settings.postgres_url)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        workers=1,
        access_log=False,
        log_level=args.log_level,
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    main()
