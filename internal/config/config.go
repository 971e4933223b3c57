// Package config defines Vigil's one configuration file: its documented
// defaults, strict YAML decoding over them (unknown keys fail), per-section
// validation with errors that name the field, and overrides from environment
// variables (VIGIL_<PATH>, e.g. VIGIL_KAFKA_BROKERS) and flags
// (--set path=value, plus the named shortcuts of cmd/vigil).
//
// A Config is a plain value: build it once at start-up and pass it down; it
// is not safe to mutate concurrently with readers.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"time"

	"gopkg.in/yaml.v3"
)

// Config is the whole configuration. Every field has a default (see Default)
// and a YAML key; the env variable of a field is VIGIL_ followed by its YAML
// path in upper case with dots as underscores.
type Config struct {
	// DataDir is the run folder: embedded broker data, local ClickHouse data,
	// logs. Relative paths are resolved against the working directory.
	DataDir    string     `yaml:"data_dir"`
	Log        Log        `yaml:"log"`
	Kafka      Kafka      `yaml:"kafka"`
	ClickHouse ClickHouse `yaml:"clickhouse"`
	HTTP       HTTP       `yaml:"http"`
	Ingest     Ingest     `yaml:"ingest"`
	Stream     Stream     `yaml:"stream"`
	Sink       Sink       `yaml:"sink"`
	Simulator  Simulator  `yaml:"simulator"`
	Status     Status     `yaml:"status"`
	FHIR       FHIR       `yaml:"fhir"`
	MLLP       MLLP       `yaml:"mllp"`
	Waveform   Waveform   `yaml:"waveform"`
	MQTT       MQTT       `yaml:"mqtt"`
	Runtime    Runtime    `yaml:"runtime"`
	// Detectors configures scores, baselines and models.
	Detectors Detectors `yaml:"detectors"`
	// Alerts configures the alert lifecycle, API and routes.
	Alerts Alerts `yaml:"alerts"`
}

// Log configures structured logging.
type Log struct {
	// Level is debug, info, warn or error.
	Level string `yaml:"level"`
	// Format is text or json.
	Format string `yaml:"format"`
}

// Kafka configures the Kafka-protocol cluster and topics.
type Kafka struct {
	// Brokers are seed brokers host:port. Empty means: start the embedded
	// broker (kfake) at Embedded.Listen and use it.
	Brokers  []string      `yaml:"brokers"`
	Embedded EmbeddedKafka `yaml:"embedded"`
	// ClientID names Vigil's Kafka clients in broker logs and quotas.
	ClientID string `yaml:"client_id"`
	Topics   Topics `yaml:"topics"`
	// Partitions is the partition count of topics Vigil creates.
	Partitions int32 `yaml:"partitions"`
	// ReplicationFactor of topics Vigil creates; -1 means the broker default.
	ReplicationFactor int16 `yaml:"replication_factor"`
	// ProduceTimeout bounds how long ingest waits for Kafka to acknowledge.
	ProduceTimeout time.Duration `yaml:"produce_timeout"`
	// MaxBufferedBytes bounds the producer's buffer; when full, producing
	// blocks (backpressure) instead of growing memory.
	MaxBufferedBytes int `yaml:"max_buffered_bytes"`
}

// EmbeddedKafka configures the embedded kfake broker.
type EmbeddedKafka struct {
	// Listen is the address the embedded broker binds.
	Listen string `yaml:"listen"`
	// SyncWrites fsyncs every produced batch (slower, survives power loss).
	SyncWrites bool `yaml:"sync_writes"`
}

// Topics names every topic (DESIGN.md defaults).
type Topics struct {
	// Samples carries canonical sample batches, keyed tenant/patient.
	Samples string `yaml:"samples"`
	// DeadLetter carries every refusal with its reason and raw bytes.
	DeadLetter string `yaml:"deadletter"`
	// Features carries closed windows' features, keyed tenant/patient.
	Features string `yaml:"features"`
	// Scores carries early-warning and model scores, keyed tenant/patient.
	Scores string `yaml:"scores"`
	// Alerts carries alert lifecycle events, keyed tenant/patient.
	Alerts string `yaml:"alerts"`
	// Imaging carries imaging findings, keyed tenant/patient.
	Imaging string `yaml:"imaging"`
	// Audit carries who did what to which data, keyed tenant.
	Audit string `yaml:"audit"`
	// State is the stream engine's compacted changelog.
	State string `yaml:"state"`
	// Bindings is the compacted device/bed → patient binding table, keyed
	// "<tenant>/<device>" (see ingest/binding).
	Bindings string `yaml:"bindings"`
}

