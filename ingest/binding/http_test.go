package binding

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/vigilhealth/vigil/internal/testenv"
)

type apiServer struct {
	t    *testing.T
	base string
}

func (a apiServer) do(method, path, body string) (int, string, []byte) {
	a.t.Helper()
	req, err := http.NewRequest(method, a.base+path, strings.NewReader(body))
	if err != nil {
		a.t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		a.t.Fatal(err)
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header.Get("Content-Type"), out
}

// TestHTTPAPI drives PUT, GET and DELETE over a real HTTP server and checks
// the answers and what the store resolves.
func TestHTTPAPI(t *testing.T) {
	cfg := testenv.Config(t, testenv.Kafka(t), "")
	s := startStore(t, cfg, nil)
	mux := http.NewServeMux()
	NewHandler(s, testenv.Logger(t), nil).Mount(muxMounter{mux})
	srv := httptest.NewServer(mux)
	defer srv.Close()
	api := apiServer{t, srv.URL}

	bed := BedKey("ICU1", "12", "A")
	path := "/v1/devices/" + url.PathEscape(bed) + "/binding"
	code, ct, body := api.do("PUT", path, `{"tenant":"st-mary","patient":"p-1","from":"2026-11-23T08:00:00Z","set_by":"nurse-7"}`)
	if code != 200 || ct != "application/json" {
		t.Fatalf("PUT: %d %s %s", code, ct, body)
	}
	var v View
	if err := json.Unmarshal(body, &v); err != nil {
		t.Fatal(err)
	}
	if v.Device != bed || v.Current == nil || v.Current.Patient != "p-1" || v.Current.From != "2026-11-23T08:00:00Z" ||
		v.Current.SetBy != "nurse-7" || v.Current.Source != "api" || len(v.History) != 1 {
		t.Errorf("PUT answer: %s", body)
	}
	at := ms("2026-11-23T09:00:00Z")
	if p, ok := s.Resolve("st-mary", bed, at); !ok || p != "p-1" {
		t.Errorf("after PUT the bed resolves to %q %v", p, ok)
	}

	// A second patient from 10:00 (no "to": open); from defaults to now
	// when absent, tested below with DELETE's default.
	code, _, body = api.do("PUT", path, `{"tenant":"st-mary","patient":"p-2","from":"2026-11-23T10:00:00+00:00"}`)
	if code != 200 {
		t.Fatalf("second PUT: %d %s", code, body)
	}
	code, _, body = api.do("GET", path+"?tenant=st-mary", "")
	if code != 200 {
		t.Fatalf("GET: %d %s", code, body)
	}
	v = View{}
	_ = json.Unmarshal(body, &v)
	if len(v.History) != 2 || v.History[0].To != "2026-11-23T10:00:00Z" || v.Current == nil || v.Current.Patient != "p-2" {
		t.Errorf("GET history: %s", body)
	}

	// DELETE at a given time ends the binding there.
	code, _, body = api.do("DELETE", path+"?tenant=st-mary&at=2026-11-23T12:00:00Z", "")
	if code != 200 {
		t.Fatalf("DELETE: %d %s", code, body)
	}
	v = View{}
	_ = json.Unmarshal(body, &v)
	if v.Current != nil || len(v.History) != 2 || v.History[1].To != "2026-11-23T12:00:00Z" || v.History[1].EndSource != "api" {
		t.Errorf("DELETE answer: %s", body)
	}
	if _, ok := s.Resolve("st-mary", bed, ms("2026-11-23T12:00:00Z")); ok {
		t.Error("the bed still resolves after DELETE")
	}
	if p, _ := s.Resolve("st-mary", bed, ms("2026-11-23T11:59:59Z")); p != "p-2" {
		t.Errorf("before the release the bed resolves to %q, want p-2", p)
	}

	// A PUT without from binds from now.
	before := time.Now().UnixMilli()
	if code, _, body = api.do("PUT", "/v1/devices/watch-9/binding", `{"tenant":"st-mary","patient":"p-3"}`); code != 200 {
		t.Fatalf("PUT without from: %d %s", code, body)
	}
	if h := s.Get("st-mary", "watch-9"); len(h) != 1 || h[0].FromMs < before || h[0].FromMs > time.Now().UnixMilli() {
		t.Errorf("from did not default to now: %+v", h)
	}

	// Errors name the field.
	for _, tc := range []struct {
		method, path, body string
		status             int
		field              string
	}{
		{"PUT", path, `{"tenant":"st-mary","patient":"p-1","from":"yesterday"}`, 400, "from"},
		{"PUT", path, `{"tenant":"st-mary","patient":"p-1","from":"2026-11-23T10:00:00Z","to":"2026-11-23T09:00:00Z"}`, 400, "to"},
		{"PUT", path, `{"tenant":"st-mary","from":"2026-11-23T10:00:00Z"}`, 400, "patient"},
		{"PUT", path, `{"tenant":"a/b","patient":"p"}`, 400, "tenant"},
		{"PUT", path, `{"tenant":"st-mary","patient":"p","bed":"x"}`, 400, "bed"},
		{"PUT", path, `{"tenant":"st-mary","patient":7}`, 400, "patient"},
		{"GET", path, "", 400, "tenant"},
		{"GET", "/v1/devices/never-seen/binding?tenant=st-mary", "", 404, "id"},
		{"DELETE", path + "?tenant=st-mary&at=noon", "", 400, "at"},
	} {
		code, ct, body := api.do(tc.method, tc.path, tc.body)
		var p Problem
		_ = json.Unmarshal(body, &p)
		if code != tc.status || ct != "application/problem+json" || p.Field != tc.field || p.Status != code || p.Detail == "" {
			t.Errorf("%s %s %s: %d %s %s, want %d naming %q", tc.method, tc.path, tc.body, code, ct, body, tc.status, tc.field)
		}
	}
}

type muxMounter struct{ *http.ServeMux }

func (m muxMounter) Mount(pattern string, h http.Handler) { m.Handle(pattern, h) }

// FuzzDecodePut: no body makes the PUT decoder panic, and what it accepts
// round-trips through JSON.
func FuzzDecodePut(f *testing.F) {
	for _, seed := range []string{
		`{"tenant":"st-mary","patient":"p-1","from":"2026-11-23T08:00:00Z","to":"2026-11-23T09:00:00Z","set_by":"nurse-7"}`,
		`{"tenant":"st-mary","patient":"p-1"}`,
		`{"tenant":"st-mary","patient":7}`,
		`{"tenant":"st-mary","bed":"x"}`,
		`{"tenant":"a"} {"tenant":"b"}`,
		`{"tenant":"\u00e9\ud800"}`,
		``, `null`, `[`, `{"tenant":`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		req, _, err := DecodePut(body)
		if err != nil {
			if req != (PutRequest{}) {
				t.Errorf("error %v with a non-empty request %+v", err, req)
			}
			return
		}
		out, err := json.Marshal(req)
		if err != nil {
			t.Fatal(err)
		}
		again, _, err := DecodePut(out)
		if err != nil || again != req {
			t.Errorf("round trip of %+v: %+v, %v", req, again, err)
		}
	})
}
