package chschema

import (
	"slices"
	"strings"
	"testing"
	"testing/fstest"
)

func TestSplitStatements(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   string
		want []string
	}{
		{"two", "SELECT 1;\nSELECT 2;\n", []string{"SELECT 1", "SELECT 2"}},
		{"no trailing semicolon", "SELECT 1", []string{"SELECT 1"}},
		{"comment only dropped", "-- nothing; here\n;\n/* nor; here */;SELECT 3", []string{"SELECT 3"}},
		{"semicolon in string", "SELECT 'a;b', \"c;d\", `e;f`; SELECT 'it''s;'", []string{"SELECT 'a;b', \"c;d\", `e;f`", "SELECT 'it''s;'"}},
		{"escaped quote", `SELECT 'a\';b'; SELECT 2`, []string{`SELECT 'a\';b'`, "SELECT 2"}},
		{"comment kept inside", "CREATE TABLE t\n(\n  -- why; because\n  x UInt8\n);", []string{"CREATE TABLE t\n(\n  -- why; because\n  x UInt8\n)"}},
	} {
		got, err := SplitStatements(tc.in)
		if err != nil {
			t.Errorf("%s: %v", tc.name, err)
			continue
		}
		if !slices.Equal(got, tc.want) {
			t.Errorf("%s: got %q, want %q", tc.name, got, tc.want)
		}
	}
	for _, bad := range []string{"SELECT 'open", "SELECT 1 /* open", "SELECT `x"} {
		if _, err := SplitStatements(bad); err == nil {
			t.Errorf("%q: no error for an unterminated quote or comment", bad)
		}
	}
}

func TestParseServerVersion(t *testing.T) {
	s, err := ParseServerVersion("18.16.1")
	if err != nil || s.Major != 18 || s.Minor != 16 {
		t.Fatalf("18.16.1 → %+v, %v", s, err)
	}
	if !s.AtLeast(18, 16) || !s.AtLeast(1, 99) || s.AtLeast(18, 17) || s.AtLeast(19, 0) {
		t.Errorf("AtLeast wrong for %+v", s)
	}
	s, err = ParseServerVersion("24.3.2.23")
	if err != nil || !s.AtLeast(23, 8) {
		t.Fatalf("24.3.2.23 → %+v, %v", s, err)
	}
	for _, bad := range []string{"", "24", "x.y", "v24.3"} {
		if _, err := ParseServerVersion(bad); err == nil {
			t.Errorf("%q parsed", bad)
		}
	}
}

// The embedded migrations render for both server generations: newer-only
// clauses appear only for newer servers, and every statement names the
// database.
func TestRenderBothGenerations(t *testing.T) {
	ms, err := Migrations()
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) == 0 {
		t.Fatal("no embedded migrations")
	}
	old, _ := ParseServerVersion("18.16.1")
	cur, _ := ParseServerVersion("24.8.4.13")
	var oldAll, curAll strings.Builder
	for i, m := range ms {
		if m.Version != uint32(i+1) {
			t.Errorf("migration %s has version %d, want %d (no gaps)", m.File, m.Version, i+1)
		}
		for _, srv := range []Server{old, cur} {
			stmts, err := m.Render(srv, "vigil_x")
			if err != nil {
				t.Fatalf("%s for %s: %v", m.File, srv.Version, err)
			}
			if len(stmts) == 0 {
				t.Errorf("%s renders no statement", m.File)
			}
			for _, s := range stmts {
				if !strings.Contains(s, "`vigil_x`.") {
					t.Errorf("%s: statement does not name the database: %s", m.File, s)
				}
				// A view is re-created (DROP ... IF EXISTS) to show new
				// columns; 18.16 has no ADD COLUMN IF NOT EXISTS.
				// (A copy INSERT INTO ... SELECT into a ReplacingMergeTree
				// whose version ranks the copied rows lowest repeats
				// harmlessly: see 0007_alerts_v2.sql.)
				if !strings.Contains(s, "IF NOT EXISTS") && !strings.Contains(s, "DROP TABLE IF EXISTS") &&
					!(srv == old && strings.Contains(s, "ADD COLUMN")) &&
					!(strings.HasPrefix(strings.TrimSpace(s), "INSERT INTO") && strings.Contains(s, "SELECT")) {
					t.Errorf("%s: statement is not idempotent: %s", m.File, s)
				}
				if srv == old {
					oldAll.WriteString(s)
				} else {
					curAll.WriteString(s)
				}
			}
		}
	}
	for _, newer := range []string{"CODEC(", "non_replicated_deduplication_window", "DateTime64", "TTL ", "Map("} {
		if strings.Contains(oldAll.String(), newer) {
			t.Errorf("18.16 rendering contains %q", newer)
		}
	}
	for _, want := range []string{"CODEC(DoubleDelta, ZSTD(1))", "non_replicated_deduplication_window = 1000"} {
		if !strings.Contains(curAll.String(), want) {
			t.Errorf("24.8 rendering lacks %q", want)
		}
	}
}

func TestLoadRejectsBadFiles(t *testing.T) {
	if _, err := load(fstest.MapFS{"1_x.sql": {Data: []byte("SELECT 1")}}); err == nil || !strings.Contains(err.Error(), "1_x.sql") {
		t.Errorf("short version accepted: %v", err)
	}
	if _, err := load(fstest.MapFS{"0001_a.sql": {}, "0001_b.sql": {}}); err == nil || !strings.Contains(err.Error(), "same version") {
		t.Errorf("duplicate version accepted: %v", err)
	}
	ms, err := load(fstest.MapFS{"0002_b.sql": {}, "0001_a.sql": {}, "README.md": {}})
	if err != nil || len(ms) != 2 || ms[0].Name != "a" || ms[1].Version != 2 {
		t.Errorf("load = %+v, %v", ms, err)
	}
	if _, err := (Migration{File: "0001_x.sql", Source: "{{.Nope}}"}).Render(Server{}, "db"); err == nil {
		t.Error("unknown template field rendered")
	}
}
