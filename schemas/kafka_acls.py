"""Who may do what in Kafka: the ACL table of every principal (DESIGN §8).

The broker denies whatever no ACL allows, so this table is the whole of each
service's rights; `nhdp up` makes the broker match it (infra/kafka_access.py),
`nhdp province grant` adds a province's. Each row was found by running the
service against the secured broker and reading its denials.

| principal       | topics                                                   | groups                          |
|-----------------|----------------------------------------------------------|---------------------------------|
| admin           | super user (creates topics, credentials and ACLs)        |                                 |
| gateway         | health.events: write; health.events(.dlq): describe      | nhdp-analytics: describe (lag)  |
| producer        | health.events: write                                     |                                 |
| worker          | health.events: read; health.events.dlq, province.*: write| nhdp-projector: read            |
| sink            | health.events: read; health.events.dlq: write            | nhdp-analytics: read            |
| replay          | health.events: read                                      | (none: it assigns partitions)   |
| province_CODE   | province.CODE.*: read                                    | province.CODE.*: read           |

Describe goes with every read and write (Kafka implies it; it is written out
so the table says it). No principal but admin may create topics or groups
outside its own, alter configs, or write `health.events` except the gateway
and the SDK's producer, so validation and pseudonymisation cannot be skipped
by producing to the log directly. Idempotent producers need no cluster ACL:
Kafka allows IDEMPOTENT_WRITE to any principal that may write a topic.
"""

from __future__ import annotations

from infra.kafka_access import DESCRIBE, GROUP, READ, TOPIC, WRITE, Grant
from schemas.principals import province_principal
from schemas.topics import ANALYTICS_GROUP, PROJECTOR_GROUP, TOPIC_DLQ, TOPIC_EVENTS

_RW = {READ: (READ, DESCRIBE), WRITE: (WRITE, DESCRIBE)}

SERVICE_GRANTS: dict[str, tuple[Grant, ...]] = {
    "gateway": (
        Grant(TOPIC, TOPIC_EVENTS, _RW[WRITE]),
        Grant(TOPIC, TOPIC_DLQ, (DESCRIBE,)),  # end offsets for /metrics' lag
        Grant(GROUP, ANALYTICS_GROUP, (DESCRIBE,)),  # the sink's committed offsets (freshness)
    ),
    "producer": (Grant(TOPIC, TOPIC_EVENTS, _RW[WRITE]),),
    "worker": (
        Grant(TOPIC, TOPIC_EVENTS, _RW[READ]),
        Grant(TOPIC, TOPIC_DLQ, _RW[WRITE]),
        Grant(TOPIC, "province.", _RW[WRITE], prefixed=True),
        Grant(GROUP, PROJECTOR_GROUP, _RW[READ]),
    ),
    "sink": (
        Grant(TOPIC, TOPIC_EVENTS, _RW[READ]),
        Grant(TOPIC, TOPIC_DLQ, _RW[WRITE]),  # a record it cannot decode is dead-lettered
        Grant(GROUP, ANALYTICS_GROUP, _RW[READ]),
    ),
    "replay": (Grant(TOPIC, TOPIC_EVENTS, _RW[READ]),),
}


def province_prefix(code: str) -> str:
    """The prefix of a province's topics and of the consumer groups it may use."""
    province_principal(code)  # checks the code
    return f"province.{code}."


def province_grants(code: str) -> tuple[Grant, ...]:
    prefix = province_prefix(code)
    return (Grant(TOPIC, prefix, (READ, DESCRIBE), prefixed=True), Grant(GROUP, prefix, (READ,), prefixed=True))
