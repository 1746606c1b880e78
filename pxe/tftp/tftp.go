// Package tftp is ESIR's read-only TFTP server for the iPXE binaries
// (undionly.kpxe, ipxe.efi, snponly.efi). It is rooted in one directory:
// names that leave it (.., absolute paths out of the root, symbolic links out
// of it) are refused with a TFTP error and logged; write requests are refused.
// Block size and transfer size are negotiated (RFC 2348, 2349); each transfer
// is logged and counted.
package tftp

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path"
	"path/filepath"
	"strings"
	"sync/atomic"

	"github.com/pin/tftp/v3"
)

// DefaultRoot is where Debian's ipxe package puts the iPXE binaries. Some of
// them are symbolic links out of it (ipxe.efi -> /boot/ipxe.efi), which a
// rooted server refuses: serve Debian's files with DebianFiles and NewFiles.
const DefaultRoot = "/usr/lib/ipxe"

// BootFiles are the iPXE binaries ESIR hands out.
func BootFiles() []string { return []string{"undionly.kpxe", "ipxe.efi", "snponly.efi"} }

// DebianFiles resolves BootFiles in DefaultRoot (following the package's
// symbolic links) into a catalogue for NewFiles. Missing files are left out;
// none at all is an error.
func DebianFiles() (map[string]string, error) {
	files := map[string]string{}
	for _, n := range BootFiles() {
		p, err := filepath.EvalSymlinks(filepath.Join(DefaultRoot, n))
		if err != nil {
			continue
		}
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() {
			files[n] = p
		}
	}
	if len(files) == 0 {
		return nil, fmt.Errorf("tftp: no iPXE binaries in %s (Debian package ipxe)", DefaultRoot)
	}
	return files, nil
}

// Stats counts the server's transfers since start.
type Stats struct {
	Requests  int64 // read requests received
	Completed int64 // transfers acknowledged to the end
	Failed    int64 // transfers that failed after starting
	Aborted   int64 // clients that stopped after option negotiation (EDK2 asks tsize first)
	NotFound  int64
	Refused   int64 // traversal attempts and writes
	Bytes     int64 // bytes of completed transfers
	Datagrams int64 // data datagrams sent by completed transfers
}

// Server serves files from a root directory, or a fixed catalogue of files,
// over TFTP.
type Server struct {
	root  *os.Root          // directory mode
	files map[string]string // catalogue mode: name -> file
	log   *slog.Logger
	srv   *tftp.Server

	requests, completed, failed, aborted, notFound, refused, bytes, datagrams atomic.Int64
}

// New returns a server for dir.
func New(dir string, log *slog.Logger) (*Server, error) {
	root, err := os.OpenRoot(dir)
	if err != nil {
		return nil, fmt.Errorf("tftp: root %s: %w", dir, err)
	}
	if log == nil {
		log = slog.Default()
	}
	return newServer(&Server{root: root, log: log}), nil
}

// NewFiles returns a server for a fixed catalogue: exactly these names
// (cleaned as Clean does) map to these files; nothing else is served.
func NewFiles(files map[string]string, log *slog.Logger) (*Server, error) {
	cat := map[string]string{}
	for n, p := range files {
		c, err := Clean(n)
		if err != nil {
			return nil, fmt.Errorf("tftp: catalogue: %w", err)
		}
		cat[c] = p
	}
	if log == nil {
		log = slog.Default()
	}
	return newServer(&Server{files: cat, log: log}), nil
}

// ServeHTTP serves the same files over HTTP (with Range), for UEFI HTTP boot
// and iPXE fetching its own binaries: what TFTP refuses, HTTP refuses too.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f, err := s.Open(r.URL.Path)
	if err != nil {
		s.log.Info("iPXE binary over HTTP: not served", "path", r.URL.Path, "remote", r.RemoteAddr, "err", err)
		http.NotFound(w, r)
		return
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	http.ServeContent(w, r, st.Name(), st.ModTime(), f)
}

func newServer(s *Server) *Server {
	s.srv = tftp.NewServer(s.read, s.write)
	s.srv.SetHook(hook{s})
	return s
}

// Open opens a requested name for reading: the name is cleaned (traversal is
// an error) and opened inside the root, or looked up in the catalogue. The
// errors say why, for the client; callers count and log them.
func (s *Server) Open(requested string) (*os.File, error) {
	name, err := Clean(requested)
	if err != nil {
		return nil, refusal{err.Error()}
	}
	var f *os.File
	if s.root != nil {
		f, err = s.root.Open(name)
	} else if p, ok := s.files[name]; ok {
		f, err = os.Open(p)
	} else {
		err = os.ErrNotExist
	}
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, notFound{name}
		}
		return nil, refusal{fmt.Sprintf("file %s refused: %v", name, err)}
	}
	st, err := f.Stat()
	if err != nil || !st.Mode().IsRegular() {
		f.Close()
		return nil, refusal{fmt.Sprintf("%s is not a file", name)}
	}
	return f, nil
}

