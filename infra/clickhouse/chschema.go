// Package chschema holds Vigil's ClickHouse schema as numbered SQL migrations
// (migrations/*.sql, embedded in the binary) and applies them in order with
// Migrate. See migrations/README.md for the file format, the template
// mechanism that adapts a migration to the server's version (the schema runs
// on Debian's ClickHouse 18.16 as well as on current releases), and the rules
// a new migration must follow.
//
// Nothing here keeps package-level state apart from the embedded files.
package chschema

import (
	"bytes"
	"context"
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"path"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"text/template"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
)

//go:embed migrations/*.sql
var embedded embed.FS

// MigrationsTable is the table, in the migrated database, that records every
// applied migration: version, name, checksum, applied_at, server_version.
const MigrationsTable = "schema_migrations"

// Migration is one numbered SQL file.
type Migration struct {
	// Version is the number the file name starts with; migrations apply in
	// increasing version order.
	Version uint32
	// Name is the rest of the file name without ".sql" ("samples" for
	// 0001_samples.sql).
	Name string
	// File is the file name.
	File string
	// Checksum is the hex SHA-256 of the file's bytes (the template source,
	// so it is the same whatever server it is rendered for).
	Checksum string
	// Source is the file's text: a Go text/template producing SQL.
	Source string
}

// Server is what a migration template can ask about the server it runs on.
type Server struct {
	// Version is the server's version string, as SELECT version() answers.
	Version string
	// Major and Minor are the first two numbers of Version.
	Major, Minor int
}

// AtLeast reports whether the server's version is major.minor or newer. In a
// migration: {{if .AtLeast 20 3}} ... {{end}}.
func (s Server) AtLeast(major, minor int) bool {
	return s.Major > major || (s.Major == major && s.Minor >= minor)
}

// ParseServerVersion parses a version string such as "18.16.1" or
// "24.3.2.23".
func ParseServerVersion(v string) (Server, error) {
	parts := strings.SplitN(strings.TrimSpace(v), ".", 3)
	if len(parts) < 2 {
		return Server{}, fmt.Errorf("parsing clickhouse version %q: want major.minor[.patch]", v)
	}
	major, err1 := strconv.Atoi(parts[0])
	minor, err2 := strconv.Atoi(parts[1])
	if err1 != nil || err2 != nil {
		return Server{}, fmt.Errorf("parsing clickhouse version %q: major and minor must be numbers", v)
	}
	return Server{Version: strings.TrimSpace(v), Major: major, Minor: minor}, nil
}

// templateData is what a migration template sees: the server (AtLeast,
// Version, Major, Minor) and DB, the quoted name of the migrated database.
type templateData struct {
	Server
	DB string
}

var fileName = regexp.MustCompile(`^([0-9]{4,})_([a-z0-9_]+)\.sql$`)

var dbName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// Migrations returns the embedded migrations in version order.
func Migrations() ([]Migration, error) {
	sub, err := fs.Sub(embedded, "migrations")
	if err != nil {
		return nil, fmt.Errorf("opening embedded migrations: %w", err)
	}
	return load(sub)
}

// load reads every *.sql file at the root of fsys. A file that does not match
// NNNN_name.sql, or two files with the same version, is an error naming it.
func load(fsys fs.FS) ([]Migration, error) {
	entries, err := fs.ReadDir(fsys, ".")
	if err != nil {
		return nil, fmt.Errorf("listing migrations: %w", err)
	}
	var out []Migration
	seen := map[uint32]string{}
	for _, e := range entries {
		if e.IsDir() || path.Ext(e.Name()) != ".sql" {
			continue
		}
		m := fileName.FindStringSubmatch(e.Name())
		if m == nil {
			return nil, fmt.Errorf("migration file %s: name must be NNNN_lower_snake_name.sql", e.Name())
		}
		v, err := strconv.ParseUint(m[1], 10, 32)
		if err != nil || v == 0 {
			return nil, fmt.Errorf("migration file %s: version must be a number from 1", e.Name())
		}
		if other, dup := seen[uint32(v)]; dup {
			return nil, fmt.Errorf("migration files %s and %s have the same version %d", other, e.Name(), v)
		}
		seen[uint32(v)] = e.Name()
		b, err := fs.ReadFile(fsys, e.Name())
		if err != nil {
			return nil, fmt.Errorf("reading migration %s: %w", e.Name(), err)
		}
		sum := sha256.Sum256(b)
		out = append(out, Migration{
			Version:  uint32(v),
			Name:     m[2],
			File:     e.Name(),
			Checksum: hex.EncodeToString(sum[:]),
			Source:   string(b),
		})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Version < out[j].Version })
	return out, nil
}

