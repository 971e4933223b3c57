package chsink_test

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/twmb/franz-go/pkg/kgo"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/vigilhealth/vigil/internal/stage"
	"github.com/vigilhealth/vigil/internal/testenv"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
	chsink "github.com/vigilhealth/vigil/sinks/clickhouse"
)

func testFeatureWindow(version uint32, hrMean float64, hrCount uint64) *vigilv1.FeatureWindow {
	return &vigilv1.FeatureWindow{
		SchemaVersion: 1,
		Tenant:        "st-mary",
		Patient:       "p-001",
		Kind:          vigilv1.WindowKind_WINDOW_KIND_TUMBLING,
		SizeMs:        60000,
		StepMs:        60000,
		StartMs:       t0 - t0%60000,
		EndMs:         t0 - t0%60000 + 60000,
		Version:       version,
		Features: []*vigilv1.Feature{
			{
				Metric: "heart_rate", Unit: "/min", Count: hrCount, Mean: hrMean, Min: 118, Max: 131, Std: 4.76,
				Last: 131, LastTimeMs: t0 + 40000, SlopePerMin: 17.4, Median: 124, P05: 118.6, P95: 130.25,
				FirstTimeMs: t0, Completeness: 0.8,
				Derived: map[string]float64{"tachy_seconds": 42, "artefact_ratio": 0.05},
			},
			{
				Metric: "spo2", Unit: "%", Count: 2, Mean: 92.5, Min: 92, Max: 93, Std: 0.5, Last: 93,
				LastTimeMs: t0 + 2000, Median: 92.5, P05: 92, P95: 93, FirstTimeMs: t0 + 1000, Completeness: -1,
			},
		},
		EmittedTimeMs: t0 + 65000 + int64(version),
		WatermarkMs:   t0 + 61000,
	}
}

func testScore() *vigilv1.Score {
	return &vigilv1.Score{
		SchemaVersion:  1,
		Id:             "sc-7f3a",
		Tenant:         "st-mary",
		Patient:        "p-001",
		Kind:           "news2",
		Value:          7,
		Band:           "high",
		Ruleset:        "news2-rcp-2017",
		RulesetVersion: "1.0.0",
		RulesetHash:    "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
		EventTimeMs:    t0 + 60000,
		Components: []*vigilv1.ScoreComponent{
			{Parameter: "respiration_rate", Metric: "respiratory_rate", InputValue: 25, InputUnit: "/min", InputTimeMs: t0 + 1000, Points: 3, Band: ">=25"},
			{Parameter: "spo2_scale_1", Metric: "spo2", InputValue: 93, InputUnit: "%", InputTimeMs: t0 + 2000, Points: 2, Band: "92-93"},
			{Parameter: "consciousness", Metric: "consciousness", Missing: true},
			{Parameter: "temperature", Metric: "body_temperature", InputValue: 38.5, InputUnit: "Cel", InputTimeMs: t0 - 7200000, Stale: true, Band: "38.1-39.0"},
		},
		Missing:            []string{"consciousness"},
		Stale:              []string{"temperature"},
		SingleParameterRed: true,
		EmittedTimeMs:      t0 + 61000,
		TopContributors:    []string{"respiration_rate", "spo2_scale_1"},
	}
}

func testAlert() *vigilv1.AlertEvent {
	return &vigilv1.AlertEvent{
		SchemaVersion:       1,
		EventId:             "ev-1",
		AlertId:             "al-1",
		Tenant:              "st-mary",
		Patient:             "p-001",
		Type:                vigilv1.AlertEventType_ALERT_EVENT_RAISED,
		Rule:                "news2_aggregate_ge_7",
		Severity:            "high",
		Reason:              "NEWS2 7 (high): respiration rate 25/min scored 3",
		Score:               testScore(),
		Ruleset:             "news2-rcp-2017",
		RulesetVersion:      "1.0.0",
		RulesetHash:         "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
		EventTimeMs:         t0 + 60000,
		EmittedTimeMs:       t0 + 61003,
		TriggerIngestTimeMs: t0 + 60950,
		Tier:                1,
	}
}

func testDeadLetter() *vigilv1.DeadLetter {
	raw := []byte(`{"tenant":"st-mary","patient":"p-009","samples":[{"metric":"heart_rate","value":"fast"}]}`)
	return &vigilv1.DeadLetter{
		SchemaVersion: 1, Reason: "invalid_json", Message: "samples[0].value: not a number",
		Source: vigilv1.Source_SOURCE_HTTP, Origin: "127.0.0.1:51234", Field: "samples[0].value",
		Raw: raw, RawSize: uint64(len(raw)), RefusedTimeMs: t0 + 5, Tenant: "st-mary", Patient: "p-009",
		Device: "watch-3", MessageId: "req-42", ContentType: "application/json",
	}
}

