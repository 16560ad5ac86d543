#!/usr/bin/env bash
# The README's test command: installs what the tests need on a fresh machine, then runs the whole suite.
#  - the package with its test extras (torch 2.14.1 / torchvision 0.29.1 or any release the range admits);
#  - as root with apt: Debian's SLURM daemons and munge, and starts a one-node cluster for the launcher tests
#    (without root or apt those tests skip with the reason, except under CI=true where they must run).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k engine -x`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
        bash ci/slurm/install.sh >/tmp/harness-slurm-install.log 2>&1 \
            || { echo "SLURM install failed (log: /tmp/harness-slurm-install.log)" >&2; tail -20 /tmp/harness-slurm-install.log >&2; }
    fi
    if command -v slurmctld >/dev/null; then
        bash ci/slurm/start.sh || echo "SLURM did not start; the SLURM tests will report why" >&2
    fi
fi

python3 -m pytest -q -p no:cacheprovider "$@"
