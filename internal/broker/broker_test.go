package broker

import (
	"context"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"
)

// TestDataSurvivesRestart produces to the broker, restarts it on the same
// data dir and port, and reads the record back.
func TestDataSurvivesRestart(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "kafka")
	b, err := Start(Options{Listen: "127.0.0.1:0", DataDir: dir, Partitions: 2, Log: slog.Default()})
	if err != nil {
		t.Fatal(err)
	}
	addr := b.Addr()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cl, err := kgo.NewClient(kgo.SeedBrokers(addr))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kadm.NewClient(cl).CreateTopic(ctx, 2, -1, nil, "t"); err != nil {
		t.Fatal(err)
	}
	if err := cl.ProduceSync(ctx, &kgo.Record{Topic: "t", Key: []byte("k"), Value: []byte("kept")}).FirstErr(); err != nil {
		t.Fatal(err)
	}
	cl.Close()
	_ = b.Close(ctx)
	_ = b.Close(ctx) // idempotent

	b2, err := Start(Options{Listen: addr, DataDir: dir, Partitions: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer b2.Close(ctx)
	cl2, err := kgo.NewClient(kgo.SeedBrokers(b2.Addr()), kgo.ConsumeTopics("t"), kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	if err != nil {
		t.Fatal(err)
	}
	defer cl2.Close()
	fs := cl2.PollFetches(ctx)
	if errs := fs.Errors(); len(errs) > 0 {
		t.Fatal(errs)
	}
	recs := fs.Records()
	if len(recs) != 1 || string(recs[0].Value) != "kept" {
		t.Fatalf("after restart got %d records, want the one produced before", len(recs))
	}
}
