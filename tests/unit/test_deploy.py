"""The production configuration (infra/deploy/, infra/systemd/), checked without Docker or a cluster.

Nothing here can be started on the development machine, so each file is checked for what can be
known statically: the Kubernetes manifests against the official OpenAPI-derived JSON schemas
(kubernetes-validate, bundled, offline), every variable against `Settings`, secrets only by
reference, a probe and limits on every container, and every command against the entry points
that exist and that `nhdp up` runs for the same service.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from kubernetes_validate import utils as k8s_schemas
from pydantic import SecretStr

from infra.settings import Settings, credentials_dir
from schemas.kafka_acls import SERVICE_GRANTS
from schemas.principals import SERVICES as PRINCIPALS
from tests.helpers import local_services

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "infra" / "deploy"
K8S = DEPLOY / "k8s"
UNITS = ROOT / "infra" / "systemd"
ENV_EXAMPLE = DEPLOY / "nhdp.env.example"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# The Kubernetes release the manifests are checked against (the oldest still supported upstream).
K8S_VERSION = "1.32"

# Variables that are not NHDP settings but that a deployment may set: libpq's password file or
# password (PostgreSQL's own client reads them), and the interpreter's and HOME.
OTHER_VARS = {"PGPASSFILE", "PGPASSWORD", "HOME", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED"}
# What a service is called in each file: the Deployment/unit → the name `nhdp.stack` gives it.
K8S_SERVICES = {"nhdp-api": "api", "nhdp-worker": "worker", "nhdp-sink": "sink", "nhdp-registry": "registry"}
UNIT_SERVICES = {
    "nhdp-api@.service": "api",
    "nhdp-worker@.service": "worker",
    "nhdp-sink.service": "sink",
    "nhdp-registry.service": "registry",
}


# -- what Settings accepts ------------------------------------------------------------------------
def setting_names() -> dict[str, str]:
    """Every variable Settings reads → its field."""
    out = {}
    for name, field in Settings.model_fields.items():
        out[field.alias or f"NHDP_{name.upper()}"] = name
    return out


def secret_names() -> set[str]:
    """The variables that hold secrets: every SecretStr field, the pseudonym secret, libpq's password."""
    names = {
        var
        for var, field in setting_names().items()
        if field == "pseudonym_secret" or SecretStr in _types(Settings.model_fields[field].annotation)
    }
    return names | {"PGPASSWORD"}


def _types(annotation) -> set:
    return {annotation, *getattr(annotation, "__args__", ())}


# -- the files ---------------------------------------------------------------------------------------
def k8s_documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


def manifests() -> list[tuple[str, dict]]:
    return [(f, d) for f, d in k8s_documents() if d["kind"] != "Kustomization"]


def of_kind(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for _, d in manifests() if d["kind"] == kind}


def containers(deployment: dict, init: bool = True) -> list[dict]:
    spec = deployment["spec"]["template"]["spec"]
    return spec["containers"] + (spec.get("initContainers", []) if init else [])


def unit_entries(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file's sections → key → every value (systemd allows repeated keys, configparser keeps one)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        assert current is not None, f"{path.name}: {line!r} outside a section"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def unit_environment(path: Path) -> dict[str, str]:
    env = {}
    for value in unit_entries(path)["Service"].get("Environment", []):
        for assignment in shlex.split(value):
            key, _, val = assignment.partition("=")
            env[key] = val
    return env


def unit_credentials(path: Path) -> dict[str, str]:
    """LoadCredential=ID:SOURCE → {ID: SOURCE}."""
    out = {}
    for value in unit_entries(path)["Service"].get("LoadCredential", []):
        ident, _, source = value.partition(":")
        out[ident] = source
    return out


def env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: {line!r} is not KEY=VALUE"
            out[key.strip()] = value.strip()
    return out


def runnable(argv: list[str]) -> bool:
    """An entry point that exists: a console script of pyproject, or `python -m` a module of ours."""
    if argv[0] == "nhdp":
        return "nhdp" in PYPROJECT["project"]["scripts"]
    assert argv[0].endswith("python") and argv[1] == "-m", argv
    path = ROOT.joinpath(*argv[2].split("."))
    return path.with_suffix(".py").is_file() or (path / "__main__.py").is_file()


# -- parsing and schemas -----------------------------------------------------------------------------
def test_every_yaml_parses_and_every_manifest_is_listed_by_the_kustomization():
    files = sorted(p.name for p in DEPLOY.rglob("*.yaml"))
    assert {"namespace.yaml", "config.yaml", "api.yaml", "worker.yaml", "sink.yaml", "registry.yaml"} <= set(files)
    for path in DEPLOY.rglob("*.yaml"):
        assert [d for d in yaml.safe_load_all(path.read_text()) if d], f"{path.name} is empty"
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in K8S.glob("*.yaml") if p.stem != "kustomization")


