// Package bus holds what every stage shares about Kafka: record keys, client
// construction from configuration, and topic creation. Stages own their own
// clients; nothing here keeps package-level state.
package bus

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
	"github.com/twmb/franz-go/plugin/kslog"

	"github.com/vigilhealth/vigil/internal/config"
)

// PatientKey is the record key of every per-patient topic: "<tenant>/<patient>".
// Keying by it keeps one patient's events in order on one partition.
func PatientKey(tenant, patient string) []byte {
	b := make([]byte, 0, len(tenant)+1+len(patient))
	b = append(b, tenant...)
	b = append(b, '/')
	return append(b, patient...)
}

// SplitPatientKey splits a key made by PatientKey. The tenant may not
// contain '/', the patient may.
func SplitPatientKey(key []byte) (tenant, patient string, ok bool) {
	t, p, ok := strings.Cut(string(key), "/")
	return t, p, ok
}

// ClientOpts returns the base franz-go options for cfg: seed brokers
// (cfg.Brokers; `vigil run` fills in the embedded broker's address there),
// client id, logging through log, bounded produce buffer. Callers append
// stage-specific options (consumer group, transactional id...).
func ClientOpts(cfg config.Kafka, log *slog.Logger) []kgo.Opt {
	return []kgo.Opt{
		kgo.SeedBrokers(cfg.Brokers...),
		kgo.ClientID(cfg.ClientID),
		kgo.WithLogger(kslog.New(log.With("component", "kafka"))),
		kgo.MaxBufferedBytes(cfg.MaxBufferedBytes),
		kgo.ProducerBatchMaxBytes(1 << 20),
		kgo.RecordPartitioner(kgo.StickyKeyPartitioner(nil)),
	}
}

// TopicSpec describes a topic Vigil creates.
type TopicSpec struct {
	Name    string
	Configs map[string]*string
}

// Specs lists the topics of DESIGN.md plus the stream changelog.
func Specs(t config.Topics) []TopicSpec {
	compact := "compact"
	return []TopicSpec{
		{Name: t.Samples},
		{Name: t.DeadLetter},
		{Name: t.Features},
		{Name: t.Scores},
		{Name: t.Alerts},
		{Name: t.Imaging},
		{Name: t.Audit},
		{Name: t.State, Configs: map[string]*string{"cleanup.policy": &compact}},
		{Name: t.Bindings, Configs: map[string]*string{"cleanup.policy": &compact}},
	}
}

// EnsureTopics creates every topic of cfg that does not exist yet, with
// cfg.Partitions partitions. Existing topics are left as they are (their
// partition count is reported, never changed, as that would move patients
// between partitions).
func EnsureTopics(ctx context.Context, cl *kgo.Client, cfg config.Kafka) error {
	adm := kadm.NewClient(cl)
	for _, s := range Specs(cfg.Topics) {
		resp, err := adm.CreateTopic(ctx, cfg.Partitions, cfg.ReplicationFactor, s.Configs, s.Name)
		if err == nil {
			err = resp.Err
		}
		if err != nil && !errors.Is(err, kerr.TopicAlreadyExists) {
			return fmt.Errorf("creating topic %s: %w", s.Name, err)
		}
	}
	return nil
}

// CommitOffsetsSync commits offsets for the client's consumer group and
// blocks until the broker answers or ctx ends. committed is called, with
// no lock of its own, for every partition the broker accepted (the caller
// forgets that offset unless a newer one was stored meanwhile); the error
// joins the request's failure and every refused partition's, each naming
// its topic and partition. Partitions not committed keep their offsets for
// the caller's next attempt.
func CommitOffsetsSync(ctx context.Context, cl *kgo.Client, offsets map[string]map[int32]kgo.EpochOffset, committed func(topic string, partition int32)) error {
	var cerr error
	cl.CommitOffsetsSync(ctx, offsets, func(_ *kgo.Client, _ *kmsg.OffsetCommitRequest, resp *kmsg.OffsetCommitResponse, err error) {
		if err != nil {
			cerr = err
			return
		}
		for _, t := range resp.Topics {
			for _, p := range t.Partitions {
				if perr := kerr.ErrorForCode(p.ErrorCode); perr != nil {
					cerr = errors.Join(cerr, fmt.Errorf("%s partition %d: %w", t.Topic, p.Partition, perr))
					continue
				}
				committed(t.Topic, p.Partition)
			}
		}
	})
	return cerr
}
