package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/vigilhealth/vigil/ingest/binding"
	"github.com/vigilhealth/vigil/ingest/mapping"
	"github.com/vigilhealth/vigil/ingest/waveform"
	"github.com/vigilhealth/vigil/internal/broker"
	"github.com/vigilhealth/vigil/internal/bus"
	"github.com/vigilhealth/vigil/internal/chserver"
	"github.com/vigilhealth/vigil/internal/clock"
	"github.com/vigilhealth/vigil/internal/config"
	"github.com/vigilhealth/vigil/internal/httpserver"
	"github.com/vigilhealth/vigil/internal/runner"
	"github.com/vigilhealth/vigil/internal/stage"
	"github.com/vigilhealth/vigil/sinks/alertapi"
)

// platform is one process's shared plumbing: config, logger, metrics
// registry, the runner and the infrastructure it started.
type platform struct {
	cfg    config.Config
	log    *slog.Logger
	reg    *prometheus.Registry
	runner *runner.Runner
	admin  *kadm.Client
	// chHTTP is the local ClickHouse's HTTP address, when we started one.
	chHTTP string
	// statusOut receives the periodic status line.
	statusOut io.Writer
	// http is the HTTP server, when this process serves one.
	http *httpserver.Server
	// mapping holds the MDC/LOINC/unit mapping tables (hot reloaded) that
	// every ingest path maps codes with; set by addIngest.
	mapping *mapping.Store
	// bindings is the device/bed → patient binding store every ingest
	// path resolves patients through; set by addIngest.
	bindings *binding.Store
	// waveforms is the waveform processor (ECG chunks → RR intervals)
	// when waveform.enabled; set by addWaveforms, used by the MLLP path.
	waveforms *waveform.Processor
	// streamClock, when set (by tests), is the processing clock of the
	// stream stage (alert timers, idle timeouts) and of the alerts API
	// (acknowledgement times); nil: the system clock.
	streamClock clock.Clock
	// alertAPI is the alerts HTTP API, when served; set by addAlertAPI.
	alertAPI *alertapi.API
}

func newPlatform(env *cliEnv) *platform {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return &platform{
		cfg:       env.cfg,
		log:       env.log,
		reg:       reg,
		runner:    runner.New(env.log, 15*time.Second),
		statusOut: env.stderr,
	}
}

func (p *platform) deps(component string) stage.Deps {
	if (component == "stream" || component == "alertapi") && p.streamClock != nil {
		return stage.Deps{Log: p.log.With("stage", component), Metrics: p.reg, Clock: p.streamClock}
	}
	return stage.Deps{Log: p.log.With("stage", component), Metrics: p.reg, Clock: clock.System{}}
}

// startKafka starts the embedded broker when no brokers are configured (and
// embedded is allowed), then creates the topics that are missing.
func (p *platform) startKafka(ctx context.Context, allowEmbedded bool) error {
	if len(p.cfg.Kafka.Brokers) == 0 {
		if !allowEmbedded {
			return fmt.Errorf("no kafka brokers configured: set --brokers (or kafka.brokers) to your cluster or to a `vigil broker`")
		}
		b, err := broker.Start(broker.Options{
			Listen:     p.cfg.Kafka.Embedded.Listen,
			DataDir:    p.cfg.Path("kafka"),
			Partitions: int(p.cfg.Kafka.Partitions),
			SyncWrites: p.cfg.Kafka.Embedded.SyncWrites,
			Log:        p.log,
		})
		if err != nil {
			return err
		}
		p.runner.AddResource("embedded broker", b.Close)
		p.cfg.Kafka.Brokers = []string{b.Addr()}
	}
	cl, err := kgo.NewClient(bus.ClientOpts(p.cfg.Kafka, p.log)...)
	if err != nil {
		return fmt.Errorf("creating kafka admin client: %w", err)
	}
	p.runner.AddResource("kafka admin client", func(context.Context) error { cl.Close(); return nil })
	p.admin = kadm.NewClient(cl)
	tctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := bus.EnsureTopics(tctx, cl, p.cfg.Kafka); err != nil {
		return fmt.Errorf("preparing topics on %v: %w", p.cfg.Kafka.Brokers, err)
	}
	return nil
}

// startClickHouse starts the local child ClickHouse when no address is
// configured and points the config at it.
func (p *platform) startClickHouse(ctx context.Context) error {
	if p.cfg.ClickHouse.Addr != "" {
		return nil
	}
	l := p.cfg.ClickHouse.Local
	srv, err := chserver.Start(ctx, chserver.Options{
		Binary:       l.Binary,
		DataDir:      p.cfg.Path("clickhouse"),
		ListenHost:   l.ListenHost,
		TCPPort:      l.TCPPort,
		HTTPPort:     l.HTTPPort,
		StartTimeout: l.StartTimeout,
		Nice:         l.Nice,
		Log:          p.log,
	})
	if err != nil {
		return err
	}
	p.runner.AddResource("clickhouse server", srv.Close)
	p.cfg.ClickHouse.Addr = srv.Addr()
	p.chHTTP = srv.HTTPAddr()
	return nil
}

func (p *platform) ensureDataDir() error {
	if err := os.MkdirAll(p.cfg.DataDir, 0o750); err != nil {
		return fmt.Errorf("creating data dir: %w", err)
	}
	abs, err := filepath.Abs(p.cfg.DataDir)
	if err == nil {
		p.cfg.DataDir = abs
	}
	return nil
}
