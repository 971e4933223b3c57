-- Alert lifecycle events (raised, rechecked, escalated, acknowledged,
-- resolved, suppressed), from topic vigil.alerts.v1. explanation holds the
-- score that drove the transition as protobuf JSON (field names as in the
-- .proto), so every alert stays explainable from the table alone:
--   visitParamExtractString(explanation, 'ruleset_hash') (any version),
--   JSONExtractString(explanation, 'ruleset_hash') (19.x and newer).
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
    tier                   UInt32
)
ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(event_time)
ORDER BY (tenant, patient, event_time_ms, alert_id, event_id)
{{- if .AtLeast 21 3}}
SETTINGS non_replicated_deduplication_window = 1000
{{- end}};

CREATE VIEW IF NOT EXISTS {{.DB}}.alerts_final AS
SELECT * FROM {{.DB}}.alerts FINAL;
