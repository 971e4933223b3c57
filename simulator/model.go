package simulator

import (
	"fmt"
	"math"
	"math/rand/v2"
	"time"
)

// Reading is one simulated measurement, in the catalogue's canonical unit.
type Reading struct {
	Patient string
	Device  string
	Metric  string
	Unit    string
	Value   float64
	TimeMs  int64
	// Seq is the device's sequence number.
	Seq uint64
}

// WardConfig describes the simulated population.
type WardConfig struct {
	// Beds are ICU beds with a bedside monitor; Wearables are patients at
	// home with a wrist wearable.
	Beds, Wearables int
	// Deteriorating patients (beds first, then wearables) develop sepsis.
	Deteriorating int
	// Seed makes the ward deterministic: the same seed and start give the
	// same readings.
	Seed int64
	// Start is the simulated time of the first step.
	Start time.Time
	// SeqBase is added to every device's sequence numbers (so that a
	// restarted simulator does not reuse them).
	SeqBase uint64
}

// Deterioration trajectory: a septic patient's severity rises linearly from
// SeverityAtStart at the start of the simulation to 1 at RampDuration.
// Vitals move from the patient's baseline towards the septic targets in
// proportion; at the starting severity the published NEWS2 chart already
// scores at least 5 for any baseline the model draws, so an alert fires
// within the first minute of a run.
const (
	SeverityAtStart = 0.55
	RampDuration    = 25 * time.Minute
	// Severity at which a deteriorating patient is given oxygen, and at
	// which new confusion appears.
	oxygenSeverity    = 0.75
	confusionSeverity = 0.85
	// No gaps or artefacts in the first quiet minutes of a run.
	quietStart = 5 * 60
)

// Septic targets at severity 1.
const (
	septicHR   = 135
	septicRR   = 30
	septicTemp = 39.4
	septicSBP  = 82
	septicDBP  = 46
	septicSpO2 = 88
)

// Ward is the physiology model of every simulated patient. It is advanced
// one simulated second at a time and is deterministic for a given
// WardConfig. It is pure (no I/O, no clock) and not safe for concurrent use.
type Ward struct {
	cfg      WardConfig
	patients []*patient
	step     int64 // simulated seconds since Start
}

type kind int

const (
	bed kind = iota
	wearable
)

// ou is an Ornstein-Uhlenbeck process (mean-reverting correlated noise) with
// mean 0, per-second reversion theta and stationary standard deviation sd.
type ou struct {
	x, theta, sd float64
}

func (o *ou) next(r *rand.Rand) float64 {
	sigma := o.sd * math.Sqrt(2*o.theta)
	o.x += -o.theta*o.x + sigma*r.NormFloat64()
	return o.x
}

type patient struct {
	id, device    string
	kind          kind
	deteriorating bool
	r             *rand.Rand
	seq           uint64

	// Baselines.
	hr, rr, spo2, sbp, dbp, temp float64
	onOxygen                     bool
	fio2, flow                   float64

	// Correlated noise.
	stress, nHR, nRR, nSpO2, nBP, nTemp ou

	// Schedules, in simulated seconds since Start.
	nextBP, nextTemp, nextACVPU, nextO2, nextHR, nextSpO2, nextSteps int64
	gapUntil                                                         int64
	artefactUntil                                                    int64
	artefactKind                                                     int
	confused                                                         bool
	walking                                                          bool
	steps                                                            float64
}

// NewWard builds the ward for cfg.
func NewWard(cfg WardConfig) *Ward {
	w := &Ward{cfg: cfg}
	n := 0
	for i := range cfg.Beds {
		w.patients = append(w.patients, newPatient(cfg, n, bed, fmt.Sprintf("icu-%02d", i+1), fmt.Sprintf("monitor-%02d", i+1), n < cfg.Deteriorating))
		n++
	}
	for i := range cfg.Wearables {
		w.patients = append(w.patients, newPatient(cfg, n, wearable, fmt.Sprintf("home-%02d", i+1), fmt.Sprintf("watch-%02d", i+1), n < cfg.Deteriorating))
		n++
	}
	return w
}

