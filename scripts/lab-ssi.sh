#!/usr/bin/env bash
# The SSI lab scenario (issue 10). Run as root on Debian 12:
#   1. installs the lab's Debian packages and Go (scripts/setup.sh lab), and
#      debootstrap;
#   2. builds bin/esir and the static bin/esir-agent;
#   3. runs `esir lab up --nodes 3 --image debian-ssi`: builds the debian-ssi
#      image (Debian 12 debootstrapped with systemd, Debian's kernel and the
#      SSI node stack; the tree and packages are cached in
#      /var/cache/esir/lab/debian-ssi, so only the first run downloads),
#      deploys it onto three QEMU machines (SeaBIOS and OVMF, mixed NICs and
#      disks), gives the server a cluster of the three (corosync voters,
#      pacemaker, chrony, keepalived + IPVS for VIP 198.18.0.50 with HTTP on
#      port 80), waits until all three are enrolled in a quorate cluster, and
#      asks the VIP from 12 client addresses which node answers: it fails
#      unless more than one node answers and every connection is answered;
#      then it logs in to node01 as root with the lab's administrator key
#      and runs `clush -s labssi -g all hostname` there, which must answer
#      from every node through the cluster SSH key ESIR installed (and the
#      nodes' host keys, made at first boot, must all differ);
#   4. prints `esir cluster show` and asks the VIP once more (`esir lab vip`);
#   5. takes the lab down, unless ESIR_LAB_KEEP=1.
# Environment: ESIR_LAB_DIR (default /var/lib/esir-lab-ssi), ESIR_LAB_TIMEOUT
# (hard timeout of the deployment, default 40m), ESIR_LAB_ARGS (more
# `esir lab up` flags).
set -euo pipefail
cd "$(dirname "$0")/.."
go=$(scripts/setup.sh lab | tail -n 1)
if ! command -v debootstrap >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >&2
fi
export CGO_ENABLED=0 GOTOOLCHAIN=auto
"$go" build -o bin/esir ./cmd/esir
"$go" build -trimpath -ldflags="-s -w" -o bin/esir-agent ./cmd/esir-agent

dir=${ESIR_LAB_DIR:-/var/lib/esir-lab-ssi}
name=labssi
cleanup() {
  rc=$?
  if [ "${ESIR_LAB_KEEP:-0}" = 1 ]; then
    echo "lab kept in $dir: bin/esir lab status --dir $dir; bin/esir lab down --dir $dir"
  else
    bin/esir lab down --dir "$dir" --name "$name" || true
  fi
  exit $rc
}
trap cleanup EXIT
bin/esir lab down --dir "$dir" --name "$name"
# shellcheck disable=SC2086
timeout --kill-after=30s "${ESIR_LAB_TIMEOUT:-40m}" \
  bin/esir lab up --dir "$dir" --name "$name" --nodes 3 --image debian-ssi ${ESIR_LAB_ARGS:-}

url=$(sed -n 's/.*"console_url": "\([^"]*\)".*/\1/p' "$dir/state.json")
bin/esir cluster show --server "$url" --token "$(cat "$dir/admin-token")"
bin/esir cluster members --server "$url" --token "$(cat "$dir/admin-token")"
bin/esir lab vip --dir "$dir" --per-client 3
