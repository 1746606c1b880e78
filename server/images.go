package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"

	"github.com/esir-project/esir/imaging"
	"github.com/esir-project/esir/server/agentapi"
	"github.com/esir-project/esir/server/api"
	"github.com/esir-project/esir/server/store"
)

// images adapts the imaging store to the API and the scheduler. Its URLs
// follow the swarm package's routes (mounted on the same listener).
type images struct {
	st *imaging.Store
	// published is called after a push to seed the new image.
	published func()
}

// Push implements api.Images.
func (im images) Push(ctx context.Context, r io.Reader) (api.ImageInfo, error) {
	img, err := im.st.Import(ctx, r)
	if errors.Is(err, imaging.ErrExists) {
		return api.ImageInfo{}, fmt.Errorf("push: %w: %v", api.ErrImageExists, err)
	}
	if err != nil {
		return api.ImageInfo{}, fmt.Errorf("push image: %w", err)
	}
	if im.published != nil {
		im.published()
	}
	return info(img.Manifest), nil
}

func (im images) get(ref string) (*imaging.Image, error) {
	img, err := im.st.Get(ref)
	if errors.Is(err, imaging.ErrNotFound) {
		return nil, fmt.Errorf("image %s: %w", ref, store.ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", ref, err)
	}
	return img, nil
}

func info(m imaging.Manifest) api.ImageInfo {
	i := api.ImageInfo{Ref: m.Ref(), Name: m.Name, Version: m.Version, Arch: m.Arch, Mode: string(m.Mode), SHA256: m.SHA256,
		CompressedSize: m.CompressedSize, UncompressedSize: m.UncompressedSize, FileCount: m.FileCount, InfoHash: m.InfoHash, Created: m.Created}
	for _, k := range m.Kernels {
		i.Kernels = append(i.Kernels, k.Version)
	}
	return i
}

// Canonical implements rollout.Images.
func (im images) Canonical(_ context.Context, ref string) (string, error) {
	img, err := im.get(ref)
	if err != nil {
		return "", err
	}
	return img.Manifest.Ref(), nil
}

// List implements api.Images.
func (im images) List(context.Context) ([]api.ImageInfo, error) {
	ms, err := im.st.List()
	if err != nil {
		return nil, fmt.Errorf("list images: %w", err)
	}
	out := make([]api.ImageInfo, 0, len(ms))
	for _, m := range ms {
		out = append(out, info(m))
	}
	return out, nil
}

// Info implements api.Images.
func (im images) Info(_ context.Context, ref string) (api.ImageInfo, error) {
	img, err := im.get(ref)
	if err != nil {
		return api.ImageInfo{}, err
	}
	return info(img.Manifest), nil
}

// Assign implements api.Images.
func (im images) Assign(_ context.Context, ref, base string) (agentapi.Image, error) {
	img, err := im.get(ref)
	if err != nil {
		return agentapi.Image{}, err
	}
	m := img.Manifest
	return agentapi.Image{
		Ref: m.Ref(), Name: m.Name, Version: m.Version, Mode: string(m.Mode), SHA256: m.SHA256,
		InfoHash: m.InfoHash, Size: m.CompressedSize,
		TorrentURL: base + "/swarm/images/" + url.PathEscape(m.Ref()) + "/torrent",
		WebSeedURL: base + "/swarm/webseed/" + m.InfoHash + "/" + url.PathEscape(m.Archive),
		Tracker:    base + "/swarm/announce",
	}, nil
}
