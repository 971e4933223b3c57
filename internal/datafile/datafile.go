// Package datafile loads the versioned data files Vigil's behaviour is made
// of (scoring tables, window specs): a document embedded in the binary or a
// file a site points a setting at, decoded strictly as YAML (unknown keys,
// a second document or an empty one fail) and identified by the sha256 of
// its exact bytes, which every output made with it names.
//
// It holds no state; every function is safe for concurrent use.
package datafile

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"

	"gopkg.in/yaml.v3"
)

// File is the bytes of a data file and their sha256.
type File struct {
	// Path is the file read, empty for the embedded document.
	Path string
	// Bytes is the document; the File owns it (callers must not modify it).
	Bytes []byte
	// Hash is the sha256 of Bytes, lowercase hex.
	Hash string
}

// Read returns the file at path, or embedded (not copied) when path is
// empty. It blocks on the file system read.
func Read(path string, embedded []byte) (File, error) {
	if path == "" {
		return File{Bytes: embedded, Hash: Hash(embedded)}, nil
	}
	doc, err := os.ReadFile(path)
	if err != nil {
		return File{}, fmt.Errorf("reading data file: %w", err)
	}
	return File{Path: path, Bytes: doc, Hash: Hash(doc)}, nil
}

// Hash is the sha256 of doc in lowercase hex.
func Hash(doc []byte) string {
	sum := sha256.Sum256(doc)
	return hex.EncodeToString(sum[:])
}

// Decode decodes doc into v strictly: a key v has no field for, an empty
// document or more than one document is an error.
func Decode(doc []byte, v any) error {
	dec := yaml.NewDecoder(bytes.NewReader(doc))
	dec.KnownFields(true)
	if err := dec.Decode(v); err != nil {
		if errors.Is(err, io.EOF) {
			return errors.New("decoding YAML: the document is empty")
		}
		return fmt.Errorf("decoding YAML: %w", err)
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		if err != nil {
			return fmt.Errorf("decoding YAML: after the first document: %w", err)
		}
		return errors.New("decoding YAML: more than one document")
	}
	return nil
}

// Load reads the file at path (or embedded when path is empty) and decodes
// it strictly into v. Errors name the path.
func Load(path string, embedded []byte, v any) (File, error) {
	f, err := Read(path, embedded)
	if err != nil {
		return File{}, err
	}
	if err := Decode(f.Bytes, v); err != nil {
		if path != "" {
			return File{}, fmt.Errorf("%s: %w", path, err)
		}
		return File{}, err
	}
	return f, nil
}