func newPatient(cfg WardConfig, idx int, k kind, id, device string, det bool) *patient {
	r := rand.New(rand.NewPCG(uint64(cfg.Seed), 0x9e3779b97f4a7c15^uint64(idx)))
	p := &patient{id: id, device: device, kind: k, deteriorating: det, r: r, seq: cfg.SeqBase}
	p.hr = 60 + 30*r.Float64()
	p.rr = 12 + 6*r.Float64()
	p.spo2 = 96 + 3*r.Float64()
	p.sbp = 108 + 30*r.Float64()
	p.dbp = p.sbp*0.58 + 4*r.NormFloat64()
	p.temp = 36.5 + 0.6*r.Float64()
	p.stress = ou{theta: 0.01, sd: 1}
	p.nHR = ou{theta: 0.05, sd: 3}
	p.nRR = ou{theta: 0.05, sd: 1}
	p.nSpO2 = ou{theta: 0.03, sd: 0.6}
	p.nBP = ou{theta: 0.005, sd: 5}
	p.nTemp = ou{theta: 0.001, sd: 0.1}
	// One stable bed patient in three is on oxygen (e.g. after surgery).
	if k == bed && !det && r.IntN(3) == 0 {
		p.onOxygen, p.fio2, p.flow = true, 24+4*float64(r.IntN(2)), 1+float64(r.IntN(2))
	}
	// Every NEWS2 input arrives within the first 40 simulated seconds, so
	// the first one-minute window already scores.
	p.nextBP = 2 + r.Int64N(30)
	p.nextTemp = 3 + r.Int64N(30)
	p.nextACVPU = 1 + r.Int64N(20)
	p.nextO2 = r.Int64N(30)
	p.nextHR = r.Int64N(5)
	p.nextSpO2 = r.Int64N(60)
	p.nextSteps = r.Int64N(60)
	return p
}

// Now is the simulated time of the next step.
func (w *Ward) Now() time.Time {
	return w.cfg.Start.Add(time.Duration(w.step) * time.Second)
}

// Step advances the ward by one simulated second and appends that second's
// readings to dst.
func (w *Ward) Step(dst []Reading) []Reading {
	t := w.step
	ms := w.cfg.Start.UnixMilli() + t*1000
	circ := circadian(w.cfg.Start.Add(time.Duration(t) * time.Second))
	for _, p := range w.patients {
		dst = p.step(dst, t, ms, circ)
	}
	w.step++
	return dst
}

// Severity is a deteriorating patient's severity at t simulated seconds.
func Severity(t int64) float64 {
	s := SeverityAtStart + (1-SeverityAtStart)*float64(t)/RampDuration.Seconds()
	return math.Min(s, 1)
}

// circadian is +1 at 16:00 and -1 at 04:00 UTC.
func circadian(t time.Time) float64 {
	h := float64(t.Hour()) + float64(t.Minute())/60
	return math.Cos(2 * math.Pi * (h - 16) / 24)
}

func toward(base, target, s float64) float64 { return base + s*(target-base) }

func (p *patient) emit(dst []Reading, ms int64, metric, unit string, v float64) []Reading {
	p.seq++
	return append(dst, Reading{Patient: p.id, Device: p.device, Metric: metric, Unit: unit, Value: v, TimeMs: ms, Seq: p.seq})
}

