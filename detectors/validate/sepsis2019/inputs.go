package sepsis2019

import (
	"math"

	"github.com/vigilhealth/vigil/ingest/validate"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// Device is the device id of the samples the validation publishes.
const Device = "psv"

// Consciousness is the catalogue metric of the ACVPU level. The challenge
// data have no consciousness column; the validation takes every patient as
// Alert (ACVPU 0) by publishing one consciousness sample of 0 at admission
// (ICULOS 0), which the scores carry forward for the whole stay. A sample,
// rather than a configured default, keeps the pipeline unchanged and makes
// every score record show the assumption as an input with its time.
const Consciousness = "consciousness"

// Sample is one accepted canonical sample of a row.
type Sample struct {
	Metric string
	// Value is in the metric's canonical unit Unit (FiO2 in %).
	Value  float64
	Unit   string
	TimeMs int64
}

// Refused is one value of the data that ingest validation refused (e.g. a
// FiO2 below 0.21, outside the catalogue's range).
type Refused struct {
	Column  string
	Row     int
	Refusal *validate.Refusal
}

// Canonical holds a patient's rows as ingest accepts them: per row the
// samples (canonical units) that validation accepted, and what it refused.
type Canonical struct {
	Patient *Patient
	// Admission is the consciousness sample at admission.
	Admission Sample
	// Rows[i] are the accepted samples of Patient.Rows[i].
	Rows    [][]Sample
	Refused []Refused
}

// Canonicalize validates every value of p with v, as ingest does, at
// processing time nowMs (Unix ms; the event times are in 2019, so nowMs
// must be later). The tenant names the samples in refusals only.
func Canonicalize(v *validate.Validator, tenant string, p *Patient, nowMs int64) *Canonical {
	c := &Canonical{Patient: p, Rows: make([][]Sample, len(p.Rows)),
		Admission: Sample{Metric: Consciousness, Value: 0, Unit: "{ACVPU}", TimeMs: Admission().UnixMilli()}}
	var out vigilv1.Sample
	for i := range p.Rows {
		r := &p.Rows[i]
		t := r.TimeMs()
		for j, col := range columns {
			x := r.Values[j]
			if math.IsNaN(x) {
				continue
			}
			in := validate.Input{Tenant: tenant, Patient: p.ID, Device: Device, Metric: col.Metric, Value: x, HasValue: true,
				Unit: col.Unit, EventTimeMs: t, HasTime: true, Sequence: uint64(i + 1), SourceCode: "PSV:" + col.Name}
			if rf := v.Sample(&in, nowMs, &out); rf != nil {
				c.Refused = append(c.Refused, Refused{Column: col.Name, Row: i, Refusal: rf})
				continue
			}
			c.Rows[i] = append(c.Rows[i], Sample{Metric: out.Metric, Value: out.Value, Unit: out.Unit, TimeMs: t})
		}
	}
	return c
}

// observed is the carried-forward state of one metric.
type observed struct {
	value  float64
	timeMs int64
	count  int
}

// Carry is a patient's carried-forward inputs as the stream engine sees
// them: per metric the newest accepted value, its time and the count of
// observations so far, and the time of the first sample. It implements
// detectors/model's Source. Not safe for concurrent use.
type Carry struct {
	by      map[string]*observed
	firstMs int64
}

// NewCarry returns an empty Carry.
func NewCarry() *Carry { return &Carry{by: map[string]*observed{}} }

// Add records samples in time order.
func (c *Carry) Add(ss ...Sample) {
	for _, s := range ss {
		if c.firstMs == 0 || s.TimeMs < c.firstMs {
			c.firstMs = s.TimeMs
		}
		o := c.by[s.Metric]
		if o == nil {
			o = &observed{}
			c.by[s.Metric] = o
		}
		o.count++
		if s.TimeMs >= o.timeMs {
			o.value, o.timeMs = s.Value, s.TimeMs
		}
	}
}

// Latest is the newest value of metric (model.Source).
func (c *Carry) Latest(metric string) (float64, int64, bool) {
	o := c.by[metric]
	if o == nil {
		return 0, 0, false
	}
	return o.value, o.timeMs, true
}

// FirstSampleMs is the time of the first sample, 0 when none (model.Source).
func (c *Carry) FirstSampleMs() int64 { return c.firstMs }

// Count is the number of observations of metric so far (model.Source).
func (c *Carry) Count(metric string) int {
	if o := c.by[metric]; o != nil {
		return o.count
	}
	return 0
}

// clone returns a copy of c.
func (c *Carry) clone() *Carry {
	d := &Carry{by: make(map[string]*observed, len(c.by)), firstMs: c.firstMs}
	for k, o := range c.by {
		x := *o
		d.by[k] = &x
	}
	return d
}

// quantise rounds each metric's value to its decimals (math.Round of
// value × 10^decimals, as the window engine stores values).
func (c *Carry) quantise(decimals map[string]int) {
	for k, o := range c.by {
		if d, ok := decimals[k]; ok {
			scale := math.Round(math.Pow(10, float64(d)))
			o.value = float64(int32(math.Round(o.value*scale))) / scale
		}
	}
}
