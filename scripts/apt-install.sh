#!/bin/sh
# Install Debian packages for an optional part of the build, never failing it:
#   sh scripts/apt-install.sh NAME CONSEQUENCE PACKAGE...
# Only as root with apt-get; otherwise, or where a package cannot be had, says so on stderr with
# CONSEQUENCE (what is skipped without it). Each package is tried on its own, so that one the
# mirror lacks does not keep the others out.
set -u
name=$1 consequence=$2
shift 2
[ $# -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "$name: missing $* and cannot install them here (needs root and apt-get):" \
         "$consequence" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! apt-get update -q >/dev/null; then
    echo "$name: apt-get update failed; trying the packages already listed" >&2
fi
for package in "$@"; do
    if ! apt-get install -y -q --no-install-recommends "$package" >/dev/null; then
        echo "$name: apt-get could not install $package: $consequence" >&2
    fi
done
exit 0
