package deadletter

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/vigilhealth/vigil/ingest/binding"
	"github.com/vigilhealth/vigil/ingest/publish"
	"github.com/vigilhealth/vigil/ingest/validate"
	"github.com/vigilhealth/vigil/internal/catalog"
	"github.com/vigilhealth/vigil/internal/config"
	"github.com/vigilhealth/vigil/internal/stage"
	"github.com/vigilhealth/vigil/internal/testenv"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

func TestMain(m *testing.M) { testenv.Main(m) }

type fixture struct {
	cfg config.Config
	pub *publish.Publisher
	rd  *Reader
}

func newFixture(t *testing.T) fixture {
	cfg := testenv.Config(t, testenv.Kafka(t), "")
	pub, err := publish.New(cfg, stage.Deps{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pub.Close(context.Background()) })
	rd, err := NewReader(cfg.Kafka, nil)
	if err != nil {
		t.Fatal(err)
	}
	return fixture{cfg, pub, rd}
}

func TestListShowFilters(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	t0 := time.Date(2026, 11, 23, 8, 0, 0, 0, time.UTC)
	hl7 := []byte("MSH|^~\\&|GW\x00\x01\x02|broken")
	letters := []*vigilv1.DeadLetter{
		{Reason: "malformed_message", Message: "no MSH-9", Source: vigilv1.Source_SOURCE_MLLP, Raw: hl7, Tenant: "a",
			RefusedTimeMs: t0.UnixMilli(), Field: "MSH-9"},
		{Reason: "unbound_device", Message: "no patient", Source: vigilv1.Source_SOURCE_HTTP, Raw: []byte(`{"value":1}`),
			Tenant: "b", Device: "d1", RefusedTimeMs: t0.Add(time.Hour).UnixMilli(),
			Batch: &vigilv1.SampleBatch{Tenant: "b", Device: "d1", Samples: []*vigilv1.Sample{{Metric: "heart_rate", Value: 70}}}},
		{Reason: "unbound_device", Message: "no patient", Source: vigilv1.Source_SOURCE_MQTT, Tenant: "a", Device: "d2",
			RefusedTimeMs: t0.Add(2 * time.Hour).UnixMilli()},
	}
	if err := f.pub.DeadLetter(ctx, letters); err != nil {
		t.Fatal(err)
	}
	count := func(fl Filter) (int, map[string]int) {
		ls, err := f.rd.List(ctx, fl, 0)
		if err != nil {
			t.Fatal(err)
		}
		if len(ls.Letters) != ls.Total {
			t.Errorf("limit 0 kept %d of %d", len(ls.Letters), ls.Total)
		}
		return ls.Total, ls.ByReason
	}
	for _, tc := range []struct {
		name string
		f    Filter
		want int
	}{
		{"all", Filter{}, 3},
		{"reason", Filter{Reason: "unbound_device"}, 2},
		{"source", Filter{Source: "mllp"}, 1},
		{"tenant", Filter{Tenant: "a"}, 2},
		{"since", Filter{Since: t0.Add(time.Hour)}, 2},
		{"until", Filter{Until: t0.Add(time.Hour)}, 1},
		{"window", Filter{Since: t0.Add(30 * time.Minute), Until: t0.Add(90 * time.Minute)}, 1},
	} {
		if n, _ := count(tc.f); n != tc.want {
			t.Errorf("%s: %d letters, want %d", tc.name, n, tc.want)
		}
	}
	if _, by := count(Filter{}); by["unbound_device"] != 2 || by["malformed_message"] != 1 {
		t.Errorf("counts by reason: %v", by)
	}
	ls, err := f.rd.List(ctx, Filter{}, 2)
	if err != nil {
		t.Fatal(err)
	}
	if ls.Total != 3 || len(ls.Letters) != 2 || ls.Letters[0].DL.RefusedTimeMs != t0.Add(time.Hour).UnixMilli() {
		t.Errorf("limit 2: %d of %d, want the newest two", len(ls.Letters), ls.Total)
	}
	var table bytes.Buffer
	if err := WriteTable(&table, ls); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(table.String(), "showing the newest 2 of 3") || !strings.Contains(table.String(), "b/d1") {
		t.Errorf("table:\n%s", table.String())
	}

	// show: binary raw as a hex dump, text raw as text.
	all, _ := f.rd.List(ctx, Filter{Source: "mllp"}, 0)
	l, err := f.rd.Get(ctx, all.Letters[0].Partition, all.Letters[0].Offset)
	if err != nil {
		t.Fatal(err)
	}
	var show bytes.Buffer
	if err := WriteShow(&show, l); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(show.String(), "raw (hex):") || !strings.Contains(show.String(), "00 01 02") ||
		!strings.Contains(show.String(), "re-drivable:   no (raw only") || !strings.Contains(show.String(), "field:         MSH-9") {
		t.Errorf("show of a binary letter:\n%s", show.String())
	}
	if _, err := f.rd.Get(ctx, all.Letters[0].Partition, all.Letters[0].Offset+100); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get beyond the end: %v, want ErrNotFound", err)
	}
}