type notFound struct{ name string }

func (n notFound) Error() string { return "file " + n.name + " not found" }

// Clean maps a requested file name to a name inside the root, or an error
// when it would leave the root. Leading slashes are dropped (clients ask for
// "/ipxe.efi" and "ipxe.efi" alike); backslashes count as separators.
func Clean(name string) (string, error) {
	n := strings.ReplaceAll(name, "\\", "/")
	if n == "" || strings.ContainsRune(n, 0) {
		return "", fmt.Errorf("invalid file name %q", name)
	}
	for _, part := range strings.Split(n, "/") {
		if part == ".." {
			return "", fmt.Errorf("file name %q leaves the TFTP root", name)
		}
	}
	c := strings.TrimPrefix(path.Clean("/"+n), "/")
	if c == "" {
		return "", fmt.Errorf("invalid file name %q", name)
	}
	return c, nil
}

// refusal is an error the read handler already counted and logged.
type refusal struct{ msg string }

func (r refusal) Error() string { return r.msg }

func remote(rf any) string {
	if ot, ok := rf.(interface{ RemoteAddr() net.UDPAddr }); ok {
		a := ot.RemoteAddr()
		return a.String()
	}
	return ""
}

func (s *Server) read(filename string, rf io.ReaderFrom) error {
	s.requests.Add(1)
	from := remote(rf)
	f, err := s.Open(filename)
	if err != nil {
		var nf notFound
		if errors.As(err, &nf) {
			s.notFound.Add(1)
			s.log.Info("tftp: not found", "file", filename, "remote", from)
			return refusal{err.Error()}
		}
		s.refused.Add(1)
		s.log.Warn("tftp: refused", "file", filename, "remote", from, "err", err)
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	if ot, ok := rf.(tftp.OutgoingTransfer); ok {
		ot.SetSize(st.Size())
	}
	// One read per block would cost a system call per datagram.
	if _, err := rf.ReadFrom(bufio.NewReaderSize(f, 256<<10)); err != nil {
		return err
	}
	s.bytes.Add(st.Size())
	return nil
}

func (s *Server) write(filename string, _ io.WriterTo) error {
	s.refused.Add(1)
	s.log.Warn("tftp: write refused", "file", filename)
	return refusal{"this TFTP server is read-only"}
}

type hook struct{ s *Server }

func (h hook) OnSuccess(st tftp.TransferStats) {
	h.s.completed.Add(1)
	h.s.datagrams.Add(int64(st.DatagramsSent))
	h.s.log.Info("tftp: sent", "file", st.Filename, "remote", st.RemoteAddr, "duration", st.Duration,
		"datagrams", st.DatagramsSent, "blksize", st.Opts["blksize"])
}

func (h hook) OnFailure(st tftp.TransferStats, err error) {
	var r refusal
	if errors.As(err, &r) {
		return // counted and logged by the handler
	}
	if st.Filename == "" {
		h.s.log.Debug("tftp: bad request", "err", err)
		return
	}
	// EDK2 first asks for the size only and aborts after the option
	// acknowledgement (error code 8): noise, not a failure.
	if strings.Contains(err.Error(), "code=8") {
		h.s.aborted.Add(1)
		h.s.log.Debug("tftp: client stopped after options", "file", st.Filename, "remote", st.RemoteAddr, "err", err)
		return
	}
	h.s.failed.Add(1)
	h.s.log.Warn("tftp: transfer failed", "file", st.Filename, "remote", st.RemoteAddr, "err", err)
}

// Stats returns the counters.
func (s *Server) Stats() Stats {
	return Stats{Requests: s.requests.Load(), Completed: s.completed.Load(), Failed: s.failed.Load(),
		Aborted: s.aborted.Load(), NotFound: s.notFound.Load(), Refused: s.refused.Load(), Bytes: s.bytes.Load(), Datagrams: s.datagrams.Load()}
}

// Serve serves on conn (UDP port 69, usually) until ctx ends. Each transfer
// uses its own socket, opened in the network namespace of the thread that
// runs it.
func (s *Server) Serve(ctx context.Context, conn net.PacketConn) error {
	done := make(chan struct{})
	defer close(done)
	go func() {
		select {
		case <-ctx.Done():
			s.srv.Shutdown()
		case <-done:
		}
	}()
	err := s.srv.Serve(conn)
	if ctx.Err() != nil {
		return nil
	}
	if err != nil {
		return fmt.Errorf("tftp: serve: %w", err)
	}
	return nil
}

// ListenAndServe listens on addr (e.g. ":69") and serves until ctx ends.
func (s *Server) ListenAndServe(ctx context.Context, addr string) error {
	conn, err := net.ListenPacket("udp4", addr)
	if err != nil {
		return fmt.Errorf("tftp: listen %s: %w", addr, err)
	}
	return s.Serve(ctx, conn)
}

// Close releases the root directory.
func (s *Server) Close() error {
	if s.root != nil {
		return s.root.Close()
	}
	return nil
}
