package mqtt

import (
	"fmt"
	"testing"
	"time"

	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/auth"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/vigilhealth/vigil/internal/testenv"
)

// externalBroker runs a separate mochi-mqtt broker on a free port, standing
// for a site's own broker, and returns its address.
func externalBroker(t *testing.T) string {
	t.Helper()
	srv := mochi.New(&mochi.Options{InlineClient: false})
	if err := srv.AddHook(new(auth.AllowHook), nil); err != nil {
		t.Fatal(err)
	}
	tcp := listeners.NewTCP(listeners.Config{Type: "tcp", ID: "site", Address: "127.0.0.1:0"})
	if err := srv.AddListener(tcp); err != nil {
		t.Fatal(err)
	}
	if err := srv.Serve(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Close() })
	return tcp.Address()
}

// With mqtt.external set (and the embedded broker off), Vigil subscribes to
// the site's broker, as a shared subscription when shared_group is set, in
// a persistent session: messages published to the site's broker end up in
// Kafka with tenant and device from their topic.
func TestExternalBrokerSubscription(t *testing.T) {
	for _, group := range []string{"", "vigil"} {
		t.Run(fmt.Sprintf("shared_group=%q", group), func(t *testing.T) {
			site := externalBroker(t)
			broker := testenv.Kafka(t)
			cfg := testConfig(t, broker)
			cfg.MQTT.Embedded.Enabled = false
			cfg.MQTT.External.Brokers = []string{"tcp://" + site}
			cfg.MQTT.External.SharedGroup = group
			cfg.MQTT.External.ClientID = "vigil-test-" + group
			e := start(t, cfg, false)
			if e.svc.Addr() != "" {
				t.Fatalf("embedded broker listening on %s although disabled", e.svc.Addr())
			}
			dev := connect(t, site, "wearable-ext", true, nil)
			for i := 1; i <= 5; i++ {
				if tok := dev.Publish(fmt.Sprintf("vigil/st-mary/watch-%d/samples", i), 1, false, payload("p-ext", i, 2)); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
					t.Fatalf("publish to the site broker: %v", tok.Error())
				}
			}
			waitFor(t, func() bool { return len(batches(t, broker, cfg.Kafka.Topics.Samples)) == 5 })
			seen := map[string]bool{}
			for _, b := range batches(t, broker, cfg.Kafka.Topics.Samples) {
				if b.Tenant != "st-mary" || b.Patient != "p-ext" || len(b.Samples) != 2 {
					t.Fatalf("batch %v", b)
				}
				seen[b.Device] = true
			}
			if len(seen) != 5 {
				t.Fatalf("devices %v, want watch-1..5", seen)
			}
			if n := testutil.ToFloat64(e.svc.in.m.outcome.WithLabelValues("external", "1", "accepted")); n != 5 {
				t.Errorf("external accepted qos 1 messages counted %v, want 5", n)
			}
		})
	}
}
