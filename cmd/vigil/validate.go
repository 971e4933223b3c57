package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"

	"github.com/vigilhealth/vigil/detectors/validate/sepsis2019"
)

const validateUsage = `Usage: vigil validate sepsis2019 --data <folder|training_setB.tar.gz> --out <csv> [flags]

Replays each patient's hourly rows of the PhysioNet/CinC 2019 sepsis challenge through the
real pipeline in this process (embedded broker, ingest validation and publishing, the stream
engine with its scores and models; event time = 2019-01-01T00:00:00Z + ICULOS hours), writes
one CSV row per input row (patient,iculos,sepsis_label,news2,mews,qsofa,model) and prints the
hourly AUROC and the challenge's normalised utility of each score at its alert threshold
(NEWS2 >= 5, MEWS >= 5, qSOFA >= 2, model >= its manifest threshold), on all patients and on
the held-out 30% (70/30 split by patient, --seed).

With --train (the default when no --model is given) it first trains the sepsis model on the
70% (gradient-boosted trees), saves it to --registry and runs the pipeline with it; the
command fails when the model does not beat NEWS2 on both AUROC and utility on the 30%.
`

// validateFlags are `vigil validate`'s own flags.
type validateFlags struct {
	data, out, model, registry string
	limit, lanes               int
	seed                       uint64
	train, noTrain, noGate     bool
}

// validateCommand is `vigil validate sepsis2019`.
func validateCommand() command {
	f := &validateFlags{}
	return command{
		name:       "validate",
		positional: true,
		run:        func(ctx context.Context, env *cliEnv) error { return cmdValidate(ctx, env, f) },
		extra: func(fs *flag.FlagSet, _ *cliEnv) {
			fs.StringVar(&f.data, "data", "", "a folder of .psv files, or training_setB.tar.gz (read as a stream)")
			fs.StringVar(&f.out, "out", "", "the CSV to write (one row per input row); empty writes none")
			fs.IntVar(&f.limit, "limit", 0, "take only the first N patients by id (0 = all)")
			fs.Uint64Var(&f.seed, "seed", sepsis2019.DefaultSeed, "seed of the 70/30 split by patient and of the trainer")
			fs.BoolVar(&f.train, "train", false, "train the sepsis model on the 70% first (the default when no --model)")
			fs.BoolVar(&f.noTrain, "no-train", false, "run no model (scores only)")
			fs.StringVar(&f.model, "model", "", "run this registry model instead of training: name or name@version")
			fs.StringVar(&f.registry, "registry", "", "model registry folder (default: models next to --out, or under data_dir)")
			fs.IntVar(&f.lanes, "lanes", 4, "concurrent publishers")
			fs.BoolVar(&f.noGate, "no-gate", false, "do not fail when the model does not beat NEWS2 on the held-out 30%")
			fs.Usage = func() { fmt.Fprint(fs.Output(), validateUsage, "\nFlags:\n"); fs.PrintDefaults() }
		},
	}
}

func cmdValidate(ctx context.Context, env *cliEnv, f *validateFlags) error {
	if len(env.args) != 1 || env.args[0] != "sepsis2019" {
		fmt.Fprint(env.stderr, validateUsage)
		return &usageError{"name the validation: vigil validate sepsis2019"}
	}
	if f.data == "" {
		return &usageError{"--data is required (a folder of .psv files or training_setB.tar.gz)"}
	}
	train := f.model == "" && !f.noTrain
	if f.train && (f.model != "" || f.noTrain) {
		return &usageError{"--train cannot be combined with --model or --no-train"}
	}
	registry := f.registry
	if registry == "" {
		if f.out != "" {
			registry = filepath.Join(filepath.Dir(f.out), "models")
		} else {
			registry = env.cfg.Path("models")
		}
	}
	if f.out != "" {
		if err := os.MkdirAll(filepath.Dir(f.out), 0o750); err != nil {
			return fmt.Errorf("creating the output folder: %w", err)
		}
	}
	rep, err := sepsis2019.Validate(ctx, sepsis2019.Options{
		Data: f.data, Out: f.out, Limit: f.limit, Seed: f.seed, Train: train, Model: f.model, Registry: registry,
		Config: env.cfg, Lanes: f.lanes, Log: env.log, Stdout: env.stdout,
	})
	if err != nil {
		return err
	}
	fmt.Fprintf(env.stdout, "\n%d patients (%d septic), %d rows; held out: %d patients; seed %d\n",
		rep.Patients, rep.Septic, rep.Rows, len(rep.Test), f.seed)
	if err := sepsis2019.WriteTable(env.stdout, rep.Evals); err != nil {
		return err
	}
	fmt.Fprintf(env.stdout, "took %s\n", rep.Elapsed.Round(1e8))
	if rep.ModelKind == "" {
		return nil
	}
	verdict := "beats"
	if !rep.ModelBeatsNEWS2 {
		verdict = "does NOT beat"
	}
	fmt.Fprintf(env.stdout, "%s %s NEWS2 on the held-out 30%% (AUROC and utility)\n", rep.ModelKind, verdict)
	if !rep.ModelBeatsNEWS2 && !f.noGate {
		return errors.New("validate sepsis2019: the model does not beat NEWS2 on both AUROC and utility on the held-out patients")
	}
	return nil
}
