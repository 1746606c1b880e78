package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/esir-project/esir/cmd/internal/cli"
	"github.com/esir-project/esir/imaging"
	"github.com/esir-project/esir/progress"
	"github.com/spf13/cobra"
)

const defaultStore = "/var/lib/esir"

func newImageCmd(app *cli.App) *cobra.Command {
	var storeDir string
	cmd := &cobra.Command{
		Use:   "image",
		Short: "Build and manage file-mode system images in the image store",
		Example: `  esir image build --from /srv/rootfs --name compute --version 1.0
  esir image ls
  esir image verify compute:1.0`,
	}
	def := os.Getenv("ESIR_STORE")
	if def == "" {
		def = defaultStore
	}
	cmd.PersistentFlags().StringVar(&storeDir, "store", def, "image store directory (env ESIR_STORE)")
	open := func() (*imaging.Store, error) { return imaging.OpenStore(storeDir) }
	cmd.AddCommand(
		newImageBuildCmd(app, open),
		newImageLsCmd(app, open),
		newImageInspectCmd(app, open),
		newImageVerifyCmd(app, open),
		newImageRmCmd(app, open),
		newImageExportCmd(app, open),
		newImageImportCmd(app, open),
		newImagePushCmd(app, open),
		newImageRemoteLsCmd(app),
	)
	return cmd
}

// newImagePushCmd streams an image of the local store to a server, which
// stores and publishes it (seeding starts at once).
func newImagePushCmd(app *cli.App, open openStore) *cobra.Command {
	var r remote
	cmd := &cobra.Command{
		Use:               "push NAME[:VERSION] --server URL",
		Short:             "Upload an image of the local store to an ESIR server, which publishes it",
		Example:           "  esir image push compute:1.0 --server https://esir.example:8080",
		Args:              cobra.ExactArgs(1),
		ValidArgsFunction: completeRefs(open),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := r.client()
			if err != nil {
				return err
			}
			s, err := open()
			if err != nil {
				return err
			}
			im, err := s.Get(args[0])
			if err != nil {
				return err
			}
			bar := app.Progress("push "+im.Manifest.Name+":"+im.Manifest.Version, im.Manifest.CompressedSize, true)
			pr, pw := io.Pipe()
			go func() {
				pw.CloseWithError(s.Export(cmd.Context(), args[0], io.MultiWriter(pw, bar)))
			}()
			info, err := c.PushImage(cmd.Context(), pr)
			pr.CloseWithError(err)
			bar.Finish()
			if err != nil {
				return fmt.Errorf("push %s to %s: %w", args[0], c.Server, err)
			}
			if r.json() {
				return writeJSON(app.Stdout, info)
			}
			fmt.Fprintf(app.Stdout, "pushed %s (sha256 %s, info hash %s)\n", info.Ref, info.SHA256, info.InfoHash)
			return nil
		},
	}
	r.addFlags(cmd)
	return cmd
}

// newImageRemoteLsCmd lists the images a server publishes.
func newImageRemoteLsCmd(app *cli.App) *cobra.Command {
	var r remote
	cmd := &cobra.Command{
		Use:     "remote-ls --server URL",
		Aliases: []string{"rls"},
		Short:   "List the images an ESIR server publishes",
		Example: "  esir image remote-ls --server http://198.18.0.1:8080 -o json",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := r.client()
			if err != nil {
				return err
			}
			ims, err := c.Images(cmd.Context())
			if err != nil {
				return err
			}
			if r.json() {
				return writeJSON(app.Stdout, ims)
			}
			tw := tabwriter.NewWriter(app.Stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "REF\tMODE\tSIZE\tUNCOMPRESSED\tFILES\tKERNELS\tINFO HASH")
			for _, im := range ims {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\t%s\n", im.Ref, im.Mode, progress.Bytes(im.CompressedSize),
					progress.Bytes(im.UncompressedSize), im.FileCount, strings.Join(im.Kernels, ","), im.InfoHash)
			}
			return tw.Flush()
		},
	}
	r.addFlags(cmd)
	return cmd
}

type openStore func() (*imaging.Store, error)