// ClickHouse configures the ClickHouse connection or the local server.
type ClickHouse struct {
	// Addr is host:port of the native protocol. Empty means: start a local
	// clickhouse-server child process (see Local) and use it.
	Addr string `yaml:"addr"`
	// Database holds Vigil's tables; migrations create it.
	Database string `yaml:"database"`
	// Username and Password authenticate to ClickHouse.
	Username string `yaml:"username"`
	Password string `yaml:"password"`
	// Local configures the child server started when Addr is empty.
	Local LocalClick `yaml:"local"`
	// DialTimeout bounds connecting; queries take their context's deadline.
	DialTimeout time.Duration `yaml:"dial_timeout"`
}

// LocalClick configures the child clickhouse-server.
type LocalClick struct {
	// Binary is the clickhouse-server executable.
	Binary string `yaml:"binary"`
	// ListenHost is the address the child server binds (loopback by default).
	ListenHost string `yaml:"listen_host"`
	// TCPPort (native protocol) and HTTPPort of the child server.
	TCPPort  int `yaml:"tcp_port"`
	HTTPPort int `yaml:"http_port"`
	// StartTimeout bounds waiting for the server to answer.
	StartTimeout time.Duration `yaml:"start_timeout"`
	// Nice is the CPU scheduling niceness the child server runs at (0-19,
	// through coreutils' nice). On a box that also serves alerts, the
	// analytics store should yield the CPU to the alert path: with 10,000
	// beds, every bed's 1-minute window closes in the same second and the
	// resulting feature and score inserts otherwise delay alerts by
	// hundreds of ms (BenchmarkAcceptToAlertWard). 0 runs it at our own
	// priority.
	Nice int `yaml:"nice"`
}

// HTTP configures the HTTP API (ingest, health, metrics).
type HTTP struct {
	// Listen is the HTTP API's host:port (port 0 picks a free one).
	Listen string `yaml:"listen"`
	// MaxBodyBytes bounds a request body.
	MaxBodyBytes int64 `yaml:"max_body_bytes"`
	// ShutdownTimeout bounds draining in-flight requests on stop.
	ShutdownTimeout time.Duration `yaml:"shutdown_timeout"`
}

// Ingest configures validation of incoming samples.
type Ingest struct {
	// MaxBatchSamples bounds the samples of one HTTP batch.
	MaxBatchSamples int `yaml:"max_batch_samples"`
	// MaxFutureSkew refuses samples whose event time is further than this
	// ahead of ingest time.
	MaxFutureSkew time.Duration `yaml:"max_future_skew"`
	// BackfillAge flags samples older than this as backfill (kept).
	BackfillAge time.Duration `yaml:"backfill_age"`
	// MaxAge refuses samples older than this (0 = no limit).
	MaxAge time.Duration `yaml:"max_age"`
	// DeadLetterRawLimit bounds the raw bytes kept on a dead letter.
	DeadLetterRawLimit int `yaml:"deadletter_raw_limit"`
	// Catalog is a metric catalogue file; empty uses the embedded one.
	Catalog string `yaml:"catalog"`
	// MappingDir is a folder of mapping files (YAML, see ingest/mapping)
	// overlaid on the embedded MDC/LOINC → metric and unit → UCUM tables;
	// empty uses the embedded tables only.
	MappingDir string `yaml:"mapping_dir"`
	// MappingReload is how often the mapping folder is checked for changes.
	MappingReload time.Duration `yaml:"mapping_reload"`
	// DedupeWindow is how long a device sequence (or an HL7 message control
	// id) is remembered to suppress duplicates; 0 disables deduplication.
	DedupeWindow time.Duration `yaml:"dedupe_window"`
	// DedupeMaxEntries bounds the remembered keys (the oldest are evicted,
	// counted in vigil_ingest_dedupe_evictions_total).
	DedupeMaxEntries int `yaml:"dedupe_max_entries"`
	// RateLimit bounds the samples per second of one source.
	RateLimit RateLimit `yaml:"rate_limit"`
}

