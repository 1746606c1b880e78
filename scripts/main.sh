#!/usr/bin/env bash
# ESIR's main job, for now: build a sample file-mode image from a sample root
# filesystem and inspect and verify it. Run as root on Debian 12; idempotent.
#   1. installs the lab's Debian packages and Go (scripts/setup.sh lab);
#   2. builds bin/esir;
#   3. makes a busybox-based root filesystem (busybox-static) with Debian's
#      newest installed kernel, its initrd and modules, when present;
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
mkdir -p "$root"
for d in bin sbin usr/bin usr/sbin etc root proc sys dev run tmp var/log boot; do mkdir -p "$root/$d"; done
chmod 1777 "$root/tmp"
chmod 0700 "$root/root"
install -m 0755 /bin/busybox "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list-full); do
  [ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
done
ln -sf /bin/busybox "$root/sbin/init"
cat > "$root/etc/inittab" <<'EOF'
::sysinit:/bin/mount -t proc proc /proc
::sysinit:/bin/mount -t sysfs sysfs /sys
::sysinit:/bin/hostname -F /etc/hostname
::askfirst:-/bin/sh
::ctrlaltdel:/sbin/reboot
EOF
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$root/etc/group"
echo sample > "$root/etc/hostname"
echo 0123456789abcdef0123456789abcdef > "$root/etc/machine-id" # the image stores it empty

# Debian's newest kernel with its initrd and modules, if installed.
kver=$(ls /boot/vmlinuz-* 2>/dev/null | sed 's|.*/vmlinuz-||' | sort -V | tail -n 1 || true)
if [ -n "$kver" ]; then
  cp /boot/vmlinuz-"$kver" "$root/boot/"
  [ -e /boot/initrd.img-"$kver" ] && cp /boot/initrd.img-"$kver" "$root/boot/"
  if [ -d /usr/lib/modules/"$kver" ]; then
    mkdir -p "$root/usr/lib/modules"
    cp -a /usr/lib/modules/"$kver" "$root/usr/lib/modules/"
    ln -s usr/lib "$root/lib"
  fi
else
  echo "main: no Debian kernel in /boot (package linux-image-amd64): the sample image has none" >&2
fi
# Fixed timestamps make the sample tree, and so the archive, identical on
# every run.
find "$root" -exec touch -h -d @1700000000 {} +

bin/esir image rm --store "$store" sample:1 >/dev/null 2>&1 || true
bin/esir image build --store "$store" --from "$root" --name sample --version 1
bin/esir image inspect --store "$store" sample:1
bin/esir image verify --store "$store" sample:1
bin/esir image ls --store "$store"
archive=$(bin/esir image inspect --store "$store" sample:1 -o json | sed -n 's/.*"archive": "\(.*\)".*/\1/p')
echo "GNU tar reads it too (first entries of $store/images/sample/1/$archive):"
tar --zstd -tvf "$store/images/sample/1/$archive" | head -n 8
