package main

import "testing"

func TestProcNetCounters(t *testing.T) {
	snmp := `Ip: Forwarding DefaultTTL
Ip: 2 64
Tcp: RtoAlgorithm OutSegs RetransSegs
Tcp: 1 1200 34
Udp: InDatagrams
Udp: 7
`
	netstat := `TcpExt: SyncookiesSent TCPFastRetrans TCPSynRetrans
TcpExt: 0 30 4
IpExt: InNoRoutes
IpExt: 9
`
	got := procNetCounters(snmp, "Tcp:", "TcpExt:")
	if got["TcpOutSegs"] != 1200 || got["TcpRetransSegs"] != 34 || len(got) != 3 {
		t.Errorf("snmp: got %v, want TcpOutSegs 1200, TcpRetransSegs 34 and TcpRtoAlgorithm only", got)
	}
	got = procNetCounters(netstat, "Tcp:", "TcpExt:")
	if got["TCPFastRetrans"] != 30 || got["TCPSynRetrans"] != 4 || got["InNoRoutes"] != 0 {
		t.Errorf("netstat: got %v", got)
	}
}

func TestQdiscDrops(t *testing.T) {
	out := `qdisc tbf 8001: root refcnt 2 rate 2500Kbit burst 16Kb lat 100ms
 Sent 1000 bytes 10 pkt (dropped 12, overlimits 3 requeues 0)
 backlog 0b 0p requeues 0
qdisc tbf 8002: dev x root refcnt 2 rate 2500Kbit burst 16Kb lat 100ms
 Sent 1000 bytes 10 pkt (dropped 5, overlimits 0 requeues 0)
`
	if got := qdiscDrops(out); got != 17 {
		t.Errorf("qdiscDrops = %d, want 17", got)
	}
}
