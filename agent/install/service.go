package install

import (
	"encoding/json"
	"fmt"
	"os"

	"github.com/esir-project/esir/agent/enroll"
	"golang.org/x/sys/unix"
)

// Files of ESIR's node service in the installed system.
const (
	AgentPath      = "/usr/sbin/esir-agent"
	SystemdUnit    = "/etc/systemd/system/esir-node.service"
	systemdWants   = "/etc/systemd/system/multi-user.target.wants/esir-node.service"
	InitScript     = "/etc/init.d/S90esir-node"
	nodeServiceCmd = AgentPath + " enroll --config " + enroll.ConfigPath
)

const systemdUnitText = `# Written by ESIR's installer.
[Unit]
Description=ESIR node service: enroll this node with the ESIR server
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
ExecStart=` + nodeServiceCmd + `
Restart=on-failure
RestartSec=10

[Install]
WantedBy=multi-user.target
`

const initScriptText = `#!/bin/sh
# Written by ESIR's installer: ESIR's node service for images without
# systemd. Brings up the network (ifupdown or busybox ifup) and enrolls the
# node with the ESIR server in the background, retrying until it answers.
case "$1" in
start)
	mkdir -p /run/network /var/run
	# The image's SSH host keys were removed by the installer: make this
	# node's own.
	[ -x /usr/bin/ssh-keygen ] && /usr/bin/ssh-keygen -A >/dev/null 2>&1
	( ifup -a >/dev/null 2>&1; exec ` + nodeServiceCmd + ` >/dev/console 2>&1 ) &
	echo $! > /var/run/esir-node.pid
	;;
stop)
	[ -f /var/run/esir-node.pid ] && kill "$(cat /var/run/esir-node.pid)" 2>/dev/null
	rm -f /var/run/esir-node.pid
	;;
esac
`

// startAgentCopy starts copying the agent binary into the root's
// filesystem while the image unpacks, as a file without a name
// (O_TMPFILE): the image may bring its own /usr/sbin, and only once it is
// in place does the service job give the copy its name. A kernel or
// filesystem without O_TMPFILE leaves the copy to the service job.
func (r *run) startAgentCopy() {
	r.agentCopy = r.goJob(func() error {
		bin, err := os.ReadFile(r.opts.Agent)
		if err != nil {
			return fmt.Errorf("agent binary: %w", err)
		}
		fd, err := unix.Open(r.mnt, unix.O_TMPFILE|unix.O_WRONLY|unix.O_CLOEXEC, 0o600)
		if err != nil {
			return nil
		}
		f := os.NewFile(uintptr(fd), r.opts.Agent+" (copy in "+r.mnt+")")
		if _, err := f.Write(bin); err != nil {
			f.Close()
			return fmt.Errorf("copy the agent binary into %s: %w", r.mnt, err)
		}
		_ = unix.SyncFileRange(fd, 0, 0, unix.SYNC_FILE_RANGE_WRITE)
		r.agentFile = f
		return nil
	})
}

// closeAgentCopy closes the agent's copy if no step named it (it then
// vanishes with its last descriptor).
func (r *run) closeAgentCopy() {
	if r.agentFile != nil {
		r.agentFile.Close()
		r.agentFile = nil
	}
}

// startService starts installing the agent binary, its configuration, a
// systemd unit (enabled) and, for images without systemd, an init script;
// the service step waits for it.
func (r *run) startService() {
	r.svc = r.goJob(func() error {
		var err error
		r.svcHow, err = r.writeService()
		return err
	})
}

// service waits for the node service's files.
func (r *run) service() (string, error) {
	if err := r.svc.wait(); err != nil {
		return "", err
	}
	return fmt.Sprintf("%s, %s, server %s", AgentPath, r.svcHow, r.asg.Server), nil
}

// writeService writes the node service's files and says how the image
// starts it.
func (r *run) writeService() (string, error) {
	if r.asg.Server == "" {
		return "", fmt.Errorf("assignment has no server URL for the node service")
	}
	if err := r.agentCopy.wait(); err != nil {
		return "", err
	}
	if r.agentFile != nil {
		err := r.linkFile(r.agentFile, AgentPath, 0o755)
		r.closeAgentCopy()
		if err != nil {
			return "", err
		}
	} else {
		bin, err := os.ReadFile(r.opts.Agent)
		if err != nil {
			return "", fmt.Errorf("agent binary: %w", err)
		}
		if err := r.writeFile(AgentPath, bin, 0o755); err != nil {
			return "", err
		}
	}
	cfg, _ := json.MarshalIndent(enroll.Config{
		Server: r.asg.Server, Token: r.asg.EnrollToken, MAC: r.opts.MAC, Hostname: r.asg.Hostname, Image: r.img.Ref,
	}, "", "  ")
	if err := r.writeFile(enroll.ConfigPath, append(cfg, '\n'), 0o600); err != nil {
		return "", err
	}
	if err := r.writeFile(SystemdUnit, []byte(systemdUnitText), 0o644); err != nil {
		return "", err
	}
	_ = os.MkdirAll(r.inRoot("/etc/systemd/system/multi-user.target.wants"), 0o755)
	_ = os.Remove(r.inRoot(systemdWants))
	if err := os.Symlink(SystemdUnit, r.inRoot(systemdWants)); err != nil {
		return "", err
	}
	if _, err := os.Stat(r.inRoot("/lib/systemd/systemd")); err == nil {
		return "systemd unit", nil
	}
	if err := r.writeFile(InitScript, []byte(initScriptText), 0o755); err != nil {
		return "", err
	}
	return "init script (no systemd in the image)", nil
}
