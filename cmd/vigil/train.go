package main

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/csv"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/vigilhealth/vigil/detectors/model"
	"github.com/vigilhealth/vigil/detectors/model/export"
	"github.com/vigilhealth/vigil/detectors/model/train"
	"github.com/vigilhealth/vigil/internal/catalog"
)

const trainUsage = `Usage: vigil train --data <csv> [--label label] [--features a,b,c] [flags]

Trains a binary classifier (gradient-boosted trees or L2 logistic regression) on a CSV with a
header row, checks it on a held-out share of the rows (or of the --group values, e.g. patients),
and writes it as ONNX with its manifest to <registry>/<name>/<version>/ (model.onnx,
manifest.yaml) when --registry is given.

Feature columns are model inputs, named by their manifest source: last:<metric>,
age_h:<metric>, stay_h or count:<metric> (input names heart_rate_last, spo2_age_h, stay_h,
heart_rate_count), or any name mapped with --source name=<source>. Empty cells, NaN and NA
are missing: they are filled with the median of the training rows (or --fill name=value),
the fill the manifest records for serving. The label column holds 0 or 1.
`

// trainFlags are `vigil train`'s own flags.
type trainFlags struct {
	data, label, features, exclude, group string
	sources, fills                        string
	name, version, registry, description  string
	holdout, threshold                    float64
	refBins                               int
	cfg                                   train.Config
}

// trainCommand is `vigil train`.
func trainCommand() command {
	f := &trainFlags{}
	d := train.DefaultConfig()
	return command{
		name: "train",
		run:  func(ctx context.Context, env *cliEnv) error { return cmdTrain(ctx, env, f) },
		extra: func(fs *flag.FlagSet, _ *cliEnv) {
			fs.StringVar(&f.data, "data", "", "CSV with a header row (required)")
			fs.StringVar(&f.label, "label", "label", "the label column (0 or 1)")
			fs.StringVar(&f.features, "features", "", "feature columns in input order, comma-separated (default: every column but label, group and --exclude)")
			fs.StringVar(&f.exclude, "exclude", "", "columns that are not features, comma-separated (e.g. iculos)")
			fs.StringVar(&f.group, "group", "", "column whose values are held out together (e.g. patient); default: rows")
			fs.StringVar(&f.sources, "source", "", "input sources of columns not named by their source: name=source,... (e.g. hr=last:heart_rate)")
			fs.StringVar(&f.fills, "fill", "", "fill values for missing cells: name=value,... (default: the training median)")
			fs.StringVar(&f.cfg.Algorithm, "algo", d.Algorithm, "gbt or logreg")
			fs.Int64Var(&f.cfg.Seed, "seed", d.Seed, "seed of the holdout split and of the trainer's subsampling")
			fs.IntVar(&f.cfg.Trees, "trees", d.Trees, "gbt: boosting rounds")
			fs.Float64Var(&f.cfg.LearningRate, "learning-rate", d.LearningRate, "gbt: shrinkage")
			fs.IntVar(&f.cfg.MaxDepth, "max-depth", d.MaxDepth, "gbt: maximum tree depth")
			fs.IntVar(&f.cfg.MaxLeaves, "max-leaves", d.MaxLeaves, "gbt: maximum leaves per tree")
			fs.Float64Var(&f.cfg.MinChildWeight, "min-child-weight", d.MinChildWeight, "gbt: least hessian sum per leaf")
			fs.Float64Var(&f.cfg.L2, "l2", d.L2, "gbt: L2 penalty on leaf values")
			fs.Float64Var(&f.cfg.MinSplitGain, "min-split-gain", d.MinSplitGain, "gbt: least loss reduction per split")
			fs.Float64Var(&f.cfg.Subsample, "subsample", d.Subsample, "gbt: share of rows per tree")
			fs.Float64Var(&f.cfg.ColSample, "colsample", d.ColSample, "gbt: share of features per tree")
			fs.IntVar(&f.cfg.Bins, "bins", d.Bins, "gbt: histogram bins per feature (2-256)")
			fs.Float64Var(&f.cfg.ScalePosWeight, "scale-pos-weight", d.ScalePosWeight, "weight of positive rows")
			fs.Float64Var(&f.cfg.Lambda, "lambda", d.Lambda, "logreg: L2 penalty on standardised weights")
			fs.Float64Var(&f.holdout, "holdout", 0.3, "share of rows (or groups) held out for AUROC and log-loss (0 = none)")
			fs.Float64Var(&f.threshold, "threshold", -1, "alert threshold on P(positive) in the manifest (default: best Youden J on the held-out rows)")
			fs.IntVar(&f.refBins, "reference-bins", 10, "bins of each input's drift reference")
			fs.StringVar(&f.name, "name", "", "model name (score kind model:<name>); with --registry")
			fs.StringVar(&f.version, "version", "", "model version; with --registry")
			fs.StringVar(&f.registry, "registry", "", "model registry folder to write <name>/<version>/ into (default: write nothing)")
			fs.StringVar(&f.description, "description", "", "manifest description")
			fs.Usage = func() { fmt.Fprint(fs.Output(), trainUsage, "\nFlags:\n"); fs.PrintDefaults() }
		},
	}
}

