package main

import (
	"context"
	"fmt"
	"net"
	"runtime/debug"
	"strings"

	"github.com/vigilhealth/vigil/ingest/httpjson"
	"github.com/vigilhealth/vigil/ingest/mapping"
	"github.com/vigilhealth/vigil/ingest/publish"
	"github.com/vigilhealth/vigil/internal/catalog"
	"github.com/vigilhealth/vigil/internal/httpserver"
	"github.com/vigilhealth/vigil/internal/status"
	chsink "github.com/vigilhealth/vigil/sinks/clickhouse"
	"github.com/vigilhealth/vigil/stream"
)

// cmdRun runs the whole flow in one process.
func cmdRun(ctx context.Context, env *cliEnv) error {
	p := newPlatform(env)
	return p.serve(ctx,
		p.ensureDataDir,
		func() error { return p.startInfra(ctx, true) },
		func() error { return p.addStages(true, true, true) },
		p.addAlertRoutes,
		func() error {
			if p.cfg.Simulator.Enabled {
				return p.addSimulator()
			}
			return nil
		},
		func() error { p.addStatus(); p.printBanner(env); return nil },
	)
}

// serve runs the set-up steps in order; when one fails it closes what the
// earlier ones started and returns its error. Otherwise it runs the stages
// until ctx ends (see runner.Run).
func (p *platform) serve(ctx context.Context, steps ...func() error) error {
	for _, step := range steps {
		if err := step(); err != nil {
			_ = p.runner.Close(context.Background())
			return err
		}
	}
	return p.runner.Run(ctx)
}

// startInfra brings up Kafka (embedded if allowed and unconfigured) and
// ClickHouse (child if unconfigured), then applies migrations.
func (p *platform) startInfra(ctx context.Context, embedded bool) error {
	if err := p.startKafka(ctx, embedded); err != nil {
		return err
	}
	if err := p.startClickHouse(ctx); err != nil {
		return err
	}
	return chsink.Migrate(ctx, p.cfg.ClickHouse, p.log)
}

// addStages registers the chosen stages in flow order (ingest first).
func (p *platform) addStages(ingest, streamStage, sink bool) error {
	if ingest {
		if err := p.addIngest(); err != nil {
			return err
		}
	}
	if streamStage {
		proc, err := stream.New(p.cfg, p.deps("stream"))
		if err != nil {
			return fmt.Errorf("creating stream processor: %w", err)
		}
		p.runner.AddStage("stream", proc)
	}
	if sink {
		s, err := chsink.New(p.cfg, p.deps("sink"))
		if err != nil {
			return fmt.Errorf("creating clickhouse sink: %w", err)
		}
		p.runner.AddStage("sink", s)
		if p.http != nil {
			p.http.AddCheck("clickhouse", p.pingClickHouse)
		}
	}
	return nil
}

// pingClickHouse is the readiness check of the ClickHouse the sink writes to.
func (p *platform) pingClickHouse(ctx context.Context) error {
	conn, err := chsink.Open(ctx, p.cfg.ClickHouse)
	if err != nil {
		return err
	}
	return conn.Close()
}

