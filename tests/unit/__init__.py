"""Tests that need no service: no Java/Kafka, no PostgreSQL, no ClickHouse server, no chDB."""