// Stream configures the stream processor.
type Stream struct {
	// Group is the consumer group (and transactional id prefix).
	Group string `yaml:"group"`
	// Window is the length of the window spec's tumbling window at whose
	// every end a NEWS2 score is emitted from the values as of then.
	Window time.Duration `yaml:"window"`
	// OutOfOrderness is how far behind the patient's newest event time a
	// sample may arrive and still fall in an open window.
	OutOfOrderness time.Duration `yaml:"out_of_orderness"`
	// CommitInterval is the longest a transaction stays open.
	CommitInterval time.Duration `yaml:"commit_interval"`
	// Ruleset is a NEWS2 ruleset file; empty uses the embedded one.
	Ruleset string `yaml:"ruleset"`
	// Staleness is how old an input may be and still feed a score.
	Staleness time.Duration `yaml:"staleness"`
	// InstanceID names this processor instance stably across restarts (a
	// host or pod name); the Kafka transactional id is "<group>-<instance
	// id>", so a restarted instance fences its crashed predecessor's open
	// transaction at once. Two live instances must not share it. Empty
	// means the host name.
	InstanceID string `yaml:"instance_id"`
	// MaxPollRecords bounds the input records taken into one poll (and
	// so the work between two checks of the commit deadline).
	MaxPollRecords int `yaml:"max_poll_records"`
	// CheckpointInterval is how long (processing time) a patient's state
	// may hold changes not yet written to the changelog. A restore reads
	// the input again from the oldest unwritten change: about this much
	// input per partition. 0 writes every changed state in each
	// transaction.
	CheckpointInterval time.Duration `yaml:"checkpoint_interval"`
	// StaticMembership joins the consumer group as a static member
	// (KIP-345, group instance id = the transactional id): a restarted or
	// crashed instance gets its partitions back at once, without waiting
	// for its old session to time out. The price: an instance that stops
	// for good keeps its partitions until the session timeout; switch it
	// off where instances come and go.
	StaticMembership bool `yaml:"static_membership"`
	// Windows configures the event-time windows and their features.
	Windows StreamWindows `yaml:"windows"`
}

// Sink configures the ClickHouse sink.
type Sink struct {
	// Group is the sink's consumer group.
	Group string `yaml:"group"`
	// BatchRows flushes a table's batch at this many rows.
	BatchRows int `yaml:"batch_rows"`
	// BatchInterval flushes a non-empty batch after this long.
	BatchInterval time.Duration `yaml:"batch_interval"`
	// RetryInitial and RetryMax bound the exponential backoff of retries.
	RetryInitial time.Duration `yaml:"retry_initial"`
	RetryMax     time.Duration `yaml:"retry_max"`
	// InsertTimeout bounds one insert attempt into ClickHouse; an attempt
	// that takes longer is abandoned and retried.
	InsertTimeout time.Duration `yaml:"insert_timeout"`
	// DrainTimeout bounds flushing buffered rows on shutdown; rows not
	// stored by then are not committed and are read again on restart.
	DrainTimeout time.Duration `yaml:"drain_timeout"`
}

// Simulator configures `vigil simulate` and `vigil run --simulate`.
type Simulator struct {
	// Enabled runs the simulator inside `vigil run` (--simulate sets it).
	Enabled bool `yaml:"enabled"`
	// Target is the base URL of the ingest HTTP API.
	Target string `yaml:"target"`
	// Tenant is the tenant id the simulated patients belong to.
	Tenant string `yaml:"tenant"`
	// Beds, Wearables and Deteriorating count the simulated patients.
	Beds          int `yaml:"beds"`
	Wearables     int `yaml:"wearables"`
	Deteriorating int `yaml:"deteriorating"`
	// Speed multiplies simulated time (1 = real time; below 1 slows it).
	// Simulated time never runs ahead of the wall clock, as ingest refuses
	// measurements from the future; for more load, raise beds.
	Speed float64 `yaml:"speed"`
	// Seed makes a run reproducible: the same seed plays the same patients.
	Seed int64 `yaml:"seed"`
	// Duration stops the simulator after this long (0 = until stopped).
	Duration time.Duration `yaml:"duration"`
	// PreRoll is how much simulated history is sent at start, at once, like
	// a gateway flushing its buffer (so that event-time windows close
	// early), counted back from the start and then to the start of that
	// minute; 0 sends none.
	PreRoll time.Duration `yaml:"pre_roll"`
	// RequestTimeout bounds one POST to the ingest endpoint.
	RequestTimeout time.Duration `yaml:"request_timeout"`
	// RetryMax caps the exponential backoff between retries of a request
	// that failed with a 5xx or a connection error.
	RetryMax time.Duration `yaml:"retry_max"`
	// MaxLag bounds how far behind real time the simulator catches up after
	// the endpoint was unreachable; older simulated data is dropped
	// (counted in vigil_simulator_samples_dropped_total).
	MaxLag time.Duration `yaml:"max_lag"`
	// Gateways sends devices through MLLP, MQTT and FHIR instead of HTTP.
	Gateways SimGateways `yaml:"gateways"`
}