// TestSinkEndToEnd writes every kind of record, checks every stored value,
// then delivers the same records again (as after a crash) and checks that
// the deduplicated reads show each exactly once.
func TestSinkEndToEnd(t *testing.T) {
	e := newEnv(t)
	topics := e.cfg.Kafka.Topics
	var batches []*vigilv1.SampleBatch
	for i, p := range []string{"p-001", "p-002", "p-003"} {
		batches = append(batches,
			sampleBatch(p, "bed-"+p, 1, 5, t0+int64(i)*100),
			sampleBatch(p, "bed-"+p, 6, 5, t0+int64(i)*100+5000))
	}
	// The same measurement from a second device is a second row.
	batches = append(batches, sampleBatch("p-001", "watch-1", 1, 2, t0))
	const wantSamples = 32
	produceAll := func() {
		for _, b := range batches {
			e.produce(topics.Samples, b)
		}
		e.produce(topics.Features, testFeatureWindow(1, 124.25, 4))
		e.produce(topics.Scores, testScore())
		e.produce(topics.Alerts, testAlert())
		e.produce(topics.DeadLetter, testDeadLetter())
	}
	produceAll()

	r := e.start(e.cfg)
	e.waitCount("SELECT count() FROM samples", wantSamples, 30*time.Second)
	e.waitCount("SELECT count() FROM features", 2, 10*time.Second)
	e.waitCount("SELECT count() FROM scores", 1, 10*time.Second)
	e.waitCount("SELECT count() FROM alerts", 1, 10*time.Second)
	e.waitCount("SELECT count() FROM dead_letters", 1, 10*time.Second)
	e.waitCommitted(10*time.Second, topics.Samples, topics.Features, topics.Scores, topics.Alerts, topics.DeadLetter)

	checkSamples(t, e, batches)
	checkFeatures(t, e, testFeatureWindow(1, 124.25, 4))
	checkScore(t, e, testScore())
	checkAlert(t, e, testAlert())
	checkDeadLetter(t, e, testDeadLetter())

	// Redelivery: the same records once more.
	produceAll()
	// The sink commits only after ClickHouse took the rows; the raw row
	// counts are not checked here because a background merge may already
	// have collapsed the redelivered rows (vigil_sink_rows_inserted_total
	// below shows they were inserted again).
	e.waitCommitted(30*time.Second, topics.Samples, topics.Features, topics.Scores, topics.Alerts, topics.DeadLetter)
	for q, want := range map[string]uint64{
		"SELECT count() FROM samples FINAL":      wantSamples,
		"SELECT count() FROM samples_final":      wantSamples,
		"SELECT count() FROM features FINAL":     2,
		"SELECT count() FROM features_final":     2,
		"SELECT count() FROM scores_final":       1,
		"SELECT count() FROM alerts_final":       1,
		"SELECT count() FROM dead_letters_final": 1,
		"SELECT uniqExact(tenant, patient, metric, event_time_ms, device, channel, sequence) FROM samples": wantSamples,
	} {
		if n := e.count(q); n != want {
			t.Errorf("after redelivery %s = %d, want %d", q, n, want)
		}
	}
	checkSamples(t, e, batches)

	if err := r.stop(t); err != nil {
		t.Fatalf("Run: %v", err)
	}
	if got := r.metric(t, "vigil_sink_rows_inserted_total", "samples"); got != 2*wantSamples {
		t.Errorf("vigil_sink_rows_inserted_total{table=samples} = %v, want %d", got, 2*wantSamples)
	}
	if got := r.metric(t, "vigil_sink_insert_seconds", "alerts"); got != 2 {
		t.Errorf("vigil_sink_insert_seconds{table=alerts} observed %v batches, want 2", got)
	}
	if got := r.metric(t, "vigil_sink_rejected_total", "samples"); got != 0 {
		t.Errorf("rejected %v samples records, want 0", got)
	}
}

type sampleRow struct {
	tenant, patient, device, metric, unit, source, sourceCode, channel, messageID, location string
	value                                                                                   float64
	eventTime                                                                               time.Time
	eventMs, ingestMs                                                                       int64
	sequence                                                                                uint64
	quality                                                                                 uint32
}

