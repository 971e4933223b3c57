package window

import (
	"runtime"
	"syscall"
	"testing"
	"time"

	"github.com/apache/arrow/go/v17/arrow/memory"
)

// vitals of the benchmark: 8 metrics at 1 Hz, values drifting the way a
// monitor's do (a few distinct values a minute).
var benchMetrics = []string{"heart_rate", "spo2", "respiratory_rate", "systolic_bp", "diastolic_bp", "mean_arterial_pressure", "body_temperature", "fio2"}

func benchValue(m, patient, sec int) float64 {
	wobble := float64((sec*7+patient*13)%5) - 2
	switch m {
	case 0:
		return 72 + wobble + float64(patient%20)
	case 1:
		return 96 + float64((sec+patient)%3)
	case 2:
		return 16 + wobble/2
	case 3:
		return 120 + wobble
	case 4:
		return 80 + wobble
	case 5:
		return 93 + wobble
	case 6:
		return 37 + float64((sec/30)%3)/10
	}
	return 21
}

// BenchmarkWindowEngine: 1-minute tumbling and 5-minute hopping windows
// (the default spec) over 10,000 patients x 8 metrics at 1 Hz, features
// built into Arrow records (one per simulated second), no Kafka. b.N counts
// samples; run with -cpu 1.
func BenchmarkWindowEngine(b *testing.B) {
	e, err := Compile(DefaultSpec(), Options{OutOfOrderness: 5 * time.Second, AllowedLateness: time.Minute}, catInfo)
	if err != nil {
		b.Fatal(err)
	}
	const patients = 10000
	ps := make([]*Patient, patients)
	for i := range ps {
		ps[i] = NewPatient()
	}
	mi := make([]int, len(benchMetrics))
	for i, n := range benchMetrics {
		mi[i], _ = e.Metric(n)
	}
	batch := NewBatch(memory.NewGoAllocator())
	defer batch.Release()
	rows := 0
	b.ReportAllocs()
	b.ResetTimer()
	cpu0 := cpuTime()
	done := 0
	for sec := 0; done < b.N; sec++ {
		t := pt0 + int64(sec)*1000
		for p := 0; p < patients && done < b.N; p++ {
			pt := ps[p]
			for m := range mi {
				e.Add(pt, mi[m], t, benchValue(m, p, sec))
			}
			done += len(mi)
			e.Advance(pt, batch, "bench", "p")
		}
		if batch.Len() > 0 {
			rows += batch.Len()
			batch.NewRecord().Release()
		}
	}
	b.ReportMetric(float64(done)/b.Elapsed().Seconds(), "samples/s")
	// The machine is shared: samples per second of CPU the process used
	// is the per-core figure whatever else runs.
	b.ReportMetric(float64(done)/(cpuTime()-cpu0).Seconds(), "samples/cpu-s")
	b.ReportMetric(float64(rows), "rows")
}

// cpuTime is the user and system CPU time the process used so far.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkEngineState measures the window state per patient at 100,000
// patients after a realistic minute of ICU vitals (HR, SpO2, RR at 1 Hz,
// blood pressure every 5 minutes, temperature once), steady state (5
// minutes fed so the hopping windows hold their 5 panes), default spec.
func BenchmarkEngineState(b *testing.B) {
	for range b.N {
		b.ReportMetric(stateBytesPerPatient(b, 100000), "bytes/patient")
	}
}

func stateBytesPerPatient(tb testing.TB, patients int) float64 {
	e, err := Compile(DefaultSpec(), Options{OutOfOrderness: 5 * time.Second, AllowedLateness: time.Minute}, catInfo)
	if err != nil {
		tb.Fatal(err)
	}
	batch := NewBatch(memory.NewGoAllocator())
	defer batch.Release()
	runtime.GC()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	ps := make(map[string]*Patient, patients)
	keys := make([]string, patients)
	for i := range keys {
		keys[i] = "st-mary/p-" + string(rune('a'+i%26)) + itoa(i)
		ps[keys[i]] = NewPatient()
	}
	hr, _ := e.Metric("heart_rate")
	sp, _ := e.Metric("spo2")
	rr, _ := e.Metric("respiratory_rate")
	sbp, _ := e.Metric("systolic_bp")
	dbp, _ := e.Metric("diastolic_bp")
	mp, _ := e.Metric("mean_arterial_pressure")
	temp, _ := e.Metric("body_temperature")
	for sec := 0; sec < 330; sec++ {
		t := pt0 + int64(sec)*1000
		for i, k := range keys {
			p := ps[k]
			e.Add(p, hr, t, benchValue(0, i, sec))
			e.Add(p, sp, t, benchValue(1, i, sec))
			e.Add(p, rr, t, benchValue(2, i, sec))
			if (sec+i)%300 == 0 {
				e.Add(p, sbp, t, benchValue(3, i, sec))
				e.Add(p, dbp, t, benchValue(4, i, sec))
				e.Add(p, mp, t, benchValue(5, i, sec))
			}
			if sec == 7 {
				e.Add(p, temp, t, 37.2)
			}
			e.Advance(p, batch, "t", k)
		}
		if batch.Len() > 0 {
			batch.NewRecord().Release()
		}
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	per := float64(after.HeapAlloc-before.HeapAlloc) / float64(patients)
	runtime.KeepAlive(ps)
	return per
}

func itoa(i int) string {
	var buf [20]byte
	n := len(buf)
	for {
		n--
		buf[n] = byte('0' + i%10)
		i /= 10
		if i == 0 {
			break
		}
	}
	return string(buf[n:])
}

// TestStateUnder4KiB checks the memory target at 100,000 patients (10,000
// under -short).
func TestStateUnder4KiB(t *testing.T) {
	n := 100000
	if testing.Short() {
		n = 10000
	}
	per := stateBytesPerPatient(t, n)
	t.Logf("window state: %.0f bytes/patient at %d patients (incl. map entry and key)", per, n)
	if per > 4096 {
		t.Errorf("window state %.0f bytes/patient, want under 4 KiB", per)
	}
}
