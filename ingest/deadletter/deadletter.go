// Package deadletter is what an integrator uses to inspect and re-drive the
// refusals on vigil.deadletter.v1 (`vigil deadletter ls|show|redrive`):
// reading the topic with filters, rendering letters as a table, JSON or in
// full, and re-driving the letters that carry a decoded batch (see
// Redriver).
//
// Letters are named by their Kafka position "<partition>:<offset>". Every
// re-drive attempt of a letter is recorded as an AuditEvent on
// vigil.audit.v1 (action "deadletter.redrive", resource
// "deadletter/<partition>:<offset>"), so that ls shows what was re-driven and
// a second redrive skips it.
package deadletter

import (
	"cmp"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/vigilhealth/vigil/internal/bus"
	"github.com/vigilhealth/vigil/internal/config"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// AuditAction is the action of the audit events recording a re-drive.
const AuditAction = "deadletter.redrive"

// ErrNotFound is returned by Get when no letter is at the position.
var ErrNotFound = errors.New("no dead letter at that position")

// Letter is one record of the dead-letter topic.
type Letter struct {
	Partition int32
	Offset    int64
	DL        *vigilv1.DeadLetter
	// Redrives are the audit events of earlier re-drives of this letter,
	// oldest first (filled by the readers when the audit topic was read).
	Redrives []*vigilv1.AuditEvent
}

// ID is the letter's position "<partition>:<offset>".
func (l Letter) ID() string { return FormatID(l.Partition, l.Offset) }

// FormatID renders a position as "<partition>:<offset>".
func FormatID(partition int32, offset int64) string {
	return strconv.Itoa(int(partition)) + ":" + strconv.FormatInt(offset, 10)
}

// ParseID parses "<partition>:<offset>".
func ParseID(s string) (int32, int64, error) {
	ps, os, ok := strings.Cut(s, ":")
	p, err1 := strconv.ParseInt(ps, 10, 32)
	o, err2 := strconv.ParseInt(os, 10, 64)
	if !ok || err1 != nil || err2 != nil || p < 0 || o < 0 {
		return 0, 0, fmt.Errorf("letter id %q: want <partition>:<offset>, e.g. 0:42", s)
	}
	return int32(p), o, nil
}

// Resource is the audit resource naming a letter.
func Resource(id string) string { return "deadletter/" + id }

// Filter selects letters; zero fields match everything.
type Filter struct {
	Reason string
	// Source is a source label: http, mllp, mqtt, fhir, replay, simulator.
	Source string
	Tenant string
	// Since and Until bound the refused time: [Since, Until).
	Since, Until time.Time
}

// Match reports whether dl passes the filter.
func (f Filter) Match(dl *vigilv1.DeadLetter) bool {
	switch {
	case f.Reason != "" && dl.Reason != f.Reason,
		f.Source != "" && dl.Source.Label() != f.Source,
		f.Tenant != "" && dl.Tenant != f.Tenant,
		!f.Since.IsZero() && dl.RefusedTimeMs < f.Since.UnixMilli(),
		!f.Until.IsZero() && dl.RefusedTimeMs >= f.Until.UnixMilli():
		return false
	}
	return true
}

// ParseTime reads a --since/--until value: an RFC 3339 timestamp, a date
// (2006-01-02, UTC) or a duration back from now ("2h", "30m").
func ParseTime(s string, now time.Time) (time.Time, error) {
	if s == "" {
		return time.Time{}, nil
	}
	if t, err := time.Parse(time.RFC3339Nano, s); err == nil {
		return t, nil
	}
	if t, err := time.Parse(time.DateOnly, s); err == nil {
		return t, nil
	}
	if d, err := time.ParseDuration(s); err == nil && d >= 0 {
		return now.Add(-d), nil
	}
	return time.Time{}, fmt.Errorf("time %q: want RFC 3339 (2026-11-23T08:00:00Z), a date (2026-11-23) or a duration back from now (2h)", s)
}

// Reader reads the dead-letter and audit topics of one cluster. It holds no
// connection between calls; it is safe for concurrent use.
type Reader struct {
	kafka config.Kafka
	log   *slog.Logger
}

// NewReader returns a Reader for cfg's brokers and topics.
func NewReader(cfg config.Kafka, log *slog.Logger) (*Reader, error) {
	if len(cfg.Brokers) == 0 {
		return nil, errors.New("no kafka brokers configured: set --brokers (or kafka.brokers)")
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Reader{kafka: cfg, log: log}, nil
}

// scan calls fn for every committed record of topic up to each partition's
// end offset at the time of the call, partition by partition.
func (r *Reader) scan(ctx context.Context, topic string, fn func(*kgo.Record) error) error {
	cl, err := kgo.NewClient(bus.ClientOpts(r.kafka, r.log)...)
	if err != nil {
		return fmt.Errorf("creating kafka client: %w", err)
	}
	defer cl.Close()
	ends, err := kadm.NewClient(cl).ListEndOffsets(ctx, topic)
	if err == nil {
		err = ends.Error()
	}
	if err != nil {
		return fmt.Errorf("listing end offsets of %s: %w", topic, err)
	}
	end := map[int32]int64{}
	ends.Each(func(o kadm.ListedOffset) {
		if o.Offset > 0 {
			end[o.Partition] = o.Offset
		}
	})
	for _, p := range slices.Sorted(maps.Keys(end)) {
		if err := r.scanPartition(ctx, topic, p, kgo.NewOffset().AtStart(), end[p], fn); err != nil {
			return err
		}
	}
	return nil
}

// scanPartition reads partition p of topic from start until end (exclusive),
// stopping early when fn returns errStop.
func (r *Reader) scanPartition(ctx context.Context, topic string, p int32, start kgo.Offset, end int64, fn func(*kgo.Record) error) error {
	cl, err := kgo.NewClient(append(bus.ClientOpts(r.kafka, r.log),
		kgo.ConsumePartitions(map[string]map[int32]kgo.Offset{topic: {p: start}}),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()), kgo.KeepControlRecords())...)
	if err != nil {
		return fmt.Errorf("creating kafka consumer: %w", err)
	}
	defer cl.Close()
	for {
		fs := cl.PollFetches(ctx)
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("reading %s partition %d: %w", topic, p, err)
		}
		for _, e := range fs.Errors() {
			return fmt.Errorf("reading %s partition %d: %w", topic, p, e.Err)
		}
		for _, rec := range fs.Records() {
			if rec.Offset >= end {
				return nil
			}
			if !rec.Attrs.IsControl() {
				if err := fn(rec); err != nil {
					if errors.Is(err, errStop) {
						return nil
					}
					return err
				}
			}
			if rec.Offset >= end-1 {
				return nil
			}
		}
	}
}

