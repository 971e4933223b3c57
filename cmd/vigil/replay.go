package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/vigilhealth/vigil/ingest/replay"
	"github.com/vigilhealth/vigil/internal/bus"
)

// replayOpts are `vigil replay`'s own flags.
type replayOpts struct {
	tenant, start, target string
	speed                 float64
	quiet                 bool
	lanes                 int
	inflight              int64
	maxFiles              int64
}

func replayFlags(fs *flag.FlagSet, e *cliEnv) {
	o := &e.replay
	fs.StringVar(&o.tenant, "tenant", "physionet", "tenant of PSV and WFDB data (recordings carry their own)")
	fs.StringVar(&o.start, "start", replay.DefaultStart().Format(time.RFC3339), "event time of PSV ICU hour 1 (RFC 3339)")
	fs.Float64Var(&o.speed, "speed", 0, "play X× real time by event time (e.g. 60: an hour per minute); 0 = full speed")
	fs.StringVar(&o.target, "target", "", "post to a running vigil's HTTP API (http://host:port) instead of publishing to Kafka in process")
	fs.BoolVar(&o.quiet, "quiet", false, "no progress (a bar on a terminal, else a line every 5 s on stderr)")
	fs.Int64Var(&o.maxFiles, "max-files", 0, "stop after this many files (PSV files, recordings, WFDB records; a tarball's entries count one each); 0 = all")
	fs.IntVar(&o.lanes, "lanes", 4, "concurrent publishers (one patient always uses one)")
	fs.Int64Var(&o.inflight, "max-inflight-bytes", 32<<20, "bound on the bytes published but not yet acknowledged")
}

// cmdReplay replays files and folders (env.args) through ingest into Kafka,
// or into a running vigil with --target.
func cmdReplay(ctx context.Context, env *cliEnv) error {
	o := env.replay
	if len(env.args) == 0 {
		return errors.New("vigil replay: name the files or folders to replay (recordings .jsonl[.gz], PSV files, folders or .tar.gz, WFDB .hea)")
	}
	start, err := time.Parse(time.RFC3339, o.start)
	if err != nil {
		return fmt.Errorf("--start %q: want an RFC 3339 time such as 2019-01-01T00:00:00Z", o.start)
	}
	p := newPlatform(env)
	cfg := p.cfg
	if o.target == "" {
		if len(cfg.Kafka.Brokers) == 0 {
			// A `vigil run` or `vigil broker` on this machine.
			cfg.Kafka.Brokers = []string{cfg.Kafka.Embedded.Listen}
		}
		cl, err := kgo.NewClient(bus.ClientOpts(cfg.Kafka, p.log)...)
		if err != nil {
			return fmt.Errorf("creating kafka admin client: %w", err)
		}
		tctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		err = bus.EnsureTopics(tctx, cl, cfg.Kafka)
		cancel()
		cl.Close()
		if err != nil {
			return fmt.Errorf("preparing topics on %v (is a broker running? start `vigil run` or `vigil broker`, or pass --brokers): %w", cfg.Kafka.Brokers, err)
		}
	}
	r, err := replay.New(cfg, p.deps("replay"), replay.Options{
		Tenant: o.tenant, Start: start, Speed: o.speed, Target: o.target, Lanes: o.lanes, MaxInFlightBytes: o.inflight,
		MaxFiles: o.maxFiles,
		Progress: replay.NewProgress(env.stderr, o.quiet),
	}, nil)
	if err != nil {
		return err
	}
	began := time.Now()
	st, runErr := r.Run(ctx, env.args)
	cctx, cancel := context.WithTimeout(context.Background(), cfg.Kafka.ProduceTimeout+5*time.Second)
	defer cancel()
	closeErr := r.Close(cctx)
	el := time.Since(began)
	fmt.Fprintf(env.stdout, "replayed %d files, %d rows: %d samples accepted in %d batches, %d refused (dead letters); skipped %d lab values, %d unmapped vital values, %d files of unknown format, %d non-ECG signals; %.1fs, %.0f samples/s\n",
		st.Files, st.Rows, st.Samples, st.Batches, st.Refused, st.Labs, st.Unmapped, st.Skipped, st.SkippedSignals, el.Seconds(), float64(st.Samples)/max(el.Seconds(), 1e-3))
	return errors.Join(runErr, closeErr)
}
