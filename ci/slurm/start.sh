#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine, without systemd, as root: munged, slurmctld, slurmd.
# Installs nothing (see ci/slurm/install.sh). Idempotent: returns at once when the node is already up.
# The node line is taken from `slurmd -C`, so it matches the machine (a mismatch would drain the node).
# Environment: SLURM_STATE_DIR (default /var/lib/harness-slurm), SLURM_LOG_DIR (default /var/log/harness-slurm),
#              SLURM_START_TIMEOUT seconds to wait for the node to become idle (default 60).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
state_dir="${SLURM_STATE_DIR:-/var/lib/harness-slurm}"
log_dir="${SLURM_LOG_DIR:-/var/log/harness-slurm}"
timeout="${SLURM_START_TIMEOUT:-60}"
conf=/etc/slurm/slurm.conf

if [ "$(id -u)" != 0 ]; then
    echo "ci/slurm/start.sh: must run as root (it starts munged, slurmctld and slurmd)" >&2
    exit 1
fi
for tool in munged munge slurmctld slurmd sinfo; do
    command -v "$tool" >/dev/null || { echo "ci/slurm/start.sh: $tool not found; run ci/slurm/install.sh" >&2; exit 1; }
done

node_idle() { sinfo --noheader --responding -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)'; }
running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }  # a daemon alive per its pid file
if running "$state_dir/slurmctld.pid" && node_idle; then
    echo "SLURM already running:"; sinfo
    exit 0
fi

# munge: a key (the Debian package usually made one) and a socket directory.
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile /etc/munge/munge.key
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key && chmod 0755 /run/munge
if ! munge -n >/dev/null 2>&1; then  # no daemon answering yet
    runuser -u munge -- munged
fi

# slurm.conf from the template, with this machine's node line.
mkdir -p "$state_dir/ctld" "$state_dir/d" "$log_dir" /etc/slurm
node_line="$(slurmd -C | head -n 1)"
host="$(hostname -s)"
sed -e "s|@HOSTNAME@|$host|" -e "s|@STATE_DIR@|$state_dir|g" -e "s|@LOG_DIR@|$log_dir|g" \
    -e "s|@NODE_LINE@|$node_line NodeAddr=127.0.0.1|" "$here/slurm.conf.in" > "$conf"

running "$state_dir/slurmctld.pid" || slurmctld
running "$state_dir/slurmd.pid" || slurmd

# Wait for the node; resume it if an earlier run left it down or drained.
for _ in $(seq "$timeout"); do
    if node_idle; then
        echo "SLURM is up:"; sinfo
        exit 0
    fi
    state="$(sinfo --noheader -o '%t' 2>/dev/null | head -n 1 || true)"
    case "$state" in
        down*|drain*|drng*) scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 1
done
echo "ci/slurm/start.sh: the node did not become idle in ${timeout}s; logs:" >&2
sinfo >&2 || true
tail -n 30 "$log_dir/slurmctld.log" "$log_dir/slurmd.log" >&2 || true
exit 1
