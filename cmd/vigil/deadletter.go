package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/user"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/vigilhealth/vigil/ingest/binding"
	"github.com/vigilhealth/vigil/ingest/deadletter"
	"github.com/vigilhealth/vigil/ingest/publish"
	"github.com/vigilhealth/vigil/ingest/validate"
	"github.com/vigilhealth/vigil/internal/catalog"
	"github.com/vigilhealth/vigil/internal/clock"
	"github.com/vigilhealth/vigil/internal/stage"
)

const deadletterUsage = `vigil deadletter: inspect and re-drive the refusals on the dead-letter topic

Usage:
  vigil deadletter ls      [--reason R] [--source S] [--tenant T] [--since T] [--until T] [--limit N] [--json]
  vigil deadletter show    <partition>:<offset> [--json]
  vigil deadletter redrive --reason R [--source S] [--tenant T] [--since T] [--until T] [--dry-run] [--again] [--json]

Times (--since, --until: the refused time, [since, until)) are RFC 3339, a date, or a duration back
from now (2h). redrive re-validates letters that carry the decoded sample, giving samples without a
patient (unbound_device) the patient bound to their device at their event time, publishes what passes
with its original message id, writes a fresh dead letter for what is refused again, and records each
letter it tried on the audit topic (a second redrive skips those unless --again). Letters holding only
raw bytes cannot be re-driven: fix the sender and resend.
`

// deadletterFlags are the flags of `vigil deadletter`.
type deadletterFlags struct {
	reason, source, tenant, since, until, actor string
	limit                                       int
	json, dryRun, again                         bool
}

// deadletterCommand is `vigil deadletter ls|show|redrive`.
func deadletterCommand() command {
	f := &deadletterFlags{}
	return command{
		name:       "deadletter",
		positional: true,
		run:        func(ctx context.Context, env *cliEnv) error { return cmdDeadletter(ctx, env, f) },
		extra: func(fs *flag.FlagSet, _ *cliEnv) {
			fs.StringVar(&f.reason, "reason", "", "only letters with this reason (e.g. unbound_device); required by redrive")
			fs.StringVar(&f.source, "source", "", "only letters from this source (http, mllp, mqtt, fhir, replay, simulator)")
			fs.StringVar(&f.tenant, "tenant", "", "only letters of this tenant")
			fs.StringVar(&f.since, "since", "", "only letters refused at or after this time (RFC 3339, date, or duration back: 2h)")
			fs.StringVar(&f.until, "until", "", "only letters refused before this time")
			fs.IntVar(&f.limit, "limit", 100, "ls: show at most the newest N letters (0 = all); counts cover all")
			fs.BoolVar(&f.json, "json", false, "print JSON instead of text")
			fs.BoolVar(&f.dryRun, "dry-run", false, "redrive: say what would happen, write nothing")
			fs.BoolVar(&f.again, "again", false, "redrive: also re-drive letters re-driven before")
			fs.StringVar(&f.actor, "actor", "", "redrive: who re-drives, for the audit trail (default: the OS user)")
			fs.Usage = func() { fmt.Fprint(fs.Output(), deadletterUsage, "\nFlags:\n"); fs.PrintDefaults() }
		},
	}
}

// parseArgs parses args with fs; a command taking positional arguments may
// mix them with flags (`vigil deadletter ls --reason x`), and gets them in
// env.args.
func parseArgs(fs *flag.FlagSet, args []string, positional bool, env *cliEnv) error {
	if !positional {
		return fs.Parse(args)
	}
	for {
		if err := fs.Parse(args); err != nil {
			return err
		}
		if fs.NArg() == 0 {
			return nil
		}
		env.args = append(env.args, fs.Arg(0))
		args = fs.Args()[1:]
	}
}

// usageError is a mistake in the command line.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg + " (vigil deadletter -h)" }

func cmdDeadletter(ctx context.Context, env *cliEnv, f *deadletterFlags) error {
	if len(env.args) == 0 {
		fmt.Fprint(env.stderr, deadletterUsage)
		return &usageError{"no subcommand: ls, show or redrive"}
	}
	now := time.Now()
	var filter deadletter.Filter
	var err error
	filter.Reason, filter.Source, filter.Tenant = f.reason, f.source, f.tenant
	if filter.Since, err = deadletter.ParseTime(f.since, now); err != nil {
		return &usageError{"--since: " + err.Error()}
	}
	if filter.Until, err = deadletter.ParseTime(f.until, now); err != nil {
		return &usageError{"--until: " + err.Error()}
	}
	rd, err := deadletter.NewReader(env.cfg.Kafka, env.log)
	if err != nil {
		return err
	}
	verb, rest := env.args[0], env.args[1:]
	switch verb {
	case "ls", "list":
		if len(rest) > 0 {
			return &usageError{fmt.Sprintf("ls takes no arguments, got %q", rest)}
		}
		ls, err := rd.List(ctx, filter, f.limit)
		if err != nil {
			return err
		}
		if f.json {
			return deadletter.WriteJSON(env.stdout, ls)
		}
		return deadletter.WriteTable(env.stdout, ls)
	case "show":
		if len(rest) != 1 {
			return &usageError{"show takes one letter id <partition>:<offset>"}
		}
		p, o, err := deadletter.ParseID(rest[0])
		if err != nil {
			return &usageError{err.Error()}
		}
		l, err := rd.Get(ctx, p, o)
		if err != nil {
			return err
		}
		if f.json {
			enc := json.NewEncoder(env.stdout)
			enc.SetIndent("", "  ")
			return enc.Encode(deadletter.JSON(l, true))
		}
		return deadletter.WriteShow(env.stdout, l)
	case "redrive":
		if len(rest) > 0 {
			return &usageError{fmt.Sprintf("redrive takes no arguments, got %q", rest)}
		}
		if f.reason == "" {
			return &usageError{"redrive needs --reason (e.g. --reason unbound_device)"}
		}
		return redrive(ctx, env, f, rd, filter)
	}
	return &usageError{fmt.Sprintf("unknown subcommand %q: ls, show or redrive", verb)}
}

func redrive(ctx context.Context, env *cliEnv, f *deadletterFlags, rd *deadletter.Reader, filter deadletter.Filter) (err error) {
	deps := stage.Deps{Log: env.log, Metrics: prometheus.NewRegistry(), Clock: clock.System{}}
	cat, err := catalog.Load(env.cfg.Ingest.Catalog)
	if err != nil {
		return err
	}
	r := &deadletter.Redriver{Validator: validate.New(cat, validate.LimitsFrom(env.cfg.Ingest)), Clock: deps.Clock,
		Actor: f.actor, Again: f.again, DryRun: f.dryRun}
	if r.Actor == "" {
		r.Actor = "cli"
		if u, uerr := user.Current(); uerr == nil {
			r.Actor = u.Username
		}
		if h, herr := os.Hostname(); herr == nil {
			r.Actor += "@" + h
		}
	}

	// The binding store, caught up, gives unbound samples their patient.
	store, err := binding.New(env.cfg, deps)
	if err != nil {
		return err
	}
	sctx, stop := context.WithCancel(ctx)
	runErr := make(chan error, 1)
	go func() { runErr <- store.Run(sctx) }()
	defer func() {
		stop()
		if e := <-runErr; e != nil && err == nil {
			err = e
		}
		_ = store.Close(context.Background())
	}()
	rctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	if err := store.Ready(rctx); err != nil {
		return err
	}
	r.Resolver = store
	if !f.dryRun {
		pub, err := publish.New(env.cfg, deps)
		if err != nil {
			return err
		}
		defer pub.Close(context.Background())
		audit, err := deadletter.NewAuditWriter(env.cfg.Kafka)
		if err != nil {
			return err
		}
		defer audit.Close()
		r.Publisher, r.Audit = pub, audit
	}

	var (
		total   deadletter.Summary
		pending []deadletter.Letter
	)
	flush := func() error {
		s, err := r.Redrive(ctx, pending)
		pending = pending[:0]
		total.Letters += s.Letters
		total.Redriven += s.Redriven
		total.Samples += s.Samples
		total.RefusedAgain += s.RefusedAgain
		total.NotRedrivable += s.NotRedrivable
		total.Skipped += s.Skipped
		total.Results = append(total.Results, s.Results...)
		if !f.json {
			for _, res := range s.Results {
				fmt.Fprintf(env.stdout, "%-12s %-17s %s\n", res.ID, res.Outcome, res.Detail)
			}
		}
		return err
	}
	err = rd.Scan(ctx, filter, func(l deadletter.Letter) error {
		pending = append(pending, l)
		if len(pending) >= 256 {
			return flush()
		}
		return nil
	})
	if err == nil {
		err = flush()
	}
	total.DryRun = f.dryRun
	if f.json {
		enc := json.NewEncoder(env.stdout)
		enc.SetIndent("", "  ")
		if total.Results == nil {
			total.Results = []deadletter.Result{}
		}
		_ = enc.Encode(total)
	} else {
		what := "re-driven"
		if f.dryRun {
			what = "would be re-driven (dry run)"
		}
		fmt.Fprintf(env.stdout, "\n%d letters: %d %s (%d samples), %d refused again, %d not re-drivable (raw only: fix the sender and resend), %d already re-driven\n",
			total.Letters, total.Redriven, what, total.Samples, total.RefusedAgain, total.NotRedrivable, total.Skipped)
	}
	if err != nil {
		return fmt.Errorf("re-driving dead letters: %w", err)
	}
	return nil
}
