// Package chsink is the ClickHouse sink stage: a Kafka consumer group over
// the samples, features, scores, alerts and dead-letter topics that writes
// every record into its ClickHouse table (schema in infra/clickhouse) in
// batches, commits Kafka offsets only after ClickHouse accepted the rows, and
// retries what may succeed later without losing or duplicating anything. It
// also opens ClickHouse connections for the other parts (Open) and applies
// the migrations (Migrate).
//
// ClickHouse is reached over its native protocol with clickhouse-go v2 (the
// driver's HTTP transport does not work with the 18.16 server that is the
// local default). See infra/clickhouse/migrations/README.md for what was
// found about that server generation.
package chsink

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"

	chschema "github.com/vigilhealth/vigil/infra/clickhouse"
	"github.com/vigilhealth/vigil/internal/config"
)

// options are the driver options for cfg. No query settings are set at
// connection level on purpose: servers as old as 18.16 only take integer
// settings they know (see the migrations README), and the server's user
// profile is the place for settings.
func options(cfg config.ClickHouse) *clickhouse.Options {
	dial := cfg.DialTimeout
	if dial <= 0 {
		dial = 5 * time.Second
	}
	return &clickhouse.Options{
		Protocol: clickhouse.Native,
		Addr:     []string{cfg.Addr},
		Auth: clickhouse.Auth{
			Database: cfg.Database,
			Username: cfg.Username,
			Password: cfg.Password,
		},
		DialTimeout:     dial,
		MaxOpenConns:    5,
		MaxIdleConns:    2,
		ConnMaxLifetime: 10 * time.Minute,
		Compression:     &clickhouse.Compression{Method: clickhouse.CompressionLZ4},
		ClientInfo: clickhouse.ClientInfo{
			Products: []struct{ Name, Version string }{{Name: "vigil"}},
		},
	}
}

// Open connects to the ClickHouse server at cfg.Addr over the native
// protocol, bound to cfg.Database with cfg's credentials, and pings it
// before returning (bounded by cfg.DialTimeout and ctx). The error says
// which address failed. The caller owns the connection (a pool safe for
// concurrent use) and closes it.
func Open(ctx context.Context, cfg config.ClickHouse) (driver.Conn, error) {
	if cfg.Addr == "" {
		return nil, errors.New("connecting to clickhouse: clickhouse.addr is empty (start the local server first or set it)")
	}
	conn, err := clickhouse.Open(options(cfg))
	if err != nil {
		return nil, fmt.Errorf("connecting to clickhouse at %s: %w", cfg.Addr, err)
	}
	pctx, cancel := context.WithTimeout(ctx, options(cfg).DialTimeout)
	defer cancel()
	if err := conn.Ping(pctx); err != nil {
		_ = conn.Close()
		return nil, fmt.Errorf("connecting to clickhouse at %s (database %q, user %q): %w", cfg.Addr, cfg.Database, cfg.Username, err)
	}
	return conn, nil
}

// Migrate connects to cfg.Addr without selecting a database (it may not
// exist yet), creates cfg.Database when missing and applies the schema
// migrations (chschema.Migrate). It blocks until done or ctx ends; it is
// idempotent.
func Migrate(ctx context.Context, cfg config.ClickHouse, log *slog.Logger) error {
	noDB := cfg
	noDB.Database = "default"
	conn, err := Open(ctx, noDB)
	if err != nil {
		return err
	}
	defer conn.Close()
	if err := chschema.Migrate(ctx, conn, cfg.Database, log); err != nil {
		return fmt.Errorf("migrating clickhouse database %s at %s: %w", cfg.Database, cfg.Addr, err)
	}
	return nil
}

// Tables lists the tables the sink writes, in a fixed order.
func Tables() []string {
	return []string{tableSamples, tableFeatures, tableScores, tableAlerts, tableDeadLetters}
}

// RowCounter returns a function that counts the rows of every sink table in
// cfg.Database (from the active parts, so before merges have removed
// duplicates; cheap). Each call opens and closes its own connection, so the
// function is safe for concurrent use and holds nothing between calls.
func RowCounter(cfg config.ClickHouse) func(ctx context.Context) (map[string]uint64, error) {
	return func(ctx context.Context) (map[string]uint64, error) {
		conn, err := Open(ctx, cfg)
		if err != nil {
			return nil, err
		}
		defer conn.Close()
		out := map[string]uint64{}
		for _, t := range Tables() {
			out[t] = 0
		}
		rows, err := conn.Query(ctx, "SELECT table, sum(rows) FROM system.parts WHERE database = ? AND active GROUP BY table", cfg.Database)
		if err != nil {
			return nil, fmt.Errorf("counting clickhouse rows: %w", err)
		}
		defer rows.Close()
		for rows.Next() {
			var table string
			var n uint64
			if err := rows.Scan(&table, &n); err != nil {
				return nil, fmt.Errorf("counting clickhouse rows: %w", err)
			}
			if _, ok := out[logicalTable(table)]; ok {
				out[logicalTable(table)] = n
			}
		}
		if err := rows.Err(); err != nil {
			return nil, fmt.Errorf("counting clickhouse rows: %w", err)
		}
		return out, nil
	}
}
