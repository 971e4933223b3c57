package replay

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/vigilhealth/vigil/ingest/httpjson"
)

// maxTargetSamples bounds the samples of one request built from PSV rows
// (below ingest.max_batch_samples' default).
const maxTargetSamples = 2000

// emitHTTP queues u for the target: a recording line is posted as it was
// recorded (one request per line, all on lane 0 to keep their order);
// PSV rows are gathered per lane into requests of up to maxTargetSamples,
// each sample carrying its patient, device and message id.
func (rn *run) emitHTTP(u *unit) error {
	if u.refusal != nil || u.contentType == contentTypeRecording {
		n := len(u.items)
		if u.refusal != nil {
			n = 1
		}
		body := append([]byte(nil), u.raw...)
		if err := rn.sem.Acquire(rn.ctx, int64(len(body))); err != nil {
			return rn.stopped()
		}
		select {
		case rn.lanes[0] <- &flight{body: body, samples: n, bytes: len(body)}:
			return nil
		case <-rn.ctx.Done():
			rn.sem.Release(int64(len(body)))
			return rn.stopped()
		}
	}
	for i := range u.items {
		it := &u.items[i]
		l := rn.laneOf(it.in.Tenant, it.in.Patient)
		req := rn.httpReqs[l]
		if req == nil {
			req = &httpjson.Request{Tenant: it.in.Tenant}
			rn.httpReqs[l] = req
		}
		s := httpjson.Sample{Patient: it.in.Patient, Device: it.in.Device, MessageID: it.msgID, Metric: it.in.Metric,
			LOINC: it.in.LOINC, Value: it.in.Value, Unit: it.in.Unit, TimeMs: it.in.EventTimeMs, Seq: it.in.Sequence,
			Channel: it.in.Channel}
		if it.in.Tenant != req.Tenant {
			s.Tenant = it.in.Tenant
		}
		req.Samples = append(req.Samples, s)
		if len(req.Samples) >= maxTargetSamples {
			if err := rn.flushHTTP(l); err != nil {
				return err
			}
		}
	}
	return nil
}

// flushHTTP encodes lane l's gathered samples into one request and queues it.
func (rn *run) flushHTTP(l int) error {
	req := rn.httpReqs[l]
	rn.httpReqs[l] = nil
	if req == nil || len(req.Samples) == 0 {
		return nil
	}
	body, err := json.Marshal(req)
	if err != nil {
		return fmt.Errorf("encoding request: %w", err)
	}
	if err := rn.sem.Acquire(rn.ctx, int64(len(body))); err != nil {
		return rn.stopped()
	}
	select {
	case rn.lanes[l] <- &flight{body: body, samples: len(req.Samples), bytes: len(body)}:
		return nil
	case <-rn.ctx.Done():
		rn.sem.Release(int64(len(body)))
		return rn.stopped()
	}
}

// post sends one request body to the target, retrying 5xx, 429 and
// connection errors with exponential backoff (up to about a minute); a 4xx
// answer is final (the target dead-lettered what it refused).
func (rn *run) post(f *flight) error {
	backoff := 100 * time.Millisecond
	deadline := time.Now().Add(time.Minute)
	for {
		url := rn.url
		if f.url != "" {
			url = f.url
		}
		code, out, err := rn.postOnce(rn.ctx, url, f.body)
		switch {
		case err == nil && code == http.StatusOK:
			rn.st.samples.Add(int64(f.samples))
			return nil
		case err == nil && code >= 400 && code < 500 && code != http.StatusTooManyRequests && code != http.StatusRequestTimeout:
			var p httpjson.Problem
			if code == http.StatusBadRequest && json.Unmarshal(out, &p) == nil && p.Accepted+p.Rejected == f.samples {
				rn.st.samples.Add(int64(p.Accepted))
				rn.st.refused.Add(int64(p.Rejected))
				return nil
			}
			rn.st.refused.Add(int64(f.samples))
			rn.log.Warn("replay: target refused a request", "status", code, "answer", clip(out))
			return nil
		}
		if rn.ctx.Err() != nil {
			return rn.stopped()
		}
		if time.Now().After(deadline) {
			if err == nil {
				err = fmt.Errorf("status %d: %s", code, clip(out))
			}
			return fmt.Errorf("posting to %s: %w", url, err)
		}
		rn.log.Warn("replay: target unavailable; retrying", "status", code, "err", err)
		select {
		case <-rn.ctx.Done():
			return rn.stopped()
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

func (rn *run) postOnce(ctx context.Context, url string, body []byte) (int, []byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return 0, nil, fmt.Errorf("building request: %w", err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := rn.client.Do(req)
	if err != nil {
		return 0, nil, fmt.Errorf("posting to the target: %w", err)
	}
	defer resp.Body.Close()
	out, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return 0, nil, fmt.Errorf("reading answer: %w", err)
	}
	return resp.StatusCode, out, nil
}