// Render executes m's template for server and database and splits the result
// into statements (on ';' outside quotes and comments; statements that hold
// nothing but comments are dropped).
func (m Migration) Render(server Server, database string) ([]string, error) {
	tpl, err := template.New(m.File).Option("missingkey=error").Parse(m.Source)
	if err != nil {
		return nil, fmt.Errorf("parsing migration %s: %w", m.File, err)
	}
	var buf bytes.Buffer
	if err := tpl.Execute(&buf, templateData{Server: server, DB: "`" + database + "`"}); err != nil {
		return nil, fmt.Errorf("rendering migration %s: %w", m.File, err)
	}
	stmts, err := SplitStatements(buf.String())
	if err != nil {
		return nil, fmt.Errorf("migration %s: %w", m.File, err)
	}
	return stmts, nil
}

// Migrate creates database if it is missing and applies, in order, every
// embedded migration not yet recorded in its schema_migrations table,
// recording each one after all its statements succeeded.
//
// conn must not be bound to database (which may not exist yet); the
// migrations name every table with the database. Migrate is idempotent: a
// second run applies nothing. A migration recorded with a checksum that
// differs from the file's (the file was edited after it was applied) is an
// error naming it; edit the schema with a new migration instead. ClickHouse
// DDL is not transactional, so every statement of a migration must be
// idempotent itself (IF NOT EXISTS): a migration interrupted half-way is then
// simply applied again. Two Migrate calls racing on one database both succeed
// (the table records the version twice, which Migrate tolerates).
//
// Migrate blocks until done or ctx ends.
func Migrate(ctx context.Context, conn driver.Conn, database string, log *slog.Logger) error {
	ms, err := Migrations()
	if err != nil {
		return err
	}
	return apply(ctx, conn, database, ms, log)
}

// applied is a row of schema_migrations.
type applied struct {
	Version  uint32
	Name     string
	Checksum string
}

func apply(ctx context.Context, conn driver.Conn, database string, ms []Migration, log *slog.Logger) error {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if !dbName.MatchString(database) {
		return fmt.Errorf("migrating clickhouse: database name %q is not a plain identifier (letters, digits, '_')", database)
	}
	var version string
	if err := conn.QueryRow(ctx, "SELECT version()").Scan(&version); err != nil {
		return fmt.Errorf("asking clickhouse for its version: %w", err)
	}
	server, err := ParseServerVersion(version)
	if err != nil {
		return err
	}
	dctx, err := ddlContext(ctx, conn)
	if err != nil {
		return err
	}
	q := "`" + database + "`"
	if err := conn.Exec(dctx, "CREATE DATABASE IF NOT EXISTS "+q); err != nil {
		return fmt.Errorf("creating database %s: %w", database, err)
	}
	if err := conn.Exec(dctx, `CREATE TABLE IF NOT EXISTS `+q+`.`+MigrationsTable+` (
    version        UInt32,
    name           String,
    checksum       String,
    applied_at     DateTime,
    server_version String
) ENGINE = MergeTree() ORDER BY version`); err != nil {
		return fmt.Errorf("creating %s.%s: %w", database, MigrationsTable, err)
	}
	done, err := readApplied(ctx, conn, q)
	if err != nil {
		return err
	}
	known := map[uint32]bool{}
	for _, m := range ms {
		known[m.Version] = true
	}
	for v, a := range done {
		if !known[v] {
			log.Warn("database has a migration this binary does not know (migrated by a newer vigil?)",
				"database", database, "version", v, "name", a.Name)
		}
	}
	var n int
	for _, m := range ms {
		if a, ok := done[m.Version]; ok {
			if a.Checksum != m.Checksum {
				return fmt.Errorf("migration %s was changed after it was applied to database %s (recorded checksum %s, file has %s): add a new migration instead of editing an applied one",
					m.File, database, a.Checksum, m.Checksum)
			}
			continue
		}
		stmts, err := m.Render(server, database)
		if err != nil {
			return err
		}
		start := time.Now()
		for i, s := range stmts {
			if err := conn.Exec(dctx, s); err != nil {
				return fmt.Errorf("applying migration %s, statement %d of %d: %w", m.File, i+1, len(stmts), err)
			}
		}
		if err := record(ctx, conn, q, m, server); err != nil {
			return err
		}
		n++
		log.Info("applied clickhouse migration", "database", database, "migration", m.File,
			"statements", len(stmts), "server_version", server.Version, "took", time.Since(start).Round(time.Millisecond))
	}
	if n == 0 {
		log.Debug("clickhouse schema up to date", "database", database, "migrations", len(ms))
	}
	return nil
}

