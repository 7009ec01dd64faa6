#!/usr/bin/env bash
# Make sure Debian's headless Chromium is installed for the dashboard's browser
# tests (tests/e2e/test_dashboard_browser.py). A browser download at install
# time (Playwright's own) does not work on our machines, so the tests drive the
# system binary. Idempotent: does nothing when /usr/bin/chromium is there.
#
#   SAGAFLOW_CHROMIUM  the binary to check (default /usr/bin/chromium)
#
# Installing needs root (CI runs as root); otherwise it says what to run.
set -euo pipefail

CHROMIUM="${SAGAFLOW_CHROMIUM:-/usr/bin/chromium}"
say() { printf 'ensure-chromium: %s\n' "$*"; }

if [ -x "$CHROMIUM" ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    say "$CHROMIUM is missing; run as root: apt-get install -y chromium" >&2
    exit 1
fi
say "installing Debian's chromium (once)"
export DEBIAN_FRONTEND=noninteractive
apt-get install -y --no-install-recommends chromium </dev/null >/dev/null \
    || { apt-get update -qq </dev/null && apt-get install -y --no-install-recommends chromium </dev/null >/dev/null; }
[ -x "$CHROMIUM" ] || { say "chromium did not install at $CHROMIUM" >&2; exit 1; }
say "$("$CHROMIUM" --version 2>/dev/null || echo installed)"
