package sepsis2019

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/vigilhealth/vigil/detectors/model"
	"github.com/vigilhealth/vigil/detectors/model/train"
	"github.com/vigilhealth/vigil/internal/config"
)

// Options configure Validate (the `vigil validate sepsis2019` command).
type Options struct {
	// Data is a folder of .psv files, a .tar.gz of them or one .psv file.
	Data string
	// Out is the CSV written (one line per input row); empty writes none.
	Out string
	// Limit > 0 takes the first Limit patients by id.
	Limit int
	// Seed of the 70/30 split (and of the trainer).
	Seed uint64
	// Train trains the sepsis model on the 70 % before the pipeline run
	// and runs the pipeline with it.
	Train bool
	// Model runs an existing model of Registry instead: "name" (newest
	// version) or "name@version".
	Model string
	// Registry is the model registry folder (required with Train or Model;
	// made absolute).
	Registry string
	// TrainConfig is the trainer's configuration (zero: defaults).
	TrainConfig train.Config
	// Config is the base configuration of the pipeline (see
	// PipelineOptions.Config); its detectors.models.run is set from
	// Train/Model.
	Config config.Config
	// Lanes of concurrent publishing (default 4).
	Lanes int
	// Log receives stage logs; Stdout the report and progress lines.
	Log    *slog.Logger
	Stdout io.Writer
}

// Report is what Validate measured.
type Report struct {
	Patients, Rows, Septic int
	Train, Test            []*Patient
	Pipeline               *PipelineResult
	// ModelKind is "model:<name>" when a model ran, else "".
	ModelKind string
	// ModelThreshold is the model manifest's alert threshold.
	ModelThreshold float64
	Trained        *Trained
	// Evals: each score on all patients and on the held-out 30 %
	// (the model on the held-out 30 % only).
	Evals []Eval
	// ModelBeatsNEWS2 is set when a model ran: its AUROC and utility on
	// the held-out 30 % are both above NEWS2's on the same patients.
	ModelBeatsNEWS2 bool
	Elapsed         time.Duration
}

// Set names of Eval.Set.
const (
	SetAll     = "all"
	SetHeldOut = "held-out 30%"
)