func checkSamples(t *testing.T, e *env, batches []*vigilv1.SampleBatch) {
	t.Helper()
	want := map[string]sampleRow{}
	for _, b := range batches {
		for _, s := range b.GetSamples() {
			want[fmt.Sprintf("%s/%s/%d", b.Patient, b.Device, s.Sequence)] = sampleRow{
				tenant: b.Tenant, patient: b.Patient, device: b.Device, metric: s.Metric, unit: s.Unit,
				source: "mllp", sourceCode: s.SourceCode, channel: s.Channel, messageID: b.MessageId,
				location: b.Location, value: s.Value, eventTime: time.UnixMilli(s.EventTimeMs).UTC().Truncate(time.Second),
				eventMs: s.EventTimeMs, ingestMs: b.IngestTimeMs, sequence: s.Sequence, quality: s.Quality,
			}
		}
	}
	rows, err := e.conn.Query(context.Background(), `SELECT tenant, patient, device, metric, value, unit, event_time,
		event_time_ms, ingest_time_ms, source, sequence, quality, source_code, channel, message_id, location
		FROM samples_final`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	seen := map[string]bool{}
	for rows.Next() {
		var r sampleRow
		if err := rows.Scan(&r.tenant, &r.patient, &r.device, &r.metric, &r.value, &r.unit, &r.eventTime,
			&r.eventMs, &r.ingestMs, &r.source, &r.sequence, &r.quality, &r.sourceCode, &r.channel,
			&r.messageID, &r.location); err != nil {
			t.Fatal(err)
		}
		r.eventTime = r.eventTime.UTC()
		k := fmt.Sprintf("%s/%s/%d", r.patient, r.device, r.sequence)
		if seen[k] {
			t.Errorf("sample %s twice in samples_final", k)
		}
		seen[k] = true
		if w, ok := want[k]; !ok {
			t.Errorf("unexpected sample row %+v", r)
		} else if r != w {
			t.Errorf("sample %s:\n got %+v\nwant %+v", k, r, w)
		}
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	if len(seen) != len(want) {
		t.Errorf("samples_final has %d samples, want %d", len(seen), len(want))
	}
}

func checkFeatures(t *testing.T, e *env, w *vigilv1.FeatureWindow) {
	t.Helper()
	for _, f := range w.Features {
		var (
			tenant, patient, unit, kind                           string
			size, step, startMs, endMs, firstMs, lastMs, emit, wm int64
			start                                                 time.Time
			version                                               uint32
			count                                                 uint64
			mean, minV, maxV, std, last, slope, median, p05, p95  float64
			completeness                                          float64
			names                                                 []string
			values                                                []float64
		)
		err := e.conn.QueryRow(context.Background(), `SELECT tenant, patient, unit, kind, size_ms, step_ms,
			window_start, window_start_ms, window_end_ms, version, count, mean, min, max, std, last, first_time_ms,
			last_time_ms, slope_per_min, median, p05, p95, completeness, derived.name, derived.value,
			emitted_time_ms, watermark_ms FROM features FINAL WHERE patient = ? AND metric = ?`, w.Patient, f.Metric).Scan(
			&tenant, &patient, &unit, &kind, &size, &step, &start, &startMs, &endMs, &version, &count, &mean, &minV,
			&maxV, &std, &last, &firstMs, &lastMs, &slope, &median, &p05, &p95, &completeness, &names, &values, &emit, &wm)
		if err != nil {
			t.Fatalf("features row %s: %v", f.Metric, err)
		}
		wantNames := make([]string, 0)
		for n := range f.Derived {
			wantNames = append(wantNames, n)
		}
		slices.Sort(wantNames)
		wantValues := make([]float64, 0)
		for _, n := range wantNames {
			wantValues = append(wantValues, f.Derived[n])
		}
		got := fmt.Sprint(tenant, patient, unit, kind, size, step, start.UTC(), startMs, endMs, version, count, mean, minV,
			maxV, std, last, firstMs, lastMs, slope, median, p05, p95, completeness, names, values, emit, wm)
		want := fmt.Sprint(w.Tenant, w.Patient, f.Unit, "tumbling", w.SizeMs, w.StepMs,
			time.UnixMilli(w.StartMs).UTC().Truncate(time.Second), w.StartMs, w.EndMs, w.Version, f.Count, f.Mean,
			f.Min, f.Max, f.Std, f.Last, f.FirstTimeMs, f.LastTimeMs, f.SlopePerMin, f.Median, f.P05, f.P95,
			f.Completeness, wantNames, wantValues, w.EmittedTimeMs, w.WatermarkMs)
		if got != want {
			t.Errorf("features %s:\n got %s\nwant %s", f.Metric, got, want)
		}
	}
}

func checkScore(t *testing.T, e *env, s *vigilv1.Score) {
	t.Helper()
	var (
		id, tenant, patient, kind, band, ruleset, version, hash string
		value                                                   float64
		et                                                      time.Time
		etMs, emitMs                                            int64
		red                                                     uint8
		missing, stale, params, metrics, units, bands, top      []string
		inputs, points                                          []float64
		times                                                   []int64
		cMissing, cStale                                        []uint8
	)
	err := e.conn.QueryRow(context.Background(), `SELECT id, tenant, patient, kind, value, band, ruleset,
		ruleset_version, ruleset_hash, event_time, event_time_ms, emitted_time_ms, single_parameter_red, missing,
		stale, components.parameter, components.metric, components.input_value, components.input_unit,
		components.input_time_ms, components.points, components.band, components.missing, components.stale,
		top_contributors FROM scores_final WHERE id = ?`, s.Id).Scan(&id, &tenant, &patient, &kind, &value, &band,
		&ruleset, &version, &hash, &et, &etMs, &emitMs, &red, &missing, &stale, &params, &metrics, &inputs, &units,
		&times, &points, &bands, &cMissing, &cStale, &top)
	if err != nil {
		t.Fatalf("scores row: %v", err)
	}
	var wp, wm, wu, wb []string
	var wi, wpts []float64
	var wt []int64
	var wMiss, wStale []uint8
	b := func(v bool) uint8 {
		if v {
			return 1
		}
		return 0
	}
	for _, c := range s.Components {
		wp, wm, wu, wb = append(wp, c.Parameter), append(wm, c.Metric), append(wu, c.InputUnit), append(wb, c.Band)
		wi, wpts, wt = append(wi, c.InputValue), append(wpts, c.Points), append(wt, c.InputTimeMs)
		wMiss, wStale = append(wMiss, b(c.Missing)), append(wStale, b(c.Stale))
	}
	got := fmt.Sprint(id, tenant, patient, kind, value, band, ruleset, version, hash, et.UTC(), etMs, emitMs, red,
		missing, stale, params, metrics, inputs, units, times, points, bands, cMissing, cStale, top)
	want := fmt.Sprint(s.Id, s.Tenant, s.Patient, s.Kind, s.Value, s.Band, s.Ruleset, s.RulesetVersion, s.RulesetHash,
		time.UnixMilli(s.EventTimeMs).UTC().Truncate(time.Second), s.EventTimeMs, s.EmittedTimeMs, b(s.SingleParameterRed),
		s.Missing, s.Stale, wp, wm, wi, wu, wt, wpts, wb, wMiss, wStale, s.TopContributors)
	if got != want {
		t.Errorf("scores row:\n got %s\nwant %s", got, want)
	}
}

func checkAlert(t *testing.T, e *env, a *vigilv1.AlertEvent) {
	t.Helper()
	var (
		eventID, alertID, tenant, patient, typ, rule, severity, reason, actor, note string
		scoreKind, scoreBand, expl, ruleset, version, hash                          string
		scoreValue                                                                  float64
		et                                                                          time.Time
		etMs, emitMs, trigMs                                                        int64
		tier                                                                        uint32
	)
	err := e.conn.QueryRow(context.Background(), `SELECT event_id, alert_id, tenant, patient, type, rule, severity,
		reason, actor, note, score_kind, score_value, score_band, explanation, ruleset, ruleset_version,
		ruleset_hash, event_time, event_time_ms, emitted_time_ms, trigger_ingest_time_ms, tier
		FROM alerts_final WHERE alert_id = ?`, a.AlertId).Scan(&eventID, &alertID, &tenant, &patient, &typ, &rule,
		&severity, &reason, &actor, &note, &scoreKind, &scoreValue, &scoreBand, &expl, &ruleset, &version, &hash,
		&et, &etMs, &emitMs, &trigMs, &tier)
	if err != nil {
		t.Fatalf("alerts row: %v", err)
	}
	got := fmt.Sprint(eventID, alertID, tenant, patient, typ, rule, severity, reason, actor, note, scoreKind,
		scoreValue, scoreBand, ruleset, version, hash, et.UTC(), etMs, emitMs, trigMs, tier)
	want := fmt.Sprint(a.EventId, a.AlertId, a.Tenant, a.Patient, "raised", a.Rule, a.Severity, a.Reason, a.Actor,
		a.Note, a.Score.Kind, a.Score.Value, a.Score.Band, a.Ruleset, a.RulesetVersion, a.RulesetHash,
		time.UnixMilli(a.EventTimeMs).UTC().Truncate(time.Second), a.EventTimeMs, a.EmittedTimeMs,
		a.TriggerIngestTimeMs, a.Tier)
	if got != want {
		t.Errorf("alerts row:\n got %s\nwant %s", got, want)
	}
	// The alert stays explainable: the whole score, components included.
	var s vigilv1.Score
	if err := protojson.Unmarshal([]byte(expl), &s); err != nil {
		t.Fatalf("explanation is not the score as protobuf JSON: %v\n%s", err, expl)
	}
	if !proto.Equal(&s, a.Score) {
		t.Errorf("explanation %s\ndoes not hold the alert's score %v", expl, a.Score)
	}
	// And it is readable with the functions 18.16 has.
	var hashFromJSON string
	if err := e.conn.QueryRow(context.Background(), `SELECT visitParamExtractString(explanation, 'ruleset_hash')
		FROM alerts_final WHERE alert_id = ?`, a.AlertId).Scan(&hashFromJSON); err != nil {
		t.Fatal(err)
	}
	if hashFromJSON != a.Score.RulesetHash {
		t.Errorf("visitParamExtractString(explanation, 'ruleset_hash') = %q, want %q", hashFromJSON, a.Score.RulesetHash)
	}
}

func checkDeadLetter(t *testing.T, e *env, d *vigilv1.DeadLetter) {
	t.Helper()
	var (
		reason, message, source, origin, field, tenant, patient, device, msgID, ct, raw string
		rt                                                                              time.Time
		rtMs                                                                            int64
		rawSize                                                                         uint64
		truncated                                                                       uint8
	)
	err := e.conn.QueryRow(context.Background(), `SELECT reason, message, source, origin, field, tenant, patient,
		device, message_id, content_type, refused_time, refused_time_ms, raw, raw_size, raw_truncated
		FROM dead_letters_final WHERE message_id = ?`, d.MessageId).Scan(&reason, &message, &source, &origin, &field,
		&tenant, &patient, &device, &msgID, &ct, &rt, &rtMs, &raw, &rawSize, &truncated)
	if err != nil {
		t.Fatalf("dead_letters row: %v", err)
	}
	got := fmt.Sprint(reason, message, source, origin, field, tenant, patient, device, msgID, ct, rt.UTC(), rtMs, raw, rawSize, truncated)
	want := fmt.Sprint(d.Reason, d.Message, "http", d.Origin, d.Field, d.Tenant, d.Patient, d.Device, d.MessageId,
		d.ContentType, time.UnixMilli(d.RefusedTimeMs).UTC().Truncate(time.Second), d.RefusedTimeMs, string(d.Raw),
		d.RawSize, 0)
	if got != want {
		t.Errorf("dead_letters row:\n got %s\nwant %s", got, want)
	}
}

// TestSinkFeatureCorrection: a window re-emitted with version 2 replaces
// version 1, and a late redelivery of version 1 does not bring it back.
func TestSinkFeatureCorrection(t *testing.T) {
	e := newEnv(t)
	r := e.start(e.cfg)
	v1, v2 := testFeatureWindow(1, 124.25, 4), testFeatureWindow(2, 125.2, 5)
	e.produce(e.cfg.Kafka.Topics.Features, v1)
	e.waitCount("SELECT count() FROM features", 2, 30*time.Second)
	checkFeatures(t, e, v1)
	e.produce(e.cfg.Kafka.Topics.Features, v2)
	e.waitCount("SELECT count() FROM features", 4, 10*time.Second)
	checkFeatures(t, e, v2)
	e.produce(e.cfg.Kafka.Topics.Features, v1)
	e.waitCount("SELECT count() FROM features", 6, 10*time.Second)
	checkFeatures(t, e, v2)
	var version uint32
	var mean float64
	var count uint64
	if err := e.conn.QueryRow(context.Background(), `SELECT version, mean, count FROM features_final
		WHERE patient = 'p-001' AND metric = 'heart_rate'`).Scan(&version, &mean, &count); err != nil {
		t.Fatal(err)
	}
	if version != 2 || mean != 125.2 || count != 5 {
		t.Errorf("features_final heart_rate: version %d mean %v count %d, want 2, 125.2, 5", version, mean, count)
	}
	if n := e.count("SELECT count() FROM features_final"); n != 2 {
		t.Errorf("features_final rows = %d, want 2 (one per metric)", n)
	}
	if err := r.stop(t); err != nil {
		t.Fatal(err)
	}
}

// TestSinkStopAndRestart stops the sink mid-way (cancel: it drains and
// commits), restarts it on the same group, and checks nothing is lost and
// nothing stored twice, even without FINAL.
func TestSinkStopAndRestart(t *testing.T) {
	e := newEnv(t)
	cfg := e.cfg
	cfg.Sink.BatchRows = 40
	const nBatches, perBatch = 150, 10
	var all []*vigilv1.SampleBatch
	for i := range nBatches {
		all = append(all, sampleBatch(fmt.Sprintf("p-%03d", i%7), fmt.Sprintf("dev-%d", i%7), uint64(i*perBatch), perBatch, t0+int64(i)*10000))
	}
	const total = nBatches * perBatch
	for i := 0; i < len(all); i += 50 {
		msgs := make([]proto.Message, 0, 50)
		for _, b := range all[i:min(i+50, len(all))] {
			msgs = append(msgs, b)
		}
		e.produce(cfg.Kafka.Topics.Samples, msgs...)
	}

	r1 := e.start(cfg)
	e.waitCount("SELECT count() FROM samples", 200, 30*time.Second)
	if err := r1.stop(t); err != nil {
		t.Fatalf("first run: %v", err)
	}
	mid := e.count("SELECT count() FROM samples")
	t.Logf("stopped after %d of %d rows", mid, total)
	lag, err := e.lag(cfg.Kafka.Topics.Samples)
	if err != nil {
		t.Fatal(err)
	}
	// What was committed is exactly what is stored: every stored record's
	// offset committed, nothing committed that is not stored.
	if stored := int64(mid / perBatch); lag[cfg.Kafka.Topics.Samples] != nBatches-stored {
		t.Errorf("after stop: lag %d records, but %d of %d records are stored", lag[cfg.Kafka.Topics.Samples], stored, nBatches)
	}

	r2 := e.start(cfg)
	e.waitCount("SELECT count() FROM samples", total, 30*time.Second)
	e.waitCommitted(10*time.Second, cfg.Kafka.Topics.Samples)
	if err := r2.stop(t); err != nil {
		t.Fatalf("second run: %v", err)
	}
	for q, want := range map[string]uint64{
		"SELECT count() FROM samples":       total,
		"SELECT count() FROM samples FINAL": total,
		"SELECT uniqExact(tenant, patient, metric, event_time_ms, device, channel, sequence) FROM samples": total,
	} {
		if n := e.count(q); n != want {
			t.Errorf("%s = %d, want %d", q, n, want)
		}
	}
	checkSamples(t, e, all)
}

// TestSinkHardStop closes the sink's clients under a running Run (as a
// crash would: no drain, no final commit) and restarts: nothing is lost and
// the deduplicated reads show each sample once.
func TestSinkHardStop(t *testing.T) {
	e := newEnv(t)
	cfg := e.cfg
	cfg.Sink.BatchRows = 30
	var all []*vigilv1.SampleBatch
	for i := range 100 {
		all = append(all, sampleBatch("p-x", "dev-x", uint64(i*10), 10, t0+int64(i)*10000))
	}
	msgs := make([]proto.Message, 0, len(all))
	for _, b := range all {
		msgs = append(msgs, b)
	}
	e.produce(cfg.Kafka.Topics.Samples, msgs...)

	r1 := e.start(cfg)
	e.waitCount("SELECT count() FROM samples", 100, 30*time.Second)
	if err := r1.sink.Close(context.Background()); err != nil {
		t.Fatalf("hard close: %v", err)
	}
	select {
	case err := <-r1.done:
		t.Logf("Run after hard close: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("Run did not return after its clients were closed")
	}
	r1.once.Do(func() {}) // Run has returned and the sink is closed

	r2 := e.start(cfg)
	e.waitCount("SELECT count() FROM samples FINAL", 1000, 30*time.Second)
	e.waitCommitted(10*time.Second, cfg.Kafka.Topics.Samples)
	if err := r2.stop(t); err != nil {
		t.Fatal(err)
	}
	if n := e.count("SELECT count() FROM samples_final"); n != 1000 {
		t.Errorf("samples_final = %d, want 1000", n)
	}
	checkSamples(t, e, all)
}

// TestSinkRetriesUntilTableBack renames the samples table away while
// records arrive: the sink retries (and commits nothing), then stores
// everything once the table is back.
func TestSinkRetriesUntilTableBack(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	db := "`" + e.cfg.ClickHouse.Database + "`"
	r := e.start(e.cfg)
	// One record first, so the sink has joined and stored before the table
	// goes away.
	e.produce(e.cfg.Kafka.Topics.Samples, sampleBatch("p-r", "dev-r", 0, 5, t0))
	e.waitCount("SELECT count() FROM samples", 5, 30*time.Second)
	e.waitCommitted(10*time.Second, e.cfg.Kafka.Topics.Samples)

	if err := e.conn.Exec(ctx, "RENAME TABLE "+db+".samples TO "+db+".samples_away"); err != nil {
		t.Fatal(err)
	}
	renamed := true
	t.Cleanup(func() {
		if renamed {
			_ = e.conn.Exec(ctx, "RENAME TABLE "+db+".samples_away TO "+db+".samples")
		}
	})
	var batches []*vigilv1.SampleBatch
	for i := 1; i <= 20; i++ {
		batches = append(batches, sampleBatch("p-r", "dev-r", uint64(i*5), 5, t0+int64(i)*5000))
	}
	msgs := make([]proto.Message, 0, len(batches))
	for _, b := range batches {
		msgs = append(msgs, b)
	}
	e.produce(e.cfg.Kafka.Topics.Samples, msgs...)
	waitFor(t, "3 retries of the samples insert", 30*time.Second, func() bool {
		return r.metric(t, "vigil_sink_retries_total", "samples") >= 3
	})
	lag, err := e.lag(e.cfg.Kafka.Topics.Samples)
	if err != nil {
		t.Fatal(err)
	}
	if lag[e.cfg.Kafka.Topics.Samples] != int64(len(batches)) {
		t.Errorf("while the table is missing the group lag is %d, want all %d new records uncommitted", lag[e.cfg.Kafka.Topics.Samples], len(batches))
	}
	if err := e.conn.Exec(ctx, "RENAME TABLE "+db+".samples_away TO "+db+".samples"); err != nil {
		t.Fatal(err)
	}
	renamed = false
	e.waitCount("SELECT count() FROM samples", 105, 30*time.Second)
	e.waitCommitted(10*time.Second, e.cfg.Kafka.Topics.Samples)
	if err := r.stop(t); err != nil {
		t.Fatal(err)
	}
	if n := e.count("SELECT count() FROM samples"); n != 105 {
		t.Errorf("samples = %d, want 105 (no loss, no duplicate)", n)
	}
	if got := r.metric(t, "vigil_sink_rejected_total", "samples"); got != 0 {
		t.Errorf("%v records rejected during an outage, want 0", got)
	}
	checkSamples(t, e, append(batches, sampleBatch("p-r", "dev-r", 0, 5, t0)))
}

// TestSinkRejectsBadRecords: a value that is not a SampleBatch, a sample
// whose time DateTime cannot hold, and a row the server refuses (a guard
// column added by a site) each go to the dead-letter topic with reason
// sink_rejected; everything else in their batches is stored, nothing blocks.
func TestSinkRejectsBadRecords(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	db := "`" + e.cfg.ClickHouse.Database + "`"
	if err := e.conn.Exec(ctx, "ALTER TABLE "+db+".samples ADD COLUMN guard UInt8 MATERIALIZED throwIf(value = 666)"); err != nil {
		t.Fatal(err)
	}
	topic := e.cfg.Kafka.Topics.Samples
	good1 := sampleBatch("p-a", "dev-a", 0, 4, t0)
	tooOld := sampleBatch("p-b", "dev-b", 0, 2, t0)
	tooOld.Samples[1].EventTimeMs = -86400000
	refused := sampleBatch("p-c", "dev-c", 0, 3, t0)
	refused.Samples[2].Value = 666
	good2 := sampleBatch("p-d", "dev-d", 0, 4, t0)
	e.produce(topic, good1)
	e.produceRecords(&kgo.Record{Topic: topic, Key: []byte("st-mary/p-z"), Value: []byte("\xff\xff not protobuf")})
	e.produce(topic, tooOld, refused, good2)

	r := e.start(e.cfg)
	e.waitCommitted(30*time.Second, topic)
	if n := e.count("SELECT count() FROM samples"); n != 8 {
		t.Errorf("stored %d samples, want the 8 of the two good batches", n)
	}
	if n := e.count("SELECT count() FROM samples WHERE patient IN ('p-b', 'p-c', 'p-z')"); n != 0 {
		t.Errorf("%d samples of rejected records stored", n)
	}
	dls := testenv.Consume(t, e.broker, e.cfg.Kafka.Topics.DeadLetter, 3, 10*time.Second)
	byPatient := map[string]*vigilv1.DeadLetter{}
	for _, rec := range dls {
		var d vigilv1.DeadLetter
		if err := proto.Unmarshal(rec.Value, &d); err != nil {
			t.Fatal(err)
		}
		if d.Reason != chsink.ReasonSinkRejected {
			t.Errorf("dead letter reason %q, want %q", d.Reason, chsink.ReasonSinkRejected)
		}
		byPatient[d.Patient] = &d
	}
	for patient, wantField := range map[string]string{"p-z": "value", "p-b": "samples[1].event_time_ms", "p-c": "samples"} {
		d := byPatient[patient]
		if d == nil {
			t.Errorf("no dead letter for %s's record (got %d dead letters)", patient, len(dls))
			continue
		}
		if d.Field != wantField || d.Tenant != "st-mary" || len(d.Raw) == 0 || d.RawSize != uint64(len(d.Raw)) ||
			!strings.Contains(d.Origin, topic) || d.RefusedTimeMs == 0 {
			t.Errorf("dead letter for %s: %v", patient, d)
		}
		t.Logf("dead letter for %s: %s", patient, d.Message)
	}
	if d := byPatient["p-c"]; d != nil && !strings.Contains(d.Message, "throwIf") {
		t.Errorf("server refusal not explained: %s", d.Message)
	}
	if d := byPatient["p-b"]; d != nil {
		var b vigilv1.SampleBatch
		if err := proto.Unmarshal(d.Raw, &b); err != nil || !proto.Equal(&b, tooOld) {
			t.Errorf("dead letter raw is not the refused record: %v", err)
		}
	}
	// The sink stores its own dead letters too, for integrators to query.
	e.waitCount("SELECT count() FROM dead_letters WHERE reason = 'sink_rejected'", 3, 10*time.Second)
	if err := r.stop(t); err != nil {
		t.Fatal(err)
	}
	if got := r.metric(t, "vigil_sink_rejected_total", "samples"); got != 3 {
		t.Errorf("vigil_sink_rejected_total{table=samples} = %v, want 3", got)
	}
}

func TestOpenNamesAddress(t *testing.T) {
	cfg := testenv.Config(t, "", testenv.ClickHouse(t)).ClickHouse
	cfg.Addr = "127.0.0.1:1"
	cfg.DialTimeout = 500 * time.Millisecond
	_, err := chsink.Open(context.Background(), cfg)
	if err == nil || !strings.Contains(err.Error(), "127.0.0.1:1") {
		t.Fatalf("Open on a closed port: %v, want an error naming the address", err)
	}
	cfg.Addr = ""
	if _, err := chsink.Open(context.Background(), cfg); err == nil {
		t.Fatal("Open with no address succeeded")
	}
}

func TestRowCounter(t *testing.T) {
	e := newEnv(t)
	r := e.start(e.cfg)
	e.produce(e.cfg.Kafka.Topics.Samples, sampleBatch("p-1", "d-1", 0, 7, t0))
	e.produce(e.cfg.Kafka.Topics.Scores, testScore())
	e.waitCount("SELECT count() FROM scores", 1, 30*time.Second)
	e.waitCount("SELECT count() FROM samples", 7, 30*time.Second)
	_ = r.stop(t)
	rows, err := chsink.RowCounter(e.cfg.ClickHouse)(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]uint64{"samples": 7, "features": 0, "scores": 1, "alerts": 0, "dead_letters": 0}
	if fmt.Sprint(rows) != fmt.Sprint(want) {
		t.Errorf("RowCounter = %v, want %v", rows, want)
	}
}

func TestNewValidates(t *testing.T) {
	cfg := testenv.Config(t, "", "")
	if _, err := chsink.New(cfg, testDeps(t)); err == nil || !strings.Contains(err.Error(), "kafka.brokers") {
		t.Errorf("New without brokers: %v", err)
	}
	cfg.Kafka.Brokers = []string{"127.0.0.1:9"}
	if _, err := chsink.New(cfg, testDeps(t)); err == nil || !strings.Contains(err.Error(), "clickhouse.addr") {
		t.Errorf("New without clickhouse: %v", err)
	}
	cfg.ClickHouse.Addr = "127.0.0.1:9"
	cfg.Sink.BatchRows = 0
	if _, err := chsink.New(cfg, testDeps(t)); err == nil || !strings.Contains(err.Error(), "sink.batch_rows") {
		t.Errorf("New with batch_rows 0: %v", err)
	}
	cfg.Sink.BatchRows = 10
	s, err := chsink.New(cfg, testDeps(t))
	if err != nil {
		t.Fatal(err)
	}
	// Close without Run, twice.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := s.Close(ctx); err != nil {
		t.Error(err)
	}
	if err := s.Close(ctx); err != nil {
		t.Error(err)
	}
}

func TestIsRetriable(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{fmt.Errorf("x: %w", context.DeadlineExceeded), true},
		{fmt.Errorf("inserting: %w", &clickhouse.Exception{Code: 60}), true},  // UNKNOWN_TABLE: a rename or migration in progress
		{fmt.Errorf("inserting: %w", &clickhouse.Exception{Code: 241}), true}, // MEMORY_LIMIT_EXCEEDED
		{fmt.Errorf("inserting: %w", &clickhouse.Exception{Code: 53}), false}, // TYPE_MISMATCH
		{fmt.Errorf("inserting: %w", &clickhouse.Exception{Code: 395}), false},
		{&chsink.PermanentError{Field: "value", Err: fmt.Errorf("bad")}, false},
		{nil, false},
	} {
		if got := chsink.IsRetriable(tc.err); got != tc.want {
			t.Errorf("IsRetriable(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}

func testDeps(t *testing.T) stage.Deps { return stage.Deps{Log: testenv.Logger(t)} }

// TestSinkTwoInstancesRebalance runs a second sink in the same group while
// the first is working: partitions move between them (the first stores and
// commits what it read before giving them up), and every sample is stored
// exactly once, even counted without FINAL.
func TestSinkTwoInstancesRebalance(t *testing.T) {
	e := newEnv(t)
	cfg := e.cfg
	cfg.Sink.BatchRows = 50
	cfg.Sink.BatchInterval = time.Second
	produce := func(from, to int) []*vigilv1.SampleBatch {
		var bs []*vigilv1.SampleBatch
		msgs := make([]proto.Message, 0, to-from)
		for i := from; i < to; i++ {
			b := sampleBatch(fmt.Sprintf("p-%02d", i%12), fmt.Sprintf("d-%02d", i%12), uint64(i*10), 10, t0+int64(i)*10000)
			bs = append(bs, b)
			msgs = append(msgs, b)
		}
		e.produce(cfg.Kafka.Topics.Samples, msgs...)
		return bs
	}
	all := produce(0, 100)
	a := e.start(cfg)
	e.waitCount("SELECT count() FROM samples", 100, 30*time.Second)
	b := e.start(cfg)
	// Produce the rest only once the partitions have been split, so that
	// the second sink has work whatever the timing.
	e.waitMembers(2, 30*time.Second)
	all = append(all, produce(100, 200)...)
	e.waitCount("SELECT count() FROM samples FINAL", 2000, 30*time.Second)
	e.waitCommitted(15*time.Second, cfg.Kafka.Topics.Samples)
	all = append(all, produce(200, 250)...)
	e.waitCount("SELECT count() FROM samples FINAL", 2500, 30*time.Second)
	e.waitCommitted(15*time.Second, cfg.Kafka.Topics.Samples)
	if err := b.stop(t); err != nil {
		t.Fatal(err)
	}
	if err := a.stop(t); err != nil {
		t.Fatal(err)
	}
	if n := e.count("SELECT count() FROM samples"); n != 2500 {
		t.Errorf("samples = %d rows, want 2500 (no duplicate across the rebalance)", n)
	}
	ra, rb := a.metric(t, "vigil_sink_rows_inserted_total", "samples"), b.metric(t, "vigil_sink_rows_inserted_total", "samples")
	t.Logf("rows inserted: first sink %v, second sink %v", ra, rb)
	if rb == 0 {
		t.Errorf("the second sink stored nothing: no partition moved to it")
	}
	checkSamples(t, e, all)
}
