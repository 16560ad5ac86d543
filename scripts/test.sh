#!/usr/bin/env bash
# The README's test command: installs what the tests need on a fresh machine, then runs the whole suite.
#  - the package with its test extras (torch 2.14.1 / torchvision 0.29.1 or any release the range admits);
#  - as root with apt: g++ when missing (torch.compile's CPU kernels), chromium (the HTML report's browser
#    test), Debian's SLURM daemons and munge, and
#    starts a one-node cluster for the launcher tests (without root or apt those tests skip with the reason,
#    except under CI=true where they must run).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k engine -x`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    if ! command -v g++ >/dev/null; then  # torch.compile (Stage.compile) builds C++ kernels on CPU
        apt-get install -y -qq g++ >/tmp/harness-gxx-install.log 2>&1 \
            || (apt-get update -qq && apt-get install -y -qq g++) >>/tmp/harness-gxx-install.log 2>&1 \
            || echo "g++ install failed (log: /tmp/harness-gxx-install.log); the torch.compile test will say so" >&2
    fi
    if ! command -v chromium >/dev/null; then  # the HTML report is checked in a headless browser
        apt-get install -y -qq chromium >/tmp/harness-chromium-install.log 2>&1 \
            || (apt-get update -qq && apt-get install -y -qq chromium) >>/tmp/harness-chromium-install.log 2>&1 \
            || echo "chromium install failed (log: /tmp/harness-chromium-install.log); the browser test will say so" >&2
    fi
    if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
        bash ci/slurm/install.sh >/tmp/harness-slurm-install.log 2>&1 \
            || { echo "SLURM install failed (log: /tmp/harness-slurm-install.log)" >&2; tail -20 /tmp/harness-slurm-install.log >&2; }
    fi
    if command -v slurmctld >/dev/null; then
        bash ci/slurm/start.sh || echo "SLURM did not start; the SLURM tests will report why" >&2
    fi
fi

# Lint and import order (pyproject.toml's [tool.ruff]) first: a style slip fails in a second, not after the suite.
python3 -m ruff check harness tests
python3 -m pytest -q -p no:cacheprovider "$@"
