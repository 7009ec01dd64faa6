#!/usr/bin/env bash
# Install and start everything the sagaflow test suite and a local deployment
# need on a plain Debian (or Ubuntu) host, without docker: PostgreSQL and
# RabbitMQ. See the two scripts it runs for the options.
#
#   sudo deploy/debian/install-services.sh
#   make test
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$here/install-postgresql.sh"
bash "$here/install-rabbitmq.sh"
