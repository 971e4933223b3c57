package chsink

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"math"
	"slices"
	"strings"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// Table names (infra/clickhouse/migrations).
const (
	tableSamples     = "samples"
	tableFeatures    = "features"
	tableScores      = "scores"
	tableAlerts      = "alerts"
	tableDeadLetters = "dead_letters"
)

// spec describes how one topic's records become rows of one table.
type spec struct {
	table string
	// message is the protobuf message type of the topic's values.
	message string
	// into is the table the rows are inserted into when it is not table
	// (alerts: alerts_v2, see migration 0007; table stays the name in
	// metrics and status).
	into string
	// columns are named in the INSERT, in the order rows hold values.
	columns []string
	// rows decodes one record value into rows. A decoding or validation
	// failure is a *PermanentError naming the field.
	rows func(value []byte) ([][]any, error)
}

func (s spec) insert() string {
	into := s.table
	if s.into != "" {
		into = s.into
	}
	return "INSERT INTO " + into + " (" + strings.Join(s.columns, ", ") + ")"
}

// tableAlertsV2 is the table alert rows go into since migration 0007
// (alerts is a view of it).
const tableAlertsV2 = "alerts_v2"

// logicalTable maps a physical table to the sink's name for it.
func logicalTable(physical string) string {
	if physical == tableAlertsV2 {
		return tableAlerts
	}
	return physical
}

var sampleColumns = []string{
	"tenant", "patient", "device", "metric", "value", "unit", "event_time", "event_time_ms",
	"ingest_time_ms", "source", "sequence", "quality", "source_code", "channel", "message_id", "location",
}

var featureColumns = []string{
	"tenant", "patient", "metric", "unit", "kind", "size_ms", "step_ms", "window_start", "window_start_ms",
	"window_end_ms", "version", "count", "mean", "min", "max", "std", "last", "first_time_ms", "last_time_ms",
	"slope_per_min", "median", "p05", "p95", "completeness", "derived.name", "derived.value",
	"emitted_time_ms", "watermark_ms", "window_name", "p25", "p75", "since_last_ms", "derived_metric",
}

var scoreColumns = []string{
	"id", "tenant", "patient", "kind", "value", "band", "ruleset", "ruleset_version", "ruleset_hash",
	"event_time", "event_time_ms", "emitted_time_ms", "single_parameter_red", "missing", "stale",
	"components.parameter", "components.metric", "components.input_value", "components.input_unit",
	"components.input_time_ms", "components.points", "components.band", "components.missing",
	"components.stale", "top_contributors",
}

var alertColumns = []string{
	"event_id", "alert_id", "tenant", "patient", "type", "rule", "severity", "reason", "actor", "note",
	"score_kind", "score_value", "score_band", "explanation", "ruleset", "ruleset_version", "ruleset_hash",
	"event_time", "event_time_ms", "emitted_time_ms", "trigger_ingest_time_ms", "tier",
	"rules_name", "rules_version", "rules_hash", "recheck_outcome", "source", "value", "raise_threshold",
	"clear_threshold", "raised_event_time_ms", "location", "ward", "acknowledged_by", "acknowledged_time_ms",
	"suppressed_until_ms", "max_tier", "escalate_after_ms", "command_id", "state", "row_version",
}

var deadLetterColumns = []string{
	"id", "reason", "message", "source", "origin", "field", "tenant", "patient", "device", "message_id",
	"content_type", "refused_time", "refused_time_ms", "raw", "raw_size", "raw_truncated",
}

func specs() map[string]spec {
	return map[string]spec{
		tableSamples:     {table: tableSamples, message: "vigil.v1.SampleBatch", columns: sampleColumns, rows: sampleRows},
		tableFeatures:    {table: tableFeatures, message: "vigil.v1.FeatureWindow", columns: featureColumns, rows: featureRows},
		tableScores:      {table: tableScores, message: "vigil.v1.Score", columns: scoreColumns, rows: scoreRows},
		tableAlerts:      {table: tableAlerts, into: tableAlertsV2, message: "vigil.v1.AlertEvent", columns: alertColumns, rows: alertRows},
		tableDeadLetters: {table: tableDeadLetters, message: "vigil.v1.DeadLetter", columns: deadLetterColumns, rows: deadLetterRows},
	}
}

// maxDateTimeSec is the last second a ClickHouse DateTime (UInt32) holds.
const maxDateTimeSec = math.MaxUint32

