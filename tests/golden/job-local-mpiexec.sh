#!/bin/bash
# Consumer job for DSN session s-20261122-0001 (rendered by the control plane).
set -eu
export DSN_CONTROLPLANE_URL=https://dsn.example.org:8750,https://dsn2.example.org:8750
export DSN_CONSUMER_TOKEN_FILE=/var/lib/dsn/sessions/s-20261122-0001/consumer.token
/opt/dsn/.venv/bin/mpiexec --oversubscribe -n 4 \
  /opt/dsn/.venv/bin/python -m dataplane.consumer run \
  --config /var/lib/dsn/sessions/s-20261122-0001/dsn.yaml \
  --session s-20261122-0001 \
  --job-id j-0001 \
  --output-dir /scratch/dsn/s-20261122-0001 \
  --scans 3 \
  --kernel stempy \
  --samples 40 &
ranks=$!
# A cancel (SIGTERM to this script) reaches the ranks as SIGUSR1, which mpiexec hands on (it
# would end them at once on SIGTERM): they finish and report the scans under way, then leave.
trap 'kill -USR1 "$ranks" 2>/dev/null || true' TERM INT
# wait returns early when the trap runs: wait again until mpiexec has ended, then for its status.
while kill -0 "$ranks" 2>/dev/null; do wait "$ranks" || true; done
wait "$ranks"