@pytest.mark.parametrize("doc", manifests(), ids=lambda d: f"{d[0]}:{d[1]['kind']}/{d[1]['metadata']['name']}")
def test_each_manifest_validates_against_the_kubernetes_schema(doc):
    _, manifest = doc
    # strict: an unknown field (a typo such as `readinesProbe`) fails too; a kind without a schema raises
    assert k8s_schemas.validate(manifest, K8S_VERSION, strict=True)


def test_everything_is_in_the_nhdp_namespace():
    for name, doc in manifests():
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "nhdp", f"{name}: {doc['kind']}/{doc['metadata']['name']}"


# -- settings: real, complete, loadable -----------------------------------------------------------
def k8s_variables() -> dict[str, list[str]]:
    """Every variable the manifests set → where."""
    out: dict[str, list[str]] = {}
    for name in of_kind("ConfigMap")["nhdp-config"]["data"]:
        out.setdefault(name, []).append("ConfigMap")
    for dep, doc in of_kind("Deployment").items():
        for c in containers(doc):
            for var in c.get("env", []):
                out.setdefault(var["name"], []).append(f"{dep}/{c['name']}")
    return out


def unit_variables() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for path in UNITS.glob("*.service"):
        for var in [*unit_environment(path), *unit_credentials(path)]:
            if var.isupper():  # credential ids that are not variables (pgpass) are files, named below
                out.setdefault(var, []).append(path.name)
    return out


@pytest.mark.parametrize(
    "where, variables",
    [
        ("k8s", k8s_variables),
        ("systemd", unit_variables),
        ("nhdp.env.example", lambda: dict.fromkeys(env_file(ENV_EXAMPLE), ["nhdp.env.example"])),
    ],
)
def test_every_variable_set_is_a_real_setting(where, variables):
    known = set(setting_names()) | OTHER_VARS
    unknown = {var: places for var, places in variables().items() if var not in known}
    assert not unknown, f"{where} sets variables no Settings field reads: {unknown}"


