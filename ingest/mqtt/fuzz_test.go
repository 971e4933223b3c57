package mqtt

import (
	"strings"
	"testing"
)

// FuzzParseTopic: a topic from the network either is refused or splits into
// a non-empty tenant and device that rebuild it exactly.
func FuzzParseTopic(f *testing.F) {
	for _, s := range []string{"vigil/st-mary/watch-7/samples", "vigil/st-mary/samples", "vigil//x/samples",
		"vigil/a/b/samples/extra", "other/a/b/samples", "vigil/a/b/c", "", "/", "vigil/a/b/samples\x00"} {
		f.Add(s, "vigil")
		f.Add(s, "")
	}
	f.Fuzz(func(t *testing.T, topic, root string) {
		tenant, device, ok := parseTopic(topic, root)
		if !ok {
			return
		}
		if tenant == "" || device == "" || strings.Contains(tenant, "/") || strings.Contains(device, "/") {
			t.Fatalf("%q → tenant %q device %q", topic, tenant, device)
		}
		first, _, _ := strings.Cut(topic, "/")
		if root != "" && first != root {
			t.Fatalf("%q accepted under root %q", topic, root)
		}
		if first+"/"+tenant+"/"+device+"/samples" != topic {
			t.Fatalf("%q does not rebuild from tenant %q device %q", topic, tenant, device)
		}
	})
}