// Status configures the periodic one-line status.
type Status struct {
	// Interval between status lines; 0 disables them.
	Interval time.Duration `yaml:"interval"`
}

// Default returns the documented defaults.
func Default() Config {
	return Config{
		DataDir: ".vigil",
		Log:     Log{Level: "info", Format: "text"},
		Kafka: Kafka{
			Embedded: EmbeddedKafka{Listen: "127.0.0.1:9092"},
			ClientID: "vigil",
			Topics: Topics{
				Samples:    "vigil.samples.v1",
				DeadLetter: "vigil.deadletter.v1",
				Features:   "vigil.features.v1",
				Scores:     "vigil.scores.v1",
				Alerts:     "vigil.alerts.v1",
				Imaging:    "vigil.imaging.v1",
				Audit:      "vigil.audit.v1",
				State:      "vigil.stream.state.v1",
				Bindings:   "vigil.bindings.v1",
			},
			Partitions:        6,
			ReplicationFactor: -1,
			ProduceTimeout:    10 * time.Second,
			MaxBufferedBytes:  64 << 20,
		},
		ClickHouse: ClickHouse{
			Database: "vigil",
			Username: "default",
			Local: LocalClick{
				Binary:       "clickhouse-server",
				ListenHost:   "127.0.0.1",
				TCPPort:      9000,
				HTTPPort:     8123,
				StartTimeout: 60 * time.Second,
				Nice:         10,
			},
			DialTimeout: 5 * time.Second,
		},
		HTTP: HTTP{
			Listen:          "127.0.0.1:8080",
			MaxBodyBytes:    8 << 20,
			ShutdownTimeout: 5 * time.Second,
		},
		Ingest: Ingest{
			MaxBatchSamples:    10000,
			MaxFutureSkew:      5 * time.Minute,
			BackfillAge:        24 * time.Hour,
			DeadLetterRawLimit: 64 << 10,
			MappingReload:      5 * time.Second,
			DedupeWindow:       10 * time.Minute,
			DedupeMaxEntries:   1 << 20,
			RateLimit:          defaultRateLimit(),
		},
		Stream: Stream{
			Group:              "vigil-stream",
			Window:             time.Minute,
			OutOfOrderness:     5 * time.Second,
			CommitInterval:     50 * time.Millisecond,
			Staleness:          time.Hour,
			MaxPollRecords:     10000,
			CheckpointInterval: 5 * time.Second,
			StaticMembership:   true,
			Windows:            defaultStreamWindows(),
		},
		Sink: Sink{
			Group:         "vigil-sink",
			BatchRows:     20000,
			BatchInterval: time.Second,
			RetryInitial:  200 * time.Millisecond,
			RetryMax:      10 * time.Second,
			InsertTimeout: 30 * time.Second,
			DrainTimeout:  30 * time.Second,
		},
		Simulator: Simulator{
			Target:         "http://127.0.0.1:8080",
			Tenant:         "demo",
			Beds:           8,
			Wearables:      4,
			Deteriorating:  2,
			Speed:          1,
			Seed:           1,
			PreRoll:        2 * time.Minute,
			RequestTimeout: 10 * time.Second,
			RetryMax:       5 * time.Second,
			MaxLag:         10 * time.Minute,
			Gateways:       defaultSimGateways(),
		},
		Status:    Status{Interval: 5 * time.Second},
		FHIR:      defaultFHIR(),
		MLLP:      defaultMLLP(),
		Waveform:  defaultWaveform(),
		MQTT:      defaultMQTT(),
		Runtime:   defaultRuntime(),
		Detectors: defaultDetectors(),
		Alerts:    defaultAlerts(),
	}
}

