package stream

import (
	"math"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// appendScore appends the protobuf encoding of s to b: the bytes
// proto.MarshalOptions{Deterministic: true} gives (fields in number order,
// proto3 zero values left out, every element of a repeated field
// written), except that unknown fields are not written.
//
// Hand-written on protowire, like window.AppendFeatureWindow, because
// scores are emitted for most input records (every change of a NEWS2
// component and every window end) and proto.Marshal was a twentieth of
// the stage's CPU for them. TestAppendScoreMatchesProto compares it with
// proto.Marshal over every field, so a field added to scores.proto and
// not here fails it. It reads s only and allocates nothing when b has
// room.
func appendScore(b []byte, s *vigilv1.Score) []byte {
	b = appendVarint(b, 1, uint64(s.GetSchemaVersion()))
	b = appendString(b, 2, s.GetId())
	b = appendString(b, 3, s.GetTenant())
	b = appendString(b, 4, s.GetPatient())
	b = appendString(b, 5, s.GetKind())
	b = appendDouble(b, 6, s.GetValue())
	b = appendString(b, 7, s.GetBand())
	b = appendString(b, 8, s.GetRuleset())
	b = appendString(b, 9, s.GetRulesetVersion())
	b = appendString(b, 10, s.GetRulesetHash())
	b = appendVarint(b, 11, uint64(s.GetEventTimeMs()))
	for _, c := range s.GetComponents() {
		b = protowire.AppendTag(b, 12, protowire.BytesType)
		b = protowire.AppendVarint(b, uint64(sizeComponent(c)))
		b = appendComponent(b, c)
	}
	for _, m := range s.GetMissing() {
		b = protowire.AppendTag(b, 13, protowire.BytesType)
		b = protowire.AppendString(b, m)
	}
	for _, m := range s.GetStale() {
		b = protowire.AppendTag(b, 14, protowire.BytesType)
		b = protowire.AppendString(b, m)
	}
	b = appendBool(b, 15, s.GetSingleParameterRed())
	b = appendVarint(b, 16, uint64(s.GetEmittedTimeMs()))
	for _, m := range s.GetTopContributors() {
		b = protowire.AppendTag(b, 17, protowire.BytesType)
		b = protowire.AppendString(b, m)
	}
	// Baseline scores only (emitted on band and drift changes): the
	// generic encoder is cheap enough there.
	for _, d := range s.GetBaselineDrifts() {
		b = protowire.AppendTag(b, 30, protowire.BytesType)
		b = protowire.AppendVarint(b, uint64(proto.Size(d)))
		b, _ = proto.MarshalOptions{Deterministic: true}.MarshalAppend(b, d)
	}
	return b
}

func sizeComponent(c *vigilv1.ScoreComponent) int {
	n := 0
	str := func(num protowire.Number, s string) {
		if s != "" {
			n += protowire.SizeTag(num) + protowire.SizeBytes(len(s))
		}
	}
	dbl := func(num protowire.Number, v float64) {
		if v != 0 || math.Signbit(v) {
			n += protowire.SizeTag(num) + 8
		}
	}
	str(1, c.GetParameter())
	str(2, c.GetMetric())
	dbl(3, c.GetInputValue())
	str(4, c.GetInputUnit())
	if t := c.GetInputTimeMs(); t != 0 {
		n += protowire.SizeTag(5) + protowire.SizeVarint(uint64(t))
	}
	dbl(6, c.GetPoints())
	if c.GetMissing() {
		n += protowire.SizeTag(7) + 1
	}
	if c.GetStale() {
		n += protowire.SizeTag(8) + 1
	}
	str(9, c.GetBand())
	dbl(30, c.GetBaselineMedian())
	dbl(31, c.GetBaselineMad())
	return n
}

func appendComponent(b []byte, c *vigilv1.ScoreComponent) []byte {
	b = appendString(b, 1, c.GetParameter())
	b = appendString(b, 2, c.GetMetric())
	b = appendDouble(b, 3, c.GetInputValue())
	b = appendString(b, 4, c.GetInputUnit())
	b = appendVarint(b, 5, uint64(c.GetInputTimeMs()))
	b = appendDouble(b, 6, c.GetPoints())
	b = appendBool(b, 7, c.GetMissing())
	b = appendBool(b, 8, c.GetStale())
	b = appendString(b, 9, c.GetBand())
	b = appendDouble(b, 30, c.GetBaselineMedian())
	b = appendDouble(b, 31, c.GetBaselineMad())
	return b
}

func appendVarint(b []byte, num protowire.Number, v uint64) []byte {
	if v == 0 {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.VarintType)
	return protowire.AppendVarint(b, v)
}

func appendString(b []byte, num protowire.Number, s string) []byte {
	if s == "" {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.BytesType)
	return protowire.AppendString(b, s)
}

// appendDouble leaves out +0 only, as proto3 does (-0 is written).
func appendDouble(b []byte, num protowire.Number, v float64) []byte {
	if v == 0 && !math.Signbit(v) {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.Fixed64Type)
	return protowire.AppendFixed64(b, math.Float64bits(v))
}

func appendBool(b []byte, num protowire.Number, v bool) []byte {
	if !v {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.VarintType)
	return append(b, 1)
}
