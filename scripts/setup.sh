#!/usr/bin/env bash
# Installs what ESIR needs on a Debian 12 machine, as root, idempotently:
#   scripts/setup.sh test   the test suite's packages (and the benchmarks' baselines)
#   scripts/setup.sh lab    the virtual cluster lab's packages
# It installs Debian packages with apt-get (services are not started), makes
# sure a Go toolchain of the version go.mod names is at hand, and downloads the
# Go modules. Prints the path of the go binary to use on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-test}

common=(ca-certificates git tar zstd xz-utils cpio e2fsprogs attr libcap2-bin iproute2 iputils-ping kmod
  qemu-system-x86 qemu-utils ipxe ipxe-qemu ovmf systemd-boot-efi busybox-static linux-image-amd64
  extlinux syslinux-common mtools dosfstools fdisk)
testonly=(udhcpc isc-dhcp-client dnsmasq tftp-hpa tftpd-hpa curl aria2 transmission-cli udpcast
  kea-admin squashfs-tools debootstrap chromium python3 gnuplot-nox corosync pacemaker pacemaker-cli-utils chrony keepalived ipvsadm clustershell openssh-server
  nfs-kernel-server nfs-common fence-agents ipmitool openipmi)
case "$what" in
  test) pkgs=("${common[@]}" "${testonly[@]}") ;;
  lab) pkgs=("${common[@]}") ;;
  *) echo "usage: $0 test|lab" >&2; exit 2 ;;
esac

if [ "$(id -u)" != 0 ]; then echo "setup: run as root (apt-get, network namespaces, loop devices)" >&2; exit 1; fi

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  # Packages such as dnsmasq and tftpd-hpa would start daemons on install; the
  # tests start their own copies in network namespaces instead.
  had_policy=0; [ -e /usr/sbin/policy-rc.d ] && had_policy=1
  [ $had_policy = 1 ] || { printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; }
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  [ $had_policy = 1 ] || rm -f /usr/sbin/policy-rc.d
  # nfs-kernel-server and rpcbind (which nfs-common needs) enable their units
  # for the next boot. The tests run the NFS server only inside QEMU guests
  # (ssi/vmtest), and a test machine has no reason to serve NFS or rpcbind on
  # port 111: when this run installed them, they stay off at boot too.
  #
  # The same holds for the other daemons the tests start themselves, in
  # namespaces or guests: a host DHCP/TFTP server, cluster stack or VRRP
  # daemon started at boot would answer on the machine's real network. chrony
  # (it replaces systemd-timesyncd) and ssh stay as installed.
  if command -v systemctl >/dev/null; then
    declare -A units=([nfs-kernel-server]="nfs-server.service rpcbind.service rpcbind.socket"
      [dnsmasq]=dnsmasq.service [tftpd-hpa]=tftpd-hpa.service [corosync]=corosync.service
      [pacemaker]=pacemaker.service [keepalived]=keepalived.service)
    for p in "${missing[@]}"; do
      [ -n "${units[$p]:-}" ] || continue
      # shellcheck disable=SC2086 # a list of unit names
      systemctl disable --quiet ${units[$p]} >&2 || true
    done
  fi
fi

# Debian 12's pacemaker-remote conflicts with pacemaker, but the SSI level-1
# test runs remote members beside core members on one host: its daemon is
# unpacked aside (the test puts this directory first in a remote node's PATH).
remote=/opt/esir-test/pacemaker-remote
if [ "$what" = test ] && [ ! -x $remote/usr/sbin/pacemaker-remoted ]; then
  tmp=$(mktemp -d); chmod 755 "$tmp"
  (cd "$tmp" && apt-get download -qq pacemaker-remote >&2)
  rm -rf $remote.tmp && mkdir -p $remote.tmp && dpkg-deb -x "$tmp"/pacemaker-remote_*.deb $remote.tmp
  rm -rf $remote && mv $remote.tmp $remote && rm -rf "$tmp"
fi

# Go: go.mod names the toolchain. A Go of 1.21 or later fetches it from the
# module proxy by itself; an older one (Debian 12's golang-go is 1.19) fetches
# the toolchain module explicitly and runs from there.
want=$(sed -n 's/^go \([0-9.]*\)$/\1/p' go.mod)
gobin=""
for g in "$(command -v go 2>/dev/null || true)" /usr/local/go/bin/go; do
  [ -n "$g" ] && [ -x "$g" ] || continue
  v=$("$g" env GOVERSION 2>/dev/null | sed 's/^go//') || continue
  if [ "$(printf '%s\n%s\n' "1.21" "$v" | sort -V | head -1)" = "1.21" ]; then gobin=$g; break; fi
done
if [ -z "$gobin" ]; then
  dpkg-query -W -f='${Status}' golang-go 2>/dev/null | grep -q 'install ok installed' || {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go >&2; }
  mod="golang.org/toolchain@v0.0.1-go${want}.linux-$(dpkg --print-architecture)"
  dir=$(cd /tmp && GOFLAGS=-mod=mod GO111MODULE=on go mod download -json "$mod" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  chmod +x "$dir"/bin/* "$dir"/pkg/tool/*/* 2>/dev/null || true
  gobin="$dir/bin/go"
fi
export GOTOOLCHAIN=auto CGO_ENABLED=0
"$gobin" mod download >&2
echo "$gobin"
