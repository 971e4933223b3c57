package model

import (
	"cmp"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"

	"github.com/vigilhealth/vigil/internal/catalog"
)

// Registry is a model registry folder: <dir>/<name>/<version>/ holding
// manifest.yaml and model.onnx. It only reads the folder; Save writes it.
// Safe for concurrent use.
type Registry struct {
	dir string
	cat *catalog.Catalog
}

// OpenRegistry returns the registry in dir; cat checks that the inputs'
// metrics are catalogue metrics (nil uses catalog.Default()).
func OpenRegistry(dir string, cat *catalog.Catalog) *Registry {
	if cat == nil {
		cat = catalog.Default()
	}
	return &Registry{dir: dir, cat: cat}
}

// Dir returns the registry folder.
func (r *Registry) Dir() string { return r.dir }

// Versions lists the versions of a model, oldest first by manifest created
// time (ties by version); it reads every manifest. A model with no versions
// wraps ErrNoModel.
func (r *Registry) Versions(name string) ([]*Manifest, error) {
	ents, err := os.ReadDir(filepath.Join(r.dir, name))
	if errors.Is(err, fs.ErrNotExist) || (err == nil && len(ents) == 0) {
		return nil, fmt.Errorf("model %q in registry %s: %w", name, r.dir, ErrNoModel)
	}
	if err != nil {
		return nil, fmt.Errorf("listing model %q: %w", name, err)
	}
	var ms []*Manifest
	for _, e := range ents {
		if !e.IsDir() {
			continue
		}
		m, err := r.manifest(name, e.Name())
		if err != nil {
			return nil, err
		}
		ms = append(ms, m)
	}
	if len(ms) == 0 {
		return nil, fmt.Errorf("model %q in registry %s: %w", name, r.dir, ErrNoModel)
	}
	slices.SortFunc(ms, func(a, b *Manifest) int {
		return cmp.Or(a.Created.Compare(b.Created), cmp.Compare(a.Version, b.Version))
	})
	return ms, nil
}

func (r *Registry) manifest(name, version string) (*Manifest, error) {
	dir := Dir(r.dir, name, version)
	doc, err := os.ReadFile(filepath.Join(dir, ManifestFile))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("model %s version %s: no %s in %s: %w", name, version, ManifestFile, dir, ErrNoModel)
		}
		return nil, fmt.Errorf("reading model manifest: %w", err)
	}
	m, err := ParseManifest(doc)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, ManifestFile), err)
	}
	if m.Name != name || m.Version != version {
		return nil, fmt.Errorf("%s: manifest names %s version %s, but the folder is %s/%s", filepath.Join(dir, ManifestFile), m.Name, m.Version, name, version)
	}
	if err := m.CheckMetrics(r.cat); err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, ManifestFile), err)
	}
	return m, nil
}

// Load reads a model version (version "" or "latest": the newest by
// manifest created time) and returns its manifest and model.onnx bytes. It
// refuses a model.onnx whose sha256 differs from the manifest's.
func (r *Registry) Load(name, version string) (*Manifest, []byte, error) {
	var m *Manifest
	if version == "" || version == "latest" {
		ms, err := r.Versions(name)
		if err != nil {
			return nil, nil, err
		}
		m = ms[len(ms)-1]
	} else {
		var err error
		if m, err = r.manifest(name, version); err != nil {
			return nil, nil, err
		}
	}
	path := filepath.Join(Dir(r.dir, m.Name, m.Version), ModelFile)
	onnx, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, fmt.Errorf("reading model: %w", err)
	}
	if got := SHA256Hex(onnx); got != m.SHA256 {
		return nil, nil, fmt.Errorf("refusing model %s version %s: sha256 of %s is %s but the manifest says %s (the file was changed after it was registered; re-export it or restore the original)",
			m.Name, m.Version, path, got, m.SHA256)
	}
	return m, onnx, nil
}
