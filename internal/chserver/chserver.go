// Package chserver runs a local clickhouse-server as a child process, bound to
// loopback with its data in a folder of ours: the default for `vigil run` on a
// single box and for the test suite. It writes the server's config files,
// starts it, waits until it answers on the native port, and stops it on Close.
//
// Sites with their own ClickHouse set clickhouse.addr and start nothing.
package chserver

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"
)

// Options configure Start.
type Options struct {
	// Binary is the clickhouse-server executable (looked up in PATH, then in
	// /usr/sbin and /usr/bin where Debian installs it).
	Binary string
	// DataDir holds data, logs and the generated config.
	DataDir    string
	ListenHost string
	// TCPPort and HTTPPort; 0 picks a free port.
	TCPPort  int
	HTTPPort int
	// StartTimeout bounds waiting for the server to answer.
	StartTimeout time.Duration
	// Nice (1-19) starts the server through coreutils' nice at that
	// niceness, so that every thread it makes yields the CPU to the
	// processes at normal priority; 0 starts it at ours.
	Nice int
	Log  *slog.Logger
}

// Server is a running child clickhouse-server. Close is idempotent and safe
// for concurrent use.
type Server struct {
	cmd      *exec.Cmd
	addr     string
	httpAddr string
	dir      string
	done     chan struct{}
	waitErr  error
	once     sync.Once
	log      *slog.Logger
}

