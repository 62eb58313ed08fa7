"""Tests against real private stacks (Kafka, PostgreSQL, ClickHouse, chDB), started by conftest.py."""
