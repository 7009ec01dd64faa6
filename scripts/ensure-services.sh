#!/usr/bin/env bash
# Make sure the servers the test suite and the benchmarks talk to are up.
#
#   PostgreSQL  SAGAFLOW_TEST_PG   (default postgresql://postgres@127.0.0.1:5432/postgres)
#   RabbitMQ    SAGAFLOW_TEST_AMQP (default amqp://guest:guest@127.0.0.1:5672)
#
# A server on this machine (loopback address) that is down but installed is
# started: PostgreSQL through pg_ctlcluster, RabbitMQ with rabbitmq-server
# -detached. A server elsewhere is only checked. The tests also create a
# RabbitMQ vhost per test with rabbitmqctl, so that must work too.
#
# Exits 0 when everything is usable, 1 with an explanation otherwise.
set -euo pipefail

PG_URL="${SAGAFLOW_TEST_PG:-postgresql://postgres@127.0.0.1:5432/postgres}"
AMQP_URL="${SAGAFLOW_TEST_AMQP:-amqp://guest:guest@127.0.0.1:5672}"
PG_WAIT="${SAGAFLOW_PG_WAIT:-30}"
AMQP_WAIT="${SAGAFLOW_AMQP_WAIT:-60}"

problems=()

say() { printf 'ensure-services: %s\n' "$*"; }
problem() { problems+=("$*"); }

# host and port of a URL such as scheme://user:secret@host:port/path
url_host() {
    local rest="${1#*://}"
    rest="${rest%%/*}"
    rest="${rest%%\?*}"
    rest="${rest##*@}"
    if [[ "$rest" == \[* ]]; then # [::1]:5432
        rest="${rest#[}"
        printf '%s' "${rest%%]*}"
    else
        printf '%s' "${rest%%:*}"
    fi
}

url_port() {
    local rest="${1#*://}" default="$2"
    rest="${rest%%/*}"
    rest="${rest%%\?*}"
    rest="${rest##*@}"
    rest="${rest##*]}"
    if [[ "$rest" == *:* && -n "${rest##*:}" ]]; then
        printf '%s' "${rest##*:}"
    else
        printf '%s' "$default"
    fi
}

# the URL without its password, for messages
masked() { sed -E 's#(://[^:/@]+):[^@]*@#\1:******@#' <<<"$1"; }

is_local() {
    case "$1" in
    127.* | localhost | ::1 | "") return 0 ;;
    *) return 1 ;;
    esac
}

port_open() {
    # bash's /dev/tcp: no client tools needed
    timeout 3 bash -c ": >/dev/tcp/$1/$2" 2>/dev/null
}

wait_for() { # seconds, then a command to retry until it succeeds
    local seconds="$1" deadline
    shift
    deadline=$((SECONDS + seconds))
    until "$@"; do
        ((SECONDS < deadline)) || return 1
        sleep 1
    done
}

# Commands that must run as root (or the service user): use sudo when we are
# not root and sudo works without a password prompt (CI has no stdin).
as_root() {
    if ((EUID == 0)); then
        "$@"
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        sudo -n "$@"
    else
        return 126
    fi
}

HOW_TO_INSTALL="on Debian/Ubuntu install and start it with: sudo deploy/debian/install-services.sh
    (other setups: deploy/README.md, section 'The test suite')"

# --------------------------------------------------------------------- PostgreSQL

PG_HOST="$(url_host "$PG_URL")"
PG_PORT="$(url_port "$PG_URL" 5432)"
PG_HOST="${PG_HOST:-127.0.0.1}"

pg_up() {
    if command -v pg_isready >/dev/null; then
        pg_isready -q -h "$PG_HOST" -p "$PG_PORT" -t 3
    else
        port_open "$PG_HOST" "$PG_PORT"
    fi
}

start_postgres() {
    local version cluster
    if ! command -v pg_ctlcluster >/dev/null || [[ ! -d /etc/postgresql ]] ||
        [[ -z "$(ls -A /etc/postgresql 2>/dev/null)" ]]; then
        problem "PostgreSQL is not running at $PG_HOST:$PG_PORT and is not installed here;
    $HOW_TO_INSTALL"
        return 1
    fi
    # the newest installed major version, and its 'main' cluster (Debian's default)
    # shellcheck disable=SC2012 # directory names are version numbers
    version="$(ls /etc/postgresql | sort -V | tail -n 1)"
    cluster=main
    # shellcheck disable=SC2012 # cluster names are plain words
    [[ -d "/etc/postgresql/$version/$cluster" ]] || cluster="$(ls "/etc/postgresql/$version" | head -n 1)"
    say "starting PostgreSQL $version/$cluster"
    if ! as_root pg_ctlcluster --skip-systemctl-redirect "$version" "$cluster" start; then
        if ((EUID != 0)); then
            problem "PostgreSQL is down and starting it needs root: run
    sudo pg_ctlcluster $version $cluster start"
            return 1
        fi
    fi
    if ! wait_for "$PG_WAIT" pg_up; then
        problem "PostgreSQL $version/$cluster did not accept connections at $PG_HOST:$PG_PORT
    within ${PG_WAIT}s; see /var/log/postgresql/postgresql-$version-$cluster.log"
        return 1
    fi
}

