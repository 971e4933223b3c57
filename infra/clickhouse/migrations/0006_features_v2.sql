-- Features from the pane-based window engine (features/window): the window's
-- name in the window spec ("1m", "5m", "activity"; the sorting key already
-- tells windows apart by kind, size and step), the quartiles, the time from
-- the last sample to the window end, and whether the feature is derived from
-- other metrics of the window (mean_arterial_pressure where not measured,
-- pulse_pressure, shock_index: only count, mean and last are set). Rows
-- written before this migration read '' / 0 there.
--
-- One ALTER with every column: the server applies it as one change of the
-- table's metadata. Servers from 20.1 skip columns already there; 18.16
-- cannot (its grammar has no such clause), so there a run interrupted
-- between this ALTER and the migration's record fails on the next run with
-- "column already exists" and the record must be added by hand.
ALTER TABLE {{.DB}}.features
    ADD COLUMN {{if .AtLeast 20 1}}IF NOT EXISTS {{end}}window_name LowCardinality(String) DEFAULT '' AFTER kind,
    ADD COLUMN {{if .AtLeast 20 1}}IF NOT EXISTS {{end}}derived_metric UInt8 DEFAULT 0 AFTER metric,
    ADD COLUMN {{if .AtLeast 20 1}}IF NOT EXISTS {{end}}since_last_ms Int64 DEFAULT 0 AFTER last_time_ms,
    ADD COLUMN {{if .AtLeast 20 1}}IF NOT EXISTS {{end}}p25 Float64 DEFAULT 0 AFTER median,
    ADD COLUMN {{if .AtLeast 20 1}}IF NOT EXISTS {{end}}p75 Float64 DEFAULT 0 AFTER p25;

-- The view of the latest version of every window, with the new columns (a
-- view's columns are fixed when it is created).
DROP TABLE IF EXISTS {{.DB}}.features_final;
CREATE VIEW IF NOT EXISTS {{.DB}}.features_final AS
SELECT * FROM {{.DB}}.features FINAL;