// Load builds the effective configuration: defaults, then the YAML file at
// path (if path is not empty), then environment variables from environ
// (VIGIL_*), then the --set style overrides in sets ("path=value"), then
// validation.
func Load(path string, environ []string, sets []string) (Config, error) {
	cfg := Default()
	if path != "" {
		doc, err := os.ReadFile(path)
		if err != nil {
			return cfg, fmt.Errorf("reading config file: %w", err)
		}
		if err := Decode(doc, &cfg); err != nil {
			return cfg, fmt.Errorf("config file %s: %w", path, err)
		}
	}
	if err := ApplyEnv(&cfg, environ); err != nil {
		return cfg, err
	}
	for _, s := range sets {
		k, v, ok := strings.Cut(s, "=")
		if !ok {
			return cfg, fmt.Errorf("override %q: want path=value", s)
		}
		if err := Set(&cfg, strings.TrimSpace(k), v); err != nil {
			return cfg, err
		}
	}
	return cfg, cfg.Validate()
}

// Decode decodes a YAML document over cfg strictly: unknown keys fail.
func Decode(doc []byte, cfg *Config) error {
	dec := yaml.NewDecoder(bytes.NewReader(doc))
	dec.KnownFields(true)
	// An empty document (io.EOF) means "all defaults".
	if err := dec.Decode(cfg); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("decoding: %w", err)
	}
	return nil
}

// Marshal renders cfg as YAML (for --print-config).
func Marshal(cfg Config) ([]byte, error) {
	var buf bytes.Buffer
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	if err := enc.Encode(cfg); err != nil {
		return nil, fmt.Errorf("encoding config: %w", err)
	}
	return buf.Bytes(), nil
}

// Paths lists every settable leaf path, sorted (for documentation).
func Paths() []string {
	var out []string
	walk(reflect.ValueOf(&Config{}).Elem(), "", func(p string, _ reflect.Value) { out = append(out, p) })
	sort.Strings(out)
	return out
}

// EnvName is the environment variable that overrides path.
func EnvName(path string) string {
	return "VIGIL_" + strings.ToUpper(strings.ReplaceAll(path, ".", "_"))
}

// ApplyEnv applies VIGIL_* variables from environ onto cfg.
func ApplyEnv(cfg *Config, environ []string) error {
	env := map[string]string{}
	for _, kv := range environ {
		if k, v, ok := strings.Cut(kv, "="); ok && strings.HasPrefix(k, "VIGIL_") {
			env[k] = v
		}
	}
	var firstErr error
	walk(reflect.ValueOf(cfg).Elem(), "", func(p string, f reflect.Value) {
		if v, ok := env[EnvName(p)]; ok && firstErr == nil {
			if err := setValue(f, v); err != nil {
				firstErr = fmt.Errorf("environment %s: %w", EnvName(p), err)
			}
		}
	})
	return firstErr
}

// Set sets the field at a YAML path (e.g. "kafka.brokers") from text.
// Lists take comma-separated values.
func Set(cfg *Config, path, value string) error {
	var found bool
	var err error
	walk(reflect.ValueOf(cfg).Elem(), "", func(p string, f reflect.Value) {
		if p == path {
			found = true
			if e := setValue(f, value); e != nil {
				err = fmt.Errorf("setting %s: %w", path, e)
			}
		}
	})
	if !found {
		return fmt.Errorf("setting %s: no such setting (see `vigil run --print-config`)", path)
	}
	return err
}

func walk(v reflect.Value, prefix string, fn func(string, reflect.Value)) {
	t := v.Type()
	for i := 0; i < t.NumField(); i++ {
		tag := strings.Split(t.Field(i).Tag.Get("yaml"), ",")[0]
		if tag == "" || tag == "-" {
			continue
		}
		p := tag
		if prefix != "" {
			p = prefix + "." + tag
		}
		f := v.Field(i)
		if f.Kind() == reflect.Struct {
			walk(f, p, fn)
			continue
		}
		fn(p, f)
	}
}

func setValue(f reflect.Value, text string) error {
	if f.Kind() == reflect.Slice && f.Type().Elem().Kind() == reflect.String {
		var items []string
		for _, s := range strings.Split(text, ",") {
			if s = strings.TrimSpace(s); s != "" {
				items = append(items, s)
			}
		}
		f.Set(reflect.ValueOf(items))
		return nil
	}
	if f.Kind() == reflect.String {
		f.SetString(text)
		return nil
	}
	ptr := reflect.New(f.Type())
	if err := yaml.Unmarshal([]byte(text), ptr.Interface()); err != nil {
		return fmt.Errorf("value %q is not a valid %s", text, f.Type())
	}
	f.Set(ptr.Elem())
	return nil
}

