#!/usr/bin/env bash
# Install Debian's Slurm + munge (and shellcheck, for the script lint test) for the local test
# cluster. Idempotent: returns at once when everything is already there.
set -euo pipefail

pkgs=(slurmctld slurmd slurm-client munge shellcheck)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

# The tests start their own daemons in a temp dir: keep the package scripts from starting
# (and failing to start) the system services. Only remove the policy file if we created it.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    created_policy=1
fi
cleanup() { if [ "$created_policy" = 1 ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