func newImageBuildCmd(app *cli.App, open openStore) *cobra.Command {
	var (
		from, fromTar, excludeFile, mode string
		opts                             imaging.BuildOptions
	)
	cmd := &cobra.Command{
		Use:   "build --from DIR|--from-tar FILE --name NAME --version V",
		Short: "Build an image from a root filesystem tree or tarball",
		Long: `Build turns a root filesystem into an image: a deterministic POSIX tar archive
compressed with zstd, a manifest and a private BitTorrent metainfo. The contents
of /proc, /sys, /dev, /run and /tmp and the SSH host keys are left out and
/etc/machine-id is emptied unless --no-default-excludes is given.
--mode partition makes a raw ext4 filesystem image instead, for comparison.`,
		Example: `  esir image build --from /srv/rootfs --name compute --version 1.0
  esir image build --from-tar rootfs.tar.gz --name web --version 2 --exclude 'var/cache/apt/*'
  esir image build --from /srv/rootfs --name compute --version 1.0-ext4 --mode partition`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if (from == "") == (fromTar == "") {
				return errors.New("give exactly one of --from DIR and --from-tar FILE")
			}
			if excludeFile != "" {
				pats, err := imaging.ReadExcludeFile(excludeFile)
				if err != nil {
					return err
				}
				opts.Exclude = append(opts.Exclude, pats...)
			}
			opts.Mode = imaging.Mode(mode)
			s, err := open()
			if err != nil {
				return err
			}
			bar := app.Progress("build "+opts.Name+":"+opts.Version, 0, true)
			opts.Progress = bar.Add
			opts.Log = app.Log
			start := time.Now()
			var img *imaging.Image
			if from != "" {
				img, err = s.Build(cmd.Context(), from, opts)
			} else {
				img, err = s.BuildFromTar(cmd.Context(), fromTar, opts)
			}
			bar.Finish()
			if err != nil {
				return err
			}
			m := img.Manifest
			app.Log.Info("image built", "image", m.Ref(), "mode", m.Mode, "files", m.FileCount,
				"size", progress.Bytes(m.CompressedSize), "uncompressed", progress.Bytes(m.UncompressedSize),
				"sha256", m.SHA256, "took", time.Since(start).Round(time.Millisecond))
			fmt.Fprintln(app.Stdout, m.Ref())
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&from, "from", "", "root filesystem directory")
	f.StringVar(&fromTar, "from-tar", "", "root filesystem tarball (plain, gzip, xz, bzip2 or zstd)")
	f.StringVar(&opts.Name, "name", "", "image name")
	f.StringVar(&opts.Version, "version", "", "image version (images are immutable)")
	f.StringVar(&mode, "mode", "file", "file (tar+zstd) or partition (raw ext4)")
	f.StringVar(&opts.Arch, "arch", "", "architecture (default: read from the tree's binaries)")
	f.StringArrayVar(&opts.Exclude, "exclude", nil, "leave out paths matching this pattern (relative to the root; repeatable)")
	f.StringVar(&excludeFile, "exclude-from", "", "file of exclude patterns, one a line")
	f.BoolVar(&opts.NoDefaultExcludes, "no-default-excludes", false, "keep /proc, /sys, /dev, /run, /tmp contents, SSH host keys and machine-id")
	f.BoolVar(&opts.KeepMachineID, "keep-machine-id", false, "keep /etc/machine-id instead of emptying it")
	f.IntVar(&opts.Level, "level", 3, "zstd compression level (1-19)")
	f.Var(&byteSize{&opts.PieceLength}, "piece-size", "BitTorrent piece size, a power of two from 16KiB to 64MiB (default: from the archive's size)")
	_ = cmd.MarkFlagRequired("name")
	_ = cmd.MarkFlagRequired("version")
	_ = cmd.MarkFlagDirname("from")
	_ = cmd.MarkFlagFilename("from-tar")
	_ = cmd.RegisterFlagCompletionFunc("mode", cobra.FixedCompletions([]string{"file", "partition"}, cobra.ShellCompDirectiveNoFileComp))
	return cmd
}

func completeRefs(open openStore) cobra.CompletionFunc {
	return func(*cobra.Command, []string, string) ([]string, cobra.ShellCompDirective) {
		s, err := open()
		if err != nil {
			return nil, cobra.ShellCompDirectiveError
		}
		ms, err := s.List()
		if err != nil {
			return nil, cobra.ShellCompDirectiveError
		}
		var refs []string
		for _, m := range ms {
			refs = append(refs, m.Ref())
		}
		return refs, cobra.ShellCompDirectiveNoFileComp
	}
}

