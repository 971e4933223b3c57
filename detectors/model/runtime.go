package model

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"

	ort "github.com/yalue/onnxruntime_go"
)

// DefaultLibrary is where `make onnxruntime` puts the ONNX Runtime shared
// library (from npm onnxruntime-node), relative to the repository root.
const DefaultLibrary = ".cache/onnxruntime/current/libonnxruntime.so.1"

// RuntimeOptions configures NewRuntime.
type RuntimeOptions struct {
	// LibraryPath is the ONNX Runtime shared library; empty searches
	// LibrarySearchPaths.
	LibraryPath string
	// IntraOpThreads is ORT's per-session intra-op thread count; 0 means 1
	// (the stream engine batches many patients per run, and the machine's
	// cores belong to the pipeline's other stages).
	IntraOpThreads int
}

// LibrarySearchPaths lists where NewRuntime looks for the library when no
// path is configured: DefaultLibrary relative to the working directory,
// then to the executable's folder and its parent.
func LibrarySearchPaths() []string {
	paths := []string{DefaultLibrary}
	if exe, err := os.Executable(); err == nil {
		dir := filepath.Dir(exe)
		paths = append(paths, filepath.Join(dir, DefaultLibrary), filepath.Join(filepath.Dir(dir), DefaultLibrary))
	}
	return paths
}

// Runtime owns the ONNX Runtime environment. ORT's environment (and the
// onnxruntime_go package holding it) is process-global in the C library: a
// process has at most one live Runtime, created once at start-up and passed
// to whatever opens models (NewRuntime fails while another is open), and
// Close destroys the environment after every Model opened from it is
// closed. Open and Close are safe for concurrent use.
type Runtime struct {
	mu      sync.Mutex
	lib     string
	threads int
	models  int
	closed  bool
}

// NewRuntime loads the ONNX Runtime library and initialises its
// environment. With opts.LibraryPath empty it tries LibrarySearchPaths in
// order; the error names every path tried and how to fetch the library.
// It fails when another Runtime of this process is still open. Callers
// must not call NewRuntime concurrently (the environment it checks and
// initialises is the C library's, not guarded by this package, which keeps
// no state of its own).
func NewRuntime(opts RuntimeOptions) (*Runtime, error) {
	if ort.IsInitialized() {
		return nil, errors.New("starting ONNX Runtime: already initialised in this process (one model.Runtime per process; pass it to every user)")
	}
	paths := []string{opts.LibraryPath}
	if opts.LibraryPath == "" {
		paths = LibrarySearchPaths()
	}
	var tried []string
	for _, p := range paths {
		if _, err := os.Stat(p); err != nil {
			tried = append(tried, fmt.Sprintf("%s (%v)", p, errors.Unwrap(err)))
			continue
		}
		ort.SetSharedLibraryPath(p)
		if err := ort.InitializeEnvironment(ort.WithLogLevelError()); err != nil {
			tried = append(tried, fmt.Sprintf("%s (%v)", p, err))
			continue
		}
		threads := opts.IntraOpThreads
		if threads <= 0 {
			threads = 1
		}
		abs, _ := filepath.Abs(p)
		return &Runtime{lib: abs, threads: threads}, nil
	}
	how := "run `make onnxruntime` in the repository (fetches it from npm onnxruntime-node into " + filepath.Dir(filepath.Dir(DefaultLibrary)) +
		") or set detectors.models.onnxruntime_library to the path of libonnxruntime.so.1"
	return nil, fmt.Errorf("loading the ONNX Runtime library: tried %s; %s", strings.Join(tried, ", "), how)
}

// LibraryPath returns the absolute path of the loaded library.
func (r *Runtime) LibraryPath() string { return r.lib }

// Version returns the ONNX Runtime version string.
func (r *Runtime) Version() string { return ort.GetVersion() }

// Close destroys the ORT environment. It fails while models opened from
// the runtime are still open; closing twice is a no-op.
func (r *Runtime) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil
	}
	if r.models > 0 {
		return fmt.Errorf("closing ONNX Runtime: %d models still open", r.models)
	}
	r.closed = true
	if err := ort.DestroyEnvironment(); err != nil {
		return fmt.Errorf("closing ONNX Runtime: %w", err)
	}
	return nil
}

// session creates a DynamicAdvancedSession (variable batch size) for an
// ONNX model in memory, with one input and the one output named by the
// manifest.
func (r *Runtime) session(m *Manifest, onnx []byte) (*ort.DynamicAdvancedSession, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil, errors.New("opening model: ONNX Runtime is closed")
	}
	so, err := ort.NewSessionOptions()
	if err != nil {
		return nil, fmt.Errorf("opening model %s: session options: %w", m.Name, err)
	}
	defer so.Destroy()
	if err := so.SetIntraOpNumThreads(r.threads); err != nil {
		return nil, fmt.Errorf("opening model %s: %w", m.Name, err)
	}
	if err := so.SetInterOpNumThreads(1); err != nil {
		return nil, fmt.Errorf("opening model %s: %w", m.Name, err)
	}
	s, err := ort.NewDynamicAdvancedSessionWithONNXData(onnx, []string{m.InputName}, []string{m.Output.Name}, so)
	if err != nil {
		return nil, fmt.Errorf("opening model %s version %s: %w", m.Name, m.Version, err)
	}
	r.models++
	return s, nil
}

func (r *Runtime) release() {
	r.mu.Lock()
	r.models--
	r.mu.Unlock()
}
