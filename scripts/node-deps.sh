#!/usr/bin/env bash
# Install the npm dependencies of the example participants written in Node.js
# (services/*_node/) from their own package-lock.json, with `npm ci`. Idempotent:
# a directory whose node_modules already matches its lock file is skipped.
# `make test` runs it: the conformance kit and the e2e test start these services.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

for lock in services/*_node/package-lock.json; do
    [ -e "$lock" ] || continue
    dir="$(dirname "$lock")"
    if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
        echo "node-deps: node and npm are needed for $dir (Node.js 18 or later)" >&2
        exit 1
    fi
    # npm writes node_modules/.package-lock.json: the same packages as the lock
    if [ -f "$dir/node_modules/.package-lock.json" ] &&
        node -e '
            const [a, b] = process.argv.slice(1).map((f) => require(require("path").resolve(f)).packages);
            const strip = (p) => JSON.stringify(Object.fromEntries(Object.entries(p).filter(([k]) => k).map(([k, v]) => [k, v.version + (v.integrity || "")])));
            process.exit(strip(a) === strip(b) ? 0 : 1);
        ' "$lock" "$dir/node_modules/.package-lock.json"; then
        echo "node-deps: $dir is up to date"
        continue
    fi
    echo "node-deps: npm ci in $dir"
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
done
