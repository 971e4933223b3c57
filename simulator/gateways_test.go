package simulator

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/vigilhealth/vigil/internal/stage"
	"github.com/vigilhealth/vigil/internal/testenv"
)

// mllpPeer is a scripted MLLP receiver over a real socket: it records every
// accepted message and answers AR to malformed or unmapped ones, AE to the
// first try of every 50th message (to exercise retries), AA otherwise. The real
// listener (ingest/mllp) has its own end-to-end tests; this one checks
// what the gateway sends.
type mllpPeer struct {
	mu    sync.Mutex
	msgs  []string
	tries map[string]int
}

func (p *mllpPeer) serve(t *testing.T, ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			r := bufio.NewReader(c)
			for {
				if _, err := r.ReadBytes(mllpStart); err != nil {
					return
				}
				msg, err := r.ReadBytes(mllpEnd)
				if err != nil {
					return
				}
				if b, _ := r.ReadByte(); b != mllpCR {
					t.Errorf("frame not ended by <FS><CR>")
					return
				}
				m := string(msg[:len(msg)-1])
				ctl := field(m, "MSH", 10)
				code := "AA"
				p.mu.Lock()
				p.tries[ctl]++
				switch {
				case !strings.HasPrefix(m, `MSH|^~\&|`):
					code = "AR"
				case strings.Contains(m, unmappedOBX3):
					code = "AR"
				case len(p.msgs)%50 == 7 && p.tries[ctl] == 1:
					code = "AE"
				}
				if code == "AA" {
					p.msgs = append(p.msgs, m)
				}
				p.mu.Unlock()
				ack := "MSH|^~\\&|VIGIL|VIGIL|GW|ICU|20260101000000||ACK^R01^ACK|a-" + ctl + "|P|2.6\rMSA|" + code + "|" + ctl + "\r"
				if code != "AA" {
					ack += "ERR||OBX^1^3|103|E||||refused by test peer\r"
				}
				if _, err := c.Write(append(append([]byte{mllpStart}, ack...), mllpEnd, mllpCR)); err != nil {
					return
				}
			}
		}()
	}
}

// field returns field n (MSH-1 is the separator) of the first seg segment.
func field(msg, seg string, n int) string {
	for _, s := range strings.Split(msg, "\r") {
		f := strings.Split(s, "|")
		if f[0] != seg {
			continue
		}
		if seg == "MSH" {
			n-- // MSH-1 is the field separator itself
		}
		if n < len(f) {
			return f[n]
		}
	}
	return ""
}

// pid is PID-3.1, the patient id.
func pid(m string) string { return strings.Split(field(m, "PID", 3), "^")[0] }

