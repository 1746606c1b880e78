#!/usr/bin/env bash
# ESIR's main job: the virtual cluster lab. Run as root on Debian 12.
#   1. installs the lab's Debian packages and Go (scripts/setup.sh lab);
#   2. builds bin/esir and the static bin/esir-agent;
#   3. takes down a lab left from an earlier run, then runs
#      `esir lab up`: builds the sample image (busybox, Debian's kernel and
#      modules) and the netboot environment, starts the ESIR server in a
#      network namespace (DHCP, TFTP, HTTP boot, tracker, seeding, web console
#      on a loopback port), starts the QEMU machines, and deploys the image
#      onto them with a progress bar per node.
# The machines keep running afterwards: `bin/esir lab status`,
# `bin/esir lab console node01`, and `bin/esir lab down` to remove it all.
# Environment: ESIR_LAB_NODES (default 2), ESIR_LAB_DIR (default
# /var/lib/esir-lab), ESIR_LAB_ARGS (more `esir lab up` flags).
set -euo pipefail
cd "$(dirname "$0")/.."
go=$(scripts/setup.sh lab | tail -n 1)
export CGO_ENABLED=0 GOTOOLCHAIN=auto
"$go" build -o bin/esir ./cmd/esir
"$go" build -trimpath -ldflags="-s -w" -o bin/esir-agent ./cmd/esir-agent

dir=${ESIR_LAB_DIR:-/var/lib/esir-lab}
bin/esir lab down --dir "$dir"
# shellcheck disable=SC2086
bin/esir lab up --dir "$dir" --nodes "${ESIR_LAB_NODES:-2}" ${ESIR_LAB_ARGS:-}
bin/esir lab status --dir "$dir"
