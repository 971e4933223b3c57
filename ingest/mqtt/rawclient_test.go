package mqtt

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

// rawClient is a minimal MQTT client over a real TCP connection, encoding
// and decoding with mochi's packets package, so that a test sees exactly
// which packets the broker sends (paho hides PUBACKs behind tokens, which
// it completes on reconnect even when no PUBACK came).
type rawClient struct {
	t    testing.TB
	conn net.Conn
	rd   *bufio.Reader
	ver  byte
}

func dialRaw(t testing.TB, addr, id string, ver byte, clean bool) *rawClient {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	c := &rawClient{t: t, conn: conn, rd: bufio.NewReader(conn), ver: ver}
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: ver,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: clean, ClientIdentifier: id, Keepalive: 60}}
	if ver == 5 && !clean {
		pk.Properties.SessionExpiryInterval, pk.Properties.SessionExpiryIntervalFlag = 3600, true
	}
	c.write(&pk, pk.ConnectEncode)
	ack, err := c.read(5 * time.Second)
	if err != nil || ack.FixedHeader.Type != packets.Connack || ack.ReasonCode != 0 {
		t.Fatalf("connecting: %v %+v", err, ack)
	}
	return c
}

func (c *rawClient) write(pk *packets.Packet, enc func(*bytes.Buffer) error) {
	c.t.Helper()
	var buf bytes.Buffer
	if err := enc(&buf); err != nil {
		c.t.Fatal(err)
	}
	if _, err := c.conn.Write(buf.Bytes()); err != nil {
		c.t.Fatalf("writing %v: %v", pk.FixedHeader.Type, err)
	}
}

func (c *rawClient) publish(topic string, id uint16, dup bool, payload []byte) {
	c.t.Helper()
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1, Dup: dup}, ProtocolVersion: c.ver,
		TopicName: topic, PacketID: id, Payload: payload}
	c.write(&pk, pk.PublishEncode)
}

// read returns the next packet from the broker, or an error (io.EOF when
// the broker closed the connection, a timeout after limit).
func (c *rawClient) read(limit time.Duration) (packets.Packet, error) {
	var pk packets.Packet
	_ = c.conn.SetReadDeadline(time.Now().Add(limit))
	hb, err := c.rd.ReadByte()
	if err != nil {
		return pk, err
	}
	if err := pk.FixedHeader.Decode(hb); err != nil {
		return pk, err
	}
	n, mul := 0, 1
	for {
		b, err := c.rd.ReadByte()
		if err != nil {
			return pk, err
		}
		n += int(b&127) * mul
		if b&128 == 0 {
			break
		}
		mul *= 128
	}
	pk.FixedHeader.Remaining = n
	body := make([]byte, n)
	if _, err := io.ReadFull(c.rd, body); err != nil {
		return pk, err
	}
	pk.ProtocolVersion = c.ver
	switch pk.FixedHeader.Type {
	case packets.Connack:
		err = pk.ConnackDecode(body)
	case packets.Puback:
		err = pk.PubackDecode(body)
	case packets.Disconnect:
		err = pk.DisconnectDecode(body)
	case packets.Publish:
		err = pk.PublishDecode(body)
	default:
		err = fmt.Errorf("unexpected packet type %d", pk.FixedHeader.Type)
	}
	return pk, err
}
