#!/bin/sh
# System packages the test suite needs beyond the virtualenv:
# - glewlwyd, the OpenID Connect provider the federated-login tests run against
#   (tests/oidc_provider.py);
# - Slurm (slurmctld, slurmd, the client commands) and munge, the one-node cluster the consumer-job
#   tests run (tests/slurm_cluster.py); libpmix-dev gives Slurm's PMIx plugin the libpmix.so it
#   loads, so that srun --mpi=pmix starts the Open MPI wheel's ranks.
# Installs only what is missing, and only as root with apt-get; otherwise says so, and those tests
# skip with the reason. Never fails the build.
set -u

missing=""
need() { missing="$missing $*"; }
command -v glewlwyd >/dev/null 2>&1 || need glewlwyd
for tool in slurmctld slurmd sbatch munged mungekey; do
    if ! PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null 2>&1; then
        need slurmctld slurmd slurm-client munge
        break
    fi
done
ls /usr/lib/libpmix.so /usr/lib/*/libpmix.so >/dev/null 2>&1 || need libpmix-dev
[ -z "$missing" ] && exit 0

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-test-deps: missing$missing and cannot install them here (needs root and" \
         "apt-get): the federated-login or Slurm tests will skip" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
# A mirror out of reach is not a reason to stop the suite: those tests skip and say why. Each
# package is tried on its own, so that one the mirror lacks does not keep the others out.
if ! apt-get update -q >/dev/null; then
    echo "install-test-deps: apt-get update failed; trying the packages already listed" >&2
fi
for package in $missing; do
    if ! apt-get install -y -q --no-install-recommends "$package" >/dev/null; then
        echo "install-test-deps: apt-get could not install $package: the tests that need it" \
             "will skip" >&2
    fi
done
exit 0
