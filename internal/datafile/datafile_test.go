package datafile

import (
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

type doc struct {
	Name  string `yaml:"name"`
	Count int    `yaml:"count"`
}

func TestLoadEmbeddedAndFile(t *testing.T) {
	emb := []byte("name: embedded\ncount: 1\n")
	var d doc
	f, err := Load("", emb, &d)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(emb)
	if d.Name != "embedded" || d.Count != 1 || f.Hash != hex.EncodeToString(sum[:]) || f.Path != "" {
		t.Errorf("embedded: %+v %+v", d, f)
	}
	path := filepath.Join(t.TempDir(), "site.yaml")
	site := []byte("name: site\ncount: 2\n")
	if err := os.WriteFile(path, site, 0o600); err != nil {
		t.Fatal(err)
	}
	d = doc{}
	f, err = Load(path, emb, &d)
	if err != nil {
		t.Fatal(err)
	}
	sum = sha256.Sum256(site)
	if d.Name != "site" || f.Hash != hex.EncodeToString(sum[:]) || f.Path != path || string(f.Bytes) != string(site) {
		t.Errorf("file: %+v %+v", d, f)
	}
	if _, err := Load(filepath.Join(t.TempDir(), "missing.yaml"), emb, &d); err == nil {
		t.Error("a missing file loaded")
	}
}

func TestDecodeIsStrict(t *testing.T) {
	for _, c := range []struct{ doc, want string }{
		{"name: x\ncont: 1\n", "cont"},
		{"", "empty"},
		{"# only a comment\n", "empty"},
		{"name: x\n---\nname: y\n", "more than one document"},
		{"name: [x\n", "decoding YAML"},
		{"count: many\n", "decoding YAML"},
	} {
		var d doc
		err := Decode([]byte(c.doc), &d)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%q: got %v, want an error containing %q", c.doc, err, c.want)
		}
	}
	path := filepath.Join(t.TempDir(), "bad.yaml")
	if err := os.WriteFile(path, []byte("nme: x\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	var d doc
	if _, err := Load(path, nil, &d); err == nil || !strings.Contains(err.Error(), path) {
		t.Errorf("error does not name the file: %v", err)
	}
}