// TestRedrivePartial re-drives one letter holding two samples of an unbound
// device whose binding covers only the first: one sample is published, the
// other is dead-lettered again, and the attempt is audited.
func TestRedrivePartial(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	now := time.Now().Truncate(time.Millisecond)
	t1, t2 := now.Add(-10*time.Minute), now.Add(-2*time.Minute)
	dl := &vigilv1.DeadLetter{Reason: "unbound_device", Source: vigilv1.Source_SOURCE_MLLP, Tenant: "h", Device: "bed:ICU/1",
		MessageId: "MSG-7", Raw: []byte("OBX|..."),
		Batch: &vigilv1.SampleBatch{Tenant: "h", Device: "bed:ICU/1", Source: vigilv1.Source_SOURCE_MLLP, MessageId: "MSG-7",
			IngestTimeMs: now.UnixMilli(), Location: "ICU^1",
			Samples: []*vigilv1.Sample{
				{Metric: "body_temperature", Value: 101.3, Unit: "[degF]", EventTimeMs: t1.UnixMilli(), SourceCode: "MDC:150364"},
				{Value: 95, Unit: "%", EventTimeMs: t2.UnixMilli(), SourceCode: "LOINC:59408-5"},
			}}}
	if err := f.pub.DeadLetter(ctx, []*vigilv1.DeadLetter{dl}); err != nil {
		t.Fatal(err)
	}
	store, err := binding.New(f.cfg, stage.Deps{})
	if err != nil {
		t.Fatal(err)
	}
	sctx, cancel := context.WithCancel(ctx)
	defer func() { cancel(); _ = store.Close(ctx) }()
	go func() { _ = store.Run(sctx) }()
	// Bound from before t1 until between t1 and t2.
	if err := store.Bind(ctx, binding.Binding{Tenant: "h", Device: "bed:ICU/1", Patient: "p-9", FromMs: t1.Add(-time.Minute).UnixMilli(),
		ToMs: t1.Add(time.Minute).UnixMilli(), Source: binding.SourceADT}); err != nil {
		t.Fatal(err)
	}
	audit, err := NewAuditWriter(f.cfg.Kafka)
	if err != nil {
		t.Fatal(err)
	}
	defer audit.Close()
	var letters []Letter
	if err := f.rd.Scan(ctx, Filter{Reason: "unbound_device"}, func(l Letter) error { letters = append(letters, l); return nil }); err != nil {
		t.Fatal(err)
	}
	r := &Redriver{Resolver: store, Validator: validate.New(catalog.Default(), validate.LimitsFrom(f.cfg.Ingest)),
		Publisher: f.pub, Audit: audit, Actor: "tester"}
	sum, err := r.Redrive(ctx, letters)
	if err != nil {
		t.Fatal(err)
	}
	if sum.Letters != 1 || sum.Samples != 1 || len(sum.Results) != 1 || sum.Results[0].Outcome != OutcomePartial {
		t.Fatalf("summary: %+v", sum)
	}

	recs := testenv.Consume(t, f.cfg.Kafka.Brokers[0], f.cfg.Kafka.Topics.Samples, 1, 10*time.Second)
	if len(recs) != 1 {
		t.Fatalf("samples: %d records", len(recs))
	}
	var b vigilv1.SampleBatch
	_ = proto.Unmarshal(recs[0].Value, &b)
	s := b.Samples[0]
	if b.Patient != "p-9" || b.MessageId != "MSG-7" || b.Source != vigilv1.Source_SOURCE_MLLP || b.Location != "ICU^1" ||
		len(b.Samples) != 1 || s.Metric != "body_temperature" || s.Unit != "Cel" || s.Value < 38.49 || s.Value > 38.51 || s.SourceCode != "MDC:150364" {
		t.Errorf("re-driven batch: %v", &b)
	}
	ls, err := f.rd.List(ctx, Filter{Reason: "unbound_device"}, 0)
	if err != nil {
		t.Fatal(err)
	}
	if ls.Total != 2 {
		t.Fatalf("unbound letters after the redrive: %d, want the original and a fresh one", ls.Total)
	}
	orig, fresh := ls.Letters[0], ls.Letters[1]
	if len(orig.Redrives) != 1 || orig.Redrives[0].Outcome != OutcomePartial || orig.Redrives[0].Actor != "tester" {
		t.Errorf("original letter's re-drives: %v", orig.Redrives)
	}
	if len(fresh.Redrives) != 0 || fresh.DL.Batch == nil || len(fresh.DL.Batch.Samples) != 1 ||
		fresh.DL.Batch.Samples[0].SourceCode != "LOINC:59408-5" || !strings.Contains(fresh.DL.Message, orig.ID()) {
		t.Errorf("fresh letter: %v", fresh.DL)
	}
	// Re-driving both again: the original is skipped, the fresh one is
	// still unbound.
	r.DryRun = true
	sum, err = r.Redrive(ctx, ls.Letters)
	if err != nil || sum.Skipped != 1 || sum.RefusedAgain != 1 {
		t.Errorf("dry run over both: %+v %v", sum, err)
	}
}

func TestParseTimeAndID(t *testing.T) {
	now := time.Date(2026, 11, 23, 12, 0, 0, 0, time.UTC)
	for in, want := range map[string]time.Time{
		"2026-11-23T08:00:00Z": time.Date(2026, 11, 23, 8, 0, 0, 0, time.UTC),
		"2026-11-22":           time.Date(2026, 11, 22, 0, 0, 0, 0, time.UTC),
		"2h":                   now.Add(-2 * time.Hour),
	} {
		if got, err := ParseTime(in, now); err != nil || !got.Equal(want) {
			t.Errorf("ParseTime(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	if _, err := ParseTime("yesterday", now); err == nil {
		t.Error("ParseTime accepted yesterday")
	}
	if p, o, err := ParseID("2:1234"); err != nil || p != 2 || o != 1234 {
		t.Errorf("ParseID: %d %d %v", p, o, err)
	}
	for _, bad := range []string{"2", "a:1", "1:-3", ""} {
		if _, _, err := ParseID(bad); err == nil {
			t.Errorf("ParseID(%q) accepted", bad)
		}
	}
}
