#!/bin/sh
# Consumer job for DSN session s-20261122-0001 (rendered by the control plane).
set -eu
export DSN_CONTROLPLANE_URL=https://dsn.example.org:8750
export DSN_CONSUMER_TOKEN_FILE=/var/lib/dsn/sessions/s-20261122-0001/consumer.token
exec /opt/dsn/.venv/bin/mpiexec --oversubscribe -n 4 \
  /opt/dsn/.venv/bin/python -m dataplane.consumer run \
  --config /var/lib/dsn/sessions/s-20261122-0001/dsn.yaml \
  --session s-20261122-0001 \
  --job-id j-0001 \
  --output-dir /scratch/dsn/s-20261122-0001 \
  --scans 3 \
  --kernel stempy \
  --samples 40
