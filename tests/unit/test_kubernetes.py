"""deploy/kubernetes: the rendered manifests are fresh, valid against the
Kubernetes API schemas (kubernetes-validate), and say what sagaflow reads:
known settings, probes on ports that exist, a grace period for SIGTERM."""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import kubernetes_validate
import pytest
import yaml

from sagaflow.config import Settings, broker_urls

ROOT = Path(__file__).resolve().parents[2]
RENDER = ROOT / "deploy" / "kubernetes" / "render.py"
VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
DASHBOARD_ONLY = {"SAGAFLOW_DASHBOARD_TOKEN"}  # read by `sagaflow dashboard` (DashboardSettings)


def _render_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sagaflow_k8s_render", RENDER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


render = _render_module()
PROFILES = sorted(render.PROFILES)


def documents(profile: str) -> list[dict[str, Any]]:
    path = ROOT / "deploy" / "kubernetes" / f"{profile}.yaml"
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    template = doc.get("spec", {}).get("template")
    return template["spec"]["containers"] if template else []


def test_the_committed_files_are_what_render_writes() -> None:
    done = subprocess.run(
        [sys.executable, str(RENDER), "--check"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_is_valid_for_kubernetes(profile: str, version: str) -> None:
    docs = documents(profile)
    assert {d["kind"] for d in docs} >= {"Deployment", "ConfigMap", "Job", "Service"}
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_refuses_a_misspelt_field() -> None:
    doc = copy.deepcopy(next(d for d in documents("cluster") if d["kind"] == "Deployment"))
    container = doc["spec"]["template"]["spec"]["containers"][0]
    container["livenesProbe"] = container.pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, VERSIONS[-1], strict=True)


@pytest.mark.parametrize("profile", PROFILES)
def test_each_long_running_container_is_probed_and_stops_gracefully(profile: str) -> None:
    deployments = [d for d in documents(profile) if d["kind"] == "Deployment"]
    assert {d["metadata"]["name"] for d in deployments} == {
        "coordinator", "inventory", "payment", "shipping", "order", "dashboard",
    }  # fmt: skip
    for doc in deployments:
        pod = doc["spec"]["template"]["spec"]
        # SIGTERM: the batches in hand finish; the transport alone gives handlers 5 s
        assert pod["terminationGracePeriodSeconds"] >= 30
        for container in containers(doc):
            ports = {p["name"] for p in container["ports"]}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert container[probe]["httpGet"]["port"] in ports, (doc["metadata"], probe)


def test_coordinators_run_several_replicas() -> None:
    for profile in PROFILES:
        coordinator = next(d for d in documents(profile) if d["metadata"]["name"] == "coordinator")
        assert coordinator["spec"]["replicas"] >= 2
        assert coordinator["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def _environment(profile: str, container: dict[str, Any]) -> dict[str, str]:
    config = next(d for d in documents(profile) if d["kind"] == "ConfigMap")["data"]
    env = dict(config)
    for var in container["env"]:
        env[var["name"]] = var.get("value", "secret")
    # what Kubernetes does with $(VAR): a password from the secret goes in the URL
    return {k: v.replace("$(AMQP_PASSWORD)", "pw").replace("$(DATABASE_PASSWORD)", "pw")
            for k, v in env.items()}  # fmt: skip


@pytest.mark.parametrize("profile", PROFILES)
def test_every_setting_is_one_sagaflow_reads_and_accepts(profile: str) -> None:
    known = {f"SAGAFLOW_{name.upper()}" for name in Settings.model_fields} | {"SAGAFLOW_SCHEMA"}
    for doc in documents(profile):
        for container in containers(doc):
            env = _environment(profile, container)
            unknown = {k for k in env if k.startswith("SAGAFLOW_")} - known - DASHBOARD_ONLY
            assert not unknown, (doc["metadata"]["name"], unknown)
            settings = Settings(**{k[9:].lower(): v for k, v in env.items()
                                   if k in known and k != "SAGAFLOW_SCHEMA"})  # fmt: skip
            assert settings.amqp_url.startswith("amqp://")


def test_the_cluster_profile_names_every_node_and_writes_only_to_the_primary() -> None:
    coordinator = next(d for d in documents("cluster") if d["metadata"]["name"] == "coordinator")
    env = _environment("cluster", containers(coordinator)[0])
    assert len(broker_urls(env["SAGAFLOW_AMQP_URL"])) == 3
    database = env["SAGAFLOW_DATABASE_URL"]
    assert database.endswith("?target_session_attrs=read-write")
    assert database.split("@")[1].split("/")[0].count(",") == 1
    assert env["SAGAFLOW_QUORUM_INITIAL_GROUP_SIZE"] == "3"
