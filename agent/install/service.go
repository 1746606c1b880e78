package install

import (
	"encoding/json"
	"fmt"
	"os"

	"github.com/esir-project/esir/agent/enroll"
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
	( ifup -a >/dev/null 2>&1; exec ` + nodeServiceCmd + ` >/dev/console 2>&1 ) &
	echo $! > /var/run/esir-node.pid
	;;
stop)
	[ -f /var/run/esir-node.pid ] && kill "$(cat /var/run/esir-node.pid)" 2>/dev/null
	rm -f /var/run/esir-node.pid
	;;
esac
`

// service installs the agent binary, its configuration, a systemd unit
// (enabled) and, for images without systemd, an init script.
func (r *run) service() (string, error) {
	if r.asg.Server == "" {
		return "", fmt.Errorf("assignment has no server URL for the node service")
	}
	bin, err := os.ReadFile(r.opts.Agent)
	if err != nil {
		return "", fmt.Errorf("agent binary: %w", err)
	}
	if err := r.writeFile(AgentPath, bin, 0o755); err != nil {
		return "", err
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
	how := "systemd unit"
	if _, err := os.Stat(r.inRoot("/lib/systemd/systemd")); err != nil {
		if err := r.writeFile(InitScript, []byte(initScriptText), 0o755); err != nil {
			return "", err
		}
		how = "init script (no systemd in the image)"
	}
	return fmt.Sprintf("%s, %s, server %s", AgentPath, how, r.asg.Server), nil
}