// trainData is a CSV read column-wise: cols[j][i] is feature j of row i
// (NaN when missing).
type trainData struct {
	names  []string
	cols   [][]float32
	y      []float64
	groups []string
}

func cmdTrain(ctx context.Context, env *cliEnv, f *trainFlags) error {
	if f.data == "" {
		return errors.New("vigil train: --data is required (vigil train -h)")
	}
	if f.registry != "" && (f.name == "" || f.version == "") {
		return errors.New("vigil train: --registry needs --name and --version")
	}
	if !(f.holdout >= 0 && f.holdout < 1) {
		return fmt.Errorf("vigil train: --holdout %v must be in [0, 1)", f.holdout)
	}
	sources, err := keyValues(f.sources, "--source")
	if err != nil {
		return err
	}
	fillArgs, err := keyValues(f.fills, "--fill")
	if err != nil {
		return err
	}
	cat, err := catalog.Load(env.cfg.Ingest.Catalog)
	if err != nil {
		return fmt.Errorf("vigil train: %w", err)
	}
	file, err := os.Open(f.data)
	if err != nil {
		return fmt.Errorf("vigil train: %w", err)
	}
	defer file.Close()
	data, err := readTrainCSV(file, f)
	if err != nil {
		return fmt.Errorf("vigil train: reading %s: %w", f.data, err)
	}
	inputs, err := manifestInputs(data.names, sources, cat)
	if err != nil {
		return fmt.Errorf("vigil train: %w", err)
	}
	for k := range fillArgs {
		if !slices.Contains(data.names, k) {
			return fmt.Errorf("vigil train: --fill %s: no such feature column (features: %s)", k, strings.Join(data.names, ", "))
		}
	}
	if err := ctx.Err(); err != nil {
		return err
	}

	// Split rows (or groups) with the seed.
	n := len(data.y)
	held := make([]bool, n)
	heldGroups := map[string]bool{}
	groups := map[string]bool{}
	for i := range held {
		key := strconv.Itoa(i)
		if data.groups != nil {
			key = data.groups[i]
			groups[key] = true
		}
		held[i] = f.holdout > 0 && unitHash(f.cfg.Seed, key) < f.holdout
		if held[i] {
			heldGroups[key] = true
		}
	}
	nf := len(data.names)
	// Fill from training rows.
	for j, name := range data.names {
		fill, given := 0.0, false
		if s, ok := fillArgs[name]; ok {
			v, err := strconv.ParseFloat(s, 64)
			if err != nil || math.IsNaN(v) || math.IsInf(v, 0) {
				return fmt.Errorf("vigil train: --fill %s=%s: not a finite number", name, s)
			}
			fill, given = v, true
		}
		if !given {
			var obs []float32
			for i, v := range data.cols[j] {
				if !held[i] && !math.IsNaN(float64(v)) {
					obs = append(obs, v)
				}
			}
			if len(obs) > 0 {
				slices.Sort(obs)
				fill = float64(obs[len(obs)/2])
			}
		}
		inputs[j].Fill = float64(float32(fill))
	}
	var xtr, xte []float32
	var ytr, yte []float64
	trainCol := make([][]float32, nf)
	for i := 0; i < n; i++ {
		for j := 0; j < nf; j++ {
			v := data.cols[j][i]
			if math.IsNaN(float64(v)) {
				v = float32(inputs[j].Fill)
			}
			if held[i] {
				xte = append(xte, v)
			} else {
				xtr = append(xtr, v)
				trainCol[j] = append(trainCol[j], v)
			}
		}
		if held[i] {
			yte = append(yte, data.y[i])
		} else {
			ytr = append(ytr, data.y[i])
		}
	}
	for j := range inputs {
		e, p := train.Reference(trainCol[j], f.refBins)
		inputs[j].Reference = model.Reference{Edges: e, Proportions: p}
	}

	env.log.Info("training", "algorithm", f.cfg.Algorithm, "rows", len(ytr), "features", nf, "held_out_rows", len(yte))
	start := time.Now()
	m, err := train.Fit(xtr, ytr, nf, f.cfg)
	if err != nil {
		return fmt.Errorf("vigil train: %w", err)
	}
	took := time.Since(start)
	metrics := map[string]float64{"train_seconds": math.Round(took.Seconds()*100) / 100}
	ptr := m.PredictBatch(xtr, nil)
	metrics["train_auroc"] = train.AUROC(ptr, ytr)
	metrics["train_logloss"] = train.LogLoss(ptr, ytr)
	thrSet := ptr
	thrY := ytr
	if len(yte) > 0 {
		pte := m.PredictBatch(xte, nil)
		metrics["auroc"] = train.AUROC(pte, yte)
		metrics["logloss"] = train.LogLoss(pte, yte)
		thrSet, thrY = pte, yte
	}
	threshold := f.threshold
	if threshold < 0 {
		threshold = train.YoudenThreshold(thrSet, thrY)
	}
	for k, v := range metrics {
		if math.IsNaN(v) {
			delete(metrics, k) // one class only in that split
		}
	}
	fmt.Fprintf(env.stdout, "trained %s on %d rows x %d features in %s\n", m.Algorithm, len(ytr), nf, took.Round(time.Millisecond))
	fmt.Fprintf(env.stdout, "training: AUROC %.4f, log-loss %.4f\n", metrics["train_auroc"], metrics["train_logloss"])
	if len(yte) > 0 {
		fmt.Fprintf(env.stdout, "held-out (%d rows): AUROC %.4f, log-loss %.4f\n", len(yte), metrics["auroc"], metrics["logloss"])
	}
	fmt.Fprintf(env.stdout, "threshold: %.6g\n", threshold)

	if f.registry == "" {
		fmt.Fprintln(env.stdout, "no --registry: nothing written")
		return nil
	}
	onnx, err := export.Marshal(m, export.Options{
		GraphName: f.name, ProducerVersion: version(), Doc: f.description,
		Metadata: map[string]string{"name": f.name, "version": f.version},
	})
	if err != nil {
		return fmt.Errorf("vigil train: %w", err)
	}
	pos := 0.0
	for _, v := range ytr {
		pos += v
	}
	split := "none"
	if f.holdout > 0 {
		unit := "rows"
		if f.group != "" {
			unit = f.group + " values"
		}
		split = fmt.Sprintf("%.0f%% of %s held out by seeded hash (seed %d)", 100*f.holdout, unit, f.cfg.Seed)
	}
	man := &model.Manifest{
		Name: f.name, Version: f.version, Created: time.Now().UTC().Truncate(time.Second),
		Algorithm: m.Algorithm, Description: f.description, Inputs: inputs,
		InputName: export.DefaultIn, Output: model.Output{Name: export.DefaultOut, Index: 1},
		Threshold: threshold,
		Training: model.Training{Data: f.data, Rows: int64(len(ytr)), Patients: int64(len(groups) - len(heldGroups)),
			Positives: int64(pos), Seed: f.cfg.Seed, Split: split},
		Metrics: metrics,
	}
	dir, err := model.Save(f.registry, man, onnx)
	if err != nil {
		return fmt.Errorf("vigil train: %w", err)
	}
	fmt.Fprintf(env.stdout, "wrote %s (model.onnx sha256 %s)\n", dir, man.SHA256)
	return nil
}

