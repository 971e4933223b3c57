package httpserver

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

func TestHealthReadyMetricsAndDrain(t *testing.T) {
	reg := prometheus.NewRegistry()
	c := prometheus.NewCounter(prometheus.CounterOpts{Name: "vigil_test_things_total", Help: "Things."})
	reg.MustRegister(c)
	c.Add(3)
	s, err := New("127.0.0.1:0", 5*time.Second, reg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	var kafkaDown atomic.Bool
	s.AddCheck("kafka", func(context.Context) error {
		if kafkaDown.Load() {
			return errors.New("no broker answers")
		}
		return nil
	})
	release := make(chan struct{})
	s.Mount("POST /slow", http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		<-release
		_, _ = w.Write([]byte("done"))
	}))
	ctx, cancel := context.WithCancel(context.Background())
	runErr := make(chan error, 1)
	go func() { runErr <- s.Run(ctx) }()
	base := "http://" + s.Addr()

	get := func(path string) (int, string) {
		resp, err := http.Get(base + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := get("/healthz"); code != 200 || strings.TrimSpace(body) != "ok" {
		t.Errorf("/healthz: %d %q", code, body)
	}
	if code, body := get("/readyz"); code != 200 || !strings.Contains(body, `"ready":true`) {
		t.Errorf("/readyz while ready: %d %s", code, body)
	}
	kafkaDown.Store(true)
	code, body := get("/readyz")
	var ready struct {
		Ready  bool `json:"ready"`
		Checks []struct {
			Name, Error string
			OK          bool
		} `json:"checks"`
	}
	_ = json.Unmarshal([]byte(body), &ready)
	if code != 503 || ready.Ready || len(ready.Checks) != 1 || ready.Checks[0].Error != "no broker answers" {
		t.Errorf("/readyz with kafka down: %d %s", code, body)
	}
	if code, body := get("/metrics"); code != 200 || !strings.Contains(body, "vigil_test_things_total 3") {
		t.Errorf("/metrics: %d, counter missing", code)
	}

	// A request in flight when the server is told to stop still completes.
	slow := make(chan string, 1)
	go func() {
		resp, err := http.Post(base+"/slow", "text/plain", nil)
		if err != nil {
			slow <- "error: " + err.Error()
			return
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		slow <- string(b)
	}()
	time.Sleep(100 * time.Millisecond)
	cancel()
	time.Sleep(100 * time.Millisecond)
	close(release)
	if got := <-slow; got != "done" {
		t.Errorf("in-flight request during shutdown: %q", got)
	}
	if err := <-runErr; err != nil {
		t.Fatal(err)
	}
	if err := s.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, err := http.Get(base + "/healthz"); err == nil {
		t.Error("server still answers after stop")
	}
}
