#!/bin/sh
# Captures the modalias strings of QEMU machines, as recorded in this folder:
# boots Debian's kernel with an initramfs holding busybox-static and the whole
# module tree; its /init prints every /sys/bus/*/devices/*/modalias (and the CPU
# modalias), loads what matches with busybox modprobe, and prints again until
# nothing new appears.
#   capture.sh KVER OUT -machine q35 -device virtio-net-pci ...
set -eu
kver=$1; out=$2; shift 2
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
mkdir -p "$work/root/bin" "$work/root/proc" "$work/root/sys" "$work/root/dev" "$work/root/lib/modules"
cp /usr/bin/busybox "$work/root/bin/busybox"
for a in sh cat echo sort modprobe mount ls uniq wc poweroff sleep sed; do ln -s busybox "$work/root/bin/$a"; done
cp -a "/lib/modules/$kver" "$work/root/lib/modules/"
cat > "$work/root/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
dump() { cat /sys/devices/system/cpu/modalias /sys/devices/virtual/dmi/id/modalias /sys/bus/*/devices/*/modalias 2>/dev/null | sort | uniq; }
prev=0
for i in 1 2 3 4; do
  n=$(dump | wc -l)
  [ "$n" = "$prev" ] && break
  prev=$n
  dump | while IFS= read -r a; do modprobe -q "$a" 2>/dev/null; done
  sleep 1
done
echo ==MODALIAS-BEGIN==
dump
echo ==MODALIAS-END==
poweroff -f
INIT
chmod +x "$work/root/init"
(cd "$work/root" && find . | cpio -o -H newc --quiet | zstd -q -T0 -3 > "$work/initrd")
timeout 300 qemu-system-x86_64 -accel tcg -cpu max -m 1536 -nographic -no-reboot \
  -kernel "/boot/vmlinuz-$kver" -initrd "$work/initrd" -append "console=ttyS0 quiet panic=-1" "$@" \
  > "$work/serial.log" 2>&1 || true
sed -n '/==MODALIAS-BEGIN==/,/==MODALIAS-END==/p' "$work/serial.log" | tr -d '\r' | grep -E '^[a-z0-9_]+:' > "$out"
test -s "$out" || { tail -30 "$work/serial.log" >&2; exit 1; }