func newImageLsCmd(app *cli.App, open openStore) *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:     "ls",
		Short:   "List the images in the store",
		Example: "  esir image ls\n  esir image ls -o json",
		Args:    cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			s, err := open()
			if err != nil {
				return err
			}
			ms, err := s.List()
			if err != nil {
				return err
			}
			if output == "json" {
				if ms == nil {
					ms = []imaging.Manifest{}
				}
				return writeJSON(app.Stdout, ms)
			}
			if output != "table" {
				return fmt.Errorf("-o %q: want table or json", output)
			}
			tw := tabwriter.NewWriter(app.Stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tVERSION\tMODE\tARCH\tSIZE\tUNCOMPRESSED\tFILES\tKERNEL\tCREATED")
			for _, m := range ms {
				k := "-"
				if len(m.Kernels) > 0 {
					k = m.Kernels[len(m.Kernels)-1].Version
				}
				size := m.CompressedSize
				if m.AllocatedSize > 0 {
					size = m.AllocatedSize
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%s\t%s\n", m.Name, m.Version, m.Mode, m.Arch,
					progress.Bytes(size), progress.Bytes(m.UncompressedSize), m.FileCount, k,
					m.Created.Local().Format(time.DateTime))
			}
			return tw.Flush()
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", "table", "output format: table or json")
	return cmd
}

func newImageInspectCmd(app *cli.App, open openStore) *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:               "inspect NAME[:VERSION]",
		Short:             "Show an image's manifest",
		Example:           "  esir image inspect compute\n  esir image inspect compute:1.0 -o json",
		Args:              cobra.ExactArgs(1),
		ValidArgsFunction: completeRefs(open),
		RunE: func(_ *cobra.Command, args []string) error {
			s, err := open()
			if err != nil {
				return err
			}
			img, err := s.Get(args[0])
			if err != nil {
				return err
			}
			m := img.Manifest
			switch output {
			case "json":
				return writeJSON(app.Stdout, m)
			case "text":
			default:
				return fmt.Errorf("-o %q: want text or json", output)
			}
			w := tabwriter.NewWriter(app.Stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintf(w, "image:\t%s\n", m.Ref())
			fmt.Fprintf(w, "mode:\t%s\n", m.Mode)
			fmt.Fprintf(w, "arch:\t%s\n", m.Arch)
			fmt.Fprintf(w, "created:\t%s\n", m.Created.Format(time.RFC3339))
			fmt.Fprintf(w, "archive:\t%s\n", img.ArchivePath())
			fmt.Fprintf(w, "sha256:\t%s\n", m.SHA256)
			fmt.Fprintf(w, "size:\t%s (%d bytes)\n", progress.Bytes(m.CompressedSize), m.CompressedSize)
			if m.AllocatedSize > 0 {
				fmt.Fprintf(w, "allocated:\t%s (%d bytes)\n", progress.Bytes(m.AllocatedSize), m.AllocatedSize)
			}
			fmt.Fprintf(w, "uncompressed:\t%s (%d bytes)\n", progress.Bytes(m.UncompressedSize), m.UncompressedSize)
			fmt.Fprintf(w, "content:\t%s (%d bytes)\n", progress.Bytes(m.ContentSize), m.ContentSize)
			fmt.Fprintf(w, "entries:\t%d\n", m.FileCount)
			fmt.Fprintf(w, "torrent:\t%s\n", img.TorrentPath())
			fmt.Fprintf(w, "info hash:\t%s\n", m.InfoHash)
			fmt.Fprintf(w, "piece length:\t%s\n", progress.Bytes(m.PieceLength))
			if len(m.Kernels) == 0 {
				fmt.Fprintf(w, "kernels:\tnone\n")
			}
			for _, k := range m.Kernels {
				parts := []string{}
				for _, p := range []string{k.Vmlinuz, k.Initrd, k.ModulesDir} {
					if p != "" {
						parts = append(parts, "/"+p)
					}
				}
				fmt.Fprintf(w, "kernel:\t%s  %s\n", k.Version, strings.Join(parts, " "))
			}
			return w.Flush()
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", "text", "output format: text or json")
	return cmd
}

func newImageVerifyCmd(app *cli.App, open openStore) *cobra.Command {
	return &cobra.Command{
		Use:   "verify NAME[:VERSION]...",
		Short: "Re-hash images: archive digest, torrent pieces and archive contents",
		Example: `  esir image verify compute:1.0
  esir image verify compute web`,
		Args:              cobra.MinimumNArgs(1),
		ValidArgsFunction: completeRefs(open),
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := open()
			if err != nil {
				return err
			}
			failed := 0
			for _, ref := range args {
				img, err := s.Verify(cmd.Context(), ref)
				if err != nil {
					app.Log.Error("verify failed", "image", ref, "err", err)
					failed++
					continue
				}
				fmt.Fprintf(app.Stdout, "%s: ok\n", img.Manifest.Ref())
			}
			if failed > 0 {
				return fmt.Errorf("%d of %d images failed verification", failed, len(args))
			}
			return nil
		},
	}
}

