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

// PlainInterval is how often a Progress that is not on a terminal writes
// its line.
const PlainInterval = 5 * time.Second

// Progress reports a replay's progress between Run's start and end: input
// bytes read (of the inputs' total size), files, rows, samples, refusals
// and samples/s. On a terminal it draws a progress bar
// (github.com/schollz/progressbar); elsewhere (a log file, a pipe, CI) it
// writes one plain line every interval, and a last one at the end. It
// refreshes on its own goroutine, which Run starts and stops; a Progress
// serves one Run.
type Progress struct {
	w        io.Writer
	plain    bool
	interval time.Duration
	total    int64
	bar      *progressbar.ProgressBar
	stop     chan struct{}
	done     sync.WaitGroup
}

// NewProgress returns a Progress writing to w: a bar when w is a terminal,
// plain lines every PlainInterval otherwise; nil (no progress) when quiet.
func NewProgress(w io.Writer, quiet bool) *Progress {
	if quiet || w == nil {
		return nil
	}
	if f, ok := w.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
		return &Progress{w: w}
	}
	return NewPlainProgress(w, PlainInterval)
}

// NewPlainProgress returns a Progress writing a plain line to w every
// interval (and at the end), whatever w is.
func NewPlainProgress(w io.Writer, interval time.Duration) *Progress {
	return &Progress{w: w, plain: true, interval: max(interval, 10*time.Millisecond)}
}

func (p *Progress) start(r *Replayer, inputs []string) {
	for _, in := range inputs {
		p.total += inputSize(in)
	}
	every := p.interval
	if !p.plain {
		total := p.total
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
		every = 250 * time.Millisecond
	}
	p.stop = make(chan struct{})
	p.done.Add(1)
	begin := time.Now()
	go func() {
		defer p.done.Done()
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-p.stop:
				p.update(r, begin, true)
				return
			case <-t.C:
				p.update(r, begin, false)
			}
		}
	}()
}

func (p *Progress) update(r *Replayer, begin time.Time, last bool) {
	s := r.Stats()
	el := time.Since(begin)
	rate := float64(s.Samples) / max(el.Seconds(), 1e-3)
	if p.plain {
		state := "replaying"
		if last {
			state = "replayed"
		}
		share := ""
		if p.total > 0 {
			share = fmt.Sprintf(" (%.0f%%)", 100*float64(min(s.Bytes, p.total))/float64(p.total))
		}
		fmt.Fprintf(p.w, "replay: %s %.1f of %.1f MB%s in %s: files %d rows %d samples %d refused %d (%.0f samples/s)\n",
			state, float64(s.Bytes)/1e6, float64(p.total)/1e6, share, el.Round(time.Second), s.Files, s.Rows, s.Samples,
			s.Refused, rate)
		return
	}
	p.bar.Describe(fmt.Sprintf("files %d rows %d samples %d refused %d (%.0f samples/s)", s.Files, s.Rows, s.Samples, s.Refused, rate))
	_ = p.bar.Set64(s.Bytes)
}

func (p *Progress) finish() {
	close(p.stop)
	p.done.Wait()
	if p.bar != nil {
		_ = p.bar.Finish()
	}
}
