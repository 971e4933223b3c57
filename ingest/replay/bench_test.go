package replay

import (
	"context"
	"testing"
	"time"

	"github.com/vigilhealth/vigil/internal/testenv"
)

// BenchmarkReplayPSV replays the whole challenge tarball (20,000 PSV files,
// streamed and decompressed on the fly) into an embedded kfake broker over
// loopback TCP in this process, through validation and the publisher, and
// reports samples/s (accepted samples acknowledged by the broker).
func BenchmarkReplayPSV(b *testing.B) {
	tgz := tarball(b)
	var samples int64
	var el time.Duration
	for range b.N {
		b.StopTimer()
		addr := testenv.Kafka(b)
		r := newReplayer(b, testenv.Config(b, addr, ""), Options{})
		b.StartTimer()
		start := time.Now()
		st, err := r.Run(context.Background(), []string{tgz})
		if err != nil {
			b.Fatal(err)
		}
		el += time.Since(start)
		samples += st.Samples
		b.StopTimer()
		_ = r.Close(context.Background())
		b.Logf("%+v", st)
		b.StartTimer()
	}
	b.ReportMetric(float64(samples)/el.Seconds(), "samples/s")
}
