package simulator

import (
	"reflect"
	"sort"
	"testing"
	"time"

	"github.com/vigilhealth/vigil/internal/catalog"
)

var t0 = time.Date(2026, 11, 23, 10, 0, 0, 0, time.UTC)

// news2 scores the last values of one patient on the published NEWS2 chart
// (Royal College of Physicians, 2017; SpO2 scale 1). It reports false when an
// input is missing.
func news2(last map[string]float64) (int, bool) {
	for _, m := range []string{"respiratory_rate", "spo2", "systolic_bp", "heart_rate", "consciousness", "body_temperature"} {
		if _, ok := last[m]; !ok {
			return 0, false
		}
	}
	score := 0
	band := func(v float64, bands [][3]float64) {
		for _, b := range bands {
			if v >= b[0] && v <= b[1] {
				score += int(b[2])
				return
			}
		}
	}
	band(last["respiratory_rate"], [][3]float64{{0, 8, 3}, {9, 11, 1}, {12, 20, 0}, {21, 24, 2}, {25, 999, 3}})
	band(last["spo2"], [][3]float64{{0, 91, 3}, {92, 93, 2}, {94, 95, 1}, {96, 100, 0}})
	if last["fio2"] > 21 {
		score += 2
	}
	band(last["systolic_bp"], [][3]float64{{0, 90, 3}, {91, 100, 2}, {101, 110, 1}, {111, 219, 0}, {220, 999, 3}})
	band(last["heart_rate"], [][3]float64{{0, 40, 3}, {41, 50, 1}, {51, 90, 0}, {91, 110, 1}, {111, 130, 2}, {131, 999, 3}})
	if last["consciousness"] > 0 {
		score += 3
	}
	band(last["body_temperature"], [][3]float64{{0, 35.0, 3}, {35.05, 36.0, 1}, {36.05, 38.0, 0}, {38.05, 39.0, 1}, {39.05, 99, 2}})
	return score, true
}

// run steps a ward for seconds and calls check every minute with the last
// value of every metric per patient.
func run(cfg WardConfig, seconds int, check func(t int, last map[string]map[string]float64)) []Reading {
	w := NewWard(cfg)
	last := map[string]map[string]float64{}
	var all []Reading
	for t := 1; t <= seconds; t++ {
		rs := w.Step(nil)
		all = append(all, rs...)
		for _, r := range rs {
			if last[r.Patient] == nil {
				last[r.Patient] = map[string]float64{}
			}
			last[r.Patient][r.Metric] = r.Value
		}
		if check != nil && t%60 == 0 {
			check(t, last)
		}
	}
	return all
}

func TestDeterioratingPatientReachesNEWS2Five(t *testing.T) {
	for seed := int64(1); seed <= 8; seed++ {
		cfg := WardConfig{Beds: 4, Wearables: 1, Deteriorating: 2, Seed: seed, Start: t0}
		var at2, at25 int
		var confused, oxygen bool
		stableHigh, stableChecks := 0, 0
		run(cfg, 30*60, func(ts int, last map[string]map[string]float64) {
			for _, p := range []string{"icu-01", "icu-02"} {
				score, ok := news2(last[p])
				if ts >= 60 && !ok {
					t.Fatalf("seed %d: %s lacks NEWS2 inputs at %ds: %v", seed, p, ts, last[p])
				}
				if ts >= 60 && score < 5 {
					t.Errorf("seed %d: deteriorating %s NEWS2 %d < 5 at %ds: %v", seed, p, score, ts, last[p])
				}
				if p == "icu-01" && ts == 120 {
					at2 = score
				}
				if p == "icu-01" && ts == 25*60 {
					at25 = score
					confused = last[p]["consciousness"] == 1
					oxygen = last[p]["fio2"] > 21
				}
			}
			for _, p := range []string{"icu-03", "icu-04"} {
				if score, ok := news2(last[p]); ok {
					stableChecks++
					if score >= 5 {
						stableHigh++
					}
				}
			}
		})
		if at25 < at2+3 || at25 < 9 {
			t.Errorf("seed %d: NEWS2 went from %d at 2 min to %d at 25 min; want a clear rise to ≥ 9", seed, at2, at25)
		}
		if !confused || !oxygen {
			t.Errorf("seed %d: at 25 min confused=%v on oxygen=%v; want both", seed, confused, oxygen)
		}
		if stableHigh*10 > stableChecks {
			t.Errorf("seed %d: stable patients scored ≥ 5 in %d of %d checks", seed, stableHigh, stableChecks)
		}
	}
}

