package lab

import (
	"fmt"

	"github.com/esir-project/esir/vm"
)

// Node is one virtual machine of the lab.
type Node struct {
	Name     string      `json:"name"` // also its hostname: node01, node02 ...
	MAC      string      `json:"mac"`
	Firmware vm.Firmware `json:"firmware"`
	NIC      string      `json:"nic"`  // QEMU NIC model
	Disk     string      `json:"disk"` // vm disk model: virtio-blk, ahci, nvme
	// DiskBytes is the size of the node's empty disk.
	DiskBytes int64  `json:"disk_bytes"`
	DiskPath  string `json:"disk_path"`
	Tap       string `json:"tap"`
	// PID is the QEMU process (0 when not running).
	PID    int    `json:"pid"`
	Serial string `json:"serial_log"`
}

// Hardware choices of `esir lab up`.
const (
	FirmwareBIOS  = "bios"
	FirmwareUEFI  = "uefi"
	FirmwareMixed = "mixed"

	HardwareVirtio = "virtio" // every node virtio-net + virtio-blk
	HardwareMixed  = "mixed"  // NIC and disk models cycle across nodes
)

// Plan gives n nodes their names, MACs, firmware and hardware. The i-th node
// (from 1) gets MAC 52:54:00:e5:LL:ii where LL is derived from the lab name,
// so two labs on one host never share a MAC.
func Plan(labName string, n int, firmware, hardware string, diskBytes int64) ([]Node, error) {
	if n < 1 || n > 200 {
		return nil, fmt.Errorf("lab: --nodes %d: want 1 to 200", n)
	}
	switch firmware {
	case FirmwareBIOS, FirmwareUEFI, FirmwareMixed:
	default:
		return nil, fmt.Errorf("lab: --firmware %q: want bios, uefi or mixed", firmware)
	}
	switch hardware {
	case HardwareVirtio, HardwareMixed:
	default:
		return nil, fmt.Errorf("lab: --hardware %q: want virtio or mixed", hardware)
	}
	if diskBytes < 64<<20 {
		return nil, fmt.Errorf("lab: disk size %d bytes: want at least 64 MiB", diskBytes)
	}
	// HardwareMixed cycles through these models. Node 1 is e1000 + AHCI and
	// node 2 virtio-net + NVMe: the two machines of the end-to-end test
	// differ on every axis (with mixed firmware node 1 is SeaBIOS, node 2
	// OVMF).
	nicModels := [...]string{"e1000", "virtio-net-pci", "e1000e"}
	diskModels := [...]string{"ahci", "nvme", "virtio-blk"}
	var h byte
	for _, c := range []byte(labName) {
		h = h*31 + c
	}
	nodes := make([]Node, n)
	for i := range nodes {
		nd := Node{
			Name:      fmt.Sprintf("node%02d", i+1),
			MAC:       fmt.Sprintf("52:54:00:e5:%02x:%02x", h, i+1),
			Firmware:  vm.Firmware(firmware),
			NIC:       "virtio-net-pci",
			Disk:      "virtio-blk",
			DiskBytes: diskBytes,
			Tap:       fmt.Sprintf("t%s%d", labName, i+1),
		}
		if len(nd.Tap) > 15 {
			nd.Tap = fmt.Sprintf("tap%d", i+1)
		}
		if firmware == FirmwareMixed {
			nd.Firmware = vm.BIOS
			if i%2 == 1 {
				nd.Firmware = vm.UEFI
			}
		}
		if hardware == HardwareMixed {
			nd.NIC = nicModels[i%len(nicModels)]
			nd.Disk = diskModels[i%len(diskModels)]
		}
		nodes[i] = nd
	}
	return nodes, nil
}

// vmConfig is the QEMU configuration of a node: network first, the NIC on
// its tap in the switch namespace, the empty disk. A UEFI node with
// virtio-net boots through OVMF's own PXE client (no option ROM), so the
// path firmware -> TFTP ipxe.efi -> iPXE -> HTTP is exercised; the other
// NICs keep QEMU's iPXE option ROM.
func vmConfig(st *State, nd Node) vm.Config {
	nic := vm.NIC{Model: nd.NIC, MAC: nd.MAC, Tap: nd.Tap}
	if nd.Firmware == vm.UEFI && nd.NIC == "virtio-net-pci" {
		nic.NoROM = true
	}
	return vm.Config{
		Name:             nd.Name,
		Firmware:         nd.Firmware,
		MemoryMiB:        st.MemoryMiB,
		NICs:             []vm.NIC{nic},
		Disks:            []vm.Disk{{Path: nd.DiskPath, Model: nd.Disk}},
		BootNetworkFirst: true,
		NoIPv6Boot:       true,
		NetNS:            st.Switch,
		WorkDir:          st.vmDir(),
		Detached:         true,
	}
}
