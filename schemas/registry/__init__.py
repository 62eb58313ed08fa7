"""NHDP's schema registry: Confluent Schema Registry REST API, AVRO only, stored in PostgreSQL.

Run it with `python -m schemas.registry --host 127.0.0.1 --port 8081`.
"""

from schemas.registry.app import create_app

__all__ = ["create_app"]
