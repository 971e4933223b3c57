package mllp

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/vigilhealth/vigil/ingest/hl7"
	"github.com/vigilhealth/vigil/ingest/publish"
	"github.com/vigilhealth/vigil/internal/stage"
	"github.com/vigilhealth/vigil/internal/testenv"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// selfSigned writes a certificate for 127.0.0.1 and its key as PEM files.
func selfSigned(t *testing.T) (certFile, keyFile string, pool *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "vigil-test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool = x509.NewCertPool()
	pool.AddCert(cert)
	return certFile, keyFile, pool
}

// TestTLS sends a PCD-01 message over MLLP over TLS and gets AA; a plain
// TCP sender on the TLS port gets no ACK.
func TestTLS(t *testing.T) {
	broker := testenv.Kafka(t)
	cfg := testenv.Config(t, broker, "")
	var pool *x509.CertPool
	cfg.MLLP.TLSCert, cfg.MLLP.TLSKey, pool = selfSigned(t)
	srv := startServer(t, cfg, nil, Options{})
	if !srv.TLS() {
		t.Fatal("listener does not speak TLS")
	}
	c, err := tls.Dial("tcp", srv.Addr(), &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	cl := &client{tb: t, c: c, r: NewReader(c, 1<<20)}
	if code, ctl := msa(cl.roundTrip(pcd("TLS-1", "MRN-1", "DEV", time.Now().Add(-time.Minute), 70, "\r"))); code != "AA" || ctl != "TLS-1" {
		t.Errorf("over TLS: %s %s", code, ctl)
	}
	plain, err := net.Dial("tcp", srv.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	_, _ = plain.Write(AppendFrame(nil, []byte(pcd("PLAIN-1", "MRN-1", "DEV", time.Now(), 70, "\r"))))
	_ = plain.SetReadDeadline(time.Now().Add(2 * time.Second))
	if b, err := NewReader(plain, 1<<20).Next(); err == nil {
		if m, perr := hl7.Parse(b); perr == nil {
			t.Errorf("plain TCP on the TLS port got an HL7 answer: %q", m.Raw())
		}
	}
}

// gatedPublisher holds every Publish of the real publisher until gate is
// closed: a Kafka that is slow to acknowledge.
type gatedPublisher struct {
	*publish.Publisher
	gate    chan struct{}
	entered chan struct{}
}

func (g gatedPublisher) Publish(ctx context.Context, batches []*vigilv1.SampleBatch) error {
	select {
	case g.entered <- struct{}{}:
	default:
	}
	select {
	case <-g.gate:
	case <-ctx.Done():
		return ctx.Err()
	}
	return g.Publisher.Publish(ctx, batches)
}

// TestSlowKafkaHoldsTheACK checks the backpressure contract: while Kafka
// has not acknowledged, the sender gets no ACK (and, as MLLP senders wait
// for it, sends nothing more); the AA comes once the samples are in Kafka.
func TestSlowKafkaHoldsTheACK(t *testing.T) {
	broker := testenv.Kafka(t)
	cfg := testenv.Config(t, broker, "")
	pub, err := publish.New(cfg, stage.Deps{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pub.Close(context.Background()) })
	g := gatedPublisher{Publisher: pub, gate: make(chan struct{}), entered: make(chan struct{}, 1)}
	srv := startServer(t, cfg, nil, Options{Publisher: g})
	c := dial(t, srv.Addr())
	if _, err := c.c.Write(AppendFrame(nil, []byte(pcd("SLOW-1", "MRN-1", "DEV", time.Now().Add(-time.Minute), 70, "\r")))); err != nil {
		t.Fatal(err)
	}
	<-g.entered
	_ = c.c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
	if _, err := c.r.Next(); err == nil {
		t.Fatal("ACK before Kafka acknowledged")
	}
	if n := len(testenv.ReadAll(t, broker, cfg.Kafka.Topics.Samples)); n != 0 {
		t.Fatalf("%d records on the topic before the publish", n)
	}
	close(g.gate)
	// The timed-out read consumed nothing: the same reader goes on.
	_ = c.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	b, err := c.r.Next()
	if err != nil {
		t.Fatalf("no ACK after Kafka acknowledged: %v", err)
	}
	m, err := hl7.Parse(b)
	if err != nil {
		t.Fatal(err)
	}
	if code, ctl := msa(m); code != "AA" || ctl != "SLOW-1" {
		t.Errorf("%s %s, want AA", code, ctl)
	}
	if n := len(testenv.ReadAll(t, broker, cfg.Kafka.Topics.Samples)); n != 1 {
		t.Errorf("%d records on the topic after the AA, want 1", n)
	}
}

// TestDedupeSurvivesRestart: a gateway that lost the ACK of a message while
// Vigil restarted sends it again to the new process; the new listener,
// having re-read the samples topic, ACKs it AA (duplicate) without
// publishing it again.
func TestDedupeSurvivesRestart(t *testing.T) {
	broker := testenv.Kafka(t)
	cfg := testenv.Config(t, broker, "")
	msg := pcd("RESTART-1", "MRN-1", "DEV", time.Now().Add(-time.Minute), 70, "\r")
	first := startServer(t, cfg, nil, Options{})
	if code, _ := msa(dial(t, first.Addr()).roundTrip(msg)); code != "AA" {
		t.Fatalf("first: %s", code)
	}
	second := startServer(t, cfg, nil, Options{}) // a new process: empty filter
	ack := dial(t, second.Addr()).roundTrip(msg)
	if code, ctl := msa(ack); code != "AA" || ctl != "RESTART-1" {
		t.Fatalf("sent again after the restart: %s %s", code, ctl)
	}
	if e := errs(ack); len(e) != 1 || !strings.Contains(e[0], "|205|I|") {
		t.Errorf("ERR %v, want one 205 duplicate (I)", e)
	}
	if d := testutil.ToFloat64(second.h.m.duplicates); d != 1 {
		t.Errorf("duplicates on the new listener %v, want 1", d)
	}
	if n := len(readBatches(t, broker, cfg.Kafka.Topics.Samples)); n != 1 {
		t.Errorf("%d batches on the topic, want 1", n)
	}
}

// TestRepeatedObservationsStoredOnce: a monitor that reports the same
// observations (same time, value, channel) again in a new message, as
// PCD-01 gateways do with the last NIBP, gets AA and the observations are
// published once; a changed one is published.
func TestRepeatedObservationsStoredOnce(t *testing.T) {
	broker := testenv.Kafka(t)
	cfg := testenv.Config(t, broker, "")
	srv := startServer(t, cfg, nil, Options{})
	c := dial(t, srv.Addr())
	at := time.Now().Add(-time.Minute).Truncate(time.Second)
	for _, m := range []struct {
		id string
		hr float64
	}{{"REP-1", 70}, {"REP-2", 70}, {"REP-3", 71}} {
		if code, _ := msa(c.roundTrip(pcd(m.id, "MRN-1", "DEV", at, m.hr, "\r"))); code != "AA" {
			t.Fatalf("%s: %s", m.id, code)
		}
	}
	got := map[string]int{}
	for _, b := range readBatches(t, broker, cfg.Kafka.Topics.Samples) {
		got[b.MessageId] += len(b.Samples)
	}
	if got["REP-1"] != 7 || got["REP-2"] != 0 || got["REP-3"] != 1 {
		t.Errorf("samples published per message %v, want REP-1 7, REP-2 0, REP-3 1 (the changed heart rate)", got)
	}
	if r := testutil.ToFloat64(srv.h.m.repeats); r != 13 {
		t.Errorf("repeated observations %v, want 13", r)
	}
}
