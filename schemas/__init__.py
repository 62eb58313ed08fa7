"""Avro event catalog (catalog), JSON models (models), wire-format codec (codec),
registry client (registry_client) and the schema registry service (registry)."""
