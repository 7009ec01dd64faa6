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
# machine, which is what the tests use (amqp://guest:guest@127.0.0.1:5672/).
# sagaflow's processes should not: each gets a user of its own that may touch
# only its own queues and exchanges (docs/security.md). Options, as
# environment variables:
#
#   SAGAFLOW_RABBITMQ_SERVICES="inventory payment shipping order"
#       create those least-privilege users with `sagaflow broker users
#       --apply`: the coordinator, the operator (`sagaflow dlq`) and one per
#       service; print each one's password and SAGAFLOW_AMQP_URL once; and
#       declare the topology (`sagaflow broker declare`) as the administrator.
#       Run the processes with SAGAFLOW_DECLARE_TOPOLOGY=false. Needs the
#       `sagaflow` command (pip install 'sagaflow[cli]', or this checkout's
#       .venv from `make venv`; SAGAFLOW_BIN=<path> to choose).
#   SAGAFLOW_RABBITMQ_PASSWORD_FILE=<file>
#       their passwords, as user=password lines, instead of generated ones
#   SAGAFLOW_RABBITMQ_VHOST (default /), SAGAFLOW_PREFIX (default sagaflow)
#       where they live and the namespace of their exchanges and queues
#   SAGAFLOW_RABBITMQ_USER / SAGAFLOW_RABBITMQ_PASSWORD
#       also create this administrator: for operators and for declaring the
#       topology from other hosts, never for a sagaflow process
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

if [[ -n "${SAGAFLOW_RABBITMQ_SERVICES:-}" ]]; then
    here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
    cli="${SAGAFLOW_BIN:-}"
    [[ -z "$cli" ]] && cli="$(command -v sagaflow || true)"
    [[ -z "$cli" && -x "$here/../../.venv/bin/sagaflow" ]] && cli="$here/../../.venv/bin/sagaflow"
    if [[ -z "$cli" ]]; then
        echo "install-rabbitmq.sh: SAGAFLOW_RABBITMQ_SERVICES needs the sagaflow command:" \
            "pip install 'sagaflow[cli]' (or make venv in a checkout), or set SAGAFLOW_BIN" >&2
        exit 1
    fi
    vhost="${SAGAFLOW_RABBITMQ_VHOST:-/}"
    admin="${SAGAFLOW_RABBITMQ_USER:-guest}"
    admin_password="${SAGAFLOW_RABBITMQ_PASSWORD:-guest}"
    if ! rabbitmqctl -q list_vhosts --no-table-headers | grep -qxF -- "$vhost"; then
        rabbitmqctl -q add_vhost "$vhost"
    fi
    rabbitmqctl -q set_permissions -p "$vhost" "$admin" '.*' '.*' '.*'
    quote() { python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$1"; }
    # the administrator's URL, in the environment only (not on a command line)
    export SAGAFLOW_AMQP_URL="amqp://$(quote "$admin"):$(quote "$admin_password")@127.0.0.1:5672/$(quote "$vhost")"
    read -r -a services <<<"$SAGAFLOW_RABBITMQ_SERVICES"
    echo "== declaring the topology for: ${services[*]}"
    "$cli" broker declare "${services[@]}"
    echo "== creating a broker user per process (passwords are shown once: store them now)"
    users=("$cli" broker users "${services[@]}" --apply)
    if [[ -n "${SAGAFLOW_RABBITMQ_PASSWORD_FILE:-}" ]]; then
        users+=(--password-file "$SAGAFLOW_RABBITMQ_PASSWORD_FILE")
    fi
    COLUMNS=250 "${users[@]}"
    unset SAGAFLOW_AMQP_URL
fi

echo "RabbitMQ $version is up on 127.0.0.1:5672"
