package config

import (
	"strings"
	"testing"
	"time"
)

func TestDetectorsScoresValidate(t *testing.T) {
	c := Default()
	if len(c.Detectors.Scores.Tables) != 3 {
		t.Fatalf("default tables %v", c.Detectors.Scores.Tables)
	}
	if got := c.Detectors.Scores.Limit("pulse", "heart_rate", time.Hour); got != time.Hour {
		t.Errorf("default limit %s, want stream.staleness", got)
	}
	c.Detectors.Scores.Staleness = 30 * time.Minute
	c.Detectors.Scores.Limits = map[string]time.Duration{"consciousness": 4 * time.Hour, "heart_rate": 5 * time.Minute, "pulse": 2 * time.Minute}
	for _, x := range []struct {
		param, metric string
		want          time.Duration
	}{{"consciousness", "consciousness", 4 * time.Hour}, {"pulse", "heart_rate", 2 * time.Minute},
		{"heart_rate", "heart_rate", 5 * time.Minute}, {"spo2", "spo2", 30 * time.Minute}} {
		if got := c.Detectors.Scores.Limit(x.param, x.metric, time.Hour); got != x.want {
			t.Errorf("Limit(%s, %s) = %s, want %s", x.param, x.metric, got, x.want)
		}
	}
	for _, tc := range []struct {
		edit  func(*DetectorsScores)
		field string
	}{
		{func(s *DetectorsScores) { s.Tables = []string{"news2", "news2"} }, "detectors.scores.tables[1]"},
		{func(s *DetectorsScores) { s.Tables = []string{"NEWS 2"} }, "detectors.scores.tables[0]"},
		{func(s *DetectorsScores) { s.Tables = []string{"pews"} }, "detectors.scores.tables[0]"},
		{func(s *DetectorsScores) { s.Files = map[string]string{"pews": "p.yaml"} }, "detectors.scores.files.pews"},
		{func(s *DetectorsScores) { s.Files = map[string]string{"mews": ""} }, "detectors.scores.files.mews"},
		{func(s *DetectorsScores) { s.Staleness = -time.Second }, "detectors.scores.staleness"},
		{func(s *DetectorsScores) { s.Limits = map[string]time.Duration{"spo2": 0} }, "detectors.scores.limits.spo2"},
	} {
		c := Default()
		tc.edit(&c.Detectors.Scores)
		if err := c.Validate(); err == nil || !strings.Contains(err.Error(), tc.field) {
			t.Errorf("want an error naming %s, got %v", tc.field, err)
		}
	}
	c = Default()
	c.Detectors.Scores.Tables = []string{"news2", "pews"}
	c.Detectors.Scores.Files = map[string]string{"pews": "/etc/vigil/pews.yaml"}
	if err := c.Validate(); err != nil {
		t.Errorf("a site table of a new kind with its file: %v", err)
	}
}
