#!/bin/sh
# System packages the test suite needs beyond the virtualenv:
# - glewlwyd, the OpenID Connect provider the federated-login tests run against
#   (tests/oidc_provider.py);
# - Slurm (slurmctld, slurmd, the client commands) and munge, the one-node cluster the consumer-job
#   tests run (tests/slurm_cluster.py); libpmix-dev gives Slurm's PMIx plugin the libpmix.so it
#   loads, so that srun --mpi=pmix starts the Open MPI wheel's ranks;
# - Chromium and its WebDriver, the headless browser the web-console tests drive
#   (tests/browser.py);
# - PostgreSQL, the server the store's tests start for its PostgreSQL engine
#   (tests/postgres_server.py: initdb and pg_ctl from /usr/lib/postgresql/*/bin).
# Installs only what is missing (scripts/apt-install.sh: as root with apt-get, never failing the
# build); otherwise says so, and those tests skip with the reason.
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
command -v chromium >/dev/null 2>&1 || need chromium
command -v chromedriver >/dev/null 2>&1 || need chromium-driver
ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || need postgresql
# shellcheck disable=SC2086  # one word per package
exec sh "$(dirname "$0")/apt-install.sh" install-test-deps \
    "the federated-login, Slurm, browser or PostgreSQL tests will skip" $missing
