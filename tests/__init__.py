"""NHDP's tests, in two rooms.

unit/   needs no service: no Java/Kafka, no PostgreSQL, no ClickHouse server, no chDB.
stack/  runs against real private stacks started by the fixtures of stack/conftest.py.

Shared helpers live in tests/helpers.py (hypothesis strategies in tests/strategies.py);
no test module imports another test module or a conftest.
"""
