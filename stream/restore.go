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
// their changelog partitions (same numbers) hold, brought up to the
// committed input offsets. It blocks until then, at most restoreTimeout:
//
//  1. it waits until no transaction is open on those changelog partitions
//     (last stable offset = high watermark): a predecessor's in-flight
//     transaction must be committed or aborted first, or the state read
//     would not match the input offsets the group hands out;
//
//  2. it reads each partition from its start, read-committed, keeping
//     control records so that reaching the end (high watermark - 1, always
//     a commit or abort marker since every changelog write is
//     transactional) is seen even though markers carry no data.
//
//  3. it replays the input from each partition's checkpoint to the
//     group's committed offset (replay).
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

	fresh := make(map[int32]*partState, len(parts))
	want := map[int32]kgo.Offset{}
	for _, p := range parts {
		ps := newPartState()
		ps.checkpoint = -2 // none read yet
		fresh[p] = ps
		if ends[p] > starts[p] {
			want[p] = kgo.NewOffset().AtStart()
		}
	}
	if len(want) > 0 {
		if err := s.readChangelog(ctx, topic, want, ends, fresh); err != nil {
			return err
		}
	}
	replayed, err := s.replay(ctx, adm, fresh)
	if err != nil {
		return err
	}
	n := 0
	for p, ps := range fresh {
		s.parts[p] = ps
		n += len(ps.pats)
	}
	s.updateGauge()
	s.p.m.restoreTime.Observe(time.Since(start).Seconds())
	s.p.log.Info("restored partition state from changelog", "partitions", parts, "patients", n,
		"replayed_records", replayed, "took", time.Since(start))
	return nil
}

// replay sets each restored partition's next offset to the group's
// committed offset and brings its state up to it: it reads the input
// again from the partition's checkpoint to the committed offset
// (read-committed) and applies each record to its patient unless the
// patient's restored state already reflects it, discarding the outputs
// (they were committed when the record was first processed). The span is
// bounded by the checkpoints: a patient's change is written at most
// stream.checkpoint_interval (plus one transaction) after it was made, so
// a partition's checkpoint trails its committed offset by about that much
// input. It returns the number of records read.
func (s *session) replay(ctx context.Context, adm *kadm.Client, fresh map[int32]*partState) (int64, error) {
	input := s.p.cfg.Kafka.Topics.Samples
	committed, err := adm.FetchOffsets(kadm.RequireStable(ctx), s.p.cfg.Stream.Group)
	if err == nil {
		err = committed.Error()
	}
	if err != nil {
		return 0, fmt.Errorf("restoring state: fetching committed offsets of group %s: %w", s.p.cfg.Stream.Group, err)
	}
	from := map[int32]kgo.Offset{}
	until := map[int32]int64{} // last offset to replay
	for p, ps := range fresh {
		c := int64(-1)
		if o, ok := committed.Lookup(input, p); ok && o.At >= 0 {
			c = o.At
		}
		ps.next = c
		switch {
		case c < 0:
			// Nothing committed: the group starts this partition afresh.
		case ps.checkpoint == -2:
			// No checkpoint record: a changelog written by a version that
			// wrote every changed state in each transaction is current.
			for _, e := range ps.pats {
				e.applied = c - 1
			}
			ps.checkpoint = c - 1
		case ps.checkpoint+1 < c:
			from[p] = kgo.NewOffset().At(ps.checkpoint + 1)
			until[p] = c - 1
		}
		if ps.checkpoint == -2 {
			ps.checkpoint = -1
		}
	}
	if len(from) == 0 {
		return 0, nil
	}
	logStart, err := adm.ListStartOffsets(ctx, input)
	if err == nil {
		err = logStart.Error()
	}
	if err != nil {
		return 0, fmt.Errorf("restoring state: listing start offsets of %s: %w", input, err)
	}
	for p, o := range from {
		if st, ok := logStart.Lookup(input, p); ok && st.Offset > o.EpochOffset().Offset {
			// Retention removed input the state needs: restore what is left.
			s.p.log.Error("input needed to restore state is gone (retention shorter than the checkpoint span); restored state misses it",
				"topic", input, "partition", p, "replay_from", o.EpochOffset().Offset, "log_start", st.Offset)
		}
	}
	cl, err := kgo.NewClient(append(s.p.clientOpts(),
		kgo.ConsumePartitions(map[string]map[int32]kgo.Offset{input: from}),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()),
		kgo.KeepControlRecords(),
	)...)
	if err != nil {
		return 0, fmt.Errorf("restoring state: creating input reader: %w", err)
	}
	defer cl.Close()
	var (
		b     vigilv1.SampleBatch
		dec   batchDecoder
		out   outputs
		n     int64
		spans = map[int32]int64{}
	)
	defer out.release()
	now := s.p.clock.Now().UnixMilli()
	at := time.Now()
	for len(until) > 0 {
		fs := cl.PollFetches(ctx)
		if ctx.Err() != nil {
			return n, fmt.Errorf("restoring state: replaying %s: %w (%d partitions not at their committed offset)", input, ctx.Err(), len(until))
		}
		var ferr error
		fs.EachError(func(t string, p int32, err error) {
			if ferr == nil {
				ferr = fmt.Errorf("restoring state: replaying %s partition %d: %w", t, p, err)
			}
		})
		if ferr != nil {
			return n, ferr
		}
		for iter := fs.RecordIter(); !iter.Done(); {
			r := iter.Next()
			last, open := until[r.Partition]
			if !open || r.Offset > last {
				continue
			}
			if !r.Attrs.IsControl() {
				ps := fresh[r.Partition]
				if e, changed := s.p.applyRecord(ps, r, &dec, &b, now, &out, true); changed {
					ps.markDirty(e, r.Offset, at)
				}
				out.reset()
				n++
				spans[r.Partition]++
			}
			if r.Offset >= last {
				delete(until, r.Partition)
			}
		}
	}
	for _, span := range spans {
		s.p.m.replaySpan.Observe(float64(span))
	}
	s.p.m.replayed.Add(float64(n))
	return n, nil
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
func (s *session) readChangelog(ctx context.Context, topic string, want map[int32]kgo.Offset, ends map[int32]int64, fresh map[int32]*partState) error {
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

// applyChangelog applies one changelog record: a patient's state (an
// empty one, a grave), a tombstone or the partition's checkpoint.
func (s *session) applyChangelog(r *kgo.Record, ps *partState) error {
	key := string(r.Key)
	if len(r.Value) == 0 {
		delete(ps.pats, key)
		delete(ps.graves, key)
		return nil
	}
	var st vigilv1.PatientState
	if err := proto.Unmarshal(r.Value, &st); err != nil {
		return permanent(fmt.Errorf("restoring state: changelog record %s/%d@%d (key %q) is not a PatientState: %w", r.Topic, r.Partition, r.Offset, key, err))
	}
	if key == checkpointKey {
		ps.checkpoint = st.GetAppliedOffset()
		return nil
	}
	pt, err := s.p.eng.fromProto(key, &st)
	if err != nil {
		return permanent(fmt.Errorf("restoring state from %s/%d@%d: %w", r.Topic, r.Partition, r.Offset, err))
	}
	if pt.empty() {
		delete(ps.pats, key)
		ps.graves[key] = st.GetAppliedOffset()
		return nil
	}
	delete(ps.graves, key)
	ps.pats[key] = &entry{pt: pt, applied: st.GetAppliedOffset(), dirtyFrom: -1}
	return nil
}
