-- Alert burden (issue 4, item 7): what a site tunes its thresholds against,
-- from the alert lifecycle events in alerts_v2 (migration 0007). Plain views,
-- computed when queried (FINAL, so a redelivered event counts once); no
-- window functions, so they run on 18.16 as on current servers.
--
-- alert_episodes: one row per alert (alert_id) with its rule, ward and
-- location (of its first event), the event time of its first RAISED event
-- (0 when never raised: re-checked away or only suppressed), the counts of
-- its RAISED, re-checked-away (RECHECKED with outcome cleared), ESCALATED and
-- SUPPRESSED events, and its acknowledgement time (0 when not acknowledged).
CREATE VIEW IF NOT EXISTS {{.DB}}.alert_episodes AS
SELECT
    tenant,
    alert_id,
    any(patient)                                             AS patient,
    any(rule)                                                AS rule,
    argMin(ward, event_time_ms)                              AS ward,
    argMin(location, event_time_ms)                          AS location,
    min(event_time_ms)                                       AS first_event_time_ms,
    minIf(event_time_ms, type = 'raised')                    AS raised_time_ms,
    countIf(type = 'raised')                                 AS raised_events,
    countIf(type = 'rechecked' AND recheck_outcome = 'cleared') AS rechecked_away_events,
    countIf(type = 'escalated')                              AS escalated_events,
    countIf(type = 'suppressed')                             AS suppressed_events,
    minIf(if(acknowledged_time_ms > 0, acknowledged_time_ms, event_time_ms), type = 'acknowledged') AS ack_time_ms
FROM {{.DB}}.alerts_v2 FINAL
GROUP BY tenant, alert_id;

-- alert_burden_daily: per tenant, UTC day (of the alert's RAISED event, or
-- of its first event when never raised), ward and rule:
--   alerts_raised        RAISED events (notifications);
--   beds                 distinct locations with a raised alert;
--   alerts_per_bed_day   alerts_raised / beds (per alerting bed: beds
--                        without alerts are not on the alerts topic);
--   acknowledged, median_time_to_ack_s, p90_time_to_ack_s
--                        from the RAISED event to the acknowledgement;
--   rechecked_away, share_rechecked_away
--                        candidate alerts cleared by the re-check, and their
--                        share rechecked_away / (rechecked_away + alerts_raised);
--   escalations, suppressed.
-- The same definitions as the vigil_alert_burden_* Prometheus metrics.
CREATE VIEW IF NOT EXISTS {{.DB}}.alert_burden_daily AS
SELECT
    tenant,
    toDate(toDateTime(intDiv(if(raised_time_ms > 0, raised_time_ms, first_event_time_ms), 1000)), 'UTC') AS day,
    ward,
    rule,
    sum(raised_events)                                       AS alerts_raised,
    uniqExactIf(location, raised_events > 0)                 AS beds,
    if(beds = 0, 0, alerts_raised / beds)                    AS alerts_per_bed_day,
    countIf(ack_time_ms > 0 AND raised_time_ms > 0)          AS acknowledged,
    quantileExactIf(0.5)((ack_time_ms - raised_time_ms) / 1000, ack_time_ms > 0 AND raised_time_ms > 0) AS median_time_to_ack_s,
    quantileExactIf(0.9)((ack_time_ms - raised_time_ms) / 1000, ack_time_ms > 0 AND raised_time_ms > 0) AS p90_time_to_ack_s,
    sum(rechecked_away_events)                               AS rechecked_away,
    if(rechecked_away + alerts_raised = 0, 0, rechecked_away / (rechecked_away + alerts_raised)) AS share_rechecked_away,
    sum(escalated_events)                                    AS escalations,
    sum(suppressed_events)                                   AS suppressed
FROM {{.DB}}.alert_episodes
GROUP BY tenant, day, ward, rule;

-- alert_burden_ward_daily: the same per tenant, day and ward over every rule
-- (beds are not additive over rules, so this is its own view).
CREATE VIEW IF NOT EXISTS {{.DB}}.alert_burden_ward_daily AS
SELECT
    tenant,
    toDate(toDateTime(intDiv(if(raised_time_ms > 0, raised_time_ms, first_event_time_ms), 1000)), 'UTC') AS day,
    ward,
    sum(raised_events)                                       AS alerts_raised,
    uniqExactIf(location, raised_events > 0)                 AS beds,
    if(beds = 0, 0, alerts_raised / beds)                    AS alerts_per_bed_day,
    countIf(ack_time_ms > 0 AND raised_time_ms > 0)          AS acknowledged,
    quantileExactIf(0.5)((ack_time_ms - raised_time_ms) / 1000, ack_time_ms > 0 AND raised_time_ms > 0) AS median_time_to_ack_s,
    quantileExactIf(0.9)((ack_time_ms - raised_time_ms) / 1000, ack_time_ms > 0 AND raised_time_ms > 0) AS p90_time_to_ack_s,
    sum(rechecked_away_events)                               AS rechecked_away,
    if(rechecked_away + alerts_raised = 0, 0, rechecked_away / (rechecked_away + alerts_raised)) AS share_rechecked_away,
    sum(escalated_events)                                    AS escalations,
    sum(suppressed_events)                                   AS suppressed
FROM {{.DB}}.alert_episodes
GROUP BY tenant, day, ward;