// ddlContext returns ctx carrying the query settings DDL needs on this
// server: on 18.x, LowCardinality columns need
// allow_experimental_low_cardinality_type=1 when the user's profile does not
// set it. Only integer settings may be sent to servers that old (their
// protocol predates settings serialized as strings), which this one is.
func ddlContext(ctx context.Context, conn driver.Conn) (context.Context, error) {
	rows, err := conn.Query(ctx, "SELECT value FROM system.settings WHERE name = 'allow_experimental_low_cardinality_type'")
	if err != nil {
		return nil, fmt.Errorf("reading clickhouse settings: %w", err)
	}
	defer rows.Close()
	var value string
	found := false
	for rows.Next() {
		if err := rows.Scan(&value); err != nil {
			return nil, fmt.Errorf("reading clickhouse settings: %w", err)
		}
		found = true
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("reading clickhouse settings: %w", err)
	}
	if found && value == "0" {
		return clickhouse.Context(ctx, clickhouse.WithSettings(clickhouse.Settings{
			"allow_experimental_low_cardinality_type": 1,
		})), nil
	}
	return ctx, nil
}

func readApplied(ctx context.Context, conn driver.Conn, q string) (map[uint32]applied, error) {
	rows, err := conn.Query(ctx, "SELECT version, name, checksum FROM "+q+"."+MigrationsTable+" ORDER BY version")
	if err != nil {
		return nil, fmt.Errorf("reading applied migrations: %w", err)
	}
	defer rows.Close()
	out := map[uint32]applied{}
	for rows.Next() {
		var a applied
		if err := rows.Scan(&a.Version, &a.Name, &a.Checksum); err != nil {
			return nil, fmt.Errorf("reading applied migrations: %w", err)
		}
		if prev, ok := out[a.Version]; ok && prev.Checksum != a.Checksum {
			return nil, fmt.Errorf("%s records version %d twice with different checksums (%s and %s)", MigrationsTable, a.Version, prev.Checksum, a.Checksum)
		}
		out[a.Version] = a
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("reading applied migrations: %w", err)
	}
	return out, nil
}

func record(ctx context.Context, conn driver.Conn, q string, m Migration, server Server) error {
	b, err := conn.PrepareBatch(ctx, "INSERT INTO "+q+"."+MigrationsTable+" (version, name, checksum, applied_at, server_version)")
	if err != nil {
		return fmt.Errorf("recording migration %s: %w", m.File, err)
	}
	if err := b.Append(m.Version, m.Name, m.Checksum, time.Now().UTC(), server.Version); err != nil {
		_ = b.Abort()
		return fmt.Errorf("recording migration %s: %w", m.File, err)
	}
	if err := b.Send(); err != nil {
		return fmt.Errorf("recording migration %s: %w", m.File, err)
	}
	return nil
}

// SplitStatements splits SQL text into statements on ';' outside string
// literals, quoted identifiers and comments. Statements that contain only
// white space and comments are dropped; the others are returned trimmed,
// without the ';'. An unterminated quote or block comment is an error.
func SplitStatements(sql string) ([]string, error) {
	var (
		out     []string
		start   int
		content bool // the current statement has something besides comments
	)
	flush := func(end int) {
		if content {
			out = append(out, strings.TrimSpace(sql[start:end]))
		}
		start, content = end+1, false
	}
	for i := 0; i < len(sql); i++ {
		c := sql[i]
		switch {
		case c == '-' && i+1 < len(sql) && sql[i+1] == '-':
			for i < len(sql) && sql[i] != '\n' {
				i++
			}
		case c == '/' && i+1 < len(sql) && sql[i+1] == '*':
			end := strings.Index(sql[i+2:], "*/")
			if end < 0 {
				return nil, errors.New("unterminated /* comment")
			}
			i += end + 3
		case c == '\'' || c == '"' || c == '`':
			j := i + 1
			for ; j < len(sql); j++ {
				if sql[j] == '\\' {
					j++
					continue
				}
				if sql[j] == c {
					break
				}
			}
			if j >= len(sql) {
				return nil, fmt.Errorf("unterminated %c quote starting at byte %d", c, i)
			}
			i, content = j, true
		case c == ';':
			flush(i)
		case c == ' ' || c == '\t' || c == '\n' || c == '\r':
		default:
			content = true
		}
	}
	flush(len(sql))
	return out, nil
}
