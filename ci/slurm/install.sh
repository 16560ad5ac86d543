#!/usr/bin/env bash
# Install the Debian packages for the one-node test cluster (run as root; CI runs this before the tests).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge
