// Command vigil is the one Vigil binary. `vigil run` runs the whole flow in
// one process (embedded Kafka-protocol broker and a child ClickHouse server
// when none are configured); the other subcommands run one stage each, all
// talking through Kafka, so a site can run them as separate processes and
// scale them by partitions and consumer groups.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/vigilhealth/vigil/internal/config"
)

const usage = `vigil: event-streamed health monitoring

Usage:
  vigil <command> [flags]

Commands:
  run        run everything in one process (embedded broker and ClickHouse when none configured)
  broker     run the embedded Kafka-protocol broker alone and create the topics
  ingest     run the HTTP ingest API (POST /v1/samples) alone
  stream     run the stream processor (windows, NEWS2, alerts) alone
  sink       run the ClickHouse sink alone
  routes     run the alert routes alone (webhooks, alert-burden metrics)
  migrate    apply the ClickHouse migrations and exit
  simulate   run the bedside/wearable simulator against an ingest endpoint
  replay     replay recordings, PhysioNet PSV folders/tarballs or WFDB records through ingest
  deadletter inspect and re-drive refused messages: ls, show <partition>:<offset>, redrive --reason R
  train      train a model (gradient-boosted trees or logistic regression) from a CSV and write it as ONNX with its manifest
  validate   validate the detectors on a public data set: sepsis2019 (PhysioNet/CinC 2019, AUROC and utility)
  version    print the version

Every command takes the common flags (vigil <command> -h lists them). Settings come
from the built-in defaults, then --config FILE, then VIGIL_* environment variables
(VIGIL_KAFKA_BROKERS, VIGIL_HTTP_LISTEN, ...: the YAML path in upper case with _),
then flags. --print-config shows the effective configuration.
`

type command struct {
	name string
	run  func(ctx context.Context, env *cliEnv) error
	// extra registers command-specific flags.
	extra func(fs *flag.FlagSet, env *cliEnv)
	// positional commands take arguments among their flags (env.args).
	positional bool
}

func commands() []command {
	return []command{
		{name: "run", run: cmdRun, extra: func(fs *flag.FlagSet, e *cliEnv) {
			fs.BoolVar(&e.simulate, "simulate", false, "also run the simulator against this process's ingest API")
		}},
		{name: "broker", run: cmdBroker},
		{name: "ingest", run: cmdIngest},
		{name: "stream", run: cmdStream},
		{name: "sink", run: cmdSink},
		{name: "routes", run: cmdRoutes},
		{name: "migrate", run: cmdMigrate},
		{name: "simulate", run: cmdSimulate, extra: func(fs *flag.FlagSet, e *cliEnv) {
			fs.StringVar(&e.record, "record", "", "also write every request body sent to this recording (JSON Lines; .gz compresses)")
		}},
		{name: "replay", run: cmdReplay, extra: replayFlags, positional: true},
		deadletterCommand(),
		validateCommand(),
		trainCommand(),
		{name: "version", run: cmdVersion},
	}
}

// setFlags collects repeated --set path=value flags.
type setFlags []string

func (s *setFlags) String() string     { return strings.Join(*s, ",") }
func (s *setFlags) Set(v string) error { *s = append(*s, v); return nil }

// cliEnv is what a subcommand receives: the effective config and the
// process-wide logger.
type cliEnv struct {
	cfg      config.Config
	log      *slog.Logger
	stdout   io.Writer
	stderr   io.Writer
	simulate bool
	// record is `vigil simulate --record`; replay holds `vigil replay`'s flags.
	record string
	replay replayOpts
	// args are the positional arguments of a positional command.
	args []string
}

func main() {
	os.Exit(realMain(os.Args[1:], os.Environ(), os.Stdout, os.Stderr))
}

func realMain(args, environ []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprint(stderr, usage)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	var cmd *command
	for _, c := range commands() {
		if c.name == args[0] {
			c := c
			cmd = &c
		}
	}
	if cmd == nil {
		fmt.Fprintf(stderr, "vigil: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
	env := &cliEnv{stdout: stdout, stderr: stderr}
	fs := flag.NewFlagSet("vigil "+cmd.name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		cfgPath, dataDir, brokers, clickhouse, httpListen, logLevel string
		sets                                                        setFlags
		printConfig                                                 bool
	)
	fs.StringVar(&cfgPath, "config", "", "YAML config file (unknown keys fail)")
	fs.StringVar(&dataDir, "data-dir", "", "run folder (default .vigil)")
	fs.StringVar(&brokers, "brokers", "", "Kafka seed brokers host:port,... (default: embedded broker in `vigil run`)")
	fs.StringVar(&clickhouse, "clickhouse", "", "ClickHouse native address host:port (default: local child server)")
	fs.StringVar(&httpListen, "http", "", "HTTP API listen address (default 127.0.0.1:8080)")
	fs.StringVar(&logLevel, "log-level", "", "debug, info, warn or error")
	fs.Var(&sets, "set", "override any setting: --set path=value (repeatable), e.g. --set stream.window=30s")
	fs.BoolVar(&printConfig, "print-config", false, "print the effective configuration as YAML and exit")
	if cmd.extra != nil {
		cmd.extra(fs, env)
	}
	if err := parseArgs(fs, args[1:], cmd.positional, env); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "vigil %s: unexpected arguments %q\n", cmd.name, fs.Args())
		return 2
	}
	// Named flags are shortcuts for --set and override it, as flags come last.
	for flagName, path := range map[string]string{"data-dir": "data_dir", "brokers": "kafka.brokers",
		"clickhouse": "clickhouse.addr", "http": "http.listen", "log-level": "log.level"} {
		if f := fs.Lookup(flagName); f != nil && f.Value.String() != "" {
			sets = append(sets, path+"="+f.Value.String())
		}
	}
	if env.simulate {
		sets = append(sets, "simulator.enabled=true")
	}
	cfg, err := config.Load(cfgPath, environ, sets)
	if err != nil {
		fmt.Fprintf(stderr, "vigil: invalid configuration:\n%v\n", err)
		return 2
	}
	if printConfig {
		out, err := config.Marshal(cfg)
		if err != nil {
			fmt.Fprintln(stderr, "vigil:", err)
			return 1
		}
		_, _ = stdout.Write(out)
		return 0
	}
	env.cfg = cfg
	env.log = newLogger(cfg.Log, stderr)
	defer cfg.Runtime.Apply()() // runtime.gc_percent, runtime.memory_limit; put back on return (tests run commands in-process)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := cmd.run(ctx, env); err != nil {
		env.log.Error("vigil "+cmd.name+" failed", "err", err)
		return 1
	}
	return 0
}

func newLogger(c config.Log, w io.Writer) *slog.Logger {
	var lvl slog.Level
	_ = lvl.UnmarshalText([]byte(c.Level))
	opts := &slog.HandlerOptions{Level: lvl}
	if c.Format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}
