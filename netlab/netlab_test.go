package netlab

import (
	"context"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"
)

func needLab(t *testing.T) {
	t.Helper()
	if err := Available(); err != nil {
		t.Skip(err)
	}
}

func TestRefusesAddressesOutsideBenchRange(t *testing.T) {
	for _, a := range []string{"10.0.0.1/24", "192.168.1.2/24", "198.20.0.1/24", "8.8.8.8/32", "198.18.0.1/8"} {
		if err := checkAddr(netip.MustParsePrefix(a)); err == nil {
			t.Errorf("%s accepted", a)
		}
	}
	for _, a := range []string{"198.18.0.1/24", "198.19.255.254/16"} {
		if err := checkAddr(netip.MustParsePrefix(a)); err != nil {
			t.Errorf("%s refused: %v", a, err)
		}
	}
}

func TestNamespacesPingShapeAndCleanUp(t *testing.T) {
	needLab(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	l, err := New(ctx, "nltest")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Close() })
	a, err := l.AddHost(ctx, "a", netip.MustParsePrefix("198.18.7.1/24"), Link{})
	if err != nil {
		t.Fatal(err)
	}
	b, err := l.AddHost(ctx, "b", netip.MustParsePrefix("198.18.7.2/24"), Link{RateMbit: 50})
	if err != nil {
		t.Fatal(err)
	}
	sw, err := l.SwitchHost(ctx, netip.MustParsePrefix("198.18.7.254/24"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Run(ctx, "ping", "-c", "1", "-W", "2", b.IP().String()); err != nil {
		t.Fatalf("a cannot reach b: %v", err)
	}
	if _, err := b.Run(ctx, "ping", "-c", "1", "-W", "2", sw.IP().String()); err != nil {
		t.Fatalf("b cannot reach the switch host: %v", err)
	}
	out, err := b.Run(ctx, "tc", "qdisc", "show", "dev", "eth0")
	if err != nil || !strings.Contains(string(out), "tbf") || !strings.Contains(string(out), "rate 50Mbit") {
		t.Fatalf("b's link is not shaped: %s %v", out, err)
	}
	// Jumbo frames on both ends of a cable: a 8000-byte ping crosses the
	// bridge unfragmented between two 9000-byte links.
	j1, err := l.AddHost(ctx, "j1", netip.MustParsePrefix("198.18.7.11/24"), Link{MTU: 9000})
	if err != nil {
		t.Fatal(err)
	}
	j2, err := l.AddHost(ctx, "j2", netip.MustParsePrefix("198.18.7.12/24"), Link{MTU: 9000})
	if err != nil {
		t.Fatal(err)
	}
	if out, err := j1.Run(ctx, "ping", "-c", "1", "-W", "2", "-M", "do", "-s", "8000", j2.IP().String()); err != nil {
		t.Fatalf("a jumbo frame did not cross the lab: %s %v", out, err)
	}
	if _, err := a.Run(ctx, "ping", "-c", "1", "-W", "2", "-M", "do", "-s", "8000", b.IP().String()); err == nil {
		t.Fatal("a 8000-byte unfragmented ping crossed 1500-byte links")
	}
	if _, err := l.AddHost(ctx, "j3", netip.MustParsePrefix("198.18.7.13/24"), Link{MTU: 100}); err == nil || !strings.Contains(err.Error(), "MTU 100") {
		t.Fatalf("MTU 100 was not refused by name: %v", err)
	}
	if _, err := l.AddHost(ctx, "c", netip.MustParsePrefix("10.1.1.1/24"), Link{}); err == nil {
		t.Fatal("a private address outside 198.18.0.0/15 was accepted")
	}
	// A process left running is killed by Close, and the namespaces go.
	sleeper := a.Command(context.Background(), "sleep", "600")
	if err := sleeper.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- sleeper.Wait() }()
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("a process in a host namespace survived Close")
	}
	list, _ := exec.Command("ip", "netns", "list").Output()
	if strings.Contains(string(list), "esir-nltest-") {
		t.Fatalf("namespaces left after Close:\n%s", list)
	}
	if err := l.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

// TestSameNameWaits opens a lab and then the same lab name again, as a
// second run of one test would: the second New waits instead of purging
// the first one's namespaces, gives up with an error naming the lab when
// its context ends, and gets the name once the first lab is closed.
func TestSameNameWaits(t *testing.T) {
	needLab(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	l, err := New(ctx, "nllock")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Close() })
	a, err := l.AddHost(ctx, "a", netip.MustParsePrefix("198.18.7.1/24"), Link{})
	if err != nil {
		t.Fatal(err)
	}
	short, cancelShort := context.WithTimeout(ctx, 500*time.Millisecond)
	defer cancelShort()
	if l2, err := New(short, "nllock"); err == nil {
		l2.Close()
		t.Fatal("a second lab of the same name opened while the first was open")
	} else if !strings.Contains(err.Error(), "nllock is in use") {
		t.Fatalf("second New: %v, want it to name the lab in use", err)
	}
	if _, err := a.Run(ctx, "true"); err != nil {
		t.Fatalf("the first lab's host went while a second New waited: %v", err)
	}
	got := make(chan error, 1)
	go func() {
		l2, err := New(ctx, "nllock")
		if err == nil {
			err = l2.Close()
		}
		got <- err
	}()
	time.Sleep(300 * time.Millisecond)
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-got:
		if err != nil {
			t.Fatalf("New after the first lab closed: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("New still waits after the first lab closed")
	}
}
