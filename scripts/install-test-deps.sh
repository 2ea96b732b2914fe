#!/bin/sh
# System packages the test suite needs beyond the virtualenv: glewlwyd, the OpenID Connect
# provider the federated-login tests run against (tests/oidc_provider.py). Installs only what is
# missing, and only as root with apt-get; otherwise says so, and those tests skip with the reason.
set -eu
if command -v glewlwyd >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-test-deps: glewlwyd is missing and cannot be installed here (needs root and" \
         "apt-get): the federated-login tests will skip" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
# A mirror out of reach is not a reason to stop the suite: those tests skip and say why.
if ! { apt-get update -q >/dev/null && \
       apt-get install -y -q --no-install-recommends glewlwyd >/dev/null; }; then
    echo "install-test-deps: apt-get could not install glewlwyd: the federated-login tests" \
         "will skip" >&2
fi
