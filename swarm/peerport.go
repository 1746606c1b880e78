package swarm

import (
	"encoding/hex"
	"errors"
	"io"
	"net"
	"net/http"
	"sync"
	"time"
)

// A node's peer port carries BitTorrent and, for plain HTTP GETs, the info
// dictionaries of the images it has: a node that starts fetching takes the
// dictionary (the image's piece hashes, about 20 bytes per piece) from a
// node that has it instead of from the server, whose link paces the first
// copy of every piece (see Server's /swarm/images/{ref}/source).

// sortTimeout bounds how long an accepted connection may take to send its
// first byte before it is dropped.
const sortTimeout = 10 * time.Second

// peerListener splits one TCP listener by the first byte of each accepted
// connection: 'G' (an HTTP GET) goes to the HTTP side, anything else (a
// BitTorrent handshake opens with byte 19) to the BitTorrent library.
type peerListener struct {
	net.Listener
	bt, web chan net.Conn
	done    chan struct{}
	once    sync.Once

	mu  sync.Mutex
	err error // why accepting stopped
}

func newPeerListener(ln net.Listener) *peerListener {
	l := &peerListener{Listener: ln, bt: make(chan net.Conn), web: make(chan net.Conn), done: make(chan struct{})}
	go l.loop()
	return l
}

func (l *peerListener) loop() {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			l.mu.Lock()
			l.err = err
			l.mu.Unlock()
			l.Close()
			return
		}
		go l.sort(c)
	}
}

// sort reads the connection's first byte and hands it on with that byte
// put back.
func (l *peerListener) sort(c net.Conn) {
	var b [1]byte
	c.SetReadDeadline(time.Now().Add(sortTimeout))
	if _, err := io.ReadFull(c, b[:]); err != nil {
		c.Close()
		return
	}
	c.SetReadDeadline(time.Time{})
	to := l.bt
	if b[0] == 'G' {
		to = l.web
	}
	select {
	case to <- &peekedConn{Conn: c, first: b[0], pending: true}:
	case <-l.done:
		c.Close()
	}
}

// Accept returns the next BitTorrent connection.
func (l *peerListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.bt:
		return c, nil
	case <-l.done:
		return nil, l.closedErr()
	}
}

func (l *peerListener) closedErr() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.err != nil {
		return l.err
	}
	return net.ErrClosed
}

// Close stops both sides.
func (l *peerListener) Close() error {
	var err error
	l.once.Do(func() {
		close(l.done)
		err = l.Listener.Close()
	})
	return err
}

// webListener is the HTTP side of a peerListener, for http.Server.Serve.
type webListener struct{ l *peerListener }

func (w webListener) Accept() (net.Conn, error) {
	select {
	case c := <-w.l.web:
		return c, nil
	case <-w.l.done:
		return nil, w.l.closedErr()
	}
}

func (w webListener) Close() error   { return nil } // the peerListener's owner closes it
func (w webListener) Addr() net.Addr { return w.l.Addr() }

// peekedConn returns the byte sort read before the rest of the stream.
type peekedConn struct {
	net.Conn
	first   byte
	pending bool
}

func (c *peekedConn) Read(b []byte) (int, error) {
	if c.pending && len(b) > 0 {
		c.pending = false
		b[0] = c.first
		return 1, nil
	}
	return c.Conn.Read(b)
}

// peerHandler serves GET /swarm/info/{infohash}: the raw info dictionary of
// an image this node has the metainfo of. The fetcher checks its SHA-1
// against the info hash the server gave it.
func (n *Node) peerHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /swarm/info/{ih}", func(w http.ResponseWriter, r *http.Request) {
		var ih [20]byte
		if s := r.PathValue("ih"); len(s) != 40 {
			http.Error(w, "info hash "+s+": want 40 hex digits", http.StatusBadRequest)
			return
		} else if _, err := hex.Decode(ih[:], []byte(s)); err != nil {
			http.Error(w, "info hash "+s+": want 40 hex digits", http.StatusBadRequest)
			return
		}
		n.mu.Lock()
		t := n.torrents[ih]
		n.mu.Unlock()
		if t == nil || t.Info() == nil {
			http.Error(w, "no metainfo for "+r.PathValue("ih")+" on this node", http.StatusNotFound)
			return
		}
		mi := t.Metainfo()
		n.infoServed.Add(1)
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Write(mi.InfoBytes)
	})
	return mux
}