// addIngest registers the HTTP server with the ingest handler.
func (p *platform) addIngest() error {
	if err := p.addMapping(); err != nil {
		return err
	}
	srv, err := httpserver.New(p.cfg.HTTP.Listen, p.cfg.HTTP.ShutdownTimeout, p.reg, p.log)
	if err != nil {
		return err
	}
	// The server's bound address is the simulator's default target.
	p.cfg.HTTP.Listen = srv.Addr()
	pub, err := publish.New(p.cfg, p.deps("ingest"))
	if err != nil {
		_ = srv.Close(context.Background())
		return fmt.Errorf("creating ingest publisher: %w", err)
	}
	h, err := httpjson.New(p.cfg, p.deps("ingest"), pub)
	if err != nil {
		_ = srv.Close(context.Background())
		return fmt.Errorf("creating http ingest: %w", err)
	}
	h.SetCodes(p.mapping)
	srv.Mount("POST /v1/samples", h)
	if err := p.addWaveforms(srv, pub); err != nil {
		_ = srv.Close(context.Background())
		_ = pub.Close(context.Background())
		return err
	}
	if err := p.addBindings(srv, h); err != nil {
		_ = srv.Close(context.Background())
		_ = pub.Close(context.Background())
		return err
	}
	if err := p.addMQTTAndFHIR(srv, pub); err != nil {
		_ = srv.Close(context.Background())
		_ = pub.Close(context.Background())
		return err
	}
	if err := p.addMLLP(pub); err != nil {
		_ = srv.Close(context.Background())
		_ = pub.Close(context.Background())
		return err
	}
	if err := p.addAlertAPI(srv, pub); err != nil {
		_ = srv.Close(context.Background())
		_ = pub.Close(context.Background())
		return err
	}
	p.http = srv
	srv.AddCheck("kafka", pub.Ping)
	p.runner.AddStage("http", srv)
	// The publisher outlives the HTTP server (in-flight requests publish
	// until the server has drained), so it is closed as a stage after it.
	p.runner.AddStage("ingest publisher", closeOnly{pub.Close})
	// The binding store starts before and stops after the paths using it.
	p.runner.AddStage("bindings", p.bindings)
	return nil
}

// addMapping creates the mapping tables (ingest.mapping_dir over the
// embedded defaults) once, as p.mapping for every ingest path, and runs their
// hot reload as a stage. The tables are usable from here on, before Run.
func (p *platform) addMapping() error {
	if p.mapping != nil {
		return nil
	}
	var opts []mapping.Option
	if p.cfg.Ingest.Catalog != "" {
		cat, err := catalog.Load(p.cfg.Ingest.Catalog)
		if err != nil {
			return err
		}
		opts = append(opts, mapping.WithCatalog(cat))
	}
	m, err := mapping.NewStore(p.cfg.Ingest.MappingDir, p.cfg.Ingest.MappingReload, p.deps("mapping"), opts...)
	if err != nil {
		return fmt.Errorf("loading mapping tables: %w", err)
	}
	p.mapping = m
	p.runner.AddStage("mapping", m)
	return nil
}

func (p *platform) addStatus() {
	if p.cfg.Status.Interval <= 0 {
		return
	}
	var rows status.RowCounter
	if p.cfg.ClickHouse.Addr != "" {
		rows = chsink.RowCounter(p.cfg.ClickHouse)
	}
	p.runner.AddStage("status", status.New(status.Options{
		Interval: p.cfg.Status.Interval,
		Gatherer: p.reg,
		Admin:    p.admin,
		Groups:   []string{p.cfg.Stream.Group, p.cfg.Sink.Group},
		Rows:     rows,
		Out:      p.statusOut,
		Log:      p.log,
	}))
}

func (p *platform) printBanner(env *cliEnv) {
	var b strings.Builder
	b.WriteString("\nVigil is running. Where to look:\n")
	fmt.Fprintf(&b, "  HTTP API    http://%s  (POST /v1/samples, GET /v1/alerts?state=open, POST /v1/alerts/{id}/ack, GET /healthz /readyz /metrics)\n", p.cfg.HTTP.Listen)
	b.WriteString(p.mllpBanner())
	b.WriteString(p.gatewayBanner())
	fmt.Fprintf(&b, "  Kafka       %s  (kcat -b %s -L; kcat -b %s -C -t %s -o beginning)\n",
		strings.Join(p.cfg.Kafka.Brokers, ","), p.cfg.Kafka.Brokers[0], p.cfg.Kafka.Brokers[0], p.cfg.Kafka.Topics.Alerts)
	host, port, _ := net.SplitHostPort(p.cfg.ClickHouse.Addr)
	fmt.Fprintf(&b, "  ClickHouse  %s  (clickhouse-client --host %s --port %s -d %s -q 'SELECT * FROM alerts')\n",
		p.cfg.ClickHouse.Addr, host, port, p.cfg.ClickHouse.Database)
	if p.chHTTP != "" {
		fmt.Fprintf(&b, "              http://%s (HTTP interface)\n", p.chHTTP)
	}
	fmt.Fprintf(&b, "  Data        %s\n", p.cfg.DataDir)
	if p.cfg.Simulator.Enabled {
		fmt.Fprintf(&b, "  Simulator   %d beds, %d wearables, %d deteriorating\n", p.cfg.Simulator.Beds, p.cfg.Simulator.Wearables, p.cfg.Simulator.Deteriorating)
		fmt.Fprintf(&b, "              %s\n", simulatorRoutes(p.cfg.Simulator))
	}
	b.WriteString("Ctrl-C drains and stops.\n\n")
	fmt.Fprint(env.stdout, b.String())
}

