#!/usr/bin/env bash
# System tools the test suite runs for real: promtool + prometheus (alert rules, live scrapes),
# docker-compose (validates docker-compose.yml; no Docker engine is needed) and libfaketime (doctor's
# clock-skew check against a real swarm). Debian/Ubuntu packages. Skips the install when all are
# there; uses sudo when not root.
set -euo pipefail
if command -v promtool >/dev/null && command -v prometheus >/dev/null && command -v docker-compose >/dev/null \
        && [ -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "install Prometheus (promtool, prometheus) and docker-compose with your package manager" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# --no-install-recommends: the binaries only, not node-exporter & co.
$SUDO apt-get install -y -qq --no-install-recommends prometheus docker-compose faketime >/dev/null
# the package may start a system Prometheus on :9090 where an init system runs; the tests use their own ports