func newImageRmCmd(app *cli.App, open openStore) *cobra.Command {
	return &cobra.Command{
		Use:               "rm NAME:VERSION...",
		Short:             "Remove images from the store",
		Example:           "  esir image rm compute:1.0",
		Args:              cobra.MinimumNArgs(1),
		ValidArgsFunction: completeRefs(open),
		RunE: func(_ *cobra.Command, args []string) error {
			s, err := open()
			if err != nil {
				return err
			}
			for _, ref := range args {
				if err := s.Remove(ref); err != nil {
					return err
				}
				fmt.Fprintf(app.Stdout, "removed %s\n", ref)
			}
			return nil
		},
	}
}

func newImageExportCmd(app *cli.App, open openStore) *cobra.Command {
	var out string
	cmd := &cobra.Command{
		Use:               "export NAME[:VERSION] --out FILE",
		Short:             "Write an image (manifest, torrent, archive) as one tar file",
		Example:           "  esir image export compute:1.0 --out compute-1.0.tar\n  esir image export compute:1.0 --out - | ssh other esir image import -",
		Args:              cobra.ExactArgs(1),
		ValidArgsFunction: completeRefs(open),
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := open()
			if err != nil {
				return err
			}
			if out == "-" {
				if f, ok := app.Stdout.(*os.File); ok && progress.IsTerminal(f) {
					return errors.New("refusing to write an image to a terminal: give --out FILE")
				}
				return s.Export(cmd.Context(), args[0], app.Stdout)
			}
			return writeAtomic(out, func(w io.Writer) error { return s.Export(cmd.Context(), args[0], w) })
		},
	}
	cmd.Flags().StringVar(&out, "out", "", "output file, or - for standard output")
	_ = cmd.MarkFlagRequired("out")
	return cmd
}

func newImageImportCmd(app *cli.App, open openStore) *cobra.Command {
	return &cobra.Command{
		Use:     "import FILE|-",
		Short:   "Verify and add an exported image to the store",
		Example: "  esir image import compute-1.0.tar",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := open()
			if err != nil {
				return err
			}
			var r io.Reader = os.Stdin
			if args[0] != "-" {
				f, err := os.Open(args[0])
				if err != nil {
					return fmt.Errorf("import image: %w", err)
				}
				defer f.Close()
				r = f
			}
			img, err := s.Import(cmd.Context(), r)
			if err != nil {
				return err
			}
			fmt.Fprintln(app.Stdout, img.Manifest.Ref())
			return nil
		},
	}
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// writeAtomic writes a file through a temporary file in the same directory
// and a rename, so a failed write leaves nothing behind.
func writeAtomic(name string, write func(io.Writer) error) error {
	dir, base := ".", name
	if i := strings.LastIndex(name, "/"); i >= 0 {
		dir, base = name[:i+1], name[i+1:]
	}
	f, err := os.CreateTemp(dir, "."+base+".tmp-*")
	if err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	defer os.Remove(f.Name())
	defer f.Close()
	if err := write(f); err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	if err := os.Rename(f.Name(), name); err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	return nil
}

// byteSize is a flag value of bytes written with an optional binary unit:
// 65536, 64K, 64KiB, 1M, 1MiB.
type byteSize struct{ v *int64 }

func (b *byteSize) String() string {
	if b.v == nil || *b.v == 0 {
		return ""
	}
	return strconv.FormatInt(*b.v, 10)
}

func (b *byteSize) Type() string { return "size" }

func (b *byteSize) Set(s string) error {
	num := strings.TrimSpace(s)
	mult := int64(1)
	for _, u := range []struct {
		suffix string
		mult   int64
	}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"K", 1 << 10}, {"M", 1 << 20}, {"G", 1 << 30}} {
		if strings.HasSuffix(num, u.suffix) {
			num, mult = strings.TrimSuffix(num, u.suffix), u.mult
			break
		}
	}
	n, err := strconv.ParseInt(num, 10, 64)
	if err != nil || n < 0 {
		return fmt.Errorf("%q: want a size such as 65536, 64KiB or 1MiB", s)
	}
	*b.v = n * mult
	return nil
}