var errStop = errors.New("stop")

// Redrives reads the audit topic and returns the re-drive events by letter
// id, oldest first.
func (r *Reader) Redrives(ctx context.Context) (map[string][]*vigilv1.AuditEvent, error) {
	out := map[string][]*vigilv1.AuditEvent{}
	err := r.scan(ctx, r.kafka.Topics.Audit, func(rec *kgo.Record) error {
		var ev vigilv1.AuditEvent
		if proto.Unmarshal(rec.Value, &ev) != nil || ev.Action != AuditAction {
			return nil
		}
		if id, ok := strings.CutPrefix(ev.Resource, "deadletter/"); ok {
			out[id] = append(out[id], &ev)
		}
		return nil
	})
	return out, err
}

// Scan calls fn for every letter matching f, partition by partition in
// offset order, with its earlier re-drives. Records that do not decode are
// passed with a DeadLetter whose Reason is "undecodable_record".
func (r *Reader) Scan(ctx context.Context, f Filter, fn func(Letter) error) error {
	redrives, err := r.Redrives(ctx)
	if err != nil {
		return err
	}
	return r.scan(ctx, r.kafka.Topics.DeadLetter, func(rec *kgo.Record) error {
		l := decode(rec)
		if !f.Match(l.DL) {
			return nil
		}
		l.Redrives = redrives[l.ID()]
		return fn(l)
	})
}

func decode(rec *kgo.Record) Letter {
	l := Letter{Partition: rec.Partition, Offset: rec.Offset, DL: &vigilv1.DeadLetter{}}
	if err := proto.Unmarshal(rec.Value, l.DL); err != nil {
		l.DL = &vigilv1.DeadLetter{Reason: "undecodable_record", Message: "the record does not decode as vigil.v1.DeadLetter: " + err.Error(),
			Raw: rec.Value, RawSize: uint64(len(rec.Value)), RefusedTimeMs: rec.Timestamp.UnixMilli()}
	}
	return l
}

// Get returns the letter at partition:offset, with its re-drives.
func (r *Reader) Get(ctx context.Context, partition int32, offset int64) (Letter, error) {
	var (
		found Letter
		ok    bool
	)
	cl, err := kgo.NewClient(bus.ClientOpts(r.kafka, r.log)...)
	if err != nil {
		return found, fmt.Errorf("creating kafka client: %w", err)
	}
	ends, err := kadm.NewClient(cl).ListEndOffsets(ctx, r.kafka.Topics.DeadLetter)
	cl.Close()
	if err == nil {
		err = ends.Error()
	}
	if err != nil {
		return found, fmt.Errorf("listing end offsets of %s: %w", r.kafka.Topics.DeadLetter, err)
	}
	lo, has := ends.Lookup(r.kafka.Topics.DeadLetter, partition)
	if !has || offset >= lo.Offset {
		return found, fmt.Errorf("letter %s: %w (partition end offset %d)", FormatID(partition, offset), ErrNotFound, lo.Offset)
	}
	err = r.scanPartition(ctx, r.kafka.Topics.DeadLetter, partition, kgo.NewOffset().At(offset), lo.Offset, func(rec *kgo.Record) error {
		if rec.Offset == offset {
			found, ok = decode(rec), true
		}
		return errStop
	})
	if err != nil {
		return found, err
	}
	if !ok {
		return found, fmt.Errorf("letter %s: %w", FormatID(partition, offset), ErrNotFound)
	}
	redrives, err := r.Redrives(ctx)
	if err != nil {
		return found, err
	}
	found.Redrives = redrives[found.ID()]
	return found, nil
}

