// Package imaging builds, stores, verifies and extracts ESIR's file-mode
// system images.
//
// A file-mode image is the files of a root filesystem as a deterministic POSIX
// tar archive (PAX headers) compressed with zstd, next to a JSON manifest and
// a private BitTorrent metainfo for distribution. Standard tools (GNU tar
// --zstd, bsdtar) list and extract the archive; Extract is ESIR's own
// extractor, which refuses entries that would land outside the target root.
//
// The store keeps images immutable and versioned under
// <dir>/images/<name>/<version>/ with manifest.json, the archive
// (image.tar.zst, or image.ext4 in partition mode) and image.torrent. Every
// write goes to a scratch directory first and appears in the store by one
// rename, so an interrupted build leaves nothing behind.
package imaging

import (
	"encoding/json"
	"fmt"
	"os"
	"regexp"
	"strings"
	"time"
)

// Mode is how an image stores its root filesystem.
type Mode string

const (
	// ModeFile stores the files as a tar+zstd archive (ESIR's format).
	ModeFile Mode = "file"
	// ModePartition stores a raw ext4 filesystem image, for comparison.
	ModePartition Mode = "partition"
)

// File names inside one image's directory in the store.
const (
	ManifestFile        = "manifest.json"
	ArchiveFile         = "image.tar.zst"
	PartitionFile       = "image.ext4"
	TorrentFile         = "image.torrent"
	manifestSchemaLabel = "esir-image/1"
)

// Kernel describes one kernel found in an image. Paths are relative to the
// image's root, as stored in the archive (Debian 12's modules live under
// usr/lib/modules because /lib is a symlink there).
type Kernel struct {
	Version    string `json:"version"`
	Vmlinuz    string `json:"vmlinuz,omitempty"`
	Initrd     string `json:"initrd,omitempty"`
	ModulesDir string `json:"modules_dir,omitempty"`
}

// Manifest describes one image; it is stored as manifest.json beside the
// archive.
type Manifest struct {
	Schema           string    `json:"schema"`
	Name             string    `json:"name"`
	Version          string    `json:"version"`
	Arch             string    `json:"arch"`
	Mode             Mode      `json:"mode"`
	Archive          string    `json:"archive"`
	SHA256           string    `json:"sha256"`
	CompressedSize   int64     `json:"compressed_size"`
	AllocatedSize    int64     `json:"allocated_size,omitempty"`
	UncompressedSize int64     `json:"uncompressed_size"`
	ContentSize      int64     `json:"content_size"`
	FileCount        int64     `json:"file_count"`
	Kernels          []Kernel  `json:"kernels"`
	Created          time.Time `json:"created"`
	PieceLength      int64     `json:"piece_length"`
	InfoHash         string    `json:"info_hash"`
	Torrent          string    `json:"torrent"`
}

// Ref returns the manifest's NAME:VERSION.
func (m *Manifest) Ref() string { return m.Name + ":" + m.Version }

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$`)

// ValidName reports an error when s cannot be an image name or version (it
// becomes a directory name in the store).
func ValidName(what, s string) error {
	if !nameRE.MatchString(s) || s == "." || s == ".." {
		return fmt.Errorf("image %s %q: want 1-128 characters from A-Z a-z 0-9 . _ + - starting with a letter or digit", what, s)
	}
	return nil
}

// ParseRef splits NAME[:VERSION]; version is empty when omitted.
func ParseRef(ref string) (name, version string, err error) {
	name, version, _ = strings.Cut(ref, ":")
	if err := ValidName("name", name); err != nil {
		return "", "", fmt.Errorf("image reference %q: %w", ref, err)
	}
	if version != "" {
		if err := ValidName("version", version); err != nil {
			return "", "", fmt.Errorf("image reference %q: %w", ref, err)
		}
	}
	return name, version, nil
}

// ReadManifest reads and checks a manifest file.
func ReadManifest(path string) (*Manifest, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read manifest: %w", err)
	}
	var m Manifest
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("parse manifest %s: %w", path, err)
	}
	if err := m.check(); err != nil {
		return nil, fmt.Errorf("manifest %s: %w", path, err)
	}
	return &m, nil
}

func (m *Manifest) check() error {
	if m.Schema != manifestSchemaLabel {
		return fmt.Errorf("schema %q, want %q", m.Schema, manifestSchemaLabel)
	}
	if err := ValidName("name", m.Name); err != nil {
		return err
	}
	if err := ValidName("version", m.Version); err != nil {
		return err
	}
	switch {
	case m.Mode == ModeFile && m.Archive != ArchiveFile, m.Mode == ModePartition && m.Archive != PartitionFile:
		return fmt.Errorf("archive %q does not fit mode %q", m.Archive, m.Mode)
	case m.Mode != ModeFile && m.Mode != ModePartition:
		return fmt.Errorf("unknown mode %q", m.Mode)
	case m.Torrent != TorrentFile:
		return fmt.Errorf("torrent %q, want %q", m.Torrent, TorrentFile)
	case len(m.SHA256) != 64:
		return fmt.Errorf("sha256 %q is not a hex SHA-256 digest", m.SHA256)
	case len(m.InfoHash) != 40:
		return fmt.Errorf("info_hash %q is not a hex SHA-1 digest", m.InfoHash)
	}
	return nil
}

// compareVersions orders versions naturally: digit runs compare as numbers,
// so 1.10 sorts after 1.9.
func compareVersions(a, b string) int {
	for a != "" && b != "" {
		da, db := digitPrefix(a), digitPrefix(b)
		if da > 0 && db > 0 {
			na, nb := strings.TrimLeft(a[:da], "0"), strings.TrimLeft(b[:db], "0")
			if len(na) != len(nb) {
				return cmpInt(len(na), len(nb))
			}
			if na != nb {
				return strings.Compare(na, nb)
			}
			a, b = a[da:], b[db:]
			continue
		}
		if a[0] != b[0] {
			return cmpInt(int(a[0]), int(b[0]))
		}
		a, b = a[1:], b[1:]
	}
	return cmpInt(len(a), len(b))
}

func digitPrefix(s string) int {
	i := 0
	for i < len(s) && s[i] >= '0' && s[i] <= '9' {
		i++
	}
	return i
}

func cmpInt(a, b int) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}
