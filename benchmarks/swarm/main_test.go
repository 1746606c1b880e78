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

func TestHaveVsRate(t *testing.T) {
	runs := []rateRun{
		{RateMbit: 20, Results: []method{
			{Name: "esir-bt adaptive", N: 8, HaveMsgs: 200, DelayP99Ms: 120},
			{Name: "esir-bt off", N: 8, HaveMsgs: 1000, DelayP99Ms: 70},
			{Name: "udpcast", N: 8},
			{Name: "esir-bt adaptive", N: 16, HaveMsgs: 500},
		}},
		{RateMbit: 2.5, Results: []method{
			{Name: "esir-bt adaptive", N: 8, HaveMsgs: 500, DelayP99Ms: 300},
			{Name: "esir-bt redundant", N: 8, HaveMsgs: 600, Bottleneck: "host (this method's processes)"},
			{Name: "esir-bt off", N: 8, Err: "timed out"},
		}},
	}
	pts := haveVsRate(runs, 8)
	a := pts["adaptive"]
	if len(a) != 2 || a[0].RateMbit != 2.5 || a[1].RateMbit != 20 {
		t.Fatalf("adaptive points %+v, want N = 8 at 2.5 then 20 Mbit/s", a)
	}
	if a[0].Share != 0 || a[1].Share != 0.2 || a[1].DelayP99 != 120 {
		t.Errorf("adaptive points %+v, want no share where off failed, 0.2 at 20 Mbit/s", a)
	}
	if r := pts["redundant"]; len(r) != 1 || !r[0].HostBound {
		t.Errorf("redundant points %+v", r)
	}
	if len(pts["off"]) != 1 || pts["off"][0].Share != 1 {
		t.Errorf("off points %+v, want one, at share 1 (the failed run left out)", pts["off"])
	}
	if got := haveModes(pts); len(got) != 3 || got[0] != "adaptive" {
		t.Errorf("modes %v", got)
	}
	if _, err := readRateRuns([]string{"/nonexistent.json"}); err == nil {
		t.Error("a missing file gave no error")
	}
}
