#!/bin/bash
#SBATCH --job-name=dsn-s-20261122-0001
#SBATCH --account=lcls:xpp12345
#SBATCH --partition=realtime
#SBATCH --reservation=beam-42
#SBATCH --qos=realtime
#SBATCH --constraint=gpu
#SBATCH --nodes=2
#SBATCH --ntasks=4
#SBATCH --cpus-per-task=8
#SBATCH --gpus-per-node=4
#SBATCH --mem=64G
#SBATCH --time=01:00:00
#SBATCH --signal=TERM@120
#SBATCH --exclusive
# Consumer job for DSN session s-20261122-0001 (rendered by the control plane).
set -euo pipefail
export DSN_CONTROLPLANE_URL=https://dsn.example.org:8750,https://dsn2.example.org:8750
export DSN_CONSUMER_TOKEN_FILE=/var/lib/dsn/sessions/s-20261122-0001/consumer.token
# Slurm sends the drain signal (--signal=TERM@DRAIN_S) to every rank of the job step that srun
# starts; ranks that mpiexec starts belong to the batch step, which it does not signal.
exec srun --mpi=pmix -n 4 \
  /opt/dsn/venv/bin/python -m dataplane.consumer run \
  --config /var/lib/dsn/sessions/s-20261122-0001/dsn.yaml \
  --session s-20261122-0001 \
  --job-id j-0001 \
  --bind-host route:dsn-gateway \
  --output-dir /scratch/dsn/s-20261122-0001 \
  --kernel stempy \
  --samples 40
