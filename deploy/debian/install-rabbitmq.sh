#!/usr/bin/env bash
# Install RabbitMQ from Debian's packages and start it (no docker needed).
#
#   sudo deploy/debian/install-rabbitmq.sh
#
# Idempotent: run it again to start a stopped broker. Works with and without
# systemd (containers, CI runners). sagaflow needs RabbitMQ 3.10 or newer
# (quorum queues with at-least-once dead-lettering); Debian 12 ships 3.10.8.
#
# The built-in `guest` user (password `guest`) may only connect from this
# machine, which is what the tests and a local coordinator use
# (amqp://guest:guest@127.0.0.1:5672/). Options, as environment variables:
#
#   SAGAFLOW_RABBITMQ_USER / SAGAFLOW_RABBITMQ_PASSWORD
#       also create this administrator (for services on other hosts)
#   SAGAFLOW_RABBITMQ_MANAGEMENT=1
#       enable the management UI on http://localhost:15672
set -euo pipefail

if ((EUID != 0)); then
    echo "install-rabbitmq.sh: run it as root (sudo $0)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive

if ! command -v rabbitmq-server >/dev/null; then
    echo "== installing RabbitMQ (apt)"
    apt-get update -q
    apt-get install -y -q --no-install-recommends rabbitmq-server
fi

port_open() { timeout 3 bash -c ': >/dev/tcp/127.0.0.1/5672' 2>/dev/null; }

echo "== starting RabbitMQ"
if [[ -d /run/systemd/system ]]; then
    systemctl enable --now rabbitmq-server
elif ! port_open; then
    # no systemd (a container): start the node in the background
    if timeout 30 rabbitmqctl -q status >/dev/null 2>&1; then
        rabbitmqctl -q start_app
    else
        rabbitmq-server -detached
    fi
fi
for _ in $(seq 1 60); do
    port_open && break
    sleep 1
done
rabbitmqctl -q await_startup --timeout 60

version="$(rabbitmqctl -q version 2>/dev/null || echo unknown)"
if [[ "$version" != unknown ]] && [[ "$(printf '%s\n' 3.10.0 "$version" | sort -V | head -n 1)" != 3.10.0 ]]; then
    echo "install-rabbitmq.sh: WARNING: RabbitMQ $version is older than 3.10;" \
        "sagaflow's queues (at-least-once dead-lettering) need 3.10 or newer" >&2
fi

if [[ "${SAGAFLOW_RABBITMQ_MANAGEMENT:-0}" == 1 ]]; then
    echo "== enabling the management UI"
    rabbitmq-plugins enable --quiet rabbitmq_management
fi

if [[ -n "${SAGAFLOW_RABBITMQ_USER:-}" ]]; then
    user="$SAGAFLOW_RABBITMQ_USER"
    password="${SAGAFLOW_RABBITMQ_PASSWORD:?set SAGAFLOW_RABBITMQ_PASSWORD too}"
    echo "== creating user $user"
    if rabbitmqctl -q list_users | awk '{print $1}' | grep -qxF "$user"; then
        # from stdin: the password never shows in the process list
        printf '%s' "$password" | rabbitmqctl -q change_password "$user" >/dev/null
    else
        printf '%s' "$password" | rabbitmqctl -q add_user "$user" >/dev/null
    fi
    rabbitmqctl -q set_user_tags "$user" administrator
    rabbitmqctl -q set_permissions -p / "$user" '.*' '.*' '.*'
fi

echo "RabbitMQ $version is up on 127.0.0.1:5672"
