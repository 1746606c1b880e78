// Package fleet simulates node agents speaking the real agent protocol
// (package agentapi) to a server: register with an inventory, report the
// install phases with progress, send the final report, enroll. Tests drive
// rollouts with it step by step; benchmarks load a server with thousands.
package fleet

import (
	"context"
	"fmt"
	"net/http"

	"github.com/esir-project/esir/server/agentapi"
)

// Agent is one simulated node agent.
type Agent struct {
	MAC    string
	Client *agentapi.Client
	// Assignment is the current assignment (after Register in install mode).
	Assignment *agentapi.Assignment
	// Mode is the last mode the server gave.
	Mode string
	seq  int64
}

// MAC returns the i-th simulated MAC (locally administered, 02:...).
func MAC(i int) string {
	return fmt.Sprintf("02:e5:%02x:%02x:%02x:%02x", byte(i>>24), byte(i>>16), byte(i>>8), byte(i))
}

// New returns an agent for mac using token at server.
func New(server, token, mac string, hc *http.Client) *Agent {
	return &Agent{MAC: mac, Client: &agentapi.Client{Server: server, Token: token, HTTP: hc}}
}

// Inventory is a plausible hardware inventory for a simulated node.
func Inventory(mac string) agentapi.Inventory {
	return agentapi.Inventory{
		Arch: "x86_64", Firmware: "uefi", Vendor: "QEMU", Product: "Standard PC (Q35)",
		CPU:         agentapi.CPU{Model: "QEMU Virtual CPU", Sockets: 1, Cores: 2, Threads: 2},
		MemoryBytes: 4 << 30,
		Disks:       []agentapi.Disk{{Name: "vda", Path: "/dev/vda", Model: "QEMU HARDDISK", Serial: "SIM-" + mac, SizeBytes: 20 << 30}},
		NICs:        []agentapi.NIC{{Name: "eth0", MAC: mac, Driver: "virtio_net", Speed: 1000, Link: true}},
		Modules:     []string{"virtio_pci", "virtio_net", "virtio_blk"},
	}
}

// Register announces the agent and keeps its assignment.
func (a *Agent) Register(ctx context.Context) (*agentapi.RegisterResponse, error) {
	r, err := a.Client.Register(ctx, agentapi.RegisterRequest{MAC: a.MAC, Inventory: Inventory(a.MAC), AgentVersion: "fleet"})
	if err != nil {
		return nil, fmt.Errorf("agent %s: register: %w", a.MAC, err)
	}
	a.Mode, a.Assignment = r.Mode, r.Assignment
	return r, nil
}

func (a *Agent) assignment() string {
	if a.Assignment == nil {
		return ""
	}
	return a.Assignment.ID
}

// Progress reports one event in phase with bytes done of total.
func (a *Agent) Progress(ctx context.Context, phase string, bytes, total int64, log ...string) (*agentapi.Ack, error) {
	a.seq++
	ev := agentapi.Event{Seq: a.seq, Phase: phase, Bytes: bytes, Total: total, Log: log}
	if phase == agentapi.PhaseFetching {
		ev.Rate, ev.Peers = 50e6, 4
		ev.Have = &agentapi.Have{Emitted: a.seq * 10, Sent: a.seq, Suppressed: a.seq * 9}
	}
	ack, err := a.Client.Events(ctx, agentapi.EventBatch{MAC: a.MAC, Assignment: a.assignment(), Events: []agentapi.Event{ev}})
	if err != nil {
		return nil, fmt.Errorf("agent %s: events: %w", a.MAC, err)
	}
	return ack, nil
}

// Resend repeats the last event (same sequence number), as an agent does
// when it did not see the answer.
func (a *Agent) Resend(ctx context.Context, phase string, bytes, total int64) (*agentapi.Ack, error) {
	ev := agentapi.Event{Seq: a.seq, Phase: phase, Bytes: bytes, Total: total}
	return a.Client.Events(ctx, agentapi.EventBatch{MAC: a.MAC, Assignment: a.assignment(), Events: []agentapi.Event{ev}})
}

// Finish sends the final report: success, or failure at step with reason.
func (a *Agent) Finish(ctx context.Context, success bool, step, reason string) (*agentapi.Ack, error) {
	ack, err := a.Client.Report(ctx, agentapi.Report{MAC: a.MAC, Assignment: a.assignment(), Success: success, Step: step, Reason: reason,
		LogTail: []string{"step " + step + " done"}})
	if err != nil {
		return nil, fmt.Errorf("agent %s: report: %w", a.MAC, err)
	}
	return ack, nil
}

// Install runs a whole successful install: booting, fetching (in a few
// progress steps), installing, report.
func (a *Agent) Install(ctx context.Context) error {
	const total = 64 << 20
	steps := []struct {
		phase string
		bytes int64
	}{{agentapi.PhaseBooting, 0}, {agentapi.PhaseFetching, 0}, {agentapi.PhaseFetching, total / 2}, {agentapi.PhaseFetching, total},
		{agentapi.PhaseInstalling, total / 2}, {agentapi.PhaseInstalling, total}}
	for _, s := range steps {
		if _, err := a.Progress(ctx, s.phase, s.bytes, total); err != nil {
			return err
		}
	}
	_, err := a.Finish(ctx, true, "", "")
	return err
}

// Enroll reports the installed system's first boot with the assignment's
// enroll token.
func (a *Agent) Enroll(ctx context.Context) (*agentapi.Ack, error) {
	if a.Assignment == nil {
		return nil, fmt.Errorf("agent %s: enroll: no assignment", a.MAC)
	}
	c := &agentapi.Client{Server: a.Client.Server, Token: a.Assignment.EnrollToken, HTTP: a.Client.HTTP}
	ack, err := c.Enroll(ctx, agentapi.EnrollRequest{MAC: a.MAC, Hostname: a.Assignment.Hostname, Image: a.Assignment.Image.Ref, Inventory: Inventory(a.MAC)})
	if err != nil {
		return nil, fmt.Errorf("agent %s: enroll: %w", a.MAC, err)
	}
	return ack, nil
}
