-- Vital-sign samples: one row per measurement, from topic vigil.samples.v1.
-- A sample's identity is (tenant, patient, metric, event_time_ms, device,
-- channel, sequence): the sink may insert a row again after a retry or a
-- crash, and ReplacingMergeTree keeps one row per identity (exactly once with
-- FINAL, or through the samples_final view, at once; in the table itself once
-- background merges have run).
CREATE TABLE IF NOT EXISTS {{.DB}}.samples
(
    tenant         LowCardinality(String),
    patient        String,
    device         String,
    metric         LowCardinality(String),
    -- Value in the metric's canonical UCUM unit.
    value          Float64,
    unit           LowCardinality(String),
    -- Event (measurement) time, to the second, for partitioning and
    -- time-series queries; event_time_ms keeps the milliseconds.
    event_time     DateTime,
    event_time_ms  Int64{{if .AtLeast 20 3}} CODEC(DoubleDelta, ZSTD(1)){{end}},
    ingest_time_ms Int64{{if .AtLeast 20 3}} CODEC(DoubleDelta, ZSTD(1)){{end}},
    -- Ingest path: http, mllp, mqtt, fhir, replay, simulator.
    source         LowCardinality(String),
    -- Per-device sequence number, 0 when unknown.
    sequence       UInt64,
    -- Bit set of vigil.v1.QualityFlag.
    quality        UInt32,
    -- The code the source used (e.g. MDC:147842, LOINC:8867-4).
    source_code    LowCardinality(String),
    channel        String,
    message_id     String,
    location       String
)
ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(event_time)
ORDER BY (tenant, patient, metric, event_time_ms, device, channel, sequence)
{{- if .AtLeast 21 3}}
-- Newer servers also drop a retried identical insert block at once.
SETTINGS non_replicated_deduplication_window = 1000
{{- end}};

-- Each sample exactly once, whatever merges have or have not run yet.
CREATE VIEW IF NOT EXISTS {{.DB}}.samples_final AS
SELECT * FROM {{.DB}}.samples FINAL;
