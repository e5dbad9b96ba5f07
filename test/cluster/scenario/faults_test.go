package scenario

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

func TestResumedAfter(t *testing.T) {
	line := func(ms int64, kind string) string {
		switch kind {
		case "concealed":
			return fmt.Sprintf(`{"t":%d,"status":403,"body":%q}`, ms, ConcealedBody)
		case "refused":
			return fmt.Sprintf(`{"t":%d,"status":0,"body":"","err":"connect: connection refused"}`, ms)
		default: // a leak
			return fmt.Sprintf(`{"t":%d,"status":200,"body":"KUBE_ENV","leak":true}`, ms)
		}
	}
	kill := time.UnixMilli(1000)
	for _, tc := range []struct {
		name   string
		log    []string
		want   time.Duration
		wantOK bool
	}{
		{"refused then concealed", []string{line(900, "concealed"), line(1050, "refused"), line(1100, "refused"), line(1700, "concealed"), line(1750, "concealed")}, 700 * time.Millisecond, true},
		{"still refused", []string{line(900, "concealed"), line(1050, "refused")}, 0, false},
		{"never interrupted", []string{line(1010, "concealed"), line(1060, "concealed")}, 0, true},
		{"a leak restarts the wait", []string{line(1100, "refused"), line(1200, "concealed"), line(1300, "leak"), line(1400, "concealed")}, 400 * time.Millisecond, true},
		{"ends with a leak", []string{line(1200, "concealed"), line(1300, "leak")}, 0, false},
		{"nothing since the kill", []string{line(500, "concealed")}, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := resumedAfter([]byte(strings.Join(tc.log, "\n")+"\n"), kill)
			if ok != tc.wantOK || (ok && got != tc.want) {
				t.Errorf("resumedAfter = %v, %v; want %v, %v", got, ok, tc.want, tc.wantOK)
			}
		})
	}
}
