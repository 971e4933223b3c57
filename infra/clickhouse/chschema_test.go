package chschema

import (
	"context"
	"io/fs"
	"slices"
	"strings"
	"testing"
	"testing/fstest"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"

	"github.com/vigilhealth/vigil/internal/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// connect opens a connection to the shared test server, not bound to any
// test database (Migrate creates it).
func connect(t *testing.T) driver.Conn {
	t.Helper()
	conn, err := clickhouse.Open(&clickhouse.Options{
		Addr:        []string{testenv.ClickHouse(t)},
		Auth:        clickhouse.Auth{Database: "default", Username: "default"},
		DialTimeout: 5 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

type recorded struct {
	version   uint32
	name      string
	checksum  string
	appliedAt time.Time
}

func appliedRows(t *testing.T, conn driver.Conn, db string) []recorded {
	t.Helper()
	rows, err := conn.Query(context.Background(),
		"SELECT version, name, checksum, applied_at FROM `"+db+"`.schema_migrations ORDER BY version")
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var out []recorded
	for rows.Next() {
		var r recorded
		if err := rows.Scan(&r.version, &r.name, &r.checksum, &r.appliedAt); err != nil {
			t.Fatal(err)
		}
		out = append(out, r)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

func tablesOf(t *testing.T, conn driver.Conn, db string) map[string]string {
	t.Helper()
	rows, err := conn.Query(context.Background(), "SELECT name, engine FROM system.tables WHERE database = ?", db)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	out := map[string]string{}
	for rows.Next() {
		var name, engine string
		if err := rows.Scan(&name, &engine); err != nil {
			t.Fatal(err)
		}
		out[name] = engine
	}
	return out
}

func TestMigrateFreshThenNoOp(t *testing.T) {
	conn := connect(t)
	db := testenv.Database(t)
	ctx := context.Background()
	log := testenv.Logger(t)

	if err := Migrate(ctx, conn, db, log); err != nil {
		t.Fatalf("first migrate: %v", err)
	}
	want := map[string]string{
		"schema_migrations":       "MergeTree",
		"samples":                 "ReplacingMergeTree",
		"features":                "ReplacingMergeTree",
		"scores":                  "ReplacingMergeTree",
		"alerts":                  "View", // of alerts_v2 since 0007
		"alerts_v2":               "ReplacingMergeTree",
		"alert_episodes":          "View", // 0008: alert burden
		"alert_burden_daily":      "View",
		"alert_burden_ward_daily": "View",
		"dead_letters":            "ReplacingMergeTree",
		"samples_final":           "View",
		"features_final":          "View",
		"scores_final":            "View",
		"alerts_final":            "View",
		"dead_letters_final":      "View",
	}
	got := tablesOf(t, conn, db)
	for name, engine := range want {
		if got[name] != engine {
			t.Errorf("table %s: engine %q, want %q", name, got[name], engine)
		}
	}
	if len(got) != len(want) {
		t.Errorf("tables: %v, want exactly %v", got, want)
	}

	ms, err := Migrations()
	if err != nil {
		t.Fatal(err)
	}
	first := appliedRows(t, conn, db)
	if len(first) != len(ms) {
		t.Fatalf("schema_migrations has %d rows, want %d: %+v", len(first), len(ms), first)
	}
	for i, m := range ms {
		r := first[i]
		if r.version != m.Version || r.name != m.Name || r.checksum != m.Checksum {
			t.Errorf("recorded %+v, want version %d name %s checksum %s", r, m.Version, m.Name, m.Checksum)
		}
		if time.Since(r.appliedAt) > time.Minute || time.Since(r.appliedAt) < -time.Minute {
			t.Errorf("migration %d applied_at %s is not now", r.version, r.appliedAt)
		}
	}

	// The sorting keys start with (tenant, patient) and partitions are by
	// month, as retention and per-patient queries rely on it.
	rows, err := conn.Query(ctx, "SELECT name, sorting_key, partition_key FROM system.tables WHERE database = ? AND engine = 'ReplacingMergeTree'", db)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var name, sk, pk string
		if err := rows.Scan(&name, &sk, &pk); err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(sk, "tenant, patient") {
			t.Errorf("%s sorting key %q does not start with tenant, patient", name, sk)
		}
		if !strings.HasPrefix(pk, "toYYYYMM(") {
			t.Errorf("%s partition key %q is not by month", name, pk)
		}
	}
	rows.Close()

	// Second run: nothing applied, nothing recorded again.
	if err := Migrate(ctx, conn, db, log); err != nil {
		t.Fatalf("second migrate: %v", err)
	}
	second := appliedRows(t, conn, db)
	if len(second) != len(first) {
		t.Fatalf("second run recorded again: %d rows, want %d", len(second), len(first))
	}
	for i := range first {
		if !second[i].appliedAt.Equal(first[i].appliedAt) {
			t.Errorf("migration %d re-recorded", first[i].version)
		}
	}
}

func TestMigrateFailsOnChangedMigration(t *testing.T) {
	conn := connect(t)
	db := testenv.Database(t)
	ctx := context.Background()
	if err := Migrate(ctx, conn, db, testenv.Logger(t)); err != nil {
		t.Fatal(err)
	}
	// The same folder with 0003 edited after it was applied.
	fsys := embeddedCopy(t)
	f := fsys["0003_scores.sql"]
	f.Data = append(append([]byte{}, f.Data...), []byte("\n-- an innocent-looking edit\n")...)
	ms, err := load(fsys)
	if err != nil {
		t.Fatal(err)
	}
	err = apply(ctx, conn, db, ms, testenv.Logger(t))
	if err == nil {
		t.Fatal("migrate with an edited, already applied migration succeeded")
	}
	if !strings.Contains(err.Error(), "0003_scores.sql") || !strings.Contains(err.Error(), "changed after it was applied") {
		t.Errorf("error does not name the edited migration: %v", err)
	}
}

func TestMigrateAppliesOnlyNewMigration(t *testing.T) {
	conn := connect(t)
	db := testenv.Database(t)
	ctx := context.Background()
	if err := Migrate(ctx, conn, db, testenv.Logger(t)); err != nil {
		t.Fatal(err)
	}
	fsys := embeddedCopy(t)
	fsys["0100_probe.sql"] = &fstest.MapFile{Data: []byte(`
-- A column added the way a later migration would.
ALTER TABLE {{.DB}}.samples ADD COLUMN probe String DEFAULT 'p';
CREATE TABLE IF NOT EXISTS {{.DB}}.probe (x UInt8{{if .AtLeast 1000 0}}, never UInt8{{end}}) ENGINE = MergeTree() ORDER BY x;
`)}
	ms, err := load(fsys)
	if err != nil {
		t.Fatal(err)
	}
	if err := apply(ctx, conn, db, ms, testenv.Logger(t)); err != nil {
		t.Fatalf("applying the new migration: %v", err)
	}
	recs := appliedRows(t, conn, db)
	if last := recs[len(recs)-1]; last.version != 100 || last.name != "probe" {
		t.Errorf("last recorded migration %+v, want 100 probe", last)
	}
	if len(recs) != len(ms) {
		t.Errorf("%d migrations recorded, want %d", len(recs), len(ms))
	}
	var cols []string
	rows, err := conn.Query(ctx, "SELECT name FROM system.columns WHERE database = ? AND table = 'probe'", db)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var c string
		_ = rows.Scan(&c)
		cols = append(cols, c)
	}
	rows.Close()
	if !slices.Equal(cols, []string{"x"}) {
		t.Errorf("probe columns %v: the version condition was not applied", cols)
	}
	// And again: the ALTER (not idempotent by itself) must not run twice.
	if err := apply(ctx, conn, db, ms, testenv.Logger(t)); err != nil {
		t.Fatalf("re-applying: %v", err)
	}
}

func TestMigrateRefusesBadDatabaseName(t *testing.T) {
	conn := connect(t)
	err := Migrate(context.Background(), conn, "vigil; DROP DATABASE x", nil)
	if err == nil || !strings.Contains(err.Error(), "not a plain identifier") {
		t.Fatalf("err = %v, want a refusal of the database name", err)
	}
}

func embeddedCopy(t *testing.T) fstest.MapFS {
	t.Helper()
	out := fstest.MapFS{}
	sub, err := fs.Sub(embedded, "migrations")
	if err != nil {
		t.Fatal(err)
	}
	err = fs.WalkDir(sub, ".", func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := fs.ReadFile(sub, p)
		out[p] = &fstest.MapFile{Data: b}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}
