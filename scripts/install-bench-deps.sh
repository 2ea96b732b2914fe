#!/bin/sh
# System packages `make bench` needs to time the gateway's peers beside it: HAProxy (as SciStream
# configures it) and stunnel (TLS 1.3), run by the peer harness. Installs only what is missing
# (scripts/apt-install.sh); otherwise says so, and those rows are skipped with the reason.
set -eu
missing=""
command -v haproxy >/dev/null 2>&1 || missing="$missing haproxy"
command -v stunnel4 >/dev/null 2>&1 || command -v stunnel >/dev/null 2>&1 || missing="$missing stunnel4"
# shellcheck disable=SC2086  # one word per package
exec sh "$(dirname "$0")/apt-install.sh" install-bench-deps "those peer rows are skipped" $missing
