package config

import (
	"fmt"
	"regexp"
	"slices"
	"time"
)

// DetectorsScores configures the early-warning scores (package
// detectors/ews): which scoring tables the stream engine runs, the files
// that replace the embedded tables, and how old each input may be. Every
// configured table is scored at the same points (on change per input batch
// and at each stream.window end) and emitted as its own Score kind on the
// scores topic, naming the table's name, version and sha256.
type DetectorsScores struct {
	// Tables are the kinds of the tables that run, in order: news2 (RCP
	// 2017), mews (Subbe 2001 unless files.mews names a site table), qsofa
	// (Sepsis-3). Empty runs no scores.
	Tables []string `yaml:"tables"`
	// Files replaces the embedded table of a kind with a file of the same
	// format (its kind must match), e.g. a site's own MEWS table; a kind
	// without an entry uses the embedded table (for news2, stream.ruleset
	// when set).
	Files map[string]string `yaml:"files"`
	// Staleness is how old an input may be and still score when limits has
	// no entry for it; 0 uses stream.staleness.
	Staleness time.Duration `yaml:"staleness"`
	// Limits is the staleness limit per table parameter (e.g.
	// consciousness, air_or_oxygen) or catalogue metric (e.g.
	// body_temperature, fio2); a parameter's entry wins over its metric's.
	// An input older than its limit is listed as stale on the score and
	// scores 0.
	Limits map[string]time.Duration `yaml:"limits"`
}

func defaultDetectorsScores() DetectorsScores {
	return DetectorsScores{Tables: []string{"news2", "mews", "qsofa"}}
}

var scoreKindRE = regexp.MustCompile(`^[a-z0-9_]{1,32}$`)

func (c DetectorsScores) validate(bad func(field, format string, args ...any)) {
	const p = "detectors.scores."
	for i, k := range c.Tables {
		switch {
		case slices.Contains(c.Tables[:i], k):
			bad(fmt.Sprintf(p+"tables[%d]", i), "%q is listed twice", k)
		case !scoreKindRE.MatchString(k):
			bad(fmt.Sprintf(p+"tables[%d]", i), "%q is not a table kind (a lowercase word such as news2, mews, qsofa)", k)
		case k != "news2" && k != "mews" && k != "qsofa" && c.Files[k] == "":
			bad(fmt.Sprintf(p+"tables[%d]", i), "%q has no embedded table: name its file in detectors.scores.files.%s", k, k)
		}
	}
	for k, f := range c.Files {
		if !slices.Contains(c.Tables, k) {
			bad(p+"files."+k, "%q is not in detectors.scores.tables", k)
		}
		if f == "" {
			bad(p+"files."+k, "is empty")
		}
	}
	if c.Staleness < 0 {
		bad(p+"staleness", "must not be negative, got %s", c.Staleness)
	}
	for k, d := range c.Limits {
		if d <= 0 {
			bad(p+"limits."+k, "must be positive, got %s", d)
		}
	}
}

// Limit is the staleness limit of metric as the input of a table's
// parameter: limits[parameter], else limits[metric], else staleness, else
// fallback (stream.staleness).
func (c DetectorsScores) Limit(parameter, metric string, fallback time.Duration) time.Duration {
	if d, ok := c.Limits[parameter]; ok {
		return d
	}
	if d, ok := c.Limits[metric]; ok {
		return d
	}
	if c.Staleness > 0 {
		return c.Staleness
	}
	return fallback
}
