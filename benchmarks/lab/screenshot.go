package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/esir-project/esir/server/api"
)

// chromium is Debian's browser binary (package chromium).
const chromium = "/usr/bin/chromium"

// screenshot signs in to the lab's web console with the admin API token and
// saves a picture of the rollout's page, as a person watching it would see it.
func screenshot(ctx context.Context, consoleURL, token string, rollout int64, out string) error {
	if _, err := os.Stat(chromium); err != nil {
		return fmt.Errorf("screenshot: %s: %w (Debian package chromium)", chromium, err)
	}
	ctx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()
	profile, err := os.MkdirTemp("", "esir-lab-chromium-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(profile)
	actx, acancel := chromedp.NewExecAllocator(ctx, chromedp.ExecPath(chromium), chromedp.Headless, chromedp.NoSandbox,
		chromedp.DisableGPU, chromedp.NoFirstRun, chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true), chromedp.Flag("disable-sync", true),
		chromedp.UserDataDir(profile), chromedp.WindowSize(1280, 900))
	defer acancel()
	bctx, bcancel := chromedp.NewContext(actx)
	defer bcancel()
	page := fmt.Sprintf("%s/ui/rollouts/%d", consoleURL, rollout)
	var png []byte
	err = chromedp.Run(bctx,
		chromedp.Navigate(page),
		chromedp.WaitVisible("#login-form"),
		chromedp.Click(`input[name="method"][value="token"]`),
		chromedp.SendKeys("#token", token),
		chromedp.Click("#signin"),
		chromedp.WaitNotPresent("#login-form"),
		chromedp.Sleep(2*time.Second), // a few live updates
		chromedp.FullScreenshot(&png, 100),
	)
	if err != nil {
		return fmt.Errorf("screenshot of %s: %w", page, err)
	}
	if err := os.WriteFile(out, png, 0o644); err != nil {
		return fmt.Errorf("screenshot: %w", err)
	}
	return nil
}

// takeShot pictures the newest rollout's page of the lab's console.
func takeShot(ctx context.Context, consoleURL string, token func() (string, error),
	rollouts func(context.Context) ([]api.RolloutView, error), out string) error {
	tok, err := token()
	if err != nil {
		return err
	}
	rs, err := rollouts(ctx)
	if err != nil {
		return fmt.Errorf("screenshot: listing rollouts: %w", err)
	}
	var id int64
	for _, r := range rs {
		id = max(id, r.ID)
	}
	if id == 0 {
		return errors.New("screenshot: the lab has no rollout")
	}
	return screenshot(ctx, consoleURL, tok, id, out)
}
