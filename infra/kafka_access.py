"""Kafka's own access control: SCRAM credentials and ACLs, created as the broker's admin.

The broker authenticates every client (SASL/SCRAM-SHA-512) and authorizes every
request against ACLs (StandardAuthorizer, nothing allowed that no ACL allows).
What each principal may do is a table of Grants kept with the names it grants
on (schemas/kafka_acls.py: this layer does not know the topics); here are the
admin calls that make the broker match such a table, idempotently, and the
ones that remove a principal.

Changes reach the broker's authorizer and credential cache through its
metadata log, about a second later: each call here waits until they are
visible before it returns.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from kafka import KafkaAdminClient
from kafka.admin import (
    ACL,
    ACLFilter,
    ACLOperation,
    ACLPermissionType,
    ACLResourcePatternType,
    ResourcePattern,
    ResourcePatternFilter,
    ResourceType,
    ScramMechanism,
    UserScramCredentialDeletion,
    UserScramCredentialUpsertion,
)

from infra.kafka import as_admin
from infra.process import ServiceError
from infra.settings import Settings

TOPIC, GROUP, CLUSTER = "topic", "group", "cluster"
READ, WRITE, DESCRIBE, CREATE, IDEMPOTENT_WRITE = "read", "write", "describe", "create", "idempotent_write"
_RESOURCES = {TOPIC: ResourceType.TOPIC, GROUP: ResourceType.GROUP, CLUSTER: ResourceType.CLUSTER}
_OPERATIONS = {
    READ: ACLOperation.READ,
    WRITE: ACLOperation.WRITE,
    DESCRIBE: ACLOperation.DESCRIBE,
    CREATE: ACLOperation.CREATE,
    IDEMPOTENT_WRITE: ACLOperation.IDEMPOTENT_WRITE,
}
_MECHANISM = ScramMechanism.SCRAM_SHA_512
# Kafka's own minimum for SCRAM-SHA-512 is 4096; more only slows every connection's handshake.
_ITERATIONS = 4096
VISIBLE_WITHIN_S = 5.0


@dataclass(frozen=True)
class Grant:
    """Operations allowed on a topic or group (a literal name, or every name with this prefix) or the cluster."""

    resource: str
    name: str
    operations: tuple[str, ...]
    prefixed: bool = False


def _acls(principal: str, grants: Iterable[Grant]) -> set[tuple]:
    """(resource type, name, pattern type, operation) of every ACL the grants stand for."""
    out = set()
    for g in grants:
        pattern = ACLResourcePatternType.PREFIXED if g.prefixed else ACLResourcePatternType.LITERAL
        name = "kafka-cluster" if g.resource == CLUSTER else g.name
        out |= {(_RESOURCES[g.resource], name, pattern, _OPERATIONS[op]) for op in g.operations}
    return out


def _user(principal: str) -> str:
    return f"User:{principal}"


class AccessAdmin:
    """One admin connection for a series of access changes (a context manager)."""

    def __init__(self, settings: Settings):
        self.admin = KafkaAdminClient(**as_admin(settings).kafka_python_config(), client_id="nhdp-access")

    def __enter__(self) -> AccessAdmin:
        return self

    def __exit__(self, *exc) -> None:
        self.admin.close()

    # -- credentials -------------------------------------------------------------------------
    def set_passwords(self, passwords: Mapping[str, str]) -> None:
        """Create or rotate these principals' SCRAM-SHA-512 credentials."""
        if not passwords:
            return
        errors = self.admin.alter_user_scram_credentials(
            [UserScramCredentialUpsertion(u, _MECHANISM, p, iterations=_ITERATIONS) for u, p in passwords.items()]
        )
        self._raise("setting the SCRAM credential of", errors)
        self._wait(lambda: set(passwords) <= self.users(), f"the credentials of {sorted(passwords)}")

    def users(self) -> set[str]:
        """The principals that have a SCRAM-SHA-512 credential."""
        described = self.admin.describe_user_scram_credentials()
        return {
            user
            for user, info in described.items()
            if not info.get("error") and any(c["mechanism"] == _MECHANISM for c in info.get("credential_infos", []))
        }

    def remove_password(self, principal: str) -> bool:
        """Delete a principal's credential; False if it had none."""
        if principal not in self.users():
            return False
        errors = self.admin.alter_user_scram_credentials([UserScramCredentialDeletion(principal, _MECHANISM)])
        self._raise("deleting the SCRAM credential of", errors)
        self._wait(lambda: principal not in self.users(), f"the removal of {principal}'s credential")
        return True

    # -- ACLs --------------------------------------------------------------------------------
    def acls_of(self, principal: str) -> set[tuple]:
        everything = ResourcePatternFilter(ResourceType.ANY, None, ACLResourcePatternType.ANY)
        acls, error = self.admin.describe_acls(
            ACLFilter(_user(principal), "*", ACLOperation.ANY, ACLPermissionType.ALLOW, everything)
        )
        if error is not None and getattr(error, "errno", 0):
            raise ServiceError(f"kafka: describing the ACLs of {principal} failed: {error}")
        return {
            (
                a.resource_pattern.resource_type,
                a.resource_pattern.resource_name,
                a.resource_pattern.pattern_type,
                a.operation,
            )
            for a in acls
        }

    def set_grants(self, principal: str, grants: Iterable[Grant]) -> tuple[int, int]:
        """Make the principal's ACLs exactly these grants: (ACLs created, ACLs removed); (0, 0) if they already were."""
        wanted, present = _acls(principal, grants), self.acls_of(principal)
        missing, extra = wanted - present, present - wanted
        if missing:
            result = self.admin.create_acls([self._acl(principal, key) for key in sorted(missing, key=repr)])
            if result.get("failed"):
                raise ServiceError(f"kafka: creating ACLs of {principal} failed: {result['failed']}")
        if extra:
            self._delete(principal, extra)
        if missing or extra:
            self._wait(lambda: self.acls_of(principal) == wanted, f"the ACLs of {principal}")
        return len(missing), len(extra)

    def remove_grants(self, principal: str) -> int:
        """Delete every ACL that names the principal; how many there were."""
        present = self.acls_of(principal)
        if present:
            self._delete(principal, present)
            self._wait(lambda: not self.acls_of(principal), f"the removal of {principal}'s ACLs")
        return len(present)

    # -- details -----------------------------------------------------------------------------
    @staticmethod
    def _acl(principal: str, key: tuple) -> ACL:
        rtype, name, pattern, op = key
        return ACL(_user(principal), "*", op, ACLPermissionType.ALLOW, ResourcePattern(rtype, name, pattern))

    def _delete(self, principal: str, keys: set[tuple]) -> None:
        filters = [
            ACLFilter(_user(principal), "*", op, ACLPermissionType.ALLOW, ResourcePatternFilter(rtype, name, pattern))
            for rtype, name, pattern, op in sorted(keys, key=repr)
        ]
        for _filter, _deleted, error in self.admin.delete_acls(filters):
            if error is not None and getattr(error, "errno", 0):
                raise ServiceError(f"kafka: deleting ACLs of {principal} failed: {error}")

    @staticmethod
    def _raise(what: str, errors: Mapping[str, str | None]) -> None:
        failed = {user: e for user, e in errors.items() if e}
        if failed:
            raise ServiceError(f"kafka: {what} {', '.join(f'{u} ({e})' for u, e in failed.items())} failed")

    @staticmethod
    def _wait(done, what: str) -> None:
        deadline = time.monotonic() + VISIBLE_WITHIN_S
        while not done():
            if time.monotonic() > deadline:
                raise ServiceError(f"kafka: {what} not visible after {VISIBLE_WITHIN_S:.0f} s")
            time.sleep(0.1)


def ensure_access(settings: Settings, table: Mapping[str, Iterable[Grant]]) -> None:
    """Every principal of the table gets its password from the local secret store and exactly its grants.

    Idempotent: an existing credential is kept (the store's password is the one it was made
    from), ACLs already there are not created again."""
    with AccessAdmin(settings) as access:
        have = access.users()
        access.set_passwords({p: settings.password_of(p) for p in table if p not in have})
        for principal, grants in table.items():
            access.set_grants(principal, grants)
