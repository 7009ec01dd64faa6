"""deploy/docker-compose.yml agrees with the code.

Docker does not run in CI, so the compose file is checked here instead: every
command names a real CLI command and a real ``MODULE:ATTR``, every
``SAGAFLOW_*`` variable is a setting, credentials and ports line up, and the
processes wait for what they need.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import typer.main
import yaml

from sagaflow import Participant, Saga
from sagaflow.cli.app import app as cli_app
from sagaflow.cli.broker import roles as broker_roles
from sagaflow.cli.resolve import load_participant, load_sagas
from sagaflow.config import Settings
from sagaflow.core.ports import Topology

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deploy" / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"

INFRA = {"rabbitmq", "postgres", "jaeger"}
WORKERS = {"inventory", "payment", "shipping"}
LONG_RUNNING = {"coordinator", "order"} | WORKERS
APPS = LONG_RUNNING | {"migrate", "broker-setup"}
DEFINITIONS = ROOT / "deploy" / "rabbitmq" / "definitions.json"
JAEGER_MIN = (2, 15, 0)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose["services"]
    assert isinstance(found, dict)
    return found


def _command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the KEY=VALUE list form
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _container_ports(service: dict[str, Any]) -> set[int]:
    ports = set()
    for spec in service.get("ports", []):
        text = str(spec["target"] if isinstance(spec, dict) else spec)
        ports.add(int(text.split("/")[0].rsplit(":", 1)[-1]))
    return ports


def _setting_env_names() -> set[str]:
    prefix = Settings.model_config.get("env_prefix", "")
    names = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        names.add((alias if isinstance(alias, str) else f"{prefix}{name}").upper())
    return names


def test_the_expected_services_are_there(services: dict[str, Any]) -> None:
    assert set(services) == INFRA | APPS


# --------------------------------------------------------------------------- commands


def test_app_services_run_the_repository_image(services: dict[str, Any]) -> None:
    for name in APPS:
        build = services[name]["build"]
        assert (COMPOSE.parent / build["context"]).resolve() == ROOT, name
        assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILE, name


def test_dockerfile_installs_the_services_extra() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.MULTILINE)
    # the dashboard too: deploy/kubernetes runs `sagaflow dashboard` from this image
    assert "pip install --editable '.[services,dashboard]'" in text
    for copied in ("sagaflow/", "services/"):
        assert re.search(rf"^COPY {copied} ", text, re.MULTILINE), copied


def _cli_command(argv: list[str]) -> Any:
    """The CLI command ``sagaflow <argv>`` names (without running anything)."""
    command: Any = typer.main.get_command(cli_app)
    for word in argv:
        # duck-typed: recent Typer releases ship their own click-like classes
        commands = getattr(command, "commands", None)
        assert isinstance(commands, dict), f"{argv}: {command.name} has no subcommands"
        sub = commands.get(word)
        assert sub is not None, f"`sagaflow {' '.join(argv)}`: no command {word!r}"
        command = sub
    return command


def test_migrate_runs_a_real_cli_command(services: dict[str, Any]) -> None:
    argv = _command(services["migrate"])
    assert argv == ["sagaflow", "db", "migrate"]
    _cli_command(argv[1:])
    assert services["migrate"]["restart"] == "no"


def test_coordinator_runs_sagas_that_exist(services: dict[str, Any]) -> None:
    argv = _command(services["coordinator"])
    assert argv[:2] == ["sagaflow", "coordinator"]
    _cli_command(argv[1:2])
    sagas = load_sagas(argv[2:])
    assert sagas and all(isinstance(saga, Saga) for saga in sagas)


@pytest.mark.parametrize("name", sorted(WORKERS))
def test_workers_run_their_participant(services: dict[str, Any], name: str) -> None:
    argv = _command(services[name])
    assert argv[:2] == ["sagaflow", "worker"]
    _cli_command(argv[1:2])
    assert len(argv) == 3
    participant = load_participant(argv[2])
    assert isinstance(participant, Participant)
    assert participant.service == name, f"compose service {name} runs {participant.service}"
    assert participant.actions, f"{name} has no handlers"


def test_order_runs_the_order_module(services: dict[str, Any]) -> None:
    argv = _command(services["order"])
    assert argv == ["python", "-m", "services.order"]
    assert importlib.util.find_spec("services.order.__main__") is not None
    participant = load_participant("services.order.app:participant")
    assert participant.service == "order"


def test_every_saga_service_is_served(services: dict[str, Any]) -> None:
    sagas = load_sagas(_command(services["coordinator"])[2:])
    needed = set().union(*(saga.services for saga in sagas))
    served = {load_participant(_command(services[name])[2]).service for name in WORKERS}
    served.add(load_participant("services.order.app:participant").service)  # in `order`
    assert needed <= served, f"no process serves {sorted(needed - served)}"


# --------------------------------------------------------------------------- configuration


def test_sagaflow_variables_are_settings(services: dict[str, Any]) -> None:
    known = _setting_env_names()
    assert {"SAGAFLOW_AMQP_URL", "SAGAFLOW_DATABASE_URL", "SAGAFLOW_JAEGER_URL"} <= known
    for name, service in services.items():
        for key in _env(service):
            if key.startswith("SAGAFLOW_"):
                assert key in known, f"{name}: {key} is not a field of sagaflow.config.Settings"


@pytest.mark.parametrize("name", sorted(APPS))
def test_settings_load_from_the_environment(
    services: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = _env(services[name])
    # only the compose file's environment counts, not the one running the tests
    prefixes = (Settings.model_config.get("env_prefix", "SAGAFLOW_"), "OTEL_")
    for variable in [v for v in os.environ if v.startswith(prefixes)]:
        monkeypatch.delenv(variable)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()  # exactly what the process does at start
    if name != "migrate":  # the database only
        assert settings.amqp_url == env["SAGAFLOW_AMQP_URL"]
    assert settings.database_url == env["SAGAFLOW_DATABASE_URL"]
    assert settings.jaeger_url == "http://localhost:16686"


def _broker_users() -> dict[str, dict[str, Any]]:
    loaded = json.loads(DEFINITIONS.read_text(encoding="utf-8"))
    permissions = {p["user"]: p for p in loaded["permissions"] if p["vhost"] == "/"}
    return {u["name"]: {**u, **permissions[u["name"]]} for u in loaded["users"]}


def _password_matches(password: str, user: dict[str, Any]) -> bool:
    # rabbit_password_hashing_sha256: base64(salt[4] + sha256(salt + password))
    assert user["hashing_algorithm"] == "rabbit_password_hashing_sha256"
    raw = base64.b64decode(user["password_hash"])
    return hashlib.sha256(raw[:4] + password.encode()).digest() == raw[4:]


def _role(name: str) -> str:
    return {"coordinator": "coordinator", "broker-setup": "admin"}.get(name, f"service:{name}")


def test_each_process_has_its_own_least_privilege_broker_user(services: dict[str, Any]) -> None:
    rabbit = services["rabbitmq"]
    mounts = {str(v).split(":")[1] for v in rabbit["volumes"] if str(v).startswith("./")}
    assert {"/etc/rabbitmq/definitions.json", "/etc/rabbitmq/conf.d/20-sagaflow.conf"} <= mounts
    conf = (ROOT / "deploy" / "rabbitmq" / "20-sagaflow.conf").read_text(encoding="utf-8")
    assert "load_definitions = /etc/rabbitmq/definitions.json" in conf
    sagas = load_sagas(_command(services["coordinator"])[2:])
    needed = set().union(*(saga.services for saga in sagas))
    expected = {user.role: user for user in broker_roles(Topology(), needed, admin="sagaflow")}
    users = _broker_users()
    assert set(users) == {user.user for user in expected.values()}
    for user in expected.values():  # exactly what `sagaflow broker users` grants
        found = users[user.user]
        grants = (found["configure"], found["write"], found["read"], tuple(found["tags"]))
        assert grants == (user.configure, user.write, user.read, user.tags), user.role
    seen = set()
    for name in sorted(APPS - {"migrate"}):
        env = _env(services[name])
        amqp = urlsplit(env["SAGAFLOW_AMQP_URL"])
        assert amqp.scheme == "amqp" and amqp.hostname == "rabbitmq" and amqp.port == 5672
        user = expected[_role(name)]
        assert amqp.username == user.user, f"{name} should log in as {user.user}"
        assert _password_matches(amqp.password or "", users[user.user]), name
        if name != "broker-setup":
            assert env["SAGAFLOW_DECLARE_TOPOLOGY"] == "false", name
        seen.add(user.user)
    assert "SAGAFLOW_AMQP_URL" not in _env(services["migrate"])  # it uses no broker
    assert len(seen) == len(APPS) - 1, "two processes share a broker user"


def test_broker_setup_declares_the_topology_first(services: dict[str, Any]) -> None:
    setup = services["broker-setup"]
    argv = _command(setup)
    assert argv[:3] == ["sagaflow", "broker", "declare"]
    _cli_command(argv[1:3])
    assert argv[3:] == ["--saga", *_command(services["coordinator"])[2:]]
    assert setup["restart"] == "no"
    assert _depends(setup) == {"rabbitmq": "service_healthy"}
    for name in LONG_RUNNING:
        assert _depends(services[name]).get("broker-setup") == "service_completed_successfully"


def test_app_services_share_urls_that_match_the_servers(services: dict[str, Any]) -> None:
    pg = _env(services["postgres"])
    for name in APPS:
        env = _env(services[name])
        db = urlsplit(env["SAGAFLOW_DATABASE_URL"])
        assert db.scheme == "postgresql" and db.hostname == "postgres" and db.port == 5432
        assert (db.username, db.password, db.path.lstrip("/")) == (
            pg["POSTGRES_USER"],
            pg["POSTGRES_PASSWORD"],
            pg["POSTGRES_DB"],
        ), f"{name}: database URL differs from the server's"


def test_tracing_is_configured_per_service(services: dict[str, Any]) -> None:
    names = {}
    for name in APPS:
        env = _env(services[name])
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318", name
        assert env.get("OTEL_SERVICE_NAME"), f"{name} has no OTEL_SERVICE_NAME"
        names[env["OTEL_SERVICE_NAME"]] = name
    assert len(names) == len(APPS), "two services report traces under one name"


# --------------------------------------------------------------------------- ports and images


def _version(tag: str) -> tuple[int, ...]:
    match = re.fullmatch(r"v?(\d+)\.(\d+)\.(\d+)", tag)
    assert match, f"pin an exact Jaeger version, not {tag!r}"
    return tuple(int(part) for part in match.groups())


def test_jaeger_is_v2_and_exposes_otlp_and_ui(services: dict[str, Any]) -> None:
    jaeger = services["jaeger"]
    repository, _, tag = jaeger["image"].rpartition(":")
    assert repository == "cr.jaegertracing.io/jaegertracing/jaeger"
    assert _version(tag) >= JAEGER_MIN
    assert {4317, 4318, 16686} <= _container_ports(jaeger)


def test_infrastructure_images_and_ports(services: dict[str, Any]) -> None:
    assert services["rabbitmq"]["image"] == "rabbitmq:3.13-management"
    assert {5672, 15672} <= _container_ports(services["rabbitmq"])
    assert services["postgres"]["image"] == "postgres:16"
    assert 5432 in _container_ports(services["postgres"])
    for name in ("rabbitmq", "postgres"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


def test_order_port_matches_its_setting(services: dict[str, Any]) -> None:
    order = services["order"]
    env = _env(order)
    port = int(env["ORDER_HTTP_PORT"])
    assert env["ORDER_HTTP_HOST"] == "0.0.0.0", "bind all interfaces inside the container"
    assert port in _container_ports(order)
    probe = " ".join(_command({"command": order["healthcheck"]["test"]}))
    assert f":{port}/health" in probe


# --------------------------------------------------------------------------- start order


def _depends(service: dict[str, Any]) -> dict[str, str]:
    depends = service.get("depends_on") or {}
    if isinstance(depends, list):
        return dict.fromkeys(depends, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in depends.items()}


@pytest.mark.parametrize("name", sorted(LONG_RUNNING))
def test_processes_wait_for_broker_database_and_migration(
    services: dict[str, Any], name: str
) -> None:
    depends = _depends(services[name])
    assert depends.get("rabbitmq") == "service_healthy", name
    assert depends.get("postgres") == "service_healthy", name
    assert depends.get("migrate") == "service_completed_successfully", name
    assert "jaeger" in depends, name


def test_migrate_waits_for_the_database(services: dict[str, Any]) -> None:
    assert _depends(services["migrate"]) == {"postgres": "service_healthy"}


def test_dependencies_name_real_services(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for dependency, condition in _depends(service).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            if condition == "service_healthy":
                assert services[dependency].get("healthcheck"), (
                    f"{name} waits for {dependency} to be healthy, but it has no healthcheck"
                )
