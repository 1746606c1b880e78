package modules

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sort"
)

// binIndex reads kmod's binary trie indices (modules.alias.bin), the format
// depmod writes beside the text files: a header (magic, version, root
// offset) and nodes addressed by offsets whose top bits say what the node
// holds: a prefix string, children (a range of bytes with one offset each),
// and values (priority and string). All numbers are big-endian.
type binIndex struct {
	file string
	data []byte
	root uint32
}

const (
	binMagic       = 0xB007F457
	binVersion     = 0x00020001
	binNodePrefix  = 0x80000000
	binNodeValues  = 0x40000000
	binNodeChilds  = 0x20000000
	binNodeOffMask = 0x0FFFFFFF
)

var errCorrupt = errors.New("corrupt binary index")

func openBinIndex(file string) (*binIndex, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	if len(data) < 12 || binary.BigEndian.Uint32(data) != binMagic {
		return nil, fmt.Errorf("%s: not a kmod index (bad magic)", file)
	}
	if v := binary.BigEndian.Uint32(data[4:]); v != binVersion {
		return nil, fmt.Errorf("%s: kmod index version %#x, want %#x", file, v, binVersion)
	}
	return &binIndex{file: file, data: data, root: binary.BigEndian.Uint32(data[8:])}, nil
}

type binNode struct {
	prefix      []byte // shares the index's memory
	first, last int    // child byte range; first > last when none
	childs      int    // offset of the child offset table
	nvalues     int
	values      int // offset of the first value
}

func (x *binIndex) node(off uint32) (binNode, error) {
	n := binNode{first: 1, last: 0}
	p := int(off & binNodeOffMask)
	d := x.data
	if p <= 0 || p >= len(d) {
		return n, errCorrupt
	}
	if off&binNodePrefix != 0 {
		end := p
		for end < len(d) && d[end] != 0 {
			end++
		}
		if end >= len(d) {
			return n, errCorrupt
		}
		n.prefix = d[p:end:end]
		p = end + 1
	}
	if off&binNodeChilds != 0 {
		if p+2 > len(d) {
			return n, errCorrupt
		}
		n.first, n.last = int(d[p]), int(d[p+1])
		n.childs = p + 2
		p = n.childs + 4*(n.last-n.first+1)
		if n.last < n.first || p > len(d) {
			return n, errCorrupt
		}
	}
	if off&binNodeValues != 0 {
		if p+4 > len(d) {
			return n, errCorrupt
		}
		n.nvalues = int(binary.BigEndian.Uint32(d[p:]))
		n.values = p + 4
	}
	return n, nil
}

// child returns the offset of n's child for byte c, or 0.
func (x *binIndex) child(n binNode, c byte) uint32 {
	if int(c) < n.first || int(c) > n.last {
		return 0
	}
	return binary.BigEndian.Uint32(x.data[n.childs+4*(int(c)-n.first):])
}

type binValue struct {
	prio  uint32
	value string
}

func (x *binIndex) addValues(n binNode, out *[]binValue) error {
	p := n.values
	d := x.data
	for i := 0; i < n.nvalues; i++ {
		if p+4 > len(d) {
			return errCorrupt
		}
		prio := binary.BigEndian.Uint32(d[p:])
		p += 4
		end := p
		for end < len(d) && d[end] != 0 {
			end++
		}
		if end >= len(d) {
			return errCorrupt
		}
		*out = append(*out, binValue{prio: prio, value: string(d[p:end])})
		p = end + 1
	}
	return nil
}

// searchWild returns the values of every pattern in the index that matches
// key (fnmatch), ordered by priority, as kmod's index_mm_searchwild does.
func (x *binIndex) searchWild(key string) ([]binValue, error) {
	var out []binValue
	off := x.root
	i := 0
	for off != 0 {
		n, err := x.node(off)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", x.file, err)
		}
		wild := false
		j := 0
		for ; j < len(n.prefix); j++ {
			ch := n.prefix[j]
			if ch == '*' || ch == '?' || ch == '[' {
				buf := append(make([]byte, 0, 128), n.prefix[j:]...)
				if err := x.wildAll(n, buf, key[min(i+j, len(key)):], &out); err != nil {
					return nil, err
				}
				wild = true
				break
			}
			if i+j >= len(key) || key[i+j] != ch {
				break
			}
		}
		if wild || j < len(n.prefix) {
			break
		}
		i += j
		for _, w := range []byte{'*', '?', '['} {
			if c := x.child(n, w); c != 0 {
				cn, err := x.node(c)
				if err != nil {
					return nil, fmt.Errorf("%s: %w", x.file, err)
				}
				buf := append(append(make([]byte, 0, 128), w), cn.prefix...)
				if err := x.wildAll(cn, buf, key[i:], &out); err != nil {
					return nil, err
				}
			}
		}
		if i == len(key) {
			if err := x.addValues(n, &out); err != nil {
				return nil, fmt.Errorf("%s: %w", x.file, err)
			}
			break
		}
		off = x.child(n, key[i])
		i++
	}
	sort.SliceStable(out, func(a, b int) bool { return out[a].prio < out[b].prio })
	return out, nil
}

// wildAll visits node n, whose pattern text so far (from the first
// wildcard, n's own prefix included) is pattern, and every node under it,
// keeping the values of patterns that match subkey. It appends to pattern's
// backing array and restores its length as it returns.
func (x *binIndex) wildAll(n binNode, pattern []byte, subkey string, out *[]binValue) error {
	for c := n.first; c <= n.last; c++ {
		off := x.child(n, byte(c))
		if off == 0 {
			continue
		}
		cn, err := x.node(off)
		if err != nil {
			return fmt.Errorf("%s: %w", x.file, err)
		}
		sub := append(append(pattern, byte(c)), cn.prefix...)
		if err := x.wildAll(cn, sub, subkey, out); err != nil {
			return err
		}
	}
	if n.nvalues > 0 && fnmatch(pattern, subkey) {
		if err := x.addValues(n, out); err != nil {
			return fmt.Errorf("%s: %w", x.file, err)
		}
	}
	return nil
}

// search returns the first value stored under exactly key, as kmod's
// index_mm_search does (modules.dep.bin: module name -> its modules.dep line).
func (x *binIndex) search(key string) (string, bool, error) {
	off := x.root
	i := 0
	for off != 0 {
		n, err := x.node(off)
		if err != nil {
			return "", false, fmt.Errorf("%s: %w", x.file, err)
		}
		for j := 0; j < len(n.prefix); j++ {
			if i+j >= len(key) || key[i+j] != n.prefix[j] {
				return "", false, nil
			}
		}
		i += len(n.prefix)
		if i == len(key) {
			if n.nvalues == 0 {
				return "", false, nil
			}
			var vals []binValue
			n.nvalues = 1
			if err := x.addValues(n, &vals); err != nil {
				return "", false, fmt.Errorf("%s: %w", x.file, err)
			}
			return vals[0].value, true, nil
		}
		off = x.child(n, key[i])
		i++
	}
	return "", false, nil
}