// dateTime converts epoch milliseconds to the DateTime column value (whole
// seconds, floored); out of DateTime's range is a permanent error on field.
func dateTime(ms int64, field string) (time.Time, error) {
	sec := ms / 1000
	if ms%1000 < 0 {
		sec--
	}
	if sec < 0 || sec > maxDateTimeSec {
		return time.Time{}, permanent(field, fmt.Errorf("%s %d is outside the range of ClickHouse DateTime (1970-01-01 to 2106-02-07)", field, ms))
	}
	return time.Unix(sec, 0).UTC(), nil
}

func unmarshal(value []byte, m proto.Message, name string) error {
	if err := proto.Unmarshal(value, m); err != nil {
		return permanent("value", fmt.Errorf("decoding %s: %w", name, err))
	}
	return nil
}

func sampleRows(value []byte) ([][]any, error) {
	var b vigilv1.SampleBatch
	if err := unmarshal(value, &b, "vigil.v1.SampleBatch"); err != nil {
		return nil, err
	}
	source := b.GetSource().Label()
	rows := make([][]any, 0, len(b.GetSamples()))
	for i, s := range b.GetSamples() {
		et, err := dateTime(s.GetEventTimeMs(), fmt.Sprintf("samples[%d].event_time_ms", i))
		if err != nil {
			return nil, err
		}
		rows = append(rows, []any{
			b.GetTenant(), b.GetPatient(), b.GetDevice(), s.GetMetric(), s.GetValue(), s.GetUnit(),
			et, s.GetEventTimeMs(), b.GetIngestTimeMs(), source, s.GetSequence(), s.GetQuality(),
			s.GetSourceCode(), s.GetChannel(), b.GetMessageId(), b.GetLocation(),
		})
	}
	return rows, nil
}

func featureRows(value []byte) ([][]any, error) {
	var w vigilv1.FeatureWindow
	if err := unmarshal(value, &w, "vigil.v1.FeatureWindow"); err != nil {
		return nil, err
	}
	ws, err := dateTime(w.GetStartMs(), "start_ms")
	if err != nil {
		return nil, err
	}
	kind := w.GetKind().Label()
	rows := make([][]any, 0, len(w.GetFeatures()))
	for _, f := range w.GetFeatures() {
		// Derived features in name order, so a redelivery is the same row.
		names := make([]string, 0, len(f.GetDerived()))
		for n := range f.GetDerived() {
			names = append(names, n)
		}
		slices.Sort(names)
		values := make([]float64, len(names))
		for i, n := range names {
			values[i] = f.GetDerived()[n]
		}
		rows = append(rows, []any{
			w.GetTenant(), w.GetPatient(), f.GetMetric(), f.GetUnit(), kind, w.GetSizeMs(), w.GetStepMs(),
			ws, w.GetStartMs(), w.GetEndMs(), w.GetVersion(), f.GetCount(), f.GetMean(), f.GetMin(), f.GetMax(),
			f.GetStd(), f.GetLast(), f.GetFirstTimeMs(), f.GetLastTimeMs(), f.GetSlopePerMin(), f.GetMedian(),
			f.GetP05(), f.GetP95(), f.GetCompleteness(), names, values, w.GetEmittedTimeMs(), w.GetWatermarkMs(),
			w.GetWindow(), f.GetP25(), f.GetP75(), f.GetSinceLastMs(), boolByte(f.GetDerivedMetric()),
		})
	}
	return rows, nil
}

func boolByte(b bool) uint8 {
	if b {
		return 1
	}
	return 0
}