func cmdBroker(ctx context.Context, env *cliEnv) error {
	p := newPlatform(env)
	if err := p.ensureDataDir(); err != nil {
		return err
	}
	p.cfg.Kafka.Brokers = nil // this command is the broker
	if err := p.startKafka(ctx, true); err != nil {
		_ = p.runner.Close(context.Background())
		return err
	}
	fmt.Fprintf(env.stdout, "Vigil embedded broker listening on %s (data in %s); topics ready. Ctrl-C stops.\n",
		p.cfg.Kafka.Brokers[0], p.cfg.Path("kafka"))
	<-ctx.Done()
	return p.runner.Close(context.Background())
}

func cmdIngest(ctx context.Context, env *cliEnv) error {
	p := newPlatform(env)
	return p.serve(ctx,
		func() error { return p.startKafka(ctx, false) },
		func() error { return p.addStages(true, false, false) },
		func() error { p.log.Info("ingest listening", "http", p.cfg.HTTP.Listen); return nil },
	)
}

func cmdStream(ctx context.Context, env *cliEnv) error {
	p := newPlatform(env)
	return p.serve(ctx,
		func() error { return p.startKafka(ctx, false) },
		func() error { return p.addStages(false, true, false) },
	)
}

func cmdSink(ctx context.Context, env *cliEnv) error {
	p := newPlatform(env)
	return p.serve(ctx,
		p.ensureDataDir,
		func() error { return p.startInfra(ctx, false) },
		func() error { return p.addStages(false, false, true) },
	)
}

func cmdMigrate(ctx context.Context, env *cliEnv) error {
	p := newPlatform(env)
	defer p.runner.Close(context.Background())
	if err := p.ensureDataDir(); err != nil {
		return err
	}
	if err := p.startClickHouse(ctx); err != nil {
		return err
	}
	if err := chsink.Migrate(ctx, p.cfg.ClickHouse, p.log); err != nil {
		return err
	}
	fmt.Fprintf(env.stdout, "migrations applied to %s database %s\n", p.cfg.ClickHouse.Addr, p.cfg.ClickHouse.Database)
	return nil
}

func cmdVersion(_ context.Context, env *cliEnv) error {
	fmt.Fprintf(env.stdout, "vigil %s\n", version())
	if bi, ok := debug.ReadBuildInfo(); ok {
		fmt.Fprintf(env.stdout, "go %s\n", bi.GoVersion)
		for _, d := range bi.Deps {
			switch d.Path {
			case "github.com/twmb/franz-go", "github.com/ClickHouse/clickhouse-go/v2", "google.golang.org/protobuf":
				fmt.Fprintf(env.stdout, "%s %s\n", d.Path, d.Version)
			}
		}
	}
	return nil
}

// version is the module version, or the VCS revision for a development build.
func version() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "(unknown)"
	}
	if bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	for _, s := range bi.Settings {
		if s.Key == "vcs.revision" && len(s.Value) >= 12 {
			return "dev-" + s.Value[:12]
		}
	}
	return "dev"
}

// closeOnly adapts a Close func to a stage whose Run just waits.
type closeOnly struct {
	close func(context.Context) error
}

func (c closeOnly) Run(ctx context.Context) error   { <-ctx.Done(); return nil }
func (c closeOnly) Close(ctx context.Context) error { return c.close(ctx) }
