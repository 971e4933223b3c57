package ratelimit

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/vigilhealth/vigil/internal/clock"
)

func TestAllowRefillsAtRate(t *testing.T) {
	clk := clock.NewManual(time.Unix(1_700_000_000, 0))
	l := New(100, 200, 10, clk) // 100 samples/s, bucket 200
	if ok, _ := l.Allow("gw", 200); !ok {
		t.Fatal("a full bucket refused its burst")
	}
	ok, retry := l.Allow("gw", 50)
	if ok || retry != 500*time.Millisecond {
		t.Fatalf("empty bucket: ok %v retry %v, want refused with 500ms", ok, retry)
	}
	if ok, _ := l.Allow("monitor", 10); !ok {
		t.Fatal("another key was limited by the first one's bucket")
	}
	clk.Advance(500 * time.Millisecond)
	if ok, _ := l.Allow("gw", 50); !ok {
		t.Fatal("not allowed after the advertised retry time")
	}
	if ok, _ := l.Allow("gw", 1); ok {
		t.Fatal("allowed beyond the refill")
	}
	if l.Limited() != 2 {
		t.Fatalf("limited %d, want 2", l.Limited())
	}
}

func TestLargeRequestGoesIntoDebt(t *testing.T) {
	clk := clock.NewManual(time.Unix(1_700_000_000, 0))
	l := New(1000, 100, 10, clk)
	if ok, _ := l.Allow("gw", 5000); !ok {
		t.Fatal("a request larger than the bucket was refused although the bucket was full")
	}
	// 5000 taken from 100: 4900 in debt, +100 needed = 5s at 1000/s.
	ok, retry := l.Allow("gw", 100)
	if ok || retry != 5*time.Second {
		t.Fatalf("after a large request: ok %v retry %v, want refused for 5s", ok, retry)
	}
}

func TestUnlimited(t *testing.T) {
	l := New(0, 0, 1, nil)
	for i := 0; i < 1000; i++ {
		if ok, _ := l.Allow(fmt.Sprint(i), 1_000_000); !ok {
			t.Fatal("an unlimited limiter refused")
		}
	}
	if err := l.Wait(context.Background(), "x", 1<<30); err != nil {
		t.Fatal(err)
	}
	if l.Len() != 0 {
		t.Fatal("an unlimited limiter kept buckets")
	}
}

func TestKeyTableBounded(t *testing.T) {
	clk := clock.NewManual(time.Unix(1_700_000_000, 0))
	l := New(10, 10, 100, clk)
	l.Allow("gw", 10) // empty gw's bucket
	for i := 0; i < 1000; i++ {
		l.Allow(fmt.Sprint("ip-", i), 1)
		if i%10 == 0 {
			l.Allow("monitor", 0) // n 0 does not touch the table
		}
	}
	if l.Len() > 100 {
		t.Fatalf("%d buckets, bound 100", l.Len())
	}
	if l.Evictions() != 1000+1-100 {
		t.Fatalf("evictions %d, want %d", l.Evictions(), 1000+1-100)
	}
}

func TestWaitSlowsDownAndCancels(t *testing.T) {
	l := New(1000, 10, 10, nil)
	start := time.Now()
	for i := 0; i < 5; i++ {
		if err := l.Wait(context.Background(), "mllp-1", 20); err != nil {
			t.Fatal(err)
		}
	}
	// 100 samples at 1000/s with a bucket of 10: at least ~80ms.
	if el := time.Since(start); el < 70*time.Millisecond {
		t.Fatalf("5×20 samples took %v, want them slowed to the rate", el)
	}
	slow := New(10, 10, 10, nil)
	slow.Allow("mqtt-1", 10) // empty
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	err := slow.Wait(ctx, "mqtt-1", 10) // would wait ~1s
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("got %v, want the context's deadline", err)
	}
	// The cancelled request's tokens were given back: the next 10 wait
	// about 1s, not 2s.
	if ok, retry := slow.Allow("mqtt-1", 10); ok || retry > 1500*time.Millisecond {
		t.Fatalf("after a cancelled Wait: ok %v retry %v, want about 1s", ok, retry)
	}
}

// BenchmarkAllow reports Allow decisions per second over 1000 keys.
func BenchmarkAllow(b *testing.B) {
	l := New(1e9, 1e9, 10_000, nil)
	keys := make([]string, 1000)
	for i := range keys {
		keys[i] = fmt.Sprint("tenant/device-", i)
	}
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			l.Allow(keys[i%len(keys)], 10)
			i++
		}
	})
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "decisions/s")
}