func (p *patient) step(dst []Reading, t, ms int64, circ float64) []Reading {
	r := p.r
	// Advance every noise process every second, emitted or not, so the
	// stream of random numbers does not depend on the schedules.
	z := p.stress.next(r)
	nHR, nRR, nSpO2, nBP, nTemp := p.nHR.next(r), p.nRR.next(r), p.nSpO2.next(r), p.nBP.next(r), p.nTemp.next(r)
	white := r.NormFloat64()

	s := 0.0
	if p.deteriorating {
		s = Severity(t)
	}
	if p.deteriorating && !p.onOxygen && s >= oxygenSeverity {
		// The nurse starts oxygen by nasal cannula.
		p.onOxygen, p.fio2, p.flow, p.nextO2 = true, 28, 2, t
	}
	if p.kind == wearable {
		if p.walking && r.Float64() < 1.0/300 || !p.walking && r.Float64() < 1.0/(1200-800*math.Max(circ, 0)) {
			p.walking = !p.walking && s < 0.7
		}
	}

	hr := toward(p.hr, septicHR, s) + 4*circ + 4*z + nHR + 0.7*white
	rr := toward(p.rr, septicRR, s) + 0.5*circ + 1.2*z + nRR
	spo2 := toward(p.spo2, septicSpO2, s) + nSpO2 - 0.2*math.Max(z, 0)
	sbp := toward(p.sbp, septicSBP, s) + 5*circ + 4*z + nBP
	dbp := toward(p.dbp, septicDBP, s) + 3*circ + 2*z + 0.6*nBP
	temp := toward(p.temp, septicTemp, s) + 0.25*circ + nTemp
	if p.onOxygen {
		spo2 += 2
	}
	if p.walking {
		hr += 25
		rr += 4
	}

	// Gaps (probe off, watch off the wrist) and artefacts (motion), never
	// in the first quiet minutes.
	if t >= quietStart && t >= p.gapUntil && t >= p.artefactUntil {
		switch {
		case p.kind == bed && r.Float64() < 1.0/3600:
			p.gapUntil = t + 15 + r.Int64N(75)
		case p.kind == wearable && r.Float64() < 1.0/7200:
			p.gapUntil = t + 300 + r.Int64N(900)
		case p.kind == bed && r.Float64() < 1.0/1800:
			p.artefactUntil = t + 3 + r.Int64N(6)
			p.artefactKind = r.IntN(2)
		}
	}
	if t < p.artefactUntil {
		if p.artefactKind == 0 {
			spo2 -= 12
		} else {
			hr = math.Min(hr*1.8, 250)
		}
	}
	inGap := t < p.gapUntil

	switch p.kind {
	case bed:
		if !inGap {
			dst = p.emit(dst, ms, "heart_rate", "/min", round(clamp(hr, 25, 250)))
			dst = p.emit(dst, ms, "spo2", "%", round(clamp(spo2, 60, 100)))
			dst = p.emit(dst, ms, "respiratory_rate", "/min", round(clamp(rr, 4, 60)))
		}
		if t >= p.nextBP {
			p.nextBP = t + 300
			sys, dia := round(clamp(sbp, 50, 230)), round(clamp(dbp, 25, 140))
			dia = math.Min(dia, sys-10)
			dst = p.emit(dst, ms, "systolic_bp", "mm[Hg]", sys)
			dst = p.emit(dst, ms, "diastolic_bp", "mm[Hg]", dia)
			dst = p.emit(dst, ms, "mean_arterial_pressure", "mm[Hg]", round(dia+(sys-dia)/3))
		}
		if t >= p.nextTemp {
			p.nextTemp = t + 240
			dst = p.emit(dst, ms, "body_temperature", "Cel", math.Round(clamp(temp, 34, 42)*10)/10)
		}
		confused := p.deteriorating && s >= confusionSeverity
		if t >= p.nextACVPU || confused != p.confused {
			p.nextACVPU = t + 900
			p.confused = confused
			acvpu := 0.0
			if confused {
				acvpu = 1
			}
			dst = p.emit(dst, ms, "consciousness", "{ACVPU}", acvpu)
		}
		if p.onOxygen && t >= p.nextO2 {
			p.nextO2 = t + 60
			dst = p.emit(dst, ms, "fio2", "%", p.fio2)
			dst = p.emit(dst, ms, "oxygen_flow", "L/min", p.flow)
		}
	case wearable:
		if p.walking {
			p.steps += 1.6 + 0.3*r.NormFloat64()
		}
		if inGap {
			break
		}
		if t >= p.nextHR {
			p.nextHR = t + 5
			dst = p.emit(dst, ms, "heart_rate", "/min", round(clamp(hr, 30, 220)))
		}
		if t >= p.nextSpO2 {
			p.nextSpO2 = t + 60
			dst = p.emit(dst, ms, "spo2", "%", round(clamp(spo2, 70, 100)))
		}
		if t >= p.nextSteps {
			p.nextSteps = t + 60
			dst = p.emit(dst, ms, "steps", "{steps}", math.Max(0, math.Round(p.steps)))
			p.steps = 0
		}
	}
	return dst
}

func round(v float64) float64 { return math.Round(v) }

func clamp(v, lo, hi float64) float64 { return math.Max(lo, math.Min(hi, v)) }