func TestGatewaysMLLPAndFHIR(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	peer := &mllpPeer{tries: map[string]int{}}
	go peer.serve(t, ln)

	var fhirMu sync.Mutex
	var bundles []map[string]any
	var httpSamples int
	mux := http.NewServeMux()
	mux.HandleFunc("POST /fhir", func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("X-Vigil-Tenant") != "demo" || r.Header.Get("Content-Type") != "application/fhir+json" {
			http.Error(w, "bad headers", http.StatusBadRequest)
			return
		}
		var b map[string]any
		body, _ := io.ReadAll(r.Body)
		if err := json.Unmarshal(body, &b); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		fhirMu.Lock()
		bundles = append(bundles, b)
		fhirMu.Unlock()
		w.Header().Set("Content-Type", "application/fhir+json")
		_, _ = w.Write([]byte(`{"resourceType":"Bundle","type":"batch-response"}`))
	})
	mux.HandleFunc("POST /v1/samples", func(w http.ResponseWriter, r *http.Request) {
		var req struct{ Samples []json.RawMessage }
		_ = json.NewDecoder(r.Body).Decode(&req)
		fhirMu.Lock()
		httpSamples += len(req.Samples)
		fhirMu.Unlock()
		_, _ = w.Write([]byte(`{"accepted":1}`))
	})
	srv := httptest.NewServer(mux)
	defer srv.Close()

	cfg := simConfig(srv.URL)
	cfg.Beds, cfg.Wearables, cfg.Deteriorating = 2, 0, 0
	cfg.PreRoll = 12 * time.Minute
	cfg.MaxLag = 20 * time.Minute
	cfg.Duration = 4 * time.Second
	cfg.Gateways.MLLP = ln.Addr().String()
	cfg.Gateways.MLLPConnections = 2
	cfg.Gateways.FHIR = true
	cfg.Gateways.FaultRate = 0.05
	reg := prometheus.NewRegistry()
	s, err := New(cfg, stage.Deps{Log: testenv.Logger(t), Metrics: reg})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Run(context.Background()); err != nil {
		t.Fatal(err)
	}
	_ = s.Close(context.Background())

	peer.mu.Lock()
	defer peer.mu.Unlock()
	seen := map[string]int{}
	admitted := map[string]bool{}
	var orus, transfers int
	for _, m := range peer.msgs {
		ctl := field(m, "MSH", 10)
		seen[ctl]++
		bed := field(m, "PV1", 3)
		switch typ := field(m, "MSH", 9); {
		case typ == "ADT^A01^ADT_A01":
			admitted[pid(m)] = true
		case typ == "ADT^A02^ADT_A01":
			transfers++
			if field(m, "PV1", 6) != "ICU^01^1" || bed != "ICU^01^2" {
				t.Errorf("transfer from %q to %q, want ICU^01^1 → ICU^01^2", field(m, "PV1", 6), bed)
			}
		case typ == "ORU^R01^ORU_R01":
			orus++
			if !admitted[pid(m)] {
				t.Fatalf("ORU for %s before its admission", pid(m))
			}
			if !strings.Contains(m, "|NM|") || strings.Contains(m, "MDC_TEMP_BODY") {
				t.Errorf("ORU without NM observations or with a temperature (spot checks go over FHIR):\n%s", m)
			}
		}
	}
	for ctl, n := range seen {
		if n != 1 {
			t.Errorf("message %s accepted %d times", ctl, n)
		}
	}
	if len(admitted) != 2 || transfers != 1 {
		t.Errorf("admitted %v, transfers %d; want 2 admissions and 1 transfer", admitted, transfers)
	}
	// 12 minutes of pre-roll: one ORU per bed and second.
	if orus < 2*12*60 {
		t.Errorf("%d ORU messages accepted, want at least %d", orus, 2*12*60)
	}
	ae := testutil.ToFloat64(s.gw.messages.WithLabelValues("mllp", "AE"))
	ar := testutil.ToFloat64(s.gw.messages.WithLabelValues("mllp", "AR"))
	faults := testutil.ToFloat64(s.gw.faults.WithLabelValues("mllp", "malformed")) + testutil.ToFloat64(s.gw.faults.WithLabelValues("mllp", "unmapped"))
	if ae == 0 || faults == 0 || ar != faults {
		t.Errorf("AE %v (want > 0, retried), AR %v, injected faults %v (want AR == faults > 0)", ae, ar, faults)
	}

	fhirMu.Lock()
	defer fhirMu.Unlock()
	var temps int
	for _, b := range bundles {
		if b["resourceType"] != "Bundle" || b["type"] != "batch" {
			t.Fatalf("not a batch bundle: %v", b)
		}
		for _, e := range b["entry"].([]any) {
			res := e.(map[string]any)["resource"].(map[string]any)
			code := res["code"].(map[string]any)["coding"].([]any)[0].(map[string]any)["code"]
			if code == "8310-5" {
				if vq, ok := res["valueQuantity"].(map[string]any); ok && vq["code"] == "Cel" {
					temps++
				}
			}
		}
	}
	// Temperature every 4 minutes per bed over 12 minutes: at least 3 each.
	if temps < 2*3 {
		t.Errorf("%d temperature spot checks over FHIR, want at least 6", temps)
	}
	if httpSamples == 0 {
		t.Errorf("consciousness charting should still go over HTTP JSON")
	}
}