// readTrainCSV reads the header, picks the label, group and feature
// columns and parses every row; errors name the line and column.
func readTrainCSV(r io.Reader, f *trainFlags) (*trainData, error) {
	cr := csv.NewReader(r)
	cr.ReuseRecord = true
	header, err := cr.Read()
	if err != nil {
		return nil, fmt.Errorf("reading the header row: %w", err)
	}
	header = slices.Clone(header)
	index := map[string]int{}
	for i, h := range header {
		h = strings.TrimSpace(h)
		header[i] = h
		if _, dup := index[h]; dup {
			return nil, fmt.Errorf("line 1: column %q appears twice", h)
		}
		index[h] = i
	}
	col := func(flagName, name string) (int, error) {
		i, ok := index[name]
		if !ok {
			return 0, fmt.Errorf("%s %q: no such column (columns: %s)", flagName, name, strings.Join(header, ", "))
		}
		return i, nil
	}
	labelAt, err := col("--label", f.label)
	if err != nil {
		return nil, err
	}
	groupAt := -1
	if f.group != "" {
		if groupAt, err = col("--group", f.group); err != nil {
			return nil, err
		}
	}
	skip := map[int]bool{labelAt: true, groupAt: true}
	for _, c := range splitList(f.exclude) {
		i, err := col("--exclude", c)
		if err != nil {
			return nil, err
		}
		skip[i] = true
	}
	var featAt []int
	if f.features != "" {
		for _, c := range splitList(f.features) {
			i, err := col("--features", c)
			if err != nil {
				return nil, err
			}
			if i == labelAt || i == groupAt {
				return nil, fmt.Errorf("--features: %q is the label or group column", c)
			}
			featAt = append(featAt, i)
		}
	} else {
		for i := range header {
			if !skip[i] {
				featAt = append(featAt, i)
			}
		}
	}
	if len(featAt) == 0 {
		return nil, errors.New("no feature columns")
	}
	d := &trainData{cols: make([][]float32, len(featAt))}
	for _, i := range featAt {
		d.names = append(d.names, header[i])
	}
	for {
		rec, err := cr.Read()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, err // *csv.ParseError names the line and column
		}
		line, _ := cr.FieldPos(0)
		ls := strings.TrimSpace(rec[labelAt])
		switch ls {
		case "0", "0.0":
			d.y = append(d.y, 0)
		case "1", "1.0":
			d.y = append(d.y, 1)
		default:
			return nil, fmt.Errorf("line %d, column %q: label %q is not 0 or 1", line, f.label, rec[labelAt])
		}
		if groupAt >= 0 {
			d.groups = append(d.groups, rec[groupAt])
		}
		for j, i := range featAt {
			v, err := parseCell(rec[i])
			if err != nil {
				return nil, fmt.Errorf("line %d, column %q: %w", line, header[i], err)
			}
			d.cols[j] = append(d.cols[j], v)
		}
	}
	if len(d.y) == 0 {
		return nil, errors.New("no data rows after the header")
	}
	return d, nil
}

