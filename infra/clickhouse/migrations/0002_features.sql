-- Window features: one row per metric per patient per window, from topic
-- vigil.features.v1. A late sample re-emits a window with a higher version
-- (a correction); ReplacingMergeTree(version) keeps the latest version of a
-- window (at once with FINAL or the features_final view).
CREATE TABLE IF NOT EXISTS {{.DB}}.features
(
    tenant          LowCardinality(String),
    patient         String,
    metric          LowCardinality(String),
    unit            LowCardinality(String),
    -- tumbling, hopping or session.
    kind            LowCardinality(String),
    size_ms         Int64,
    step_ms         Int64,
    -- Window [start, end) in event time; window_start to the second for
    -- partitioning, the _ms columns exact.
    window_start    DateTime,
    window_start_ms Int64{{if .AtLeast 20 3}} CODEC(DoubleDelta, ZSTD(1)){{end}},
    window_end_ms   Int64{{if .AtLeast 20 3}} CODEC(DoubleDelta, ZSTD(1)){{end}},
    -- 1 for the first emission, higher for corrections.
    version         UInt32,
    count           UInt64,
    mean            Float64,
    min             Float64,
    max             Float64,
    -- Population standard deviation.
    std             Float64,
    last            Float64,
    first_time_ms   Int64,
    last_time_ms    Int64,
    slope_per_min   Float64,
    median          Float64,
    p05             Float64,
    p95             Float64,
    -- Fraction of expected samples present, -1 when unknown.
    completeness    Float64,
    -- Derived features as parallel arrays derived.name, derived.value
    -- (sorted by name); ARRAY JOIN derived to get one row per feature.
    derived         Nested(name String, value Float64),
    emitted_time_ms Int64,
    watermark_ms    Int64
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(window_start)
ORDER BY (tenant, patient, metric, kind, size_ms, step_ms, window_start_ms)
{{- if .AtLeast 21 3}}
SETTINGS non_replicated_deduplication_window = 1000
{{- end}};

-- The latest version of every window.
CREATE VIEW IF NOT EXISTS {{.DB}}.features_final AS
SELECT * FROM {{.DB}}.features FINAL;
