-- Scores (news2, mews, qsofa, baseline, model:<name>), from topic
-- vigil.scores.v1. Every score names its ruleset or model, version and
-- content hash, and keeps its components (the inputs that drove it) as
-- parallel arrays components.parameter, components.metric, ...
-- The score id is deterministic, so a redelivered score replaces itself.
CREATE TABLE IF NOT EXISTS {{.DB}}.scores
(
    id                   String,
    tenant               LowCardinality(String),
    patient              String,
    kind                 LowCardinality(String),
    value                Float64,
    band                 LowCardinality(String),
    ruleset              LowCardinality(String),
    ruleset_version      LowCardinality(String),
    ruleset_hash         String,
    event_time           DateTime,
    event_time_ms        Int64{{if .AtLeast 20 3}} CODEC(DoubleDelta, ZSTD(1)){{end}},
    emitted_time_ms      Int64,
    single_parameter_red UInt8,
    -- Parameters whose input was missing or stale.
    missing              Array(String),
    stale                Array(String),
    components           Nested(
        parameter     String,
        metric        String,
        input_value   Float64,
        input_unit    String,
        input_time_ms Int64,
        points        Float64,
        band          String,
        missing       UInt8,
        stale         UInt8
    ),
    -- Parameter names, most contributing first.
    top_contributors     Array(String)
)
ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(event_time)
ORDER BY (tenant, patient, kind, event_time_ms, id)
{{- if .AtLeast 21 3}}
SETTINGS non_replicated_deduplication_window = 1000
{{- end}};

CREATE VIEW IF NOT EXISTS {{.DB}}.scores_final AS
SELECT * FROM {{.DB}}.scores FINAL;