// parseCell reads a feature value; empty, NaN and NA are missing (NaN).
func parseCell(s string) (float32, error) {
	s = strings.TrimSpace(s)
	switch strings.ToLower(s) {
	case "", "nan", "na", "null":
		return float32(math.NaN()), nil
	}
	v, err := strconv.ParseFloat(s, 64)
	if err != nil || math.IsInf(v, 0) || math.Abs(v) > math.MaxFloat32 {
		return 0, fmt.Errorf("%q is not a finite number", s)
	}
	return float32(v), nil
}

// manifestInputs names each feature column as a manifest input: a column
// named by its source (last:heart_rate) becomes heart_rate_last; others
// need --source name=source.
func manifestInputs(names []string, sources map[string]string, cat *catalog.Catalog) ([]model.Input, error) {
	for k := range sources {
		if !slices.Contains(names, k) {
			return nil, fmt.Errorf("--source %s: no such feature column (features: %s)", k, strings.Join(names, ", "))
		}
	}
	inputs := make([]model.Input, len(names))
	for j, col := range names {
		src, name := col, ""
		if s, ok := sources[col]; ok {
			src, name = s, col
		}
		kind, metric, err := model.ParseSource(src)
		if err != nil {
			return nil, fmt.Errorf("feature column %q: %v; name the column by its source or map it with --source %s=<source>", col, err, col)
		}
		var unit string
		switch kind {
		case model.SourceLast:
			m, ok := cat.Lookup(metric)
			if !ok {
				return nil, fmt.Errorf("feature column %q: %q is not a catalogue metric (one of %s)", col, metric, strings.Join(cat.IDs(), ", "))
			}
			unit = m.Unit
			if name == "" {
				name = metric + "_last"
			}
		case model.SourceAge:
			unit = "h"
			if name == "" {
				name = metric + "_age_h"
			}
		case model.SourceStay:
			unit = "h"
			if name == "" {
				name = "stay_h"
			}
		case model.SourceCount:
			unit = "1"
			if name == "" {
				name = metric + "_count"
			}
		}
		if kind != model.SourceLast && kind != model.SourceStay {
			if _, ok := cat.Lookup(metric); !ok {
				return nil, fmt.Errorf("feature column %q: %q is not a catalogue metric (one of %s)", col, metric, strings.Join(cat.IDs(), ", "))
			}
		}
		inputs[j] = model.Input{Name: name, Source: src, Unit: unit}
	}
	return inputs, nil
}

// keyValues parses "a=1,b=2".
func keyValues(s, flagName string) (map[string]string, error) {
	out := map[string]string{}
	for _, kv := range splitList(s) {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" || v == "" {
			return nil, fmt.Errorf("vigil train: %s %q: want name=value", flagName, kv)
		}
		out[strings.TrimSpace(k)] = strings.TrimSpace(v)
	}
	return out, nil
}

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// unitHash maps (seed, key) to [0, 1) deterministically and uniformly (a
// sha256 prefix; FNV's high bits barely move when only the last byte of
// the key changes, as in p001, p002, ...).
func unitHash(seed int64, key string) float64 {
	sum := sha256.Sum256([]byte(strconv.FormatInt(seed, 10) + "\x00" + key))
	return float64(binary.BigEndian.Uint64(sum[:8])>>11) / (1 << 53)
}