// Validate reads the data, splits it, optionally trains the model, runs
// every patient through the pipeline (RunPipeline), writes the CSV and
// evaluates each score. It blocks until done.
func Validate(ctx context.Context, o Options) (*Report, error) {
	began := time.Now()
	if o.Stdout == nil {
		o.Stdout = io.Discard
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	say := func(format string, args ...any) {
		fmt.Fprintf(o.Stdout, "%s  %s\n", time.Since(began).Truncate(100*time.Millisecond), fmt.Sprintf(format, args...))
	}
	if (o.Train || o.Model != "") && o.Registry == "" {
		return nil, errors.New("validate sepsis2019: a model registry folder is needed to train or run a model")
	}
	if o.Train && o.Model != "" {
		return nil, errors.New("validate sepsis2019: train a model or run an existing one, not both")
	}
	pts, err := Read(ctx, o.Data, o.Limit)
	if err != nil {
		return nil, err
	}
	rep := &Report{Patients: len(pts), Rows: CountRows(pts)}
	for _, p := range pts {
		if p.Septic() {
			rep.Septic++
		}
	}
	say("read %d patients (%d septic), %d rows from %s", rep.Patients, rep.Septic, rep.Rows, o.Data)
	rep.Train, rep.Test = Split(pts, o.Seed)
	test := make(map[string]bool, len(rep.Test))
	for _, p := range rep.Test {
		test[p.ID] = true
	}
	v := NewValidator(o.Config)
	nowMs := time.Now().UnixMilli()
	canon := make(map[string]*Canonical, len(pts))
	all := make([]*Canonical, len(pts))
	for i, p := range pts {
		all[i] = Canonicalize(v, "physionet", p, nowMs)
		canon[p.ID] = all[i]
	}
	pick := func(ps []*Patient) []*Canonical {
		out := make([]*Canonical, len(ps))
		for i, p := range ps {
			out[i] = canon[p.ID]
		}
		return out
	}

	cfg := o.Config
	if o.Registry != "" {
		if o.Registry, err = filepath.Abs(o.Registry); err != nil {
			return nil, err
		}
		cfg.Detectors.Models.Registry = o.Registry
	}
	if o.Train {
		say("training the sepsis model on %d patients (70%%, seed %d); %d held out", len(rep.Train), o.Seed, len(rep.Test))
		tr, err := TrainModel(ctx, pick(rep.Train), pick(rep.Test), TrainOptions{Registry: o.Registry, Seed: o.Seed,
			Data: "PhysioNet/CinC 2019 " + filepath.Base(o.Data), Config: o.TrainConfig, WindowSpec: o.Config.Stream.Windows.Spec, Progress: say})
		if err != nil {
			return nil, err
		}
		rep.Trained = tr
		say("saved %s (version %s, threshold %.4g) in %s", tr.Dir, tr.Manifest.Version, tr.Manifest.Threshold, tr.Elapsed.Truncate(time.Second))
		cfg.Detectors.Models.Run = []config.ModelRef{{Name: tr.Manifest.Name, Version: tr.Manifest.Version}}
		rep.ModelThreshold = tr.Manifest.Threshold
	} else if o.Model != "" {
		name, version, _ := strings.Cut(o.Model, "@")
		cfg.Detectors.Models.Run = []config.ModelRef{{Name: name, Version: version}}
		m, err := loadManifest(o.Registry, name, version)
		if err != nil {
			return nil, err
		}
		rep.ModelThreshold = m.Threshold
	}

	say("replaying %d patients through the pipeline (embedded broker, ingest, stream)", len(all))
	lastSaid := time.Now()
	res, err := RunPipeline(ctx, all, PipelineOptions{Config: cfg, Lanes: o.Lanes, Log: o.Log,
		Progress: func(done, total int) {
			if time.Since(lastSaid) > 10*time.Second {
				lastSaid = time.Now()
				say("published %d/%d patients", done, total)
			}
		}})
	if err != nil {
		return nil, err
	}
	rep.Pipeline = res
	say("pipeline: %d samples in %d batches, refused %v; scores received %v; %s",
		res.Samples, res.Batches, res.Refused, res.Received, res.Elapsed.Truncate(100*time.Millisecond))
	rep.ModelKind = ModelKind(res.Kinds)
	if len(cfg.Detectors.Models.Run) > 0 && rep.ModelKind == "" {
		return nil, fmt.Errorf("validate sepsis2019: model %s was configured but the pipeline emitted no model scores", cfg.Detectors.Models.Run[0].Name)
	}
	if o.Out != "" {
		if err := writeCSVFile(o.Out, pts, res.Scores, rep.ModelKind); err != nil {
			return nil, err
		}
		say("wrote %s", o.Out)
	}
	heldOut := func(p *Patient) bool { return test[p.ID] }
	for _, k := range []struct {
		kind string
		thr  float64
	}{{KindNEWS2, ThresholdNEWS2}, {KindMEWS, ThresholdMEWS}, {KindQSOFA, ThresholdQSOFA}} {
		vals, ok := res.Scores[k.kind]
		if !ok {
			say("no %s scores: the stream engine does not compute them (column left empty)", k.kind)
			continue
		}
		for _, set := range []struct {
			name string
			keep func(*Patient) bool
		}{{SetAll, nil}, {SetHeldOut, heldOut}} {
			e, err := Evaluate(k.kind, set.name, pts, vals, k.thr, set.keep)
			if err != nil {
				return nil, err
			}
			rep.Evals = append(rep.Evals, e)
		}
	}
	if rep.ModelKind != "" {
		e, err := Evaluate(rep.ModelKind, SetHeldOut, pts, res.Scores[rep.ModelKind], rep.ModelThreshold, heldOut)
		if err != nil {
			return nil, err
		}
		rep.Evals = append(rep.Evals, e)
		i := slices.IndexFunc(rep.Evals, func(x Eval) bool { return x.Kind == KindNEWS2 && x.Set == SetHeldOut })
		if i >= 0 {
			n := rep.Evals[i]
			rep.ModelBeatsNEWS2 = e.AUROC > n.AUROC && e.Utility > n.Utility
		}
	}
	rep.Elapsed = time.Since(began)
	return rep, nil
}

func writeCSVFile(name string, pts []*Patient, scores map[string][]float64, modelKind string) error {
	f, err := os.Create(name)
	if err != nil {
		return fmt.Errorf("writing csv: %w", err)
	}
	if err := WriteCSV(f, pts, scores, modelKind); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("writing csv: %w", err)
	}
	return nil
}

// loadManifest reads the manifest of a registry model (version "" for the
// newest).
func loadManifest(registry, name, version string) (*model.Manifest, error) {
	m, _, err := model.OpenRegistry(registry, nil).Load(name, version)
	if err != nil {
		return nil, fmt.Errorf("validate sepsis2019: %w", err)
	}
	return m, nil
}
