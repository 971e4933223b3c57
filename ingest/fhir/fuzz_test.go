package fhir

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/vigilhealth/vigil/internal/config"
	"github.com/vigilhealth/vigil/internal/stage"
	"github.com/vigilhealth/vigil/internal/testenv"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// discard is a Publisher that acknowledges at once: the fuzz target
// exercises decoding and answering, not Kafka.
type discard struct{}

func (discard) Publish(context.Context, []*vigilv1.SampleBatch) error   { return nil }
func (discard) DeadLetter(context.Context, []*vigilv1.DeadLetter) error { return nil }

// FuzzFHIRDecode feeds arbitrary bodies to POST /fhir/Observation and
// POST /fhir: no panic, no hang, and always a FHIR JSON answer with a
// status a FHIR client understands. Seeded with the 64 R4 examples, each
// also wrapped in a Bundle.
func FuzzFHIRDecode(f *testing.F) {
	dir := testenv.Dataset(f, "fhir-r4-observations")
	files, _ := filepath.Glob(filepath.Join(dir, "Observation-*.json"))
	for _, p := range files {
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
		f.Add(append(append([]byte(`{"resourceType":"Bundle","type":"transaction","entry":[{"fullUrl":"urn:uuid:1","request":{"method":"POST","url":"Observation"},"resource":`), b...), "}]}"...))
	}
	f.Add([]byte(`{"resourceType":"Observation","status":"final","code":{"coding":[{"system":"http://loinc.org","code":"85353-1"}]},"subject":{"reference":"Patient/a"},"effectiveDateTime":"2024-01-01T00:00:00Z","contained":[{"resourceType":"Observation","id":"x","status":"final","code":{"coding":[{"system":"http://loinc.org","code":"85353-1"}]},"hasMember":[{"reference":"#x"}]}],"hasMember":[{"reference":"#x"}]}`))
	f.Add([]byte(`{"resourceType":"Observation","valueQuantity":{"value":1e999}}`))
	f.Add([]byte(`[{"resourceType":`))

	cfg := config.Default()
	cfg.FHIR.AcceptDateOnly = true
	h, err := New(cfg, stage.Deps{}, discard{}, Options{})
	if err != nil {
		f.Fatal(err)
	}
	mux := http.NewServeMux()
	h.Mount(mux.Handle)
	f.Fuzz(func(t *testing.T, body []byte) {
		for _, path := range []string{"/fhir/Observation", "/fhir"} {
			req := httptest.NewRequest(http.MethodPost, path, bytes.NewReader(body))
			req.Header.Set("Content-Type", "application/fhir+json")
			rec := httptest.NewRecorder()
			start := time.Now()
			done := make(chan struct{})
			go func() {
				select {
				case <-done:
				case <-time.After(5 * time.Second):
					buf := make([]byte, 1<<20)
					n := runtime.Stack(buf, true)
					panic(fmt.Sprintf("HANG %q\n%s", body, buf[:n]))
				}
			}()
			mux.ServeHTTP(rec, req)
			close(done)
			if d := time.Since(start); d > 2*time.Second {
				t.Errorf("%s took %s", path, d)
			}
			switch rec.Code {
			case 200, 201, 400, 413, 422:
			default:
				t.Errorf("%s: status %d: %s", path, rec.Code, rec.Body.Bytes())
			}
			if !json.Valid(rec.Body.Bytes()) {
				t.Errorf("%s: answer is not JSON: %q", path, rec.Body.Bytes())
			}
		}
	})
}

// TestDateTime checks FHIR dateTime parsing at each precision and offset.
func TestDateTime(t *testing.T) {
	cases := []struct {
		in   string
		want string // RFC 3339 UTC, "" for an error
		prec precision
	}{
		{"2017-05-03T15:54:26-04:00", "2017-05-03T19:54:26Z", precTime},
		{"2014-12-05T09:30:10+01:00", "2014-12-05T08:30:10Z", precTime},
		{"2024-02-29T23:59:59.5Z", "2024-02-29T23:59:59.5Z", precTime},
		{"2024-01-01T00:00:00.123456789+14:00", "2023-12-31T10:00:00.123Z", precTime},
		{"1999-07-02", "1999-07-02T00:00:00Z", precDay},
		{"2016-03", "2016-03-01T00:00:00Z", precMonth},
		{"2016", "2016-01-01T00:00:00Z", precYear},
		{"2023-02-29", "", 0},
		{"2024-01-01T10:00:00", "", 0},
		{"2024-01-01T10:00Z", "", 0},
		{"2024-01-01T25:00:00Z", "", 0},
		{"2024-01-01 10:00:00Z", "", 0},
		{"2024-01-01T10:00:00+0100", "", 0},
		{"0000", "", 0},
		{"", "", 0},
	}
	for _, c := range cases {
		got, prec, err := parseDateTime(c.in)
		if c.want == "" {
			if err == nil {
				t.Errorf("%q: no error", c.in)
			}
			continue
		}
		want, _ := time.Parse(time.RFC3339Nano, c.want)
		if err != nil || got != want.UnixMilli() || prec != c.prec {
			t.Errorf("%q: %d %v %v, want %s (%d) %v", c.in, got, prec, err, c.want, want.UnixMilli(), c.prec)
		}
	}
}
