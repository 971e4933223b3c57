-- What Vigil refused, why and from where, from topic vigil.deadletter.v1, so
-- integrators can query refusals:
--   SELECT reason, count() FROM dead_letters_final GROUP BY reason.
-- id is the hex SHA-256 (first 16 bytes) of the dead-letter record, so a
-- redelivered dead letter replaces itself.
CREATE TABLE IF NOT EXISTS {{.DB}}.dead_letters
(
    id              String,
    -- Machine-readable reason (invalid_json, unknown_metric, out_of_range,
    -- sink_rejected, ...) and a sentence for a human.
    reason          LowCardinality(String),
    message         String,
    source          LowCardinality(String),
    origin          String,
    -- The offending field, as a path ("samples[3].value").
    field           String,
    tenant          LowCardinality(String),
    patient         String,
    device          String,
    message_id      String,
    content_type    LowCardinality(String),
    refused_time    DateTime,
    refused_time_ms Int64,
    -- The refused bytes, truncated to ingest.deadletter_raw_limit.
    raw             String,
    raw_size        UInt64,
    raw_truncated   UInt8
)
ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(refused_time)
ORDER BY (tenant, patient, refused_time_ms, id)
{{- if .AtLeast 21 3}}
SETTINGS non_replicated_deduplication_window = 1000
{{- end}};

CREATE VIEW IF NOT EXISTS {{.DB}}.dead_letters_final AS
SELECT * FROM {{.DB}}.dead_letters FINAL;
