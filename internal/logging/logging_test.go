package logging

import (
	"bytes"
	"strings"
	"testing"
)

func TestNew(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		format, level, wantErr, wantOut string
	}{
		{"json", "info", "", `"msg":"hello"`},
		{"text", "debug", "", "msg=hello"},
		{"yaml", "info", `--log-format "yaml"`, ""},
		{"json", "loud", `--log-level "loud"`, ""},
	} {
		var buf bytes.Buffer
		log, err := New(&buf, tc.format, tc.level)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("New(%q, %q) error = %v, want one naming %s", tc.format, tc.level, err, tc.wantErr)
			}
			continue
		}
		if err != nil {
			t.Fatalf("New(%q, %q): %v", tc.format, tc.level, err)
		}
		log.Info("hello")
		if !strings.Contains(buf.String(), tc.wantOut) {
			t.Errorf("New(%q, %q) wrote %q, want %s", tc.format, tc.level, buf.String(), tc.wantOut)
		}
	}
}