// Listing is the result of List: the newest matching letters (at most the
// limit), oldest first, and counts over every matching letter.
type Listing struct {
	Letters []Letter
	// Total counts every matching letter; ByReason splits it.
	Total    int
	ByReason map[string]int
}

// List scans the letters matching f and keeps the newest limit of them (0 =
// all) by refused time.
func (r *Reader) List(ctx context.Context, f Filter, limit int) (Listing, error) {
	out := Listing{ByReason: map[string]int{}}
	byTime := func(a, b Letter) int {
		return cmp.Or(cmp.Compare(a.DL.RefusedTimeMs, b.DL.RefusedTimeMs), cmp.Compare(a.Partition, b.Partition),
			cmp.Compare(a.Offset, b.Offset))
	}
	err := r.Scan(ctx, f, func(l Letter) error {
		out.Total++
		out.ByReason[l.DL.Reason]++
		out.Letters = append(out.Letters, l)
		if limit > 0 && len(out.Letters) >= 2*limit {
			slices.SortFunc(out.Letters, byTime)
			out.Letters = slices.Delete(out.Letters, 0, len(out.Letters)-limit)
		}
		return nil
	})
	slices.SortFunc(out.Letters, byTime)
	if limit > 0 && len(out.Letters) > limit {
		out.Letters = out.Letters[len(out.Letters)-limit:]
	}
	return out, err
}

// redriveState summarises a letter's re-drives for a listing.
func redriveState(l Letter) string {
	if len(l.Redrives) == 0 {
		if l.DL.Batch == nil {
			return "raw only"
		}
		return ""
	}
	last := l.Redrives[len(l.Redrives)-1]
	return last.Outcome + " " + fmtMs(last.TimeMs)
}

// WriteTable renders a listing as an aligned table followed by the counts
// by reason.
func WriteTable(w io.Writer, ls Listing) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "REFUSED\tID\tSOURCE\tREASON\tFIELD\tTENANT/DEVICE\tREDRIVE\tMESSAGE")
	for _, l := range ls.Letters {
		d := l.DL
		who := d.Tenant + "/" + d.Device
		if who == "/" {
			who = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", fmtMs(d.RefusedTimeMs), l.ID(), d.Source.Label(), d.Reason,
			dash(d.Field), clip(who, 48), dash(redriveState(l)), clip(oneLine(d.Message), 80))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if len(ls.Letters) < ls.Total {
		fmt.Fprintf(w, "(showing the newest %d of %d; --limit 0 shows all)\n", len(ls.Letters), ls.Total)
	}
	fmt.Fprintf(w, "\n%d letters", ls.Total)
	reasons := slices.Sorted(maps.Keys(ls.ByReason))
	if len(reasons) > 0 {
		fmt.Fprint(w, " by reason:")
	}
	fmt.Fprintln(w)
	for _, r := range reasons {
		fmt.Fprintf(w, "  %-22s %d\n", r, ls.ByReason[r])
	}
	return nil
}

// LetterJSON is a letter as `ls --json` and `show --json` print it.
type LetterJSON struct {
	ID          string          `json:"id"`
	Partition   int32           `json:"partition"`
	Offset      int64           `json:"offset"`
	Refused     string          `json:"refused"`
	Source      string          `json:"source"`
	Reason      string          `json:"reason"`
	Field       string          `json:"field,omitempty"`
	Message     string          `json:"message"`
	Origin      string          `json:"origin,omitempty"`
	Tenant      string          `json:"tenant,omitempty"`
	Patient     string          `json:"patient,omitempty"`
	Device      string          `json:"device,omitempty"`
	MessageID   string          `json:"message_id,omitempty"`
	ContentType string          `json:"content_type,omitempty"`
	RawSize     uint64          `json:"raw_size"`
	Truncated   bool            `json:"raw_truncated,omitempty"`
	Redrivable  bool            `json:"redrivable"`
	Redrives    []RedriveJSON   `json:"redrives,omitempty"`
	Raw         string          `json:"raw,omitempty"`
	Batch       json.RawMessage `json:"batch,omitempty"`
}

