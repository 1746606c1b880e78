package imaging

import (
	"fmt"
	"path"
	"sort"
	"strconv"
	"strings"
	"time"
)

// ESIR writes its tar headers itself rather than through archive/tar: Go's
// writer cannot emit PAX 1.0 sparse entries, and owning the encoding keeps
// the archive byte-for-byte deterministic. Reading uses archive/tar.

const blockSize = 512

// Tar type flags ESIR writes.
const (
	typeReg     = '0'
	typeLink    = '1'
	typeSymlink = '2'
	typeChar    = '3'
	typeBlock   = '4'
	typeDir     = '5'
	typeFifo    = '6'
	typePAX     = 'x'
)

// tarHeader is one archive entry's metadata.
type tarHeader struct {
	name     string // slash path relative to the root; "." for the root
	typ      byte
	mode     uint32 // permission bits with setuid, setgid and sticky
	uid, gid int
	uname    string
	gname    string
	mtime    time.Time
	size     int64 // bytes of data that follow the header (sparse: map + data)
	linkname string
	devmajor uint32
	devminor uint32
	records  map[string]string // extra PAX records (xattrs, sparse)
}

// encode appends the entry's header blocks (a PAX extended header when
// needed, then the ustar header) to dst.
func (h *tarHeader) encode(dst []byte) []byte {
	name := h.name
	if name == "." {
		name = "./"
	} else if h.typ == typeDir {
		name += "/"
	}
	pax := map[string]string{}
	for k, v := range h.records {
		pax[k] = v
	}
	if _, sparse := pax["GNU.sparse.name"]; !sparse && !fitsUstarString(name, 100) {
		pax["path"] = name
	}
	if !fitsUstarString(h.linkname, 100) {
		pax["linkpath"] = h.linkname
	}
	if !fitsOctal(int64(h.uid), 8) {
		pax["uid"] = strconv.Itoa(h.uid)
	}
	if !fitsOctal(int64(h.gid), 8) {
		pax["gid"] = strconv.Itoa(h.gid)
	}
	if !fitsOctal(h.size, 12) {
		pax["size"] = strconv.FormatInt(h.size, 10)
	}
	if h.uname != "" && !fitsUstarString(h.uname, 32) {
		pax["uname"] = h.uname
	}
	if h.gname != "" && !fitsUstarString(h.gname, 32) {
		pax["gname"] = h.gname
	}
	if h.mtime.Nanosecond() != 0 || !fitsOctal(h.mtime.Unix(), 12) {
		pax["mtime"] = formatPAXTime(h.mtime)
	}
	if len(pax) > 0 {
		recs := encodePAXRecords(pax)
		ph := tarHeader{
			name:  paxHeaderName(h.name),
			typ:   typePAX,
			mode:  0o644,
			mtime: time.Unix(0, 0),
			size:  int64(len(recs)),
		}
		dst = ph.encodeUstar(dst, ph.name)
		dst = append(dst, recs...)
		dst = appendPadding(dst, int64(len(recs)))
	}
	return h.encodeUstar(dst, name)
}

func (h *tarHeader) encodeUstar(dst []byte, name string) []byte {
	var b [blockSize]byte
	putString(b[0:100], name)
	putOctal(b[100:108], int64(h.mode&0o7777))
	putOctal(b[108:116], int64(h.uid))
	putOctal(b[116:124], int64(h.gid))
	putOctal(b[124:136], h.size)
	putOctal(b[136:148], h.mtime.Unix())
	b[156] = h.typ
	putString(b[157:257], h.linkname)
	copy(b[257:263], "ustar\x00")
	copy(b[263:265], "00")
	if fitsUstarString(h.uname, 32) {
		putString(b[265:297], h.uname)
	}
	if fitsUstarString(h.gname, 32) {
		putString(b[297:329], h.gname)
	}
	if h.typ == typeChar || h.typ == typeBlock {
		putOctal(b[329:337], int64(h.devmajor))
		putOctal(b[337:345], int64(h.devminor))
	}
	copy(b[148:156], "        ")
	sum := 0
	for _, c := range b {
		sum += int(c)
	}
	copy(b[148:156], fmt.Sprintf("%06o\x00 ", sum))
	return append(dst, b[:]...)
}

// paxHeaderName names the extended header of an entry: deterministic and
// short, as readers that do not know PAX would extract it as a file.
func paxHeaderName(name string) string {
	dir, file := path.Split(name)
	n := path.Join(dir, "PaxHeaders", file)
	if len(n) > 99 {
		n = n[:99]
	}
	return n
}

func encodePAXRecords(recs map[string]string) []byte {
	keys := make([]string, 0, len(recs))
	for k := range recs {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var out []byte
	for _, k := range keys {
		v := recs[k]
		// "%d %s=%s\n": the length counts its own digits.
		size := len(k) + len(v) + 3
		size += len(strconv.Itoa(size))
		rec := strconv.Itoa(size) + " " + k + "=" + v + "\n"
		if len(rec) != size {
			rec = strconv.Itoa(len(rec)) + " " + k + "=" + v + "\n"
		}
		out = append(out, rec...)
	}
	return out
}

func formatPAXTime(ts time.Time) string {
	sec, nsec := ts.Unix(), int64(ts.Nanosecond())
	if nsec == 0 {
		return strconv.FormatInt(sec, 10)
	}
	sign := ""
	if sec < 0 {
		sign = "-"
		sec = -(sec + 1)
		nsec = 1e9 - nsec
	}
	return strings.TrimRight(fmt.Sprintf("%s%d.%09d", sign, sec, nsec), "0")
}

func fitsUstarString(s string, size int) bool {
	if len(s) >= size {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 || s[i] == 0 {
			return false
		}
	}
	return true
}

// fitsOctal reports whether n fits a NUL-terminated octal field of size bytes.
func fitsOctal(n int64, size int) bool {
	return n >= 0 && (size >= 12 && n < 1<<33 || size == 8 && n < 1<<21)
}

func putString(b []byte, s string) {
	if len(s) > len(b) {
		s = s[:len(b)]
	}
	copy(b, s)
}

func putOctal(b []byte, n int64) {
	if n < 0 {
		n = 0
	}
	s := strconv.FormatInt(n, 8)
	if len(s) > len(b)-1 {
		return // the PAX header carries it
	}
	s = strings.Repeat("0", len(b)-1-len(s)) + s
	copy(b, s)
	b[len(b)-1] = 0
}

func appendPadding(dst []byte, n int64) []byte {
	if r := n % blockSize; r != 0 {
		dst = append(dst, make([]byte, blockSize-r)...)
	}
	return dst
}