def test_the_env_example_names_what_a_deployment_must_set():
    example = env_file(ENV_EXAMPLE)
    must = {
        "NHDP_ENV",
        "NHDP_DATA_DIR",
        "NHDP_KAFKA_BOOTSTRAP_SERVERS",
        "NHDP_KAFKA_SECURITY_PROTOCOL",
        "NHDP_KAFKA_PARTITIONS",
        "NHDP_POSTGRES_DSN",
        "NHDP_CLICKHOUSE_URL",
        "NHDP_REGISTRY_URL",
        "NHDP_API_HOST",
    }
    assert must <= set(example), must - set(example)
    assert example["NHDP_ENV"] != "local"
    assert example["NHDP_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert len(example["NHDP_KAFKA_BOOTSTRAP_SERVERS"].split(",")) >= 3
    # each API unit sets its own port; the env file would override every one of them
    assert "NHDP_API_PORT" not in example
    # every secret is named in its comments, with where it comes from
    text = ENV_EXAMPLE.read_text()
    for var in secret_names() - {"PGPASSWORD"}:
        assert re.search(rf"^#.*-> {var}\b", text, flags=re.M), f"nhdp.env.example does not say where {var} comes from"
    assert set(example) <= set(of_kind("ConfigMap")["nhdp-config"]["data"]) | {"NHDP_API_PORT"}


def _load(env: dict[str, str], monkeypatch, tmp_path: Path) -> Settings:
    """Settings as a production process builds them: these variables, the secrets as credential files."""
    for var in list(setting_names()) + ["CREDENTIALS_DIRECTORY"]:
        monkeypatch.delenv(var, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "NHDP_PSEUDONYM_SECRET").write_text("p" * 64 + "\n")
    (creds / "NHDP_API_TOKEN_SECRET").write_text("t" * 64)
    (creds / "NHDP_PRINCIPAL_PASSWORD").write_text("worker-password")
    (creds / "NHDP_CLICKHOUSE_PASSWORD").write_text("clickhouse-password")
    (creds / "pgpass").write_text("*:*:*:nhdp:pg-password")  # a file for libpq, not a setting
    return Settings(_secrets_dir=creds)


@pytest.mark.parametrize("source", ["ConfigMap", "nhdp.env.example"])
def test_the_production_settings_load_with_their_secrets_from_files(source, monkeypatch, tmp_path):
    env = dict(of_kind("ConfigMap")["nhdp-config"]["data"]) if source == "ConfigMap" else env_file(ENV_EXAMPLE)
    settings = _load(env | {"NHDP_PRINCIPAL": "worker"}, monkeypatch, tmp_path)
    assert settings.env == "production"
    assert settings.kafka_security_protocol == "SASL_SSL"
    assert settings.kafka_python_auth()["sasl_plain_password"] == "worker-password"
    assert settings.librdkafka_config()["security.protocol"] == "SASL_SSL"
    assert settings.pseudonym_secret == "p" * 64  # the trailing newline of `openssl … > file` is stripped
    assert settings.token_secret() == "t" * 64
    assert settings.analytics_password() == "clickhouse-password"
    assert not settings.local_postgres and settings.postgres_url == env["NHDP_POSTGRES_DSN"]
    assert settings.analytics_url() == env["NHDP_CLICKHOUSE_URL"]
    assert settings.registry_url == env["NHDP_REGISTRY_URL"]


def test_a_variable_wins_over_a_credential_file(monkeypatch, tmp_path):
    settings = _load({"NHDP_ENV": "production", "NHDP_PSEUDONYM_SECRET": "v" * 40}, monkeypatch, tmp_path)
    assert settings.pseudonym_secret == "v" * 40


def test_credentials_come_from_systemds_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert credentials_dir() == str(tmp_path)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    assert credentials_dir() is None


def test_the_worker_speaks_tls_under_sasl_ssl():
    from streams.worker import broker_credentials

    base = Settings(principal="worker", principal_password="pw")
    tls = broker_credentials(base.model_copy(update={"kafka_security_protocol": "SASL_SSL"}))
    assert tls.ssl_context is not None and tls.protocol.value == "SASL_SSL"
    assert (tls.username, tls.password, tls.mechanism.value) == ("worker", "pw", "SCRAM-SHA-512")
    plain = broker_credentials(base)
    assert plain.ssl_context is None and plain.protocol.value == "SASL_PLAINTEXT"


# -- secrets only by reference --------------------------------------------------------------------
def test_no_secret_value_in_the_manifests():
    secrets = secret_names()
    assert not of_kind("Secret"), "Secrets are created from the vault (README.md), never committed"
    assert not secrets & set(of_kind("ConfigMap")["nhdp-config"]["data"])
    for dep, doc in of_kind("Deployment").items():
        for c in containers(doc):
            for var in c.get("env", []):
                if var["name"] in secrets:
                    assert "value" not in var, f"{dep}: {var['name']} inline"
                    assert var["valueFrom"]["secretKeyRef"]["name"] == "nhdp-secrets"


def test_no_secret_value_in_the_units_or_the_env_file():
    secrets = secret_names() | {"PGPASSWORD"}
    assert not secrets & set(env_file(ENV_EXAMPLE))
    for path in UNITS.glob("*.service"):
        assert not secrets & set(unit_environment(path)), f"{path.name}: a secret in Environment="
        for ident, source in unit_credentials(path).items():
            assert source.startswith("/etc/nhdp/credentials/"), f"{path.name}: {ident} from {source}"
        assert "EnvironmentFile" in unit_entries(path)["Service"]


def test_no_password_in_any_url():
    for path in [*DEPLOY.rglob("*"), *UNITS.glob("*")]:
        if path.is_file():
            # scheme://user:password@host: a password where URLs get printed
            assert not re.search(r"[a-z]+://[^/\s:@]+:[^/\s@]+@", path.read_text()), path.name


# -- each service: the same process, principal and secrets everywhere ------------------------------
def _module_and_command(argv: list[str]) -> tuple[str, ...]:
    """`python -m nhdp.cli api` and `nhdp api` are the same command: the module and its subcommand."""
    if argv[0] == "nhdp":
        return ("nhdp.cli", *argv[1:2])
    args = [a for a in argv[3:] if not a.startswith("-")][:1]
    return (argv[2], *args)


def test_each_deployment_runs_what_the_local_stack_runs_as_the_same_principal(tmp_path):
    local = local_services(tmp_path)
    deployments = of_kind("Deployment")
    assert set(deployments) == set(K8S_SERVICES)
    for dep, service in K8S_SERVICES.items():
        (main,) = containers(deployments[dep], init=False)
        assert runnable(main["command"]), f"{dep}: {main['command']} is no entry point"
        argv, env = local[service]
        # the registry's --host/--port come from the ConfigMap there, as from the env file under systemd
        local_argv = [a for a in argv if not a.startswith("--") and not a.isdigit() and a != "127.0.0.1"]
        assert _module_and_command(main["command"]) == _module_and_command(["python", *local_argv])
        principal = {v["name"]: v.get("value") for v in main.get("env", [])}.get("NHDP_PRINCIPAL")
        if service != "registry":  # the registry signs in to nothing but PostgreSQL
            assert principal == env["NHDP_PRINCIPAL"], dep
            assert principal in PRINCIPALS and principal in SERVICE_GRANTS


def test_each_unit_signs_in_as_the_principal_the_local_stack_uses(tmp_path):
    local = local_services(tmp_path)
    for unit, service in UNIT_SERVICES.items():
        path = UNITS / unit
        principal = unit_environment(path).get("NHDP_PRINCIPAL")
        if service == "registry":
            assert principal is None and "NHDP_PRINCIPAL_PASSWORD" not in unit_credentials(path)
            continue
        assert principal == local[service][1]["NHDP_PRINCIPAL"], unit
        assert unit_credentials(path)["NHDP_PRINCIPAL_PASSWORD"].endswith(f"/principal-{principal}")


def _k8s_secrets(dep: str) -> set[str]:
    (main,) = containers(of_kind("Deployment")[dep], init=False)
    return {v["name"] for v in main.get("env", []) if "valueFrom" in v}


def _unit_secrets(unit: str) -> set[str]:
    path = UNITS / unit
    names = {c for c in unit_credentials(path) if c.isupper()}
    if unit_environment(path).get("PGPASSFILE") == "%d/pgpass":
        assert "pgpass" in unit_credentials(path)
        names.add("PGPASSWORD")  # the same password, as libpq's file
    return names


@pytest.mark.parametrize("dep", sorted(K8S_SERVICES))
def test_each_service_gets_the_same_secrets_under_systemd_and_kubernetes(dep):
    unit = next(u for u, s in UNIT_SERVICES.items() if s == K8S_SERVICES[dep])
    assert _k8s_secrets(dep) == _unit_secrets(unit)
    # Settings refuses to start outside NHDP_ENV=local without the pseudonym secret, in every process
    assert "NHDP_PSEUDONYM_SECRET" in _k8s_secrets(dep)


def test_the_api_units_run_one_process_per_port():
    path = UNITS / "nhdp-api@.service"
    assert unit_environment(path)["NHDP_API_PORT"] == "%i"
    assert unit_entries(path)["Install"]["DefaultInstance"] == ["8000"]


# -- each Deployment: probes, limits, least privilege, sizes --------------------------------------
@pytest.mark.parametrize("dep", sorted(K8S_SERVICES))
def test_each_deployment_has_a_readiness_probe_limits_and_no_privilege(dep):
    doc = of_kind("Deployment")[dep]
    pod = doc["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == dockerfile_user()
    assert pod["automountServiceAccountToken"] is False  # none of them talks to the Kubernetes API
    for c in containers(doc):
        limits, requests = c["resources"]["limits"], c["resources"]["requests"]
        assert {"cpu", "memory"} <= set(limits) and {"cpu", "memory"} <= set(requests), c["name"]
        ctx = c["securityContext"]
        assert ctx["readOnlyRootFilesystem"] is True and ctx["allowPrivilegeEscalation"] is False
        assert ctx["capabilities"]["drop"] == ["ALL"]
        # every path written to is a volume: the data folder and /tmp
        writable = {m["mountPath"] for m in c.get("volumeMounts", []) if not m.get("readOnly")}
        assert "/var/lib/nhdp" in writable
        assert of_kind("ConfigMap")["nhdp-config"]["data"]["NHDP_DATA_DIR"] == "/var/lib/nhdp"
    for c in containers(doc, init=False):
        assert "readinessProbe" in c, f"{dep}/{c['name']} has no readiness probe"


def test_the_api_has_two_replicas_ready_on_healthz():
    api = of_kind("Deployment")["nhdp-api"]
    assert api["spec"]["replicas"] >= 2
    (main,) = containers(api, init=False)
    assert main["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert of_kind("PodDisruptionBudget")["nhdp-api"]["spec"]["minAvailable"] >= 1


def test_workers_stay_within_the_partitions_and_the_sink_is_alone():
    partitions = int(of_kind("ConfigMap")["nhdp-config"]["data"]["NHDP_KAFKA_PARTITIONS"])
    deployments = of_kind("Deployment")
    assert 1 <= deployments["nhdp-worker"]["spec"]["replicas"] <= partitions
    sink = deployments["nhdp-sink"]["spec"]
    # a single writer fenced in ClickHouse: never two, not even during a rollout
    assert sink["replicas"] == 1 and sink["strategy"]["type"] == "Recreate"


def test_the_ready_files_the_probes_look_for_are_the_ones_the_services_write(tmp_path):
    settings = Settings(data_dir=Path("/var/lib/nhdp"))
    for dep, service in (("nhdp-worker", "worker"), ("nhdp-sink", "sink")):
        (main,) = containers(of_kind("Deployment")[dep], init=False)
        probe = main["readinessProbe"]["exec"]["command"][-1]
        pattern = probe.split()[-1]
        assert Path(str(settings.ready_path(service, 1234)).replace("1234", "*")) == Path(pattern)


def test_each_service_selects_its_pods_and_names_a_container_port():
    deployments = of_kind("Deployment")
    services = of_kind("Service")
    assert set(services) == {"nhdp-api", "nhdp-registry"}
    data = of_kind("ConfigMap")["nhdp-config"]["data"]
    for name, svc in services.items():
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= labels.items()
        (main,) = containers(deployments[name], init=False)
        ports = {p["name"]: p["containerPort"] for p in main["ports"]}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports
        setting = "NHDP_API_PORT" if name == "nhdp-api" else "NHDP_REGISTRY_PORT"
        assert int(data[setting]) in ports.values()
    assert data["NHDP_REGISTRY_URL"].startswith("http://nhdp-registry.nhdp.svc:")


def test_network_policy_denies_ingress_by_default():
    policies = of_kind("NetworkPolicy")
    default = [p for p in policies.values() if p["spec"]["podSelector"] == {} and "ingress" not in p["spec"]]
    assert default and default[0]["spec"]["policyTypes"] == ["Ingress"]
    registry = policies["nhdp-registry-ingress"]["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    for doc in of_kind("Deployment").values():
        assert registry.items() <= doc["spec"]["template"]["metadata"]["labels"].items()


# -- the image ---------------------------------------------------------------------------------------
def dockerfile() -> list[tuple[str, str]]:
    lines = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
    return [tuple(line.split(None, 1)) for line in lines if line.strip() and not line.startswith("#")]


def dockerfile_user() -> int:
    (user,) = [arg for op, arg in dockerfile() if op == "USER"]
    uid, _, gid = user.partition(":")
    return int(uid)


def test_the_image_is_pinned_non_root_and_holds_every_package():
    froms = [arg.split()[0] for op, arg in dockerfile() if op == "FROM"]
    assert froms and all(re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", f) for f in froms), froms
    assert dockerfile_user() != 0
    copied = {arg.split()[0] for op, arg in dockerfile() if op == "COPY" and "--from" not in arg}
    packages = set(PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"])
    assert {p.rstrip("*") for p in packages} <= copied
    (cmd,) = [arg for op, arg in dockerfile() if op == "CMD"]
    assert runnable(yaml.safe_load(cmd))
    for doc in of_kind("Deployment").values():
        for c in containers(doc):
            assert c["image"].split(":")[1] == PYPROJECT["project"]["version"]


def test_the_readme_names_every_file():
    readme = (DEPLOY / "README.md").read_text()
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.name != "README.md":
            assert path.relative_to(DEPLOY).as_posix() in readme, path.name