check_postgres() {
    if pg_up; then
        say "PostgreSQL is up at $PG_HOST:$PG_PORT"
    elif is_local "$PG_HOST"; then
        start_postgres || return 0
        say "PostgreSQL started at $PG_HOST:$PG_PORT"
    else
        problem "PostgreSQL at $(masked "$PG_URL") is unreachable (SAGAFLOW_TEST_PG points
    at another host, so this script does not start it)"
        return 0
    fi
    # Reachable is not enough: the tests log in and create databases.
    if command -v psql >/dev/null; then
        if ! psql "$PG_URL" -XAtqc 'SELECT 1' >/dev/null 2>&1 </dev/null; then
            problem "PostgreSQL is up but $(masked "$PG_URL") cannot log in. The tests connect
    without a password by default: allow 'trust' for 127.0.0.1 in pg_hba.conf
    (deploy/debian/install-postgresql.sh does that) or put a password in SAGAFLOW_TEST_PG"
        fi
    fi
}

# --------------------------------------------------------------------- RabbitMQ

AMQP_HOST="$(url_host "$AMQP_URL")"
AMQP_PORT="$(url_port "$AMQP_URL" 5672)"
AMQP_HOST="${AMQP_HOST:-127.0.0.1}"

amqp_up() { port_open "$AMQP_HOST" "$AMQP_PORT"; }

start_rabbitmq() {
    if ! command -v rabbitmq-server >/dev/null; then
        problem "RabbitMQ is not running at $AMQP_HOST:$AMQP_PORT and is not installed here;
    $HOW_TO_INSTALL"
        return 1
    fi
    # A node that is up with its application stopped only needs start_app.
    if timeout 30 rabbitmqctl -q status >/dev/null 2>&1 </dev/null; then
        say "RabbitMQ node is up but not listening; starting its application"
        as_root timeout 60 rabbitmqctl -q start_app </dev/null || true
    else
        say "starting RabbitMQ"
        if ! as_root rabbitmq-server -detached </dev/null; then
            problem "RabbitMQ is down and starting it failed (it needs root: run
    sudo rabbitmq-server -detached); see /var/log/rabbitmq/"
            return 1
        fi
    fi
    if ! wait_for "$AMQP_WAIT" amqp_up; then
        problem "RabbitMQ did not listen on $AMQP_HOST:$AMQP_PORT within ${AMQP_WAIT}s;
    see /var/log/rabbitmq/"
        return 1
    fi
    # the port opens a moment before the node has finished booting
    timeout "$AMQP_WAIT" rabbitmqctl -q await_startup --timeout "$AMQP_WAIT" \
        >/dev/null 2>&1 </dev/null || true
}

check_rabbitmq() {
    if amqp_up; then
        say "RabbitMQ is up at $AMQP_HOST:$AMQP_PORT"
    elif is_local "$AMQP_HOST"; then
        start_rabbitmq || return 0
        say "RabbitMQ started at $AMQP_HOST:$AMQP_PORT"
    else
        problem "RabbitMQ at $(masked "$AMQP_URL") is unreachable (SAGAFLOW_TEST_AMQP points
    at another host, so this script does not start it)"
        return 0
    fi
    # tests/conftest.py creates and deletes a vhost per test with rabbitmqctl
    if ! command -v rabbitmqctl >/dev/null; then
        problem "rabbitmqctl is not installed; the tests create a vhost per test with it
    (apt-get install rabbitmq-server provides it)"
    elif ! timeout 60 rabbitmqctl -q list_vhosts >/dev/null 2>&1 </dev/null; then
        problem "rabbitmqctl cannot reach the RabbitMQ node; the tests create a vhost per
    test with it. Run as root, or copy /var/lib/rabbitmq/.erlang.cookie to
    ~/.erlang.cookie (mode 600); for a remote broker set RABBITMQ_NODENAME"
    fi
}

check_postgres
check_rabbitmq

if ((${#problems[@]})); then
    for message in "${problems[@]}"; do
        printf 'ensure-services: ERROR: %s\n' "$message" >&2
    done
    exit 1
fi
