package chserver

import (
	"context"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"
)

func TestStartAnswersAndStops(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	s, err := Start(ctx, Options{DataDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.Get("http://" + s.HTTPAddr() + "/?query=SELECT%20version()")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || strings.TrimSpace(string(body)) == "" {
		t.Fatalf("version query: %d %q", resp.StatusCode, body)
	}
	t.Logf("clickhouse %s on %s", strings.TrimSpace(string(body)), s.Addr())
	if err := s.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(ctx); err != nil {
		t.Fatal("second Close:", err)
	}
	if _, err := http.Get("http://" + s.HTTPAddr() + "/ping"); err == nil {
		t.Fatal("server still answers after Close")
	}
}
