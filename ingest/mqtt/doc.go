// Package mqtt is the MQTT ingest path for wearables: an embedded MQTT
// 3.1.1/5 broker (github.com/mochi-mqtt/server/v2) that `vigil run` and
// `vigil ingest` start on mqtt.embedded.listen (127.0.0.1:1883), and/or a
// subscription to an external broker (github.com/eclipse/paho.mqtt.golang)
// when mqtt.external.brokers is set.
//
// # Topic and payload
//
// A wearable publishes to
//
//	vigil/<tenant>/<device>/samples
//
// with QoS 0 or 1 (QoS 2 is downgraded to 1). The payload is the JSON body
// of POST /v1/samples (see package httpjson for the schema, the same
// validation and the same dead letters), with tenant and device defaulting
// to the topic's:
//
//	{"patient": "p-001", "samples": [
//	  {"metric": "heart_rate", "value": 72, "time_ms": 1795428000250, "seq": 17},
//	  {"metric": "spo2", "value": 97, "unit": "%", "time_ms": 1795428000250, "seq": 18}]}
//
// A payload (or sample) naming another tenant than the topic is refused
// (reason invalid_id, field tenant): the topic is what the broker's ACL
// authorises. A sample may name another device (a gateway relaying
// several). Samples carry source "mqtt". No compact payload is defined: the
// JSON above is about 60 bytes per sample, which a wearable batching a few
// seconds of readings per message sends comfortably, and one format means
// one decoder (fuzzed with the HTTP path's) and one set of refusals.
//
// Topics under vigil/ that are not of that form are refused (dead letter
// with reason unsupported_message, field topic). Other topics are plain MQTT
// traffic that the broker relays to subscribers without ingesting.
//
// # Acknowledgement
//
// A QoS 1 PUBLISH is acknowledged (PUBACK) only after Kafka acknowledged its
// samples and dead letters. The hook decodes and validates each ingest
// PUBLISH on the client's read goroutine (a device over its rate limit
// waits there, on its own connection) and queues it on the client's lane: a
// few goroutines (lanes.go), each serving many clients through a bounded
// queue (when it is full the read loops wait, which stops reading their
// sockets: backpressure). A lane takes what is queued (up to maxBatch
// messages of any of its clients), writes their samples to Kafka in one call
// without waiting for the producer's linger (httpjson.Handler.Commit,
// publish.Publisher.PublishNow), then writes each client's PUBACKs in one
// write. So devices that each wait for their PUBACK share a Kafka round
// trip with every device that published meanwhile, a device may pipeline
// (as MQTT's receive maximum allows), and since a client keeps its lane and
// a lane publishes one batch at a time, one client's samples keep their
// order on their partition and its PUBACKs come in order. Then:
//
//   - all samples accepted: PUBACK (reason 0x00);
//   - some or all refused (invalid JSON, out of range, unknown metric, ...):
//     the refused ones are on vigil.deadletter.v1 with the reason, the valid
//     ones in Kafka; MQTT 5 gets PUBACK 0x99 (payload format invalid) with a
//     reason string naming the first problem (0x90 for a bad topic, 0x95 for
//     a payload over mqtt.max_payload_bytes); MQTT 3.1.1 gets a plain PUBACK
//     (the message can never succeed; it is dead-lettered);
//   - Kafka did not acknowledge (unavailable, kafka.produce_timeout): no
//     PUBACK for it nor for what the client sent after it; the connection
//     is closed (MQTT 5: DISCONNECT 0x89 server busy, MQTT 3.1.1 has no
//     server DISCONNECT) so the client, reconnecting with its session,
//     sends them again. MQTT 5 gets PUBACK 0x80 when Kafka refused it
//     permanently (it would never succeed).
//
// A QoS 0 message is ingested the same way but never acknowledged; it is
// lost if Kafka is down (logged). Ingest messages are not relayed to MQTT
// subscribers: they are on vigil.samples.v1, and relaying would show every
// patient's data to any client allowed to subscribe. On stop, new QoS 1
// publishes are refused unacknowledged (the client re-sends them after the
// restart), publishes in flight finish and are acknowledged
// (mqtt.embedded.drain_timeout), then the connections close. A client
// re-sending a message whose PUBACK it missed produces the same samples
// again: within ingest.dedupe_window the ingest drops the repeated device
// sequences, and the ClickHouse samples table is a ReplacingMergeTree on
// the sample's identity, so they count once through FINAL (samples_final).
//
// The rate limit of ingest.rate_limit applies per tenant and device; over
// it, a device is slowed down (its PUBACKs wait), not refused. Samples
// without a patient take the patient bound to their device (WithResolver),
// as over HTTP.
//
// # Authentication
//
// mqtt.embedded.auth.anonymous admits clients without a username from
// loopback only (default), from anywhere, or not at all; named users and
// their topic ACLs come from a mochi-mqtt auth ledger file
// (mqtt.embedded.auth.ledger_file), e.g. restricting a hospital's devices to
// vigil/st-mary/#. TLS is enabled with mqtt.embedded.tls.
//
// # External broker
//
// With mqtt.external.brokers set, Vigil subscribes with QoS 1 to
// mqtt.external.topic (default vigil/+/+/samples; levels 2 and 3 are tenant
// and device), as $share/<group>/<topic> when mqtt.external.shared_group is
// set, in a persistent session (clean session off, stable
// mqtt.external.client_id) so that messages published while Vigil is down
// are delivered when it is back. Each message is acknowledged only after
// Kafka has it (automatic acknowledgement is off); a Kafka failure is
// retried with backoff, and on stop unacknowledged messages stay with the
// broker.
//
// # Metrics
//
// vigil_mqtt_messages_received_total{mode,qos},
// vigil_mqtt_messages_total{mode,qos,result},
// vigil_mqtt_messages_not_acked_total{mode,why} and the PUBACK latency
// histogram vigil_mqtt_puback_seconds{mode}.
package mqtt
