// Package cli holds what ESIR's command-line programs share: the global
// logging flags and the App each command receives.
package cli

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"

	"github.com/esir-project/esir/progress"
	"github.com/spf13/cobra"
)

// App is what every command receives from main: where to write, and the
// logger configured from the global flags.
type App struct {
	Stdout io.Writer
	Stderr io.Writer
	Log    *slog.Logger

	logFormat string
	logLevel  string
}

// NewApp returns an App writing to the process's standard streams.
func NewApp() *App {
	return &App{Stdout: os.Stdout, Stderr: os.Stderr, Log: slog.New(slog.NewTextHandler(os.Stderr, nil))}
}

// AddLogFlags registers --log-format and --log-level on root and configures
// the App's logger before any command runs.
func (a *App) AddLogFlags(root *cobra.Command) {
	root.PersistentFlags().StringVar(&a.logFormat, "log-format", "text", "log format: text or json")
	root.PersistentFlags().StringVar(&a.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	prev := root.PersistentPreRunE
	root.PersistentPreRunE = func(cmd *cobra.Command, args []string) error {
		if err := a.setupLog(); err != nil {
			return err
		}
		if prev != nil {
			return prev(cmd, args)
		}
		return nil
	}
}

func (a *App) setupLog() error {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(a.logLevel)); err != nil {
		return fmt.Errorf("--log-level %q: want debug, info, warn or error", a.logLevel)
	}
	opts := &slog.HandlerOptions{Level: lvl}
	switch strings.ToLower(a.logFormat) {
	case "auto", "text", "":
		a.Log = slog.New(slog.NewTextHandler(a.Stderr, opts))
	case "json":
		a.Log = slog.New(slog.NewJSONHandler(a.Stderr, opts))
	default:
		return fmt.Errorf("--log-format %q: want text or json", a.logFormat)
	}
	slog.SetDefault(a.Log)
	return nil
}

// Progress returns a progress bar on the App's stderr.
func (a *App) Progress(label string, total int64, bytes bool) *progress.Bar {
	return progress.New(a.Stderr, label, total, bytes)
}