// strs never returns nil, so an empty list is an empty array.
func strs(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

func scoreRows(value []byte) ([][]any, error) {
	var s vigilv1.Score
	if err := unmarshal(value, &s, "vigil.v1.Score"); err != nil {
		return nil, err
	}
	et, err := dateTime(s.GetEventTimeMs(), "event_time_ms")
	if err != nil {
		return nil, err
	}
	n := len(s.GetComponents())
	var (
		param, metric, unit, band = make([]string, n), make([]string, n), make([]string, n), make([]string, n)
		input, points             = make([]float64, n), make([]float64, n)
		inputTime                 = make([]int64, n)
		missing, stale            = make([]uint8, n), make([]uint8, n)
	)
	for i, c := range s.GetComponents() {
		param[i], metric[i], unit[i], band[i] = c.GetParameter(), c.GetMetric(), c.GetInputUnit(), c.GetBand()
		input[i], points[i], inputTime[i] = c.GetInputValue(), c.GetPoints(), c.GetInputTimeMs()
		missing[i], stale[i] = boolByte(c.GetMissing()), boolByte(c.GetStale())
	}
	return [][]any{{
		s.GetId(), s.GetTenant(), s.GetPatient(), s.GetKind(), s.GetValue(), s.GetBand(), s.GetRuleset(),
		s.GetRulesetVersion(), s.GetRulesetHash(), et, s.GetEventTimeMs(), s.GetEmittedTimeMs(),
		boolByte(s.GetSingleParameterRed()), strs(s.GetMissing()), strs(s.GetStale()),
		param, metric, input, unit, inputTime, points, band, missing, stale, strs(s.GetTopContributors()),
	}}, nil
}

// explanation renders a score as compact protobuf JSON with the .proto field
// names and every field present: stable for the same score (protojson's own
// output varies its white space on purpose), and readable with
// visitParamExtract* on 18.16 and JSONExtract* on newer servers.
func explanation(s *vigilv1.Score) (string, error) {
	if s == nil {
		return "", nil
	}
	b, err := protojson.MarshalOptions{UseProtoNames: true, EmitUnpopulated: true}.Marshal(s)
	if err != nil {
		return "", fmt.Errorf("rendering score as json: %w", err)
	}
	var buf bytes.Buffer
	if err := json.Compact(&buf, b); err != nil {
		return "", fmt.Errorf("compacting score json: %w", err)
	}
	return buf.String(), nil
}

func alertRows(value []byte) ([][]any, error) {
	var a vigilv1.AlertEvent
	if err := unmarshal(value, &a, "vigil.v1.AlertEvent"); err != nil {
		return nil, err
	}
	et, err := dateTime(a.GetEventTimeMs(), "event_time_ms")
	if err != nil {
		return nil, err
	}
	expl, err := explanation(a.GetScore())
	if err != nil {
		return nil, permanent("score", err)
	}
	sc := a.GetScore()
	return [][]any{{
		a.GetEventId(), a.GetAlertId(), a.GetTenant(), a.GetPatient(),
		a.GetType().Label(), a.GetRule(), a.GetSeverity(), a.GetReason(),
		a.GetActor(), a.GetNote(), sc.GetKind(), sc.GetValue(), sc.GetBand(), expl, a.GetRuleset(),
		a.GetRulesetVersion(), a.GetRulesetHash(), et, a.GetEventTimeMs(), a.GetEmittedTimeMs(),
		a.GetTriggerIngestTimeMs(), a.GetTier(),
		a.GetRulesName(), a.GetRulesVersion(), a.GetRulesHash(), a.GetRecheckOutcome(), a.GetSource(), a.GetValue(),
		a.GetRaiseThreshold(), a.GetClearThreshold(), a.GetRaisedEventTimeMs(), a.GetLocation(), a.GetWard(),
		a.GetAcknowledgedBy(), a.GetAcknowledgedTimeMs(), a.GetSuppressedUntilMs(), a.GetMaxTier(), a.GetEscalateAfterMs(),
		a.GetCommandId(), a.GetState(), uint8(1),
	}}, nil
}

// deadLetterID identifies a dead-letter record by its bytes, so that a
// redelivered dead letter replaces itself.
func deadLetterID(value []byte) string {
	sum := sha256.Sum256(value)
	return hex.EncodeToString(sum[:16])
}

func deadLetterRows(value []byte) ([][]any, error) {
	var d vigilv1.DeadLetter
	if err := unmarshal(value, &d, "vigil.v1.DeadLetter"); err != nil {
		return nil, err
	}
	// A dead letter is kept whatever its time says: an impossible refusal
	// time is stored as 1970 in the DateTime column, exact in the _ms one.
	rt, err := dateTime(d.GetRefusedTimeMs(), "refused_time_ms")
	if err != nil {
		rt = time.Unix(0, 0).UTC()
	}
	return [][]any{{
		deadLetterID(value), d.GetReason(), d.GetMessage(), d.GetSource().Label(),
		d.GetOrigin(), d.GetField(), d.GetTenant(), d.GetPatient(), d.GetDevice(), d.GetMessageId(),
		d.GetContentType(), rt, d.GetRefusedTimeMs(), string(d.GetRaw()), d.GetRawSize(), boolByte(d.GetRawTruncated()),
	}}, nil
}