// RedriveJSON is one recorded re-drive.
type RedriveJSON struct {
	Time    string `json:"time"`
	Actor   string `json:"actor,omitempty"`
	Outcome string `json:"outcome"`
	Detail  string `json:"detail,omitempty"`
}

// JSON renders l; full adds the raw bytes (as text when printable, else
// hex) and the decoded batch.
func JSON(l Letter, full bool) LetterJSON {
	d := l.DL
	out := LetterJSON{ID: l.ID(), Partition: l.Partition, Offset: l.Offset, Refused: fmtMs(d.RefusedTimeMs),
		Source: d.Source.Label(), Reason: d.Reason, Field: d.Field, Message: d.Message, Origin: d.Origin,
		Tenant: d.Tenant, Patient: d.Patient, Device: d.Device, MessageID: d.MessageId, ContentType: d.ContentType,
		RawSize: d.RawSize, Truncated: d.RawTruncated, Redrivable: d.Batch != nil}
	for _, ev := range l.Redrives {
		out.Redrives = append(out.Redrives, RedriveJSON{Time: fmtMs(ev.TimeMs), Actor: ev.Actor, Outcome: ev.Outcome, Detail: ev.Detail})
	}
	if full {
		if printable(d.Raw) {
			out.Raw = string(d.Raw)
		} else {
			out.Raw = "hex:" + hex.EncodeToString(d.Raw)
		}
		if d.Batch != nil {
			out.Batch, _ = protojson.Marshal(d.Batch)
		}
	}
	return out
}

// WriteJSON renders a listing as one JSON document.
func WriteJSON(w io.Writer, ls Listing) error {
	doc := struct {
		Letters  []LetterJSON   `json:"letters"`
		Total    int            `json:"total"`
		ByReason map[string]int `json:"by_reason"`
	}{Letters: []LetterJSON{}, Total: ls.Total, ByReason: ls.ByReason}
	for _, l := range ls.Letters {
		doc.Letters = append(doc.Letters, JSON(l, false))
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(doc)
}

// WriteShow prints one letter in full: every field, its re-drives, the
// decoded batch and the raw bytes (as text when printable UTF-8, else as a
// hex dump).
func WriteShow(w io.Writer, l Letter) error {
	d := l.DL
	row := func(k, v string) {
		if v != "" {
			fmt.Fprintf(w, "%-14s %s\n", k+":", v)
		}
	}
	row("id", l.ID())
	row("refused", fmtMs(d.RefusedTimeMs))
	row("source", d.Source.Label())
	row("reason", d.Reason)
	row("field", d.Field)
	row("message", d.Message)
	row("origin", d.Origin)
	row("tenant", d.Tenant)
	row("patient", d.Patient)
	row("device", d.Device)
	row("message id", d.MessageId)
	row("content type", d.ContentType)
	size := fmt.Sprintf("%d bytes", d.RawSize)
	if d.RawTruncated {
		size += fmt.Sprintf(" (truncated: %d kept)", len(d.Raw))
	}
	row("raw size", size)
	if d.Batch == nil {
		row("re-drivable", "no (raw only: fix the sender and resend)")
	} else {
		row("re-drivable", "yes")
	}
	for _, ev := range l.Redrives {
		row("re-driven", fmt.Sprintf("%s %s by %s: %s", fmtMs(ev.TimeMs), ev.Outcome, dash(ev.Actor), ev.Detail))
	}
	if d.Batch != nil {
		b, err := protojson.MarshalOptions{Multiline: true, Indent: "  "}.Marshal(d.Batch)
		if err != nil {
			return fmt.Errorf("rendering batch: %w", err)
		}
		fmt.Fprintf(w, "\nbatch:\n%s\n", b)
	}
	if printable(d.Raw) {
		fmt.Fprintf(w, "\nraw (text):\n%s\n", strings.ReplaceAll(string(d.Raw), "\r", "\n"))
	} else {
		fmt.Fprintf(w, "\nraw (hex):\n%s", hex.Dump(d.Raw))
	}
	return nil
}

// printable reports whether b is UTF-8 text without control characters
// other than tab, CR and LF (HL7 segments end in CR).
func printable(b []byte) bool {
	if !utf8.Valid(b) {
		return false
	}
	for _, r := range string(b) {
		if unicode.IsControl(r) && r != '\t' && r != '\r' && r != '\n' {
			return false
		}
	}
	return true
}

func fmtMs(ms int64) string {
	if ms == 0 {
		return "-"
	}
	return time.UnixMilli(ms).UTC().Format("2006-01-02T15:04:05.000Z")
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func clip(s string, n int) string {
	if utf8.RuneCountInString(s) <= n {
		return s
	}
	r := []rune(s)
	return string(r[:n-1]) + "…"
}

func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
}
