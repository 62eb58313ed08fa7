"""The README's main job, end to end, on a private stack: campaign in, exact figures out."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.stack


def test_demo_publishes_the_hcmc_campaign_and_every_figure_matches(clean_stack):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NHDP_")} | clean_stack.as_env()
    proc = subprocess.run(
        [sys.executable, "-m", "nhdp.cli", "demo", "--scale", "0.005", "--no-wait"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "every figure equals the simulator's independent computation" in out
    assert "projections caught up" in out
    assert clean_stack.api_url in out
    # one citizen's health book: QR saved, scanned in, certificate saved and verified from its PNG
    assert "scanned at site" in out and "VALID certificate URN:UVCI:01:VN:" in out, out
    assert (clean_stack.data_dir / "demo" / "health-book-qr.png").stat().st_size > 0
    assert (clean_stack.data_dir / "demo" / "certificate.png").stat().st_size > 0

    # Run twice: the same campaign again is duplicates only, and still exact.
    again = subprocess.run(
        [sys.executable, "-m", "nhdp.cli", "demo", "--scale", "0.005", "--no-wait"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert "every figure equals" in again.stdout and "VALID certificate" in again.stdout
