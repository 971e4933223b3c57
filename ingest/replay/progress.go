package replay

import (
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"
)

// Progress draws a progress bar of a replay on a terminal: input bytes read
// (of the inputs' total size), files, rows, samples and samples/s. It
// refreshes on its own goroutine between Run's start and end.
type Progress struct {
	w    io.Writer
	bar  *progressbar.ProgressBar
	stop chan struct{}
	done sync.WaitGroup
}

// NewProgress returns a Progress drawing on w, or nil (no progress) when
// quiet is set or w is not a terminal.
func NewProgress(w io.Writer, quiet bool) *Progress {
	if quiet {
		return nil
	}
	f, ok := w.(*os.File)
	if !ok || !term.IsTerminal(int(f.Fd())) {
		return nil
	}
	return &Progress{w: w}
}

func (p *Progress) start(r *Replayer, inputs []string) {
	var total int64
	for _, in := range inputs {
		total += inputSize(in)
	}
	if total <= 0 {
		total = -1
	}
	p.bar = progressbar.NewOptions64(total,
		progressbar.OptionSetWriter(p.w),
		progressbar.OptionShowBytes(true),
		progressbar.OptionSetWidth(24),
		progressbar.OptionThrottle(200*time.Millisecond),
		progressbar.OptionSetPredictTime(true),
		progressbar.OptionFullWidth(),
		progressbar.OptionSetDescription("replay"),
		progressbar.OptionOnCompletion(func() { fmt.Fprintln(p.w) }),
	)
	p.stop = make(chan struct{})
	p.done.Add(1)
	begin := time.Now()
	go func() {
		defer p.done.Done()
		t := time.NewTicker(250 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-p.stop:
				p.update(r, begin)
				return
			case <-t.C:
				p.update(r, begin)
			}
		}
	}()
}

func (p *Progress) update(r *Replayer, begin time.Time) {
	s := r.Stats()
	rate := float64(s.Samples) / max(time.Since(begin).Seconds(), 1e-3)
	p.bar.Describe(fmt.Sprintf("files %d rows %d samples %d refused %d (%.0f samples/s)", s.Files, s.Rows, s.Samples, s.Refused, rate))
	_ = p.bar.Set64(s.Bytes)
}

func (p *Progress) finish() {
	close(p.stop)
	p.done.Wait()
	_ = p.bar.Finish()
}
