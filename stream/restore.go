package stream

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"
	"google.golang.org/protobuf/proto"

	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// restoreLocked replaces the state of the given input partitions with what
// their changelog partitions (same numbers) hold. It blocks until then, at
// most restoreTimeout:
//
//  1. it waits until no transaction is open on those changelog partitions
//     (last stable offset = high watermark): a predecessor's in-flight
//     transaction must be committed or aborted first, or the state read
//     would not match the input offsets the group hands out;
//  2. it reads each partition from its start, read-committed, keeping
//     control records so that reaching the end (high watermark - 1, always
//     a commit or abort marker since every changelog write is
//     transactional) is seen even though markers carry no data.
//
// cl is the session's client (passed in: the first assignment can run
// before NewGroupTransactSession has returned it). s.mu must be held.
func (s *session) restoreLocked(ctx context.Context, cl *kgo.Client, parts []int32) error {
	if len(parts) == 0 {
		return nil
	}
	slices.Sort(parts)
	ctx, cancel := context.WithTimeout(ctx, restoreTimeout)
	defer cancel()
	start := time.Now()
	topic := s.p.cfg.Kafka.Topics.State
	adm := kadm.NewClient(cl)

	ends := make(map[int32]int64, len(parts))
	starts := make(map[int32]int64, len(parts))
	for wait := 10 * time.Millisecond; ; wait = min(wait*2, 500*time.Millisecond) {
		settled, err := s.listChangelog(ctx, adm, topic, parts, starts, ends)
		if err != nil {
			return err
		}
		if settled {
			break
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("restoring state: waiting for open transactions on %s partitions %v to end: %w", topic, parts, ctx.Err())
		case <-time.After(wait):
		}
	}

	fresh := make(map[int32]map[string]*patient, len(parts))
	want := map[int32]kgo.Offset{}
	for _, p := range parts {
		fresh[p] = map[string]*patient{}
		if ends[p] > starts[p] {
			want[p] = kgo.NewOffset().AtStart()
		}
	}
	if len(want) > 0 {
		if err := s.readChangelog(ctx, topic, want, ends, fresh); err != nil {
			return err
		}
	}
	n := 0
	for p, pats := range fresh {
		s.parts[p] = pats
		n += len(pats)
	}
	s.updateGauge()
	s.p.m.restoreTime.Observe(time.Since(start).Seconds())
	s.p.log.Info("restored partition state from changelog", "partitions", parts, "patients", n, "took", time.Since(start))
	return nil
}

// listChangelog fills the start and end offsets of the changelog
// partitions and reports whether none has an open transaction.
func (s *session) listChangelog(ctx context.Context, adm *kadm.Client, topic string, parts []int32, starts, ends map[int32]int64) (bool, error) {
	hw, err := adm.ListEndOffsets(ctx, topic)
	if err == nil {
		err = hw.Error()
	}
	if err != nil {
		return false, fmt.Errorf("restoring state: listing end offsets of %s: %w", topic, err)
	}
	lso, err := adm.ListCommittedOffsets(ctx, topic)
	if err == nil {
		err = lso.Error()
	}
	if err != nil {
		return false, fmt.Errorf("restoring state: listing stable offsets of %s: %w", topic, err)
	}
	so, err := adm.ListStartOffsets(ctx, topic)
	if err == nil {
		err = so.Error()
	}
	if err != nil {
		return false, fmt.Errorf("restoring state: listing start offsets of %s: %w", topic, err)
	}
	settled := true
	for _, p := range parts {
		h, ok1 := hw.Lookup(topic, p)
		l, ok2 := lso.Lookup(topic, p)
		st, ok3 := so.Lookup(topic, p)
		if !ok1 || !ok2 || !ok3 {
			return false, permanent(fmt.Errorf("restoring state: changelog %s has no partition %d (co-partitioning broken)", topic, p))
		}
		ends[p], starts[p] = h.Offset, st.Offset
		if l.Offset < h.Offset {
			settled = false
		}
	}
	return settled, nil
}

// readChangelog reads the wanted partitions up to their end offsets into
// fresh.
func (s *session) readChangelog(ctx context.Context, topic string, want map[int32]kgo.Offset, ends map[int32]int64, fresh map[int32]map[string]*patient) error {
	cl, err := kgo.NewClient(append(s.p.clientOpts(),
		kgo.ConsumePartitions(map[string]map[int32]kgo.Offset{topic: want}),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()),
		kgo.KeepControlRecords(),
	)...)
	if err != nil {
		return fmt.Errorf("restoring state: creating changelog reader: %w", err)
	}
	defer cl.Close()
	remaining := len(want)
	done := map[int32]bool{}
	for remaining > 0 {
		fs := cl.PollFetches(ctx)
		if ctx.Err() != nil {
			return fmt.Errorf("restoring state: reading %s: %w (%d partitions not at their end)", topic, ctx.Err(), remaining)
		}
		var ferr error
		fs.EachError(func(t string, p int32, err error) {
			if ferr == nil {
				ferr = fmt.Errorf("restoring state: reading %s partition %d: %w", t, p, err)
			}
		})
		if ferr != nil {
			return ferr
		}
		for iter := fs.RecordIter(); !iter.Done(); {
			r := iter.Next()
			if done[r.Partition] {
				continue
			}
			if !r.Attrs.IsControl() {
				if err := s.applyChangelog(r, fresh[r.Partition]); err != nil {
					return err
				}
			}
			if r.Offset >= ends[r.Partition]-1 {
				done[r.Partition] = true
				remaining--
			}
		}
	}
	return nil
}

// applyChangelog applies one changelog record.
func (s *session) applyChangelog(r *kgo.Record, pats map[string]*patient) error {
	key := string(r.Key)
	if len(r.Value) == 0 {
		delete(pats, key)
		return nil
	}
	var ps vigilv1.PatientState
	if err := proto.Unmarshal(r.Value, &ps); err != nil {
		return permanent(fmt.Errorf("restoring state: changelog record %s/%d@%d (key %q) is not a PatientState: %w", r.Topic, r.Partition, r.Offset, key, err))
	}
	pt, err := s.p.eng.fromProto(key, &ps)
	if err != nil {
		return permanent(fmt.Errorf("restoring state from %s/%d@%d: %w", r.Topic, r.Partition, r.Offset, err))
	}
	pats[key] = pt
	return nil
}