// Validate checks every section and returns all problems found, each naming
// its field.
func (c *Config) Validate() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", field, fmt.Sprintf(format, args...)))
	}
	if c.DataDir == "" {
		bad("data_dir", "must not be empty")
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		bad("log.level", "%q is not one of debug, info, warn, error", c.Log.Level)
	}
	switch c.Log.Format {
	case "text", "json":
	default:
		bad("log.format", "%q is not one of text, json", c.Log.Format)
	}
	for i, b := range c.Kafka.Brokers {
		if _, _, err := net.SplitHostPort(b); err != nil {
			bad(fmt.Sprintf("kafka.brokers[%d]", i), "%q is not host:port", b)
		}
	}
	if len(c.Kafka.Brokers) == 0 {
		if _, _, err := net.SplitHostPort(c.Kafka.Embedded.Listen); err != nil {
			bad("kafka.embedded.listen", "%q is not host:port", c.Kafka.Embedded.Listen)
		}
	}
	topics := map[string]string{}
	tv := reflect.ValueOf(c.Kafka.Topics)
	for i := 0; i < tv.NumField(); i++ {
		name := tv.Field(i).String()
		field := "kafka.topics." + strings.Split(tv.Type().Field(i).Tag.Get("yaml"), ",")[0]
		if name == "" {
			bad(field, "must not be empty")
		} else if other, dup := topics[name]; dup {
			bad(field, "topic %q is also used by %s", name, other)
		}
		topics[name] = field
	}
	if c.Kafka.Partitions < 1 {
		bad("kafka.partitions", "must be at least 1, got %d", c.Kafka.Partitions)
	}
	if c.Kafka.ProduceTimeout <= 0 {
		bad("kafka.produce_timeout", "must be positive")
	}
	if c.Kafka.MaxBufferedBytes < 1<<20 {
		bad("kafka.max_buffered_bytes", "must be at least 1 MiB, got %d", c.Kafka.MaxBufferedBytes)
	}
	if c.ClickHouse.Addr != "" {
		if _, _, err := net.SplitHostPort(c.ClickHouse.Addr); err != nil {
			bad("clickhouse.addr", "%q is not host:port", c.ClickHouse.Addr)
		}
	} else {
		if c.ClickHouse.Local.TCPPort <= 0 || c.ClickHouse.Local.TCPPort > 65535 {
			bad("clickhouse.local.tcp_port", "%d is not a port", c.ClickHouse.Local.TCPPort)
		}
		if c.ClickHouse.Local.HTTPPort <= 0 || c.ClickHouse.Local.HTTPPort > 65535 {
			bad("clickhouse.local.http_port", "%d is not a port", c.ClickHouse.Local.HTTPPort)
		}
	}
	if c.ClickHouse.Database == "" || strings.ContainsAny(c.ClickHouse.Database, "`\"' .;") {
		bad("clickhouse.database", "%q is not a plain database name", c.ClickHouse.Database)
	}
	if _, _, err := net.SplitHostPort(c.HTTP.Listen); err != nil {
		bad("http.listen", "%q is not host:port", c.HTTP.Listen)
	}
	if c.HTTP.MaxBodyBytes < 1024 {
		bad("http.max_body_bytes", "must be at least 1024, got %d", c.HTTP.MaxBodyBytes)
	}
	if c.Ingest.MaxBatchSamples < 1 {
		bad("ingest.max_batch_samples", "must be at least 1")
	}
	if c.Ingest.MaxFutureSkew < 0 {
		bad("ingest.max_future_skew", "must not be negative")
	}
	if c.Ingest.DeadLetterRawLimit < 0 {
		bad("ingest.deadletter_raw_limit", "must not be negative")
	}
	if c.Ingest.BackfillAge < 0 {
		bad("ingest.backfill_age", "must not be negative")
	}
	if c.Ingest.MaxAge < 0 {
		bad("ingest.max_age", "must not be negative")
	}
	c.Ingest.validateExtra(bad)
	if c.Stream.Group == "" {
		bad("stream.group", "must not be empty")
	}
	if c.Stream.Window < time.Second || c.Stream.Window%time.Second != 0 {
		bad("stream.window", "must be a whole number of seconds, at least 1s, got %s", c.Stream.Window)
	}
	if c.Stream.OutOfOrderness < 0 {
		bad("stream.out_of_orderness", "must not be negative")
	}
	c.Stream.Windows.validate(bad)
	if c.Stream.CommitInterval <= 0 {
		bad("stream.commit_interval", "must be positive")
	}
	if c.Stream.Staleness <= 0 {
		bad("stream.staleness", "must be positive")
	}
	if strings.ContainsAny(c.Stream.InstanceID, " \t\n/") {
		bad("stream.instance_id", "%q must not contain spaces or '/'", c.Stream.InstanceID)
	}
	if c.Stream.MaxPollRecords < 1 {
		bad("stream.max_poll_records", "must be at least 1, got %d", c.Stream.MaxPollRecords)
	}
	if c.Stream.CheckpointInterval < 0 {
		bad("stream.checkpoint_interval", "must not be negative (0 writes every changed state in each transaction), got %s", c.Stream.CheckpointInterval)
	}
	if c.ClickHouse.Local.Nice < 0 || c.ClickHouse.Local.Nice > 19 {
		bad("clickhouse.local.nice", "must be 0-19, got %d", c.ClickHouse.Local.Nice)
	}
	if c.Sink.Group == "" || c.Sink.Group == c.Stream.Group {
		bad("sink.group", "must be set and differ from stream.group")
	}
	if c.Sink.BatchRows < 1 {
		bad("sink.batch_rows", "must be at least 1")
	}
	if c.Sink.BatchInterval <= 0 {
		bad("sink.batch_interval", "must be positive")
	}
	if c.Sink.RetryInitial <= 0 || c.Sink.RetryMax < c.Sink.RetryInitial {
		bad("sink.retry_initial", "must be positive and not above sink.retry_max")
	}
	if c.Sink.InsertTimeout < time.Second {
		bad("sink.insert_timeout", "must be at least 1s, got %s", c.Sink.InsertTimeout)
	}
	if c.Sink.DrainTimeout <= 0 {
		bad("sink.drain_timeout", "must be positive")
	}
	if c.Simulator.Beds < 0 || c.Simulator.Wearables < 0 || c.Simulator.Deteriorating < 0 {
		bad("simulator", "beds, wearables and deteriorating must not be negative")
	}
	if c.Simulator.Deteriorating > c.Simulator.Beds+c.Simulator.Wearables {
		bad("simulator.deteriorating", "%d is more than beds + wearables", c.Simulator.Deteriorating)
	}
	if c.Simulator.Speed <= 0 {
		bad("simulator.speed", "must be positive")
	}
	if u, err := url.Parse(c.Simulator.Target); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		bad("simulator.target", "%q is not an http(s) URL", c.Simulator.Target)
	}
	if c.Simulator.Tenant == "" || strings.ContainsAny(c.Simulator.Tenant, "/ \t\n") {
		bad("simulator.tenant", "%q must be set, without '/' or spaces", c.Simulator.Tenant)
	}
	if c.Simulator.Duration < 0 {
		bad("simulator.duration", "must not be negative")
	}
	if c.Simulator.PreRoll < 0 {
		bad("simulator.pre_roll", "must not be negative")
	}
	if c.Simulator.RequestTimeout <= 0 {
		bad("simulator.request_timeout", "must be positive")
	}
	if c.Simulator.RetryMax <= 0 {
		bad("simulator.retry_max", "must be positive")
	}
	if c.Simulator.MaxLag < time.Second {
		bad("simulator.max_lag", "must be at least 1s, got %s", c.Simulator.MaxLag)
	}
	c.Simulator.Gateways.validate(bad)
	c.FHIR.validate(bad)
	c.MLLP.validate(bad)
	c.Waveform.validate(bad)
	c.MQTT.validate(bad)
	c.Runtime.validate(bad)
	c.Detectors.validate(bad)
	c.Alerts.validate(bad)
	if c.Status.Interval < 0 {
		bad("status.interval", "must not be negative")
	}
	return errors.Join(errs...)
}

// Path resolves p against the data dir when it is relative.
func (c *Config) Path(p ...string) string {
	return filepath.Join(append([]string{c.DataDir}, p...)...)
}