// Start writes the config and starts the server, returning once its native
// port accepts connections. Cancelling ctx aborts the wait (and stops it).
func Start(ctx context.Context, o Options) (*Server, error) {
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.ListenHost == "" {
		o.ListenHost = "127.0.0.1"
	}
	if o.StartTimeout == 0 {
		o.StartTimeout = 60 * time.Second
	}
	bin, err := findBinary(o.Binary)
	if err != nil {
		return nil, err
	}
	dir, err := filepath.Abs(o.DataDir)
	if err != nil {
		return nil, fmt.Errorf("resolving clickhouse data dir: %w", err)
	}
	for _, sub := range []string{"data", "tmp", "user_files", "format_schemas", "log"} {
		if err := os.MkdirAll(filepath.Join(dir, sub), 0o750); err != nil {
			return nil, fmt.Errorf("creating clickhouse data dir: %w", err)
		}
	}
	if o.TCPPort == 0 {
		if o.TCPPort, err = freePort(o.ListenHost); err != nil {
			return nil, err
		}
	}
	if o.HTTPPort == 0 {
		if o.HTTPPort, err = freePort(o.ListenHost); err != nil {
			return nil, err
		}
	}
	cfgPath := filepath.Join(dir, "config.xml")
	if err := os.WriteFile(cfgPath, []byte(serverConfig(dir, o)), 0o640); err != nil {
		return nil, fmt.Errorf("writing clickhouse config: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "users.xml"), []byte(usersConfig), 0o640); err != nil {
		return nil, fmt.Errorf("writing clickhouse users: %w", err)
	}
	// A previous run killed hard leaves its pid file; the server refuses to
	// start while it names a live process, and ignores it otherwise.
	stdout, err := os.OpenFile(filepath.Join(dir, "log", "stdout.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o640)
	if err != nil {
		return nil, fmt.Errorf("opening clickhouse stdout log: %w", err)
	}
	cmd := exec.Command(bin, "--config-file="+cfgPath)
	if o.Nice > 0 {
		// nice execs the server in its own process (same pid), before
		// the server makes any thread.
		nice, err := exec.LookPath("nice")
		if err != nil {
			stdout.Close()
			return nil, fmt.Errorf("clickhouse nice %d: finding coreutils' nice: %w", o.Nice, err)
		}
		cmd = exec.Command(nice, "-n", strconv.Itoa(o.Nice), bin, "--config-file="+cfgPath)
	}
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = stdout, stdout
	// Own process group: a Ctrl-C at the terminal reaches us, and we stop
	// the server in order, after the sink has drained.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	if err := cmd.Start(); err != nil {
		stdout.Close()
		return nil, fmt.Errorf("starting %s: %w", bin, err)
	}
	s := &Server{
		cmd:      cmd,
		addr:     net.JoinHostPort(o.ListenHost, strconv.Itoa(o.TCPPort)),
		httpAddr: net.JoinHostPort(o.ListenHost, strconv.Itoa(o.HTTPPort)),
		dir:      dir,
		done:     make(chan struct{}),
		log:      o.Log,
	}
	go func() {
		s.waitErr = cmd.Wait()
		stdout.Close()
		close(s.done)
	}()
	wctx, cancel := context.WithTimeout(ctx, o.StartTimeout)
	defer cancel()
	if err := s.waitReady(wctx); err != nil {
		_ = s.Close(context.Background())
		return nil, fmt.Errorf("clickhouse-server did not come up on %s (see %s): %w", s.addr, filepath.Join(dir, "log"), err)
	}
	o.Log.Info("clickhouse server started", "addr", s.addr, "http", s.httpAddr, "data_dir", dir)
	return s, nil
}

func (s *Server) waitReady(ctx context.Context) error {
	for {
		select {
		case <-s.done:
			return fmt.Errorf("server exited: %v", s.waitErr)
		default:
		}
		// The native port accepting a connection and the HTTP /ping answering
		// means it has loaded its metadata.
		if c, err := net.DialTimeout("tcp", s.httpAddr, 200*time.Millisecond); err == nil {
			_, _ = c.Write([]byte("GET /ping HTTP/1.0\r\n\r\n"))
			_ = c.SetReadDeadline(time.Now().Add(time.Second))
			buf := make([]byte, 64)
			n, _ := c.Read(buf)
			c.Close()
			if n > 12 && string(buf[9:12]) == "200" {
				if c2, err := net.DialTimeout("tcp", s.addr, 200*time.Millisecond); err == nil {
					c2.Close()
					return nil
				}
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// Addr is the native protocol host:port.
func (s *Server) Addr() string { return s.addr }

// HTTPAddr is the HTTP interface host:port.
func (s *Server) HTTPAddr() string { return s.httpAddr }

// Close stops the server (SIGTERM, then SIGKILL when ctx ends or after 20 s)
// and waits for it to exit.
func (s *Server) Close(ctx context.Context) error {
	var err error
	s.once.Do(func() {
		_ = s.cmd.Process.Signal(syscall.SIGTERM)
		t := time.NewTimer(20 * time.Second)
		defer t.Stop()
		select {
		case <-s.done:
		case <-ctx.Done():
			_ = s.cmd.Process.Kill()
			<-s.done
			err = fmt.Errorf("stopping clickhouse: %w", ctx.Err())
		case <-t.C:
			_ = s.cmd.Process.Kill()
			<-s.done
			err = errors.New("stopping clickhouse: killed after 20s")
		}
		s.log.Info("clickhouse server stopped")
	})
	return err
}

func findBinary(name string) (string, error) {
	if name == "" {
		name = "clickhouse-server"
	}
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, dir := range []string{"/usr/sbin", "/usr/bin", "/usr/local/bin"} {
		p := filepath.Join(dir, filepath.Base(name))
		if st, err := os.Stat(p); err == nil && !st.IsDir() {
			return p, nil
		}
	}
	return "", fmt.Errorf("clickhouse server binary %q not found: run `make deps` (installs Debian's clickhouse-server) or set clickhouse.addr to an existing server", name)
}

// FreePort returns a free TCP port on host.
func freePort(host string) (int, error) {
	l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		return 0, fmt.Errorf("finding a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func serverConfig(dir string, o Options) string {
	return fmt.Sprintf(`<?xml version="1.0"?>
<!-- Written by vigil on every start; edit the vigil config instead. -->
<yandex>
  <logger>
    <level>warning</level>
    <log>%[1]s/log/clickhouse-server.log</log>
    <errorlog>%[1]s/log/clickhouse-server.err.log</errorlog>
    <size>100M</size>
    <count>3</count>
  </logger>
  <listen_host>%[2]s</listen_host>
  <tcp_port>%[3]d</tcp_port>
  <http_port>%[4]d</http_port>
  <path>%[1]s/data/</path>
  <tmp_path>%[1]s/tmp/</tmp_path>
  <user_files_path>%[1]s/user_files/</user_files_path>
  <format_schema_path>%[1]s/format_schemas/</format_schema_path>
  <users_config>users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <timezone>UTC</timezone>
  <mlock_executable>false</mlock_executable>
  <mark_cache_size>268435456</mark_cache_size>
  <uncompressed_cache_size>268435456</uncompressed_cache_size>
  <max_concurrent_queries>200</max_concurrent_queries>
  <max_connections>1024</max_connections>
  <keep_alive_timeout>2</keep_alive_timeout>
</yandex>
`, dir, o.ListenHost, o.TCPPort, o.HTTPPort)
}

const usersConfig = `<?xml version="1.0"?>
<yandex>
  <profiles>
    <default>
      <max_memory_usage>4000000000</max_memory_usage>
      <allow_experimental_low_cardinality_type>1</allow_experimental_low_cardinality_type>
      <!-- An idle native connection re-checks for shutdown every poll_interval
           seconds (default 10): keep stopping within a second or two even
           while a clickhouse-client session stays open. -->
      <poll_interval>1</poll_interval>
    </default>
  </profiles>
  <users>
    <default>
      <password></password>
      <networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
      <profile>default</profile>
      <quota>default</quota>
    </default>
  </users>
  <quotas>
    <default>
      <interval>
        <duration>3600</duration>
        <queries>0</queries><errors>0</errors><result_rows>0</result_rows>
        <read_rows>0</read_rows><execution_time>0</execution_time>
      </interval>
    </default>
  </quotas>
</yandex>
`
