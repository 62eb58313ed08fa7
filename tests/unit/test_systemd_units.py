"""The production systemd units (infra/systemd/): each restarts always, is hardened, and runs a module of ours
that exists, the very one `nhdp up` runs for that service."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path

import pytest

from tests.helpers import local_services

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "infra" / "systemd"
SERVICES = sorted(UNITS.glob("*.service"))


def parse(path: Path) -> configparser.ConfigParser:
    # systemd allows repeated keys and %-specifiers: not strict, no interpolation, keys as written.
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment]
    parser.read_string(path.read_text())
    return parser


def module_of(exec_start: str) -> tuple[str, list[str]]:
    argv = shlex.split(exec_start)
    assert argv[0].endswith("/python") and argv[1] == "-m", exec_start
    return argv[2], argv[3:]


def runnable(module: str) -> bool:
    """`python -m module` works: a module file, or a package with __main__.py."""
    path = ROOT.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__main__.py").is_file()


def test_the_four_services_and_the_target_are_there():
    assert {p.name for p in SERVICES} == {
        "nhdp-registry.service",
        "nhdp-worker@.service",
        "nhdp-sink.service",
        "nhdp-api@.service",
    }
    target = parse(UNITS / "nhdp.target")
    wanted = set(target["Unit"]["Wants"].split())
    # a template's default instance: worker 1, the API on port 8000
    assert wanted == {p.name.replace("@.", f"@{parse(p)['Install'].get('DefaultInstance')}.") for p in SERVICES}
    assert {"nhdp-worker@1.service", "nhdp-api@8000.service"} <= wanted


@pytest.mark.parametrize("path", SERVICES, ids=lambda p: p.name)
def test_each_service_restarts_always_and_runs_a_module_that_exists(path):
    unit = parse(path)
    service = unit["Service"]
    assert service["Restart"] == "always"
    assert service["RestartSec"]
    assert unit["Unit"]["StartLimitIntervalSec"] == "0"  # never given up on
    module, _ = module_of(service["ExecStart"])
    assert module.split(".")[0] in ("schemas", "streams", "nhdp")
    assert runnable(module), f"{path.name}: no module {module} in the repository"
    assert unit["Unit"]["PartOf"] == "nhdp.target" and unit["Install"]["WantedBy"] == "nhdp.target"


@pytest.mark.parametrize("path", SERVICES, ids=lambda p: p.name)
def test_each_service_is_hardened(path):
    service = parse(path)["Service"]
    assert service["User"] == "nhdp"
    assert service["EnvironmentFile"] == "/etc/nhdp/nhdp.env"
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["PrivateTmp"] == "yes"
    assert "/var/lib/nhdp" in service["ReadWritePaths"].split()
    assert service["CapabilityBoundingSet"] == ""


def test_each_service_runs_what_the_local_stack_runs(tmp_path):
    local = {}
    for argv, _env in local_services(tmp_path).values():
        module, args = argv[1], argv[2:]
        # the subcommand, if any (`nhdp.cli api`); the registry's --host/--port come from the env file there
        local[module] = args[:1] if args and not args[0].startswith("-") else []
    units = {}
    for path in SERVICES:
        module, args = module_of(parse(path)["Service"]["ExecStart"])
        units[module] = args[:1]
    assert units == local
