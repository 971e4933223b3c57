package mllp

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"
	"google.golang.org/protobuf/proto"

	"github.com/vigilhealth/vigil/internal/bus"
	"github.com/vigilhealth/vigil/internal/config"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// maxWarmTime bounds the dedupe warm-up at start.
const maxWarmTime = 30 * time.Second

// warmDedupe refills the duplicate filters (messages and observations)
// after a restart from what this
// path published within the dedupe window: every MLLP batch on the samples
// topic names its message (tenant, MSH-10), so a gateway that re-sends a
// message whose ACK it lost while Vigil restarted is recognised as it
// would have been before. It reads the topic from the offsets at
// now − dedupe_window to the end offsets at start, within maxWarmTime and
// ctx (then it logs how far it got and returns: duplicates older than that
// are left to the sink's ReplacingMergeTree). It returns how many message
// ids it recorded.
func (s *Server) warmDedupe(ctx context.Context, kcfg config.Kafka) (int, error) {
	if s.h.dedupe == nil || len(kcfg.Brokers) == 0 {
		return 0, nil
	}
	ctx, cancel := context.WithTimeout(ctx, maxWarmTime)
	defer cancel()
	cl, err := kgo.NewClient(bus.ClientOpts(kcfg, s.log)...)
	if err != nil {
		return 0, fmt.Errorf("creating kafka client for the dedupe warm-up: %w", err)
	}
	defer cl.Close()
	adm := kadm.NewClient(cl)
	topic := kcfg.Topics.Samples
	from := time.Now().Add(-s.cfg.DedupeWindow).UnixMilli()
	starts, err := adm.ListOffsetsAfterMilli(ctx, from, topic)
	if err == nil {
		err = starts.Error()
	}
	if err != nil {
		return 0, fmt.Errorf("listing samples topic offsets at %d: %w", from, err)
	}
	ends, err := adm.ListEndOffsets(ctx, topic)
	if err == nil {
		err = ends.Error()
	}
	if err != nil {
		return 0, fmt.Errorf("listing samples topic end offsets: %w", err)
	}
	assign := map[int32]kgo.Offset{}
	remaining := map[int32]int64{}
	starts.Each(func(o kadm.ListedOffset) {
		end, ok := ends.Lookup(topic, o.Partition)
		if ok && o.Offset >= 0 && o.Offset < end.Offset {
			assign[o.Partition] = kgo.NewOffset().At(o.Offset)
			remaining[o.Partition] = end.Offset
		}
	})
	if len(assign) == 0 {
		return 0, nil
	}
	cl.AddConsumePartitions(map[string]map[int32]kgo.Offset{topic: assign})
	n := 0
	var buf []byte
	for len(remaining) > 0 {
		fs := cl.PollFetches(ctx)
		if ctx.Err() != nil {
			return n, fmt.Errorf("dedupe warm-up stopped after %d message ids: %w", n, ctx.Err())
		}
		for _, e := range fs.Errors() {
			if !errors.Is(e.Err, context.Canceled) {
				s.log.Warn("reading samples topic for the dedupe warm-up", "partition", e.Partition, "err", e.Err)
			}
		}
		fs.EachRecord(func(r *kgo.Record) {
			if end, ok := remaining[r.Partition]; ok && r.Offset+1 >= end {
				delete(remaining, r.Partition)
			}
			var b vigilv1.SampleBatch
			if proto.Unmarshal(r.Value, &b) != nil || b.Source != vigilv1.Source_SOURCE_MLLP || b.MessageId == "" {
				return
			}
			buf = oruKey(buf[:0], b.Tenant, b.MessageId)
			s.h.dedupe.Add(buf)
			for _, smp := range b.Samples {
				buf = observationKey(buf[:0], b.Tenant, b.Patient, b.Device, smp)
				s.h.repeats.Add(buf)
			}
			n++
		})
	}
	return n, nil
}
