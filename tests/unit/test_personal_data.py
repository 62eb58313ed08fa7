"""Personal data (DESIGN §7), the parts that need no service: the settings, the CLI and
the pseudonymiser refuse the public development secret outside the local stack.

That no national id reaches Kafka, PostgreSQL or ClickHouse is tested against the
real stack in tests/stack/test_personal_data.py.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from infra.settings import LOCAL_DEV_SECRET, ConfigError, Settings


def test_settings_refuse_the_development_secret_outside_the_local_stack(monkeypatch):
    for name in [k for k in os.environ if k.startswith("NHDP_")]:
        monkeypatch.delenv(name)
    message = (
        r"NHDP_PSEUDONYM_SECRET must be set to a private value when NHDP_ENV is 'production': "
        r"the local default would make subject ids reversible by anyone"
    )
    with pytest.raises(ConfigError, match=message):
        Settings(env="production")  # missing: the default
    with pytest.raises(ConfigError, match=message):
        Settings(env="production", pseudonym_secret=LOCAL_DEV_SECRET)
    with pytest.raises(ConfigError, match=message):
        Settings(env="production", pseudonym_secret="")

    monkeypatch.setenv("NHDP_ENV", "staging")
    with pytest.raises(ConfigError, match="when NHDP_ENV is 'staging'"):
        Settings()
    monkeypatch.setenv("NHDP_PSEUDONYM_SECRET", "k8Q2-a-real-secret-from-the-vault-7f3c9e")
    assert Settings().pseudonym_secret == "k8Q2-a-real-secret-from-the-vault-7f3c9e"
    assert Settings(env="production", pseudonym_secret="another-real-secret-0a9b8c-f00d-4e1a").env == "production"
    with pytest.raises(
        ConfigError,
        match="NHDP_PSEUDONYM_SECRET is 12 characters; at least 32 are required when NHDP_ENV is 'production'",
    ):
        Settings(env="production", pseudonym_secret="short-secret")

    # The local stack keeps working without configuration.
    monkeypatch.delenv("NHDP_ENV")
    monkeypatch.delenv("NHDP_PSEUDONYM_SECRET")
    assert Settings().pseudonym_secret == LOCAL_DEV_SECRET


def test_the_cli_refuses_to_start_with_the_development_secret_in_production(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NHDP_")}
    env |= {"NHDP_ENV": "production", "NHDP_DATA_DIR": str(tmp_path), "COLUMNS": "400"}
    proc = subprocess.run(
        [sys.executable, "-m", "nhdp.cli", "import", str(tmp_path / "none.jsonl")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "NHDP_PSEUDONYM_SECRET must be set to a private value when NHDP_ENV is 'production'" in proc.stderr


def test_the_pseudonymiser_refuses_an_empty_secret():
    from producers.pseudonym import Pseudonymiser

    with pytest.raises(ValueError, match="secret is empty"):
        Pseudonymiser("")


@given(
    st.text(alphabet="0123456789", min_size=9, max_size=9) | st.text(alphabet="0123456789", min_size=12, max_size=12)
)
def test_a_subject_id_is_the_hmac_sha256_of_the_citizen_id_under_the_secret(citizen_id):
    """The keyed state is copied per id, never updated: every id gets RFC 2104's HMAC, however many came before."""
    from producers.pseudonym import Pseudonymiser

    pseudonymiser = Pseudonymiser("a secret of this deployment")
    for _ in range(2):
        assert (
            pseudonymiser.subject_id(citizen_id)
            == hmac.new(b"a secret of this deployment", citizen_id.encode(), hashlib.sha256).hexdigest()
        )
