package scenario

import (
	"strings"
	"testing"
	"time"
)

func TestAnalyzeClients(t *testing.T) {
	t.Parallel()
	const conc = `"status":403,"body":"This metadata endpoint is concealed."`
	for _, tc := range []struct {
		name string
		log  []string
		want clientStats
	}{
		{"all concealed, poll handed back", []string{
			`{"c":"new","t":900,"end":905,` + conc + `}`, // before the window
			`{"c":"new","t":1000,"end":1005,` + conc + `}`,
			`{"c":"ka","t":1010,"end":1011,` + conc + `}`,
			`{"c":"new","t":1020,"end":1025,` + conc + `}`,
			`{"c":"ka","t":1090,"end":1091,` + conc + `}`,
			`{"c":"poll","t":500,"end":1100,"status":200,"body":"p"}`,
		}, clientStats{requests: 4, longestGap: 80 * time.Millisecond, gapClient: "ka", pollAnswers: 1,
			gapWait: time.Millisecond, gapIdle: 79 * time.Millisecond, longestWait: 5 * time.Millisecond, waitClient: "new"}},
		{"the gap is a slow answer", []string{
			`{"c":"ka","t":1000,"end":1002,` + conc + `}`,
			`{"c":"ka","t":1020,"end":1170,` + conc + `}`,
			`{"c":"ka","t":1170,"end":1171,` + conc + `}`,
		}, clientStats{requests: 3, longestGap: 150 * time.Millisecond, gapClient: "ka",
			gapWait: 150 * time.Millisecond, gapIdle: 0, longestWait: 150 * time.Millisecond, waitClient: "ka"}},
		{"refused, 503, leak", []string{
			`{"c":"new","t":1000,"end":1001,"status":0,"err":"connection refused"}`,
			`{"c":"ka","t":1000,"end":1001,"status":503,"body":"x"}`,
			`{"c":"new","t":1200,"end":1201,` + conc + `}`,
			`{"c":"ka","t":1020,"end":1021,"status":200,"body":"KUBE"}`,
			`{"c":"poll","t":1000,"end":1300,"status":503,"body":"shutting down"}`,
		}, clientStats{requests: 4, noAnswer: 1, errors: 2, leaks: 1, longestGap: 200 * time.Millisecond, gapClient: "new",
			gapIdle: 200 * time.Millisecond, longestWait: time.Millisecond, waitClient: "new"}},
	} {
		st, err := analyzeClients([]byte(strings.Join(tc.log, "\n")+"\n"), 1000)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		st.firstBad, st.pollLines, st.lastPoll, st.gapAt, st.waitAt, st.waitLine = "", 0, "", 0, 0, ""
		if st != tc.want {
			t.Errorf("%s: %+v, want %+v", tc.name, st, tc.want)
		}
	}
	st, err := analyzeClientsUntil([]byte(`{"c":"new","t":1000,"end":1005,`+conc+`}`+"\n"+`{"c":"new","t":1500,"end":1505,`+conc+`}`+"\n"), 1000, 1200)
	if err != nil || st.requests != 1 {
		t.Errorf("until 1200: %+v, %v; want the one request before it", st, err)
	}
	if _, err := analyzeClients([]byte(`{"c":"other","t":2000}`+"\n"), 0); err == nil {
		t.Error("an unknown client was accepted")
	}
}
