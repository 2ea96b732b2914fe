#!/bin/sh
# System packages `make bench` needs to time the gateway's peers beside it: HAProxy (as SciStream
# configures it) and stunnel (TLS 1.3), run by the peer harness. Installs only what is missing,
# only as root with apt-get; otherwise says so, and those rows are skipped with the reason.
set -eu
missing=""
command -v haproxy >/dev/null 2>&1 || missing="$missing haproxy"
command -v stunnel4 >/dev/null 2>&1 || command -v stunnel >/dev/null 2>&1 || missing="$missing stunnel4"
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-bench-deps:$missing missing and cannot be installed here (needs root and" \
         "apt-get): those peer rows are skipped" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -q >/dev/null && \
       apt-get install -y -q --no-install-recommends $missing >/dev/null; }; then
    echo "install-bench-deps: apt-get could not install$missing: those peer rows are skipped" >&2
fi
