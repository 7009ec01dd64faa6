#!/usr/bin/env bash
# Install PostgreSQL from Debian's packages and start it (no docker needed).
#
#   sudo deploy/debian/install-postgresql.sh
#
# Idempotent: run it again to start a stopped server. Works with and without
# systemd (containers, CI runners). What it configures:
#
# - Default (development and test hosts): TCP connections from this machine
#   (127.0.0.1 and ::1) are trusted without a password, which is what the test
#   suite's default SAGAFLOW_TEST_PG=postgresql://postgres@127.0.0.1:5432/postgres
#   expects. Nothing from other hosts is allowed (the server listens on
#   localhost only).
# - With SAGAFLOW_PG_PASSWORD=<secret>: no trust rule is added; the password of
#   the `postgres` role is set instead. Use
#   SAGAFLOW_DATABASE_URL=postgresql://postgres:<secret>@127.0.0.1:5432/postgres
#   (and the same in SAGAFLOW_TEST_PG for the tests).
set -euo pipefail

if ((EUID != 0)); then
    echo "install-postgresql.sh: run it as root (sudo $0)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive

if ! command -v pg_ctlcluster >/dev/null || [[ -z "$(ls -A /etc/postgresql 2>/dev/null)" ]]; then
    echo "== installing PostgreSQL (apt)"
    apt-get update -q
    apt-get install -y -q --no-install-recommends postgresql postgresql-client
fi

# shellcheck disable=SC2012 # directory names are version numbers
version="$(ls /etc/postgresql | sort -V | tail -n 1)"
cluster=main
if [[ ! -d "/etc/postgresql/$version/$cluster" ]]; then
    echo "== creating cluster $version/$cluster"
    pg_createcluster "$version" "$cluster"
fi
conf_dir="/etc/postgresql/$version/$cluster"
hba="$conf_dir/pg_hba.conf"
major="${version%%.*}"
if ((major < 13)); then
    echo "install-postgresql.sh: PostgreSQL $version is too old; sagaflow needs 13 or newer" >&2
    exit 1
fi

marker="# sagaflow: trust local TCP connections (development and test hosts only)"
if [[ -z "${SAGAFLOW_PG_PASSWORD:-}" ]]; then
    if ! grep -qF "$marker" "$hba"; then
        echo "== trusting local TCP connections in $hba"
        # pg_hba.conf is read top-down and the first matching line wins: prepend.
        tmp="$(mktemp)"
        {
            echo "$marker"
            echo "host    all    all    127.0.0.1/32    trust"
            echo "host    all    all    ::1/128         trust"
            echo
            cat "$hba"
        } >"$tmp"
        cat "$tmp" >"$hba" # keep the file's owner and mode
        rm -f "$tmp"
    fi
fi

start() {
    if [[ -d /run/systemd/system ]]; then
        systemctl enable --now "postgresql@$version-$cluster"
        systemctl reload "postgresql@$version-$cluster"
    else
        # no systemd (a container): pg_ctlcluster directly
        if pg_ctlcluster "$version" "$cluster" status >/dev/null 2>&1; then
            pg_ctlcluster --skip-systemctl-redirect "$version" "$cluster" reload
        else
            pg_ctlcluster --skip-systemctl-redirect "$version" "$cluster" start
        fi
    fi
}

echo "== starting PostgreSQL $version/$cluster"
start
port="$(pg_conftool -s "$version" "$cluster" show port 2>/dev/null || echo 5432)"
for _ in $(seq 1 30); do
    pg_isready -q -h 127.0.0.1 -p "$port" && break
    sleep 1
done
pg_isready -h 127.0.0.1 -p "$port"

if [[ -n "${SAGAFLOW_PG_PASSWORD:-}" ]]; then
    echo "== setting the password of role postgres"
    # SQL on stdin (printf is a shell builtin): the secret never shows in the process list
    printf "ALTER ROLE postgres PASSWORD '%s';\n" "${SAGAFLOW_PG_PASSWORD//\'/\'\'}" |
        runuser -u postgres -- psql -X -q -p "$port" -v ON_ERROR_STOP=1
fi

echo "PostgreSQL $version is up on 127.0.0.1:$port"
