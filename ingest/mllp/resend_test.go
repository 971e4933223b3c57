package mllp

import (
	"context"
	"testing"
	"time"

	"github.com/vigilhealth/vigil/ingest/hl7"
	"github.com/vigilhealth/vigil/ingest/publish"
	"github.com/vigilhealth/vigil/internal/stage"
	"github.com/vigilhealth/vigil/internal/testenv"
)

// TestResendDuringSlowPublishIsPublishedOnce: a gateway whose ACK timeout
// is shorter than Kafka's acknowledgement gives up on the first copy of a
// message, reconnects and sends it again while the first is still being
// published. The copy must wait for the first's outcome and be ACKed AA
// without a second publish (before, both were published: duplicate
// samples in Kafka and in ClickHouse).
func TestResendDuringSlowPublishIsPublishedOnce(t *testing.T) {
	broker := testenv.Kafka(t)
	cfg := testenv.Config(t, broker, "")
	pub, err := publish.New(cfg, stage.Deps{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pub.Close(context.Background()) })
	g := gatedPublisher{Publisher: pub, gate: make(chan struct{}), entered: make(chan struct{}, 1)}
	srv := startServer(t, cfg, nil, Options{Publisher: g})
	msg := AppendFrame(nil, []byte(pcd("RESEND-1", "MRN-1", "DEV", time.Now().Add(-time.Minute), 70, "\r")))

	first := dial(t, srv.Addr())
	if _, err := first.c.Write(msg); err != nil {
		t.Fatal(err)
	}
	<-g.entered
	// The sender's ACK timeout: it drops the connection and re-sends.
	_ = first.c.Close()
	second := dial(t, srv.Addr())
	if _, err := second.c.Write(msg); err != nil {
		t.Fatal(err)
	}
	select {
	case <-g.entered:
		t.Error("the re-sent copy was published while the first copy was still being published")
	case <-time.After(300 * time.Millisecond):
	}
	close(g.gate)
	_ = second.c.SetReadDeadline(time.Now().Add(20 * time.Second))
	b, err := second.r.Next()
	if err != nil {
		t.Fatalf("no ACK for the re-sent copy: %v", err)
	}
	m, err := hl7.Parse(append([]byte(nil), b...))
	if err != nil {
		t.Fatal(err)
	}
	if code, ctl := msa(m); code != "AA" || ctl != "RESEND-1" {
		t.Errorf("re-sent copy answered %s %s, want AA RESEND-1", code, ctl)
	}
	batches := readBatches(t, broker, cfg.Kafka.Topics.Samples)
	if len(batches) != 1 {
		t.Fatalf("%d sample batches on the topic for one message sent twice, want 1", len(batches))
	}
	if n := len(batches[0].Samples); n == 0 {
		t.Errorf("the published batch holds no samples")
	}
}
