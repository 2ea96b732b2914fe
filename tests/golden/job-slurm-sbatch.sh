#!/bin/bash
#SBATCH --job-name=dsn-s-20261122-0001
#SBATCH --account=m4d5
#SBATCH --qos=realtime
#SBATCH --constraint=cpu
#SBATCH --nodes=2
#SBATCH --ntasks=4
#SBATCH --cpus-per-task=8
#SBATCH --time=01:00:00
#SBATCH --output=/scratch/dsn/s-20261122-0001/slurm-%j.out
#SBATCH --exclusive
# Consumer job for DSN session s-20261122-0001 (rendered by the control plane).
set -euo pipefail
export DSN_CONTROLPLANE_URL=https://dsn.example.org:8750
export DSN_CONSUMER_TOKEN_FILE=/var/lib/dsn/sessions/s-20261122-0001/consumer.token
srun --ntasks=4 --cpus-per-task=8 \
  --cpu-bind=cores \
  /opt/dsn/.venv/bin/python -m dataplane.consumer run \
  --config /var/lib/dsn/sessions/s-20261122-0001/dsn.yaml \
  --session s-20261122-0001 \
  --job-id j-0001 \
  --output-dir /scratch/dsn/s-20261122-0001 \
  --kernel stempy \
  --samples 40
