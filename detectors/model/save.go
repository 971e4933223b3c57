package model

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// File names inside a model version folder.
const (
	ManifestFile = "manifest.yaml"
	ModelFile    = "model.onnx"
)

// Dir is the folder of a model version in a registry:
// <registry>/<name>/<version>.
func Dir(registryDir, name, version string) string {
	return filepath.Join(registryDir, name, version)
}

// SHA256Hex returns the lower-case hex sha256 of b.
func SHA256Hex(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// Save writes a model version to <registryDir>/<name>/<version>/: it sets
// m.SHA256 from onnx, validates m, and writes model.onnx then
// manifest.yaml (each to a temporary file renamed into place, so a reader
// never sees a half-written file). An existing version folder is refused
// (versions are immutable) unless it holds exactly the same model bytes.
// It returns the version folder.
func Save(registryDir string, m *Manifest, onnx []byte) (string, error) {
	if len(onnx) == 0 {
		return "", errors.New("saving model: empty model.onnx")
	}
	m.SHA256 = SHA256Hex(onnx)
	if err := m.Validate(); err != nil {
		return "", fmt.Errorf("saving model: %w", err)
	}
	doc, err := m.Marshal()
	if err != nil {
		return "", err
	}
	dir := Dir(registryDir, m.Name, m.Version)
	if old, err := os.ReadFile(filepath.Join(dir, ModelFile)); err == nil && SHA256Hex(old) != m.SHA256 {
		return "", fmt.Errorf("saving model %s version %s: %s already holds a different model.onnx (versions are immutable; pick a new version)", m.Name, m.Version, dir)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("saving model: %w", err)
	}
	if err := writeAtomic(filepath.Join(dir, ModelFile), onnx); err != nil {
		return "", err
	}
	if err := writeAtomic(filepath.Join(dir, ManifestFile), doc); err != nil {
		return "", err
	}
	return dir, nil
}

func writeAtomic(path string, b []byte) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("saving model: %w", err)
	}
	_, werr := f.Write(b)
	serr := f.Sync()
	cerr := f.Close()
	if err := errors.Join(werr, serr, cerr); err != nil {
		os.Remove(f.Name())
		return fmt.Errorf("saving model: writing %s: %w", path, err)
	}
	if err := os.Rename(f.Name(), path); err != nil {
		os.Remove(f.Name())
		return fmt.Errorf("saving model: %w", err)
	}
	return nil
}