func TestVitalsTrendLikeSepsis(t *testing.T) {
	cfg := WardConfig{Beds: 1, Deteriorating: 1, Seed: 3, Start: t0}
	mean := func(rs []Reading, metric string, from, to int64) float64 {
		var sum float64
		var n int
		for _, r := range rs {
			if r.Metric == metric && r.TimeMs >= t0.UnixMilli()+from*1000 && r.TimeMs < t0.UnixMilli()+to*1000 {
				sum += r.Value
				n++
			}
		}
		if n == 0 {
			t.Fatalf("no %s between %ds and %ds", metric, from, to)
		}
		return sum / float64(n)
	}
	rs := run(cfg, 30*60, nil)
	early, late := [2]int64{0, 300}, [2]int64{1500, 1800}
	for metric, rises := range map[string]bool{"heart_rate": true, "respiratory_rate": true, "body_temperature": true,
		"systolic_bp": false, "spo2": false} {
		e, l := mean(rs, metric, early[0], early[1]), mean(rs, metric, late[0], late[1])
		if rises && l <= e || !rises && l >= e {
			t.Errorf("%s: first 5 min %.1f, last 5 min %.1f; want it to %s", metric, e, l, map[bool]string{true: "rise", false: "fall"}[rises])
		}
	}
}

func TestReadingsAreValidAndScheduled(t *testing.T) {
	cat := catalog.Default()
	cfg := WardConfig{Beds: 6, Wearables: 3, Deteriorating: 2, Seed: 42, Start: t0, SeqBase: 1 << 32}
	rs := run(cfg, 20*60, nil)
	perDevice := map[string][]Reading{}
	counts := map[string]map[string]int{}
	for _, r := range rs {
		m, ok := cat.Lookup(r.Metric)
		if !ok || r.Unit != m.Unit {
			t.Fatalf("reading %+v: unknown metric or non-canonical unit", r)
		}
		if err := m.CheckRange(r.Value); err != nil {
			t.Fatalf("reading %+v: %v", r, err)
		}
		perDevice[r.Device] = append(perDevice[r.Device], r)
		if counts[r.Device] == nil {
			counts[r.Device] = map[string]int{}
		}
		counts[r.Device][r.Metric]++
	}
	for dev, list := range perDevice {
		for i := 1; i < len(list); i++ {
			if list[i].Seq != list[i-1].Seq+1 || list[i].TimeMs < list[i-1].TimeMs {
				t.Fatalf("%s: sequence or time not increasing at %d: %+v then %+v", dev, i, list[i-1], list[i])
			}
		}
		if list[0].Seq != 1<<32+1 {
			t.Errorf("%s: first seq %d, want SeqBase+1", dev, list[0].Seq)
		}
	}
	// A bed: 1 Hz vitals (minus gaps), NIBP every 5 min, temperature every
	// 4 min, consciousness.
	bed := counts["monitor-04"]
	if bed["heart_rate"] < 1000 || bed["systolic_bp"] != 4 || bed["diastolic_bp"] != 4 || bed["mean_arterial_pressure"] != 4 ||
		bed["body_temperature"] != 5 || bed["consciousness"] < 2 {
		t.Errorf("bed schedule over 20 min: %v", bed)
	}
	watch := counts["watch-01"]
	if watch["heart_rate"] < 100 || watch["heart_rate"] > 240 || watch["spo2"] > 20 || watch["steps"] > 20 || watch["spo2"] < 1 || watch["systolic_bp"] != 0 {
		t.Errorf("wearable schedule over 20 min: %v", watch)
	}
	var onO2 []string
	for dev, c := range counts {
		if c["fio2"] > 0 && c["oxygen_flow"] > 0 {
			onO2 = append(onO2, dev)
		}
	}
	sort.Strings(onO2)
	if len(onO2) == 0 {
		t.Errorf("no patient on oxygen")
	}
}

func TestSameSeedSameData(t *testing.T) {
	cfg := WardConfig{Beds: 3, Wearables: 2, Deteriorating: 1, Seed: 7, Start: t0}
	a := run(cfg, 900, nil)
	b := run(cfg, 900, nil)
	if !reflect.DeepEqual(a, b) {
		t.Fatal("same seed gave different readings")
	}
	cfg.Seed = 8
	c := run(cfg, 900, nil)
	if reflect.DeepEqual(a, c) {
		t.Fatal("different seeds gave the same readings")
	}
}

func TestGapsAndArtefactsHappen(t *testing.T) {
	cfg := WardConfig{Beds: 10, Seed: 5, Start: t0}
	rs := run(cfg, 3600, nil)
	gaps, artefacts := 0, 0
	lastHR := map[string]int64{}
	for _, r := range rs {
		if r.Metric != "heart_rate" {
			continue
		}
		if prev, ok := lastHR[r.Device]; ok && r.TimeMs-prev > 10_000 {
			gaps++
		}
		lastHR[r.Device] = r.TimeMs
	}
	for _, r := range rs {
		if r.Metric == "spo2" && r.Value < 85 {
			artefacts++
		}
	}
	if gaps == 0 || artefacts == 0 {
		t.Errorf("1 h of 10 beds: %d gaps, %d artefact readings; want some of each", gaps, artefacts)
	}
}
