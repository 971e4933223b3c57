-- Alert lifecycle events with the whole lifecycle (issue 4): the rules file
-- (name, version, sha256), the re-check outcome, what the rule read and its
-- thresholds, location and ward, the acknowledgement (who, when, the command)
-- and the suppression, escalation and state after the event.
--
-- 18.16 has no ADD COLUMN IF NOT EXISTS, so instead of altering `alerts`
-- this migration creates `alerts_v2` (which the sink writes from now on),
-- copies the rows of the old table into it, and replaces the old table by a
-- view of the same name, so that `SELECT ... FROM alerts` keeps working with
-- every new column. Each statement is idempotent, and so is the sequence
-- interrupted anywhere:
--   - the copy is ReplacingMergeTree(row_version): copied rows have version
--     0, rows written by the sink version 1, so a copy repeated after a
--     crash (or reading the view) never replaces a sink row;
--   - the old table is (re)created empty when a previous run dropped it
--     before creating the view, copied from (nothing), and dropped again.
CREATE TABLE IF NOT EXISTS {{.DB}}.alerts_v2
(
    event_id               String,
    alert_id               String,
    tenant                 LowCardinality(String),
    patient                String,
    type                   LowCardinality(String),
    rule                   LowCardinality(String),
    severity               LowCardinality(String),
    reason                 String,
    -- Who acted (acknowledged), empty for automatic transitions.
    actor                  String,
    note                   String,
    score_kind             LowCardinality(String),
    score_value            Float64,
    score_band             LowCardinality(String),
    explanation            String,
    ruleset                LowCardinality(String),
    ruleset_version        LowCardinality(String),
    ruleset_hash           String,
    event_time             DateTime,
    event_time_ms          Int64,
    emitted_time_ms        Int64,
    -- emitted_time_ms - trigger_ingest_time_ms is Vigil's own latency.
    trigger_ingest_time_ms Int64,
    tier                   UInt32,
    -- The rules file that holds the rule.
    rules_name             LowCardinality(String),
    rules_version          LowCardinality(String),
    rules_hash             String,
    -- confirmed, cleared (re-checked away), timeout (raised unconfirmed), ''.
    recheck_outcome        LowCardinality(String),
    -- score:<kind> or feature:<metric>:<stat>, the value read, thresholds.
    source                 LowCardinality(String),
    value                  Float64,
    raise_threshold        Float64,
    clear_threshold        Float64,
    raised_event_time_ms   Int64,
    -- Bed (HL7 PV1-3) and ward (its first '^' component).
    location               String,
    ward                   LowCardinality(String),
    acknowledged_by        String,
    acknowledged_time_ms   Int64,
    suppressed_until_ms    Int64,
    max_tier               UInt32,
    escalate_after_ms      Int64,
    command_id             String,
    -- open, acknowledged, resolved, rechecked_away, suppressed (after the event).
    state                  LowCardinality(String),
    -- 1 for rows the sink writes, 0 for rows copied from the first table.
    row_version            UInt8
)
ENGINE = ReplacingMergeTree(row_version)
PARTITION BY toYYYYMM(event_time)
ORDER BY (tenant, patient, event_time_ms, alert_id, event_id)
{{- if .AtLeast 21 3}}
SETTINGS non_replicated_deduplication_window = 1000
{{- end}};

-- The old table, in case a previous run dropped it and stopped before the
-- view below (then this is empty and the copy copies nothing).
CREATE TABLE IF NOT EXISTS {{.DB}}.alerts
(
    event_id               String,
    alert_id               String,
    tenant                 LowCardinality(String),
    patient                String,
    type                   LowCardinality(String),
    rule                   LowCardinality(String),
    severity               LowCardinality(String),
    reason                 String,
    actor                  String,
    note                   String,
    score_kind             LowCardinality(String),
    score_value            Float64,
    score_band             LowCardinality(String),
    explanation            String,
    ruleset                LowCardinality(String),
    ruleset_version        LowCardinality(String),
    ruleset_hash           String,
    event_time             DateTime,
    event_time_ms          Int64,
    emitted_time_ms        Int64,
    trigger_ingest_time_ms Int64,
    tier                   UInt32
)
ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(event_time)
ORDER BY (tenant, patient, event_time_ms, alert_id, event_id);

INSERT INTO {{.DB}}.alerts_v2 (event_id, alert_id, tenant, patient, type, rule, severity, reason, actor, note,
    score_kind, score_value, score_band, explanation, ruleset, ruleset_version, ruleset_hash, event_time,
    event_time_ms, emitted_time_ms, trigger_ingest_time_ms, tier, row_version)
SELECT event_id, alert_id, tenant, patient, type, rule, severity, reason, actor, note,
    score_kind, score_value, score_band, explanation, ruleset, ruleset_version, ruleset_hash, event_time,
    event_time_ms, emitted_time_ms, trigger_ingest_time_ms, tier, 0
FROM {{.DB}}.alerts;

-- The views of the old table go first (alerts_final reads it).
DROP TABLE IF EXISTS {{.DB}}.alerts_final;
DROP TABLE IF EXISTS {{.DB}}.alerts;

CREATE VIEW IF NOT EXISTS {{.DB}}.alerts AS
SELECT * FROM {{.DB}}.alerts_v2;

CREATE VIEW IF NOT EXISTS {{.DB}}.alerts_final AS
SELECT * FROM {{.DB}}.alerts_v2 FINAL;
