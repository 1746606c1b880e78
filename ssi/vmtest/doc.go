// Package vmtest holds the SSI stack's level-2 test (issue 10): keepalived
// and IPVS in QEMU guests running Debian's kernel, which has the ip_vs
// modules the CI host's kernel lacks. Two directors run keepalived with the
// configuration ssi.Render gives them, two real servers carry the VIP on lo
// with the ARP sysctls ssi.Render gives them, and a client namespace on the
// same netlab bridge connects to the VIP. The same guests check the NFS home
// (the CI host's kernel has no nfsd): r1 exports /home, r2 and d2 mount it
// with their rendered fstab line. The package has no code of its own outside
// its tests; they need root, qemu-system-x86, linux-image-amd64,
// busybox-static, keepalived, ipvsadm, nfs-kernel-server and nfs-common.
package vmtest
