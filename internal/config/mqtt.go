package config

import (
	"net"
	"net/url"
	"strings"
	"time"
)

// MQTT configures MQTT ingest (see ingest/mqtt): wearables publish the JSON
// of POST /v1/samples to vigil/<tenant>/<device>/samples, either on the
// embedded broker or on an external broker Vigil subscribes to.
type MQTT struct {
	// Embedded is the MQTT broker `vigil run` and `vigil ingest` start.
	Embedded MQTTEmbedded `yaml:"embedded"`
	// External subscribes to another broker instead (or as well).
	External MQTTExternal `yaml:"external"`
	// MaxPayloadBytes bounds one PUBLISH payload; larger ones are refused
	// (dead letter with reason body_too_large).
	MaxPayloadBytes int `yaml:"max_payload_bytes"`
}

// MQTTEmbedded configures the embedded broker (mochi-mqtt).
type MQTTEmbedded struct {
	// Enabled starts the embedded broker.
	Enabled bool `yaml:"enabled"`
	// Listen is the broker's host:port (port 0 picks a free one).
	Listen string `yaml:"listen"`
	// TLS, when cert_file and key_file are set, makes the listener TLS only.
	TLS MQTTTLS `yaml:"tls"`
	// Auth decides who may connect and publish.
	Auth MQTTAuth `yaml:"auth"`
	// DrainTimeout bounds how long a stop waits for publishes in flight to
	// Kafka to be acknowledged (PUBACK) before it closes the connections.
	DrainTimeout time.Duration `yaml:"drain_timeout"`
}

// MQTTTLS configures TLS of the embedded broker's listener.
type MQTTTLS struct {
	// CertFile and KeyFile are the PEM server certificate and key.
	CertFile string `yaml:"cert_file"`
	KeyFile  string `yaml:"key_file"`
	// ClientCAFile, when set, requires client certificates signed by it.
	ClientCAFile string `yaml:"client_ca_file"`
}

// MQTTAuth configures authentication of the embedded broker.
type MQTTAuth struct {
	// Anonymous says who may connect without a username: "loopback"
	// (clients on 127.0.0.1/::1 only), "allow" (anyone) or "deny".
	Anonymous string `yaml:"anonymous"`
	// LedgerFile is a YAML or JSON file in mochi-mqtt's auth ledger format
	// (auth: [{username, password, allow}], acl: [{username, filters:
	// {"vigil/st-mary/#": 3}}]) listing the users and the topics each may
	// publish to; empty means no users.
	LedgerFile string `yaml:"ledger_file"`
}

// MQTTExternal configures subscribing to an external MQTT broker (paho).
type MQTTExternal struct {
	// Brokers are broker URLs (tcp://host:1883, ssl://host:8883,
	// ws://host/mqtt); empty means no external subscription.
	Brokers []string `yaml:"brokers"`
	// ClientID is the stable client id of the persistent session (clean
	// session off), so the broker keeps messages that arrive while Vigil is
	// down. Two Vigil instances must not share it; with SharedGroup, give
	// each instance its own.
	ClientID string `yaml:"client_id"`
	// Username and Password authenticate to the broker.
	Username string `yaml:"username"`
	Password string `yaml:"password"`
	// SharedGroup, when set, subscribes to $share/<group>/<topic> so that
	// several Vigil instances share the messages (MQTT 5 shared
	// subscriptions, also supported by most 3.1.1 brokers).
	SharedGroup string `yaml:"shared_group"`
	// Topic is the topic filter; its second and third levels are tenant and
	// device.
	Topic string `yaml:"topic"`
	// CAFile is a PEM CA bundle to verify ssl:// brokers (empty: system
	// roots).
	CAFile string `yaml:"ca_file"`
	// ConnectTimeout bounds one connection attempt; Vigil keeps retrying.
	ConnectTimeout time.Duration `yaml:"connect_timeout"`
}

func defaultMQTT() MQTT {
	return MQTT{
		Embedded: MQTTEmbedded{
			Enabled:      true,
			Listen:       "127.0.0.1:1883",
			Auth:         MQTTAuth{Anonymous: "loopback"},
			DrainTimeout: 10 * time.Second,
		},
		External: MQTTExternal{
			ClientID:       "vigil-ingest",
			Topic:          "vigil/+/+/samples",
			ConnectTimeout: 10 * time.Second,
		},
		MaxPayloadBytes: 1 << 20,
	}
}

func (m MQTT) validate(bad func(field, format string, args ...any)) {
	e := m.Embedded
	if e.Enabled {
		if _, _, err := net.SplitHostPort(e.Listen); err != nil {
			bad("mqtt.embedded.listen", "%q is not host:port", e.Listen)
		}
	}
	if (e.TLS.CertFile == "") != (e.TLS.KeyFile == "") {
		bad("mqtt.embedded.tls", "set both cert_file and key_file, or neither")
	}
	if e.TLS.ClientCAFile != "" && e.TLS.CertFile == "" {
		bad("mqtt.embedded.tls.client_ca_file", "needs cert_file and key_file")
	}
	switch e.Auth.Anonymous {
	case "loopback", "allow", "deny":
	default:
		bad("mqtt.embedded.auth.anonymous", "%q is not loopback, allow or deny", e.Auth.Anonymous)
	}
	if e.DrainTimeout < 0 {
		bad("mqtt.embedded.drain_timeout", "must not be negative")
	}
	if m.MaxPayloadBytes < 64 || m.MaxPayloadBytes > 256<<20 {
		bad("mqtt.max_payload_bytes", "must be between 64 and 268435455, got %d", m.MaxPayloadBytes)
	}
	x := m.External
	for _, b := range x.Brokers {
		u, err := url.Parse(b)
		if err != nil || u.Host == "" {
			bad("mqtt.external.brokers", "%q is not a broker URL such as tcp://host:1883", b)
			continue
		}
		switch u.Scheme {
		case "tcp", "mqtt", "ssl", "tls", "mqtts", "ws", "wss":
		default:
			bad("mqtt.external.brokers", "%q: scheme %q is not tcp, ssl, ws or wss", b, u.Scheme)
		}
	}
	if len(x.Brokers) > 0 {
		if x.ClientID == "" || len(x.ClientID) > 128 {
			bad("mqtt.external.client_id", "must be set (at most 128 bytes) for a persistent session")
		}
		parts := strings.Split(x.Topic, "/")
		if len(parts) != 4 || strings.ContainsAny(x.Topic, "#") || strings.HasPrefix(x.Topic, "$") {
			bad("mqtt.external.topic", "%q must be a four-level filter like vigil/+/+/samples (tenant and device at levels 2 and 3)", x.Topic)
		}
		if strings.ContainsAny(x.SharedGroup, "/+#") {
			bad("mqtt.external.shared_group", "%q must not contain '/', '+' or '#'", x.SharedGroup)
		}
		if x.ConnectTimeout <= 0 {
			bad("mqtt.external.connect_timeout", "must be positive")
		}
	}
}
