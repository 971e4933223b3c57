// Package broker runs Vigil's embedded Kafka-protocol broker: franz-go's kfake
// with its data on disk, so that a single box (or a laptop) needs no Kafka
// install. It is the local default, not a cluster: kfake serves every request
// on one goroutine. Production sites configure kafka.brokers instead and the
// same code talks to their cluster.
package broker

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strconv"
	"sync"

	"github.com/twmb/franz-go/pkg/kfake"
)

// Broker is a running embedded broker. Close is idempotent and safe to call
// concurrently.
type Broker struct {
	cluster *kfake.Cluster
	addr    string
	once    sync.Once
}

// Options configure Start.
type Options struct {
	// Listen is host:port; port 0 picks a free port.
	Listen string
	// DataDir holds the broker's log segments; it survives restarts.
	DataDir string
	// Partitions is the default partition count of auto-created topics.
	Partitions int
	// SyncWrites fsyncs every batch.
	SyncWrites bool
	Log        *slog.Logger
}

// Start starts the broker and returns once it listens.
func Start(opts Options) (*Broker, error) {
	host, portText, err := net.SplitHostPort(opts.Listen)
	if err != nil {
		return nil, fmt.Errorf("embedded broker listen address %q: %w", opts.Listen, err)
	}
	port, err := strconv.Atoi(portText)
	if err != nil {
		return nil, fmt.Errorf("embedded broker port %q: %w", portText, err)
	}
	if err := os.MkdirAll(opts.DataDir, 0o750); err != nil {
		return nil, fmt.Errorf("creating broker data dir: %w", err)
	}
	kopts := []kfake.Opt{
		kfake.NumBrokers(1),
		kfake.Ports(port),
		kfake.ListenFn(func(network, _ string) (net.Listener, error) {
			return net.Listen(network, net.JoinHostPort(host, portText))
		}),
		kfake.DataDir(opts.DataDir),
		kfake.ClusterID("vigil-embedded"),
		kfake.GroupMinSessionTimeout(0),
		kfake.BrokerConfigs(map[string]string{
			// Compact the stream changelog every minute rather than hourly.
			"log.cleaner.backoff.ms": "60000",
			"message.max.bytes":      strconv.Itoa(8 << 20),
		}),
	}
	if opts.Partitions > 0 {
		kopts = append(kopts, kfake.DefaultNumPartitions(opts.Partitions))
	}
	if opts.SyncWrites {
		kopts = append(kopts, kfake.SyncWrites())
	}
	c, err := kfake.NewCluster(kopts...)
	if err != nil {
		return nil, fmt.Errorf("starting embedded broker on %s: %w", opts.Listen, err)
	}
	addrs := c.ListenAddrs()
	b := &Broker{cluster: c, addr: addrs[0]}
	if opts.Log != nil {
		opts.Log.Info("embedded kafka broker started", "addr", b.addr, "data_dir", opts.DataDir)
	}
	return b, nil
}

// Addr is the broker's host:port.
func (b *Broker) Addr() string { return b.addr }

// Close stops the broker, flushing its data to disk. It blocks until the
// broker has stopped; ctx is accepted for symmetry with other stages.
func (b *Broker) Close(_ context.Context) error {
	b.once.Do(b.cluster.Close)
	return nil
}
