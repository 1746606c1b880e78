#!/usr/bin/env bash
# ESIR's main job, for now: build a sample file-mode image from a sample root
# filesystem and inspect and verify it. Run as root on Debian 12; idempotent.
#   1. installs the lab's Debian packages and Go (scripts/setup.sh lab);
#   2. builds bin/esir;
#   3. makes the sample root filesystem (esir image sample: busybox-static
#      and Debian's installed kernel with its modules);
#   4. builds the image sample:1 into the store (replacing an earlier sample:1),
#      then inspects, verifies and lists it, and shows GNU tar reading it.
# Environment: ESIR_STORE (default /var/lib/esir), ESIR_WORK (default
# /var/tmp/esir-sample).
set -euo pipefail
cd "$(dirname "$0")/.."
go=$(scripts/setup.sh lab | tail -n 1)
export CGO_ENABLED=0 GOTOOLCHAIN=auto
"$go" build -o bin/esir ./cmd/esir

store=${ESIR_STORE:-/var/lib/esir}
work=${ESIR_WORK:-/var/tmp/esir-sample}
root=$work/rootfs
rm -rf "$root"
mkdir -p "$work"
# The lab's sample tree (sampleimage): busybox-static with busybox init and
# Debian's installed kernel (linux-image-amd64) with its modules, with fixed
# modes and times, so the archive is the same on every run.
bin/esir image sample --out "$root"

bin/esir image rm --store "$store" sample:1 >/dev/null 2>&1 || true
bin/esir image build --store "$store" --from "$root" --name sample --version 1
bin/esir image inspect --store "$store" sample:1
bin/esir image verify --store "$store" sample:1
bin/esir image ls --store "$store"
archive=$(bin/esir image inspect --store "$store" sample:1 -o json | sed -n 's/.*"archive": "\(.*\)".*/\1/p')
echo "GNU tar reads it too (first entries of $store/images/sample/1/$archive):"
tar --zstd -tvf "$store/images/sample/1/$archive" | sed -n 1,8p
