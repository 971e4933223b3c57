package config

import (
	"net"
	"strings"
	"time"
)

// MLLP configures the HL7 v2 listener (MLLP over TCP, optionally TLS) that
// takes ORU^R01 (IHE PCD-01) observations and ADT admissions, transfers and
// discharges.
type MLLP struct {
	// Enabled starts the MLLP listener in `vigil run` and `vigil ingest`.
	Enabled bool `yaml:"enabled"`
	// Listen is the listener's host:port (2575 is the registered HL7 port;
	// port 0 picks a free one).
	Listen string `yaml:"listen"`
	// TLSCert and TLSKey are PEM files; when both are set the listener
	// speaks TLS (MLLP over TLS), else plain TCP.
	TLSCert string `yaml:"tls_cert"`
	TLSKey  string `yaml:"tls_key"`
	// MaxMessageBytes bounds one framed message; a larger one is refused
	// (AR) without being buffered.
	MaxMessageBytes int `yaml:"max_message_bytes"`
	// MaxConnections bounds concurrent connections (each processes its
	// messages one after another); further senders wait in the accept
	// backlog.
	MaxConnections int `yaml:"max_connections"`
	// ReadTimeout closes a connection that sends nothing for this long.
	ReadTimeout time.Duration `yaml:"read_timeout"`
	// WriteTimeout bounds writing one ACK.
	WriteTimeout time.Duration `yaml:"write_timeout"`
	// Tenant is the tenant of messages whose sending facility (MSH-4) is
	// not in Tenants.
	Tenant string `yaml:"tenant"`
	// Tenants maps a sending facility (MSH-4 namespace id) to its tenant.
	Tenants map[string]string `yaml:"tenants"`
	// DedupeWindow is how long a message control id (MSH-10, unique per
	// tenant) is remembered: a message sent again within it is ACKed AA
	// again but not republished, also across a restart (the ids are
	// re-read from the samples topic at start). 0 disables.
	DedupeWindow time.Duration `yaml:"dedupe_window"`
	// DedupeSize bounds the remembered control ids (oldest forgotten first,
	// counted in vigil_ingest_dedupe_evictions_total{filter="mllp_messages"}).
	DedupeSize int `yaml:"dedupe_size"`
	// RateLimit is the messages per second one source (sending facility,
	// else remote host) may send before its ACKs are slowed (counted in
	// vigil_ingest_rate_limited_total{source="mllp"}; a source held back
	// longer than half of ack_timeout gets AE); 0 disables.
	RateLimit float64 `yaml:"rate_limit"`
	// RateBurst is how many messages a source may send at once above
	// RateLimit.
	RateBurst int `yaml:"rate_burst"`
	// AckTimeout bounds processing one message (Kafka acknowledgement
	// included); past it the sender gets AE and should resend.
	AckTimeout time.Duration `yaml:"ack_timeout"`
}

func defaultMLLP() MLLP {
	return MLLP{
		Enabled:         true,
		Listen:          "127.0.0.1:2575",
		MaxMessageBytes: 1 << 20,
		MaxConnections:  512,
		ReadTimeout:     10 * time.Minute,
		WriteTimeout:    10 * time.Second,
		Tenant:          "default",
		DedupeWindow:    10 * time.Minute,
		DedupeSize:      100_000,
		RateBurst:       100,
		AckTimeout:      30 * time.Second,
	}
}

func (c MLLP) validate(bad func(field, format string, args ...any)) {
	if !c.Enabled {
		return
	}
	if _, _, err := net.SplitHostPort(c.Listen); err != nil {
		bad("mllp.listen", "%q is not host:port", c.Listen)
	}
	if (c.TLSCert == "") != (c.TLSKey == "") {
		bad("mllp.tls_cert", "tls_cert and tls_key must be set together")
	}
	if c.MaxMessageBytes < 1024 || c.MaxMessageBytes > 64<<20 {
		bad("mllp.max_message_bytes", "must be between 1024 and 64 MiB, got %d", c.MaxMessageBytes)
	}
	if c.MaxConnections < 1 {
		bad("mllp.max_connections", "must be at least 1, got %d", c.MaxConnections)
	}
	if c.ReadTimeout < time.Second {
		bad("mllp.read_timeout", "must be at least 1s, got %s", c.ReadTimeout)
	}
	if c.WriteTimeout <= 0 {
		bad("mllp.write_timeout", "must be positive")
	}
	if c.AckTimeout < time.Second {
		bad("mllp.ack_timeout", "must be at least 1s, got %s", c.AckTimeout)
	}
	checkTenant := func(field, t string) {
		if t == "" || strings.ContainsAny(t, "/ \t\r\n") {
			bad(field, "%q must be set, without '/' or spaces", t)
		}
	}
	checkTenant("mllp.tenant", c.Tenant)
	for fac, t := range c.Tenants {
		checkTenant("mllp.tenants."+fac, t)
	}
	if c.DedupeWindow < 0 {
		bad("mllp.dedupe_window", "must not be negative")
	}
	if c.DedupeWindow > 0 && c.DedupeSize < 1 {
		bad("mllp.dedupe_size", "must be at least 1 when dedupe_window is set, got %d", c.DedupeSize)
	}
	if c.RateLimit < 0 {
		bad("mllp.rate_limit", "must not be negative")
	}
	if c.RateLimit > 0 && c.RateBurst < 1 {
		bad("mllp.rate_burst", "must be at least 1 when rate_limit is set, got %d", c.RateBurst)
	}
}
