#!/bin/sh
# The peers a facility would pick instead of the gateway, timed in the same sitting by the shared
# peer harness (run where it lives, never copied): HAProxy as SciStream configures it, stunnel
# TLS 1.3, zmq.proxy with and without CURVE, PUSH -> PULL with no hop, and stempy's own electron
# counting per core. Each prints RESULT lines.
#   sh bench/peers.sh PYTHON [PEERS_DIR]
set -u
python=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
peers=${2:-../shared/peers}
if [ ! -d "$peers" ]; then
    echo "peers: no peer harness at $peers (set PEERS=DIR): peer rows skipped" >&2
    exit 0
fi
cd "$peers"
run() {
    tool=$1; shift
    if [ -n "$tool" ] && ! command -v "$tool" >/dev/null 2>&1; then
        echo "peers: $tool not installed: $1 skipped" >&2
        return
    fi
    "$python" "$@" --runs 3 --quiet 2>/dev/null | grep RESULT || echo "peers: $1 failed" >&2
}
run haproxy bench_haproxy.py --bufsize 100000 --consumers 1,2
run stunnel bench_stunnel.py --variant tls13
run "" bench_zmq_l4_proxy.py
run "" bench_zmq_curve.py --mode raw,l4front
run "" bench_zmq_raw.py --transport tcp --copy 0 --hwm 0
run "" bench_stempy_count.py --method frame,reader_cxx
