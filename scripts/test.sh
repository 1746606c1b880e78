#!/usr/bin/env bash
# Runs ESIR's whole test suite as root on Debian 12: installs what the tests
# need (scripts/setup.sh test), then runs every package's tests, including the
# ones that need root, network namespaces and QEMU. Artifacts (serial logs,
# screenshots) go to $ESIR_ARTIFACTS (default ./artifacts).
set -euo pipefail
cd "$(dirname "$0")/.."
go=$(scripts/setup.sh test | tail -n 1)
export CGO_ENABLED=0 GOTOOLCHAIN=auto
export ESIR_ARTIFACTS=${ESIR_ARTIFACTS:-$PWD/artifacts}
mkdir -p "$ESIR_ARTIFACTS"
"$go" vet ./...
# One package at a time: the QEMU and network-namespace tests each want both
# cores, and each test carries its own hard timeout as well.
"$go" test -p 1 -timeout 45m -count=1 ./... 2>&1 | tee "$ESIR_ARTIFACTS/go-test.log"
