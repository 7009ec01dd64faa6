"""Render the example system's Kubernetes manifests: ``single-node.yaml`` and
``cluster.yaml`` next to this file (deploy/kubernetes/README.md).

Helm is not used: one Python function per object, and two profiles that differ
only in data (where RabbitMQ and PostgreSQL are, how many replicas). The
rendered files are committed; ``python deploy/kubernetes/render.py`` writes
them again, ``--check`` fails when they are stale (tests/unit/test_kubernetes.py
runs it, and validates every object against the Kubernetes API schemas).

    python deploy/kubernetes/render.py                      # rewrite both files
    python deploy/kubernetes/render.py --check              # exit 1 if stale
    python deploy/kubernetes/render.py --profile cluster --image registry/app:1.2 > my.yaml
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
NAMESPACE = "sagaflow"
IMAGE = "sagaflow-example:latest"  # built from deploy/Dockerfile
METRICS_PORT = 9464
ORDER_PORT = 8000
DASHBOARD_PORT = 8089
SAGAS = "services.order.saga:SAGAS"
"""Every version of create-order: sagas started on v1 finish on v1, new ones start v2."""
PARTICIPANTS = ("inventory", "payment", "shipping")
SECRET = "sagaflow-secrets"
GRACE_SECONDS = 45
"""SIGTERM: a coordinator or worker finishes the batches in hand (commit, reply,
ack; the transport gives running handlers 5 s, a batch its commit), then exits
0. 45 s leaves room for a commit waiting on a failing-over database."""

Obj = dict[str, Any]


@dataclass(frozen=True)
class Profile:
    """Where the servers are and how many of each process run."""

    name: str
    description: str
    amqp_hosts: tuple[str, ...]
    postgres_hosts: tuple[str, ...]
    coordinators: int
    workers: int
    quorum_group_size: int | None

    def amqp_url(self, user: str) -> str:
        # the password comes from the secret at run time: $(VAR) is expanded by Kubernetes
        return f"amqp://{user}:$(AMQP_PASSWORD)@{','.join(self.amqp_hosts)}/sagaflow"

    def database_url(self) -> str:
        hosts = ",".join(self.postgres_hosts)
        query = "?target_session_attrs=read-write" if len(self.postgres_hosts) > 1 else ""
        return f"postgresql://sagaflow:$(DATABASE_PASSWORD)@{hosts}/sagaflow{query}"


PROFILES = {
    "single-node": Profile(
        name="single-node",
        description="one RabbitMQ node and one PostgreSQL server (services rabbitmq, postgres)",
        amqp_hosts=("rabbitmq:5672",),
        postgres_hosts=("postgres:5432",),
        coordinators=2,
        workers=1,
        quorum_group_size=None,
    ),
    "cluster": Profile(
        name="cluster",
        description="a three-node RabbitMQ cluster (a StatefulSet rabbitmq-server behind the"
        " headless service rabbitmq-nodes, as the RabbitMQ cluster operator names them) and a"
        " PostgreSQL primary with a standby (services postgres-1, postgres-2)",
        amqp_hosts=tuple(
            f"rabbitmq-server-{n}.rabbitmq-nodes.{NAMESPACE}.svc:5672" for n in range(3)
        ),
        postgres_hosts=("postgres-1:5432", "postgres-2:5432"),
        coordinators=3,
        workers=2,
        quorum_group_size=3,
    ),
}


def _meta(name: str, component: str) -> Obj:
    return {
        "name": name,
        "namespace": NAMESPACE,
        "labels": {"app.kubernetes.io/name": "sagaflow", "app.kubernetes.io/component": component},
    }


def _secret(key: str, name: str) -> Obj:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": SECRET, "key": key}}}


def config_map(profile: Profile) -> Obj:
    data = {
        "SAGAFLOW_PREFIX": "sagaflow",
        "SAGAFLOW_LOG_FORMAT": "json",
        # the processes' broker users may not declare: the broker-setup job did
        "SAGAFLOW_DECLARE_TOPOLOGY": "false",
        "SAGAFLOW_METRICS_PORT": str(METRICS_PORT),
        "SAGAFLOW_METRICS_HOST": "0.0.0.0",
        "SAGAFLOW_CONNECT_TIMEOUT": "120",
    }
    if profile.quorum_group_size is not None:
        data["SAGAFLOW_QUORUM_INITIAL_GROUP_SIZE"] = str(profile.quorum_group_size)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta("sagaflow-config", "config"),
        "data": data,
    }


def _env(profile: Profile, broker_user: str, *, signing: bool = True) -> list[Obj]:
    env = [
        _secret("database-password", "DATABASE_PASSWORD"),
        _secret(f"amqp-password-{broker_user}", "AMQP_PASSWORD"),
        {"name": "SAGAFLOW_DATABASE_URL", "value": profile.database_url()},
        {"name": "SAGAFLOW_AMQP_URL", "value": profile.amqp_url(f"sagaflow-{broker_user}")},
    ]
    if signing:
        env.append(_secret("signing-keys", "SAGAFLOW_SIGNING_KEYS"))
    return env


def _metrics_probes() -> Obj:
    # the coordinator and workers have no /health: their Prometheus endpoint answers
    # once settings, database and broker checks passed (it starts after them)
    probe = {"httpGet": {"path": "/metrics", "port": "metrics"}, "periodSeconds": 10}
    return {
        "startupProbe": {**probe, "failureThreshold": 30, "periodSeconds": 5},
        "readinessProbe": {**probe, "failureThreshold": 3},
        "livenessProbe": {**probe, "failureThreshold": 6, "timeoutSeconds": 5},
    }


def _http_probes(path: str, port: str) -> Obj:
    probe = {"httpGet": {"path": path, "port": port}, "periodSeconds": 10}
    return {
        "startupProbe": {**probe, "failureThreshold": 30, "periodSeconds": 5},
        "readinessProbe": {**probe, "failureThreshold": 3},
        "livenessProbe": {**probe, "failureThreshold": 6, "timeoutSeconds": 5},
    }


def _container(name: str, command: list[str], env: list[Obj], ports: list[Obj], probes: Obj) -> Obj:
    return {
        "name": name,
        "image": IMAGE,
        "command": command,
        "envFrom": [{"configMapRef": {"name": "sagaflow-config"}}],
        "env": env,
        "ports": ports,
        **probes,
        "resources": {
            "requests": {"cpu": "250m", "memory": "256Mi"},
            "limits": {"memory": "512Mi"},
        },
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }


def deployment(name: str, component: str, replicas: int, container: Obj) -> Obj:
    labels = {"app.kubernetes.io/name": "sagaflow", "app.kubernetes.io/component": component}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(name, component),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            # a new pod is ready before an old one gets SIGTERM
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "terminationGracePeriodSeconds": GRACE_SECONDS,
                    "containers": [container],
                    # spread the replicas over nodes: losing one node loses one replica
                    "topologySpreadConstraints": [
                        {
                            "maxSkew": 1,
                            "topologyKey": "kubernetes.io/hostname",
                            "whenUnsatisfiable": "ScheduleAnyway",
                            "labelSelector": {"matchLabels": labels},
                        }
                    ],
                },
            },
        },
    }


def disruption_budget(name: str, component: str) -> Obj:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(name, component),
        "spec": {
            "maxUnavailable": 1,
            "selector": {
                "matchLabels": {
                    "app.kubernetes.io/name": "sagaflow",
                    "app.kubernetes.io/component": component,
                }
            },
        },
    }


def service(name: str, component: str, port: int) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(name, component),
        "spec": {
            "selector": {
                "app.kubernetes.io/name": "sagaflow",
                "app.kubernetes.io/component": component,
            },
            "ports": [{"name": "http", "port": port, "targetPort": "http"}],
        },
    }


def job(name: str, command: list[str], env: list[Obj]) -> Obj:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _meta(name, name),
        "spec": {
            "backoffLimit": 6,
            "template": {
                "spec": {
                    "restartPolicy": "OnFailure",
                    "containers": [
                        {
                            "name": name,
                            "image": IMAGE,
                            "command": command,
                            "envFrom": [{"configMapRef": {"name": "sagaflow-config"}}],
                            "env": env,
                        }
                    ],
                }
            },
        },
    }


def render(profile: Profile, image: str = IMAGE) -> list[Obj]:
    """Every object of the example system for ``profile``."""
    metrics = [{"name": "metrics", "containerPort": METRICS_PORT}]
    objects: list[Obj] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        config_map(profile),
        # run once per release, before the new coordinators start
        job("sagaflow-migrate", ["sagaflow", "db", "migrate"], _env(profile, "admin")),
        job(
            "sagaflow-broker-setup",
            ["sagaflow", "broker", "declare", *PARTICIPANTS, "order"],
            _env(profile, "admin", signing=False),
        ),
        deployment(
            "coordinator",
            "coordinator",
            profile.coordinators,
            _container(
                "coordinator",
                ["sagaflow", "coordinator", SAGAS],
                _env(profile, "coordinator"),
                metrics,
                _metrics_probes(),
            ),
        ),
        disruption_budget("coordinator", "coordinator"),
    ]
    for name in PARTICIPANTS:
        objects += [
            deployment(
                name,
                name,
                profile.workers,
                _container(
                    "worker",
                    ["sagaflow", "worker", f"services.{name}.app:participant"],
                    _env(profile, name),
                    metrics,
                    _metrics_probes(),
                ),
            ),
            disruption_budget(name, name),
        ]
    http = [{"name": "http", "containerPort": ORDER_PORT}]
    order_env = [
        *_env(profile, "order"),
        {"name": "ORDER_HTTP_HOST", "value": "0.0.0.0"},
        {"name": "ORDER_HTTP_PORT", "value": str(ORDER_PORT)},
    ]
    objects += [
        deployment(
            "order",
            "order",
            profile.workers,
            _container(
                "order",
                ["python", "-m", "services.order"],
                order_env,
                [*http, *metrics],
                _http_probes("/health", "http"),
            ),
        ),
        disruption_budget("order", "order"),
        service("order", "order", ORDER_PORT),
    ]
    dashboard_env = [
        *_env(profile, "operator", signing=True),
        _secret("dashboard-token", "SAGAFLOW_DASHBOARD_TOKEN"),
    ]
    objects += [
        deployment(
            "dashboard",
            "dashboard",
            1,
            _container(
                "dashboard",
                [
                    *("sagaflow", "dashboard", "--module", SAGAS),
                    *("--host", "0.0.0.0", "--port", str(DASHBOARD_PORT)),
                ],
                dashboard_env,
                [{"name": "http", "containerPort": DASHBOARD_PORT}],
                _http_probes("/health", "http"),
            ),
        ),
        service("dashboard", "dashboard", DASHBOARD_PORT),
    ]
    if image != IMAGE:
        for obj in objects:
            for pod in _pod_specs(obj):
                for container in pod["containers"]:
                    container["image"] = image
    return objects


def _pod_specs(obj: Obj) -> list[Obj]:
    template = obj.get("spec", {}).get("template")
    return [template["spec"]] if template else []


def to_yaml(profile: Profile, image: str = IMAGE) -> str:
    header = (
        f"# sagaflow's example system on Kubernetes: {profile.description}.\n"
        "# Rendered by deploy/kubernetes/render.py (edit that, not this); see"
        " deploy/kubernetes/README.md.\n"
    )
    return header + yaml.safe_dump_all(render(profile, image), sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 if a rendered file is stale")
    p.add_argument("--profile", choices=sorted(PROFILES), help="print one profile to stdout")
    p.add_argument("--image", default=IMAGE)
    args = p.parse_args(argv)
    if args.profile:
        sys.stdout.write(to_yaml(PROFILES[args.profile], args.image))
        return 0
    stale = []
    for name, profile in PROFILES.items():
        path = HERE / f"{name}.yaml"
        text = to_yaml(profile)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
    if stale:
        print(f"stale: {', '.join(stale)}: run python deploy/kubernetes/render.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
