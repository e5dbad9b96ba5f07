// Package doctor is the node preflight check (`metaconceal-proxy doctor`): it prints the
// node agent's last datapath self-test of the host guard (warning when bypassed), and reads,
// from the node's metadata server, which service accounts the node carries and with
// which scopes, and warns when a scope lets the token reach the Compute Engine API.
// Concealment hides kube-env from the metadata server, but any pod can still take
// the node's access token (tokens are not concealed, as on GKE) and call
// compute.instances.get, whose answer carries the instance's metadata, kube-env
// included. The fix is the one of GKE's "Protecting cluster metadata" guide,
// section "Configure node service account": a minimally privileged node service
// account; the doctor prints its gcloud commands with this node's values filled in.
package doctor

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/metaconceal/metaconceal/pkg/gce"
	"github.com/metaconceal/metaconceal/pkg/selftest"
	"github.com/metaconceal/metaconceal/pkg/state"
)

// Exit codes of Main.
const (
	ExitOK          = 0 // nothing to warn about
	ExitWarnings    = 1 // at least one warning: scripts can gate on it
	ExitUnreachable = 2 // the metadata server could not be read (or bad flags)
)

// riskyScopes are the OAuth scopes (after https://www.googleapis.com/auth/) whose
// tokens can call compute.instances.get.
var riskyScopes = map[string]bool{
	"cloud-platform":           true,
	"cloud-platform.read-only": true,
	"compute":                  true,
	"compute.readonly":         true,
}

const scopePrefix = "https://www.googleapis.com/auth/"

// The minimal roles of a node service account, from GKE's guide.
var minimalRoles = []string{"roles/monitoring.metricWriter", "roles/monitoring.viewer", "roles/logging.logWriter"}

// account is one service account the node carries.
type account struct {
	email  string
	scopes []string
	risky  []string
}

// facts is what the doctor read.
type facts struct {
	projectID, zone, location, cluster, instance string
	accounts                                     []account
}

// Main runs the doctor with args (without the program name) and returns the exit code.
func Main(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("doctor", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: metaconceal-proxy doctor [--upstream URL] [--timeout D] [--sa-name NAME] [--state-dir DIR]")
		fmt.Fprintln(stderr, "Run on a node: checks the node service account's scopes against concealment bypass.")
		fmt.Fprintln(stderr, "Exit codes: 0 ok, 1 warnings found, 2 metadata server unreachable or unreadable.")
		fs.PrintDefaults()
	}
	upstream := fs.String("upstream", "http://"+gce.MetadataIPv4.String(), "metadata server to read (from the node)")
	timeout := fs.Duration("timeout", 5*time.Second, "time allowed for all reads together")
	saName := fs.String("sa-name", "", "name to suggest for the new node service account (default <cluster>-node-sa)")
	stateDir := fs.String("state-dir", state.DefaultDir, "the plugin's state dir, where the node agent keeps its last datapath self-test")
	if err := fs.Parse(args); err != nil {
		return ExitUnreachable
	}
	if fs.NArg() != 0 {
		fmt.Fprintf(stderr, "doctor: unexpected argument %q\n", fs.Arg(0))
		return ExitUnreachable
	}
	base, err := url.Parse(strings.TrimSuffix(*upstream, "/"))
	if err != nil || (base.Scheme != "http" && base.Scheme != "https") || base.Host == "" {
		fmt.Fprintf(stderr, "doctor: --upstream %q: want an http:// or https:// URL with a host\n", *upstream)
		return ExitUnreachable
	}
	if *timeout <= 0 {
		fmt.Fprintf(stderr, "doctor: --timeout %v: want a positive duration\n", *timeout)
		return ExitUnreachable
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	r := &reader{base: base.String(), client: &http.Client{
		// The metadata server is link-local: never through an HTTP(S)_PROXY.
		Transport: &http.Transport{Proxy: nil},
		// A metadata server answers 301 for a directory without its slash; the
		// doctor asks for exact paths and treats any redirect as an error.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}}
	f, err := r.read(ctx)
	if err != nil {
		fmt.Fprintf(stderr, "doctor: cannot read the node's metadata from %s: %v\n", base, err)
		fmt.Fprintln(stderr, "doctor: run it on a GCE node (hostNetwork), or point --upstream at the metadata server.")
		return ExitUnreachable
	}
	code := report(stdout, f, *saName)
	if !guardLine(stdout, *stateDir) && code == ExitOK {
		code = ExitWarnings
	}
	return code
}

// guardLine prints the node agent's last datapath self-test (docs/datapath.md) and
// reports false when it found the host guard bypassed.
func guardLine(w io.Writer, stateDir string) bool {
	o, ok, err := selftest.ReadOutcome(stateDir)
	switch {
	case err != nil:
		fmt.Fprintf(w, "guard self-test: unreadable: %v\n", err)
	case !ok:
		fmt.Fprintf(w, "guard self-test: none in %s (the node agent runs it with --selftest-interval; or run metaconceal-install selftest)\n", stateDir)
	case o.State == selftest.StateBypassed:
		fmt.Fprintf(w, "WARNING: guard self-test at %s: BYPASSED: %s\n", o.At.UTC().Format(time.RFC3339), o.Message())
		return false
	default:
		fmt.Fprintf(w, "guard self-test at %s: %s: %s\n", o.At.UTC().Format(time.RFC3339), o.State, o.Message())
	}
	return true
}

type reader struct {
	base   string
	client *http.Client
}

// errNotFound marks an entry the metadata server does not have (404).
var errNotFound = errors.New("not found")

func (r *reader) get(ctx context.Context, p string) (string, error) {
	u := r.base + "/computeMetadata/v1/" + p
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return "", fmt.Errorf("GET %s: %w", u, err)
	}
	req.Header.Set("Metadata-Flavor", "Google")
	resp, err := r.client.Do(req)
	if err != nil {
		return "", err // names the method and URL already
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return "", fmt.Errorf("GET %s: reading the answer: %w", u, err)
	}
	if resp.StatusCode == http.StatusNotFound {
		return "", fmt.Errorf("GET %s: %w", u, errNotFound)
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("GET %s: status %d: %s", u, resp.StatusCode, strings.TrimSpace(string(body)))
	}
	if resp.Header.Get("Metadata-Flavor") != "Google" {
		return "", fmt.Errorf("GET %s: the answer lacks the header Metadata-Flavor: Google; this is not a GCE metadata server", u)
	}
	return strings.TrimSpace(string(body)), nil
}

// optional reads p, returning "" when the server does not have it.
func (r *reader) optional(ctx context.Context, p string) (string, error) {
	v, err := r.get(ctx, p)
	if errors.Is(err, errNotFound) {
		return "", nil
	}
	return v, err
}

func (r *reader) read(ctx context.Context) (facts, error) {
	var f facts
	var err error
	if f.projectID, err = r.get(ctx, "project/project-id"); err != nil {
		return f, err
	}
	zonePath, err := r.get(ctx, "instance/zone")
	if err != nil {
		return f, err
	}
	f.zone = zonePath[strings.LastIndexByte(zonePath, '/')+1:] // projects/N/zones/Z
	for _, o := range []struct {
		dst *string
		p   string
	}{
		{&f.instance, "instance/name"},
		{&f.cluster, "instance/attributes/cluster-name"},
		{&f.location, "instance/attributes/cluster-location"},
	} {
		if *o.dst, err = r.optional(ctx, o.p); err != nil {
			return f, err
		}
	}
	if f.location == "" {
		f.location = f.zone
	}
	listing, err := r.get(ctx, "instance/service-accounts/")
	if err != nil {
		return f, err
	}
	// default/ names the same account as its email: read it first, then the others,
	// and skip an email already seen.
	names := []string{"default"}
	for l := range strings.SplitSeq(listing, "\n") {
		if l = strings.TrimSuffix(strings.TrimSpace(l), "/"); l != "" && l != "default" {
			names = append(names, l)
		}
	}
	seen := map[string]bool{}
	for _, name := range names {
		prefix := "instance/service-accounts/" + url.PathEscape(name) + "/"
		email, err := r.get(ctx, prefix+"email")
		if errors.Is(err, errNotFound) && name == "default" {
			continue // a VM without a service account
		}
		if err != nil {
			return f, err
		}
		if seen[email] {
			continue
		}
		seen[email] = true
		scopes, err := r.get(ctx, prefix+"scopes")
		if err != nil {
			return f, err
		}
		a := account{email: email}
		for s := range strings.SplitSeq(scopes, "\n") {
			if s = strings.TrimSpace(s); s == "" {
				continue
			}
			a.scopes = append(a.scopes, s)
			if riskyScopes[strings.TrimPrefix(s, scopePrefix)] && strings.HasPrefix(s, scopePrefix) {
				a.risky = append(a.risky, s)
			}
		}
		f.accounts = append(f.accounts, a)
	}
	return f, nil
}

func orPlaceholder(v, placeholder string) string {
	if v == "" {
		return placeholder
	}
	return v
}

var zoneRE = regexp.MustCompile(`^[a-z]+-[a-z]+[0-9]+-[a-z]$`)

// locationFlag is the gcloud flag for a cluster location: zonal or regional.
func locationFlag(loc string) string {
	if loc == "" {
		return "--location=LOCATION"
	}
	if zoneRE.MatchString(loc) {
		return "--zone=" + loc
	}
	return "--region=" + loc
}

var saNameBad = regexp.MustCompile(`[^a-z0-9-]+`)

// suggestSAName derives a valid service account id (6-30 characters, lowercase
// letters, digits and hyphens, starting with a letter) from the cluster name.
func suggestSAName(cluster string) string {
	base := saNameBad.ReplaceAllString(strings.ToLower(cluster), "-")
	base = strings.Trim(base, "-")
	const suffix = "-node-sa"
	if len(base) > 30-len(suffix) {
		base = strings.TrimRight(base[:30-len(suffix)], "-")
	}
	name := base + suffix
	if base == "" || name[0] < 'a' || name[0] > 'z' {
		name = "mc" + name
	}
	if len(name) < 6 {
		name = "metaconceal-node-sa"
	}
	return name
}

func report(w io.Writer, f facts, saName string) int {
	fmt.Fprintln(w, "metaconceal doctor: node service account check")
	fmt.Fprintf(w, "  project:   %s\n", f.projectID)
	fmt.Fprintf(w, "  zone:      %s\n", f.zone)
	fmt.Fprintf(w, "  cluster:   %s (location %s)\n", orPlaceholder(f.cluster, "(no cluster-name attribute)"), f.location)
	fmt.Fprintf(w, "  instance:  %s\n", orPlaceholder(f.instance, "(unknown)"))
	if len(f.accounts) == 0 {
		fmt.Fprintln(w, "  service accounts: none: pods can get no Google token from this node")
	}
	warnings := 0
	for _, a := range f.accounts {
		fmt.Fprintf(w, "  service account: %s\n", a.email)
		for _, s := range a.scopes {
			mark := ""
			if slices.Contains(a.risky, s) {
				mark = "   <- reaches the Compute Engine API"
			}
			fmt.Fprintf(w, "    scope: %s%s\n", s, mark)
		}
		if strings.HasSuffix(a.email, "-compute@developer.gserviceaccount.com") {
			fmt.Fprintf(w, "NOTE: %s is the Compute Engine default service account.\n", a.email)
			fmt.Fprintln(w, "      GKE advises a minimally privileged node service account instead:")
			fmt.Fprintln(w, "      restrict nodes by IAM roles, not by access scopes.")
		}
	}
	fmt.Fprintln(w)
	for _, a := range f.accounts {
		for _, s := range a.risky {
			warnings++
			fmt.Fprintf(w, "WARNING: service account %s has the scope %s.\n", a.email, s)
		}
	}
	if warnings == 0 {
		fmt.Fprintln(w, "OK: no service account on this node has a scope that reaches the Compute Engine API.")
		return ExitOK
	}
	fmt.Fprintln(w, "  Any pod can take this node's access token from the metadata server (tokens are not")
	fmt.Fprintln(w, "  concealed) and call the Compute Engine API (compute.instances.get), whose answer carries")
	fmt.Fprintln(w, "  the instance metadata with kube-env: that goes around metadata concealment.")
	fmt.Fprintln(w, "  Fix (GKE, \"Protecting cluster metadata\" > \"Configure node service account\"): give the")
	fmt.Fprintln(w, "  nodes a minimally privileged service account, and do not give it compute.instances.get.")
	fmt.Fprintln(w)

	project := f.projectID
	cluster := orPlaceholder(f.cluster, "CLUSTER_NAME")
	if saName == "" {
		saName = suggestSAName(orPlaceholder(f.cluster, "metaconceal"))
	}
	display := cluster + " node service account"
	loc := locationFlag(f.location)
	fmt.Fprintf(w, `# 1. Create a minimally privileged node service account:
gcloud iam service-accounts create %[1]s \
    --project=%[2]s \
    --display-name="%[3]s"
export NODE_SA_EMAIL=%[1]s@%[2]s.iam.gserviceaccount.com

# 2. Give it only the roles GKE nodes need:
`, saName, project, display)
	for _, role := range minimalRoles {
		fmt.Fprintf(w, "gcloud projects add-iam-policy-binding %s \\\n    --member=serviceAccount:$NODE_SA_EMAIL \\\n    --role=%s\n", project, role)
	}
	fmt.Fprintf(w, `
# 3. Move the nodes to it: a new node pool (then drain and delete the old pool) ...
gcloud beta container node-pools create metaconceal-secure-pool \
    --project=%[1]s \
    --cluster=%[2]s \
    %[3]s \
    --service-account=$NODE_SA_EMAIL \
    --workload-metadata-from-node=SECURE
# ... or a new cluster:
gcloud beta container clusters create %[2]s \
    --project=%[1]s \
    %[3]s \
    --service-account=$NODE_SA_EMAIL \
    --workload-metadata-from-node=SECURE
`, project, cluster, loc)
	fmt.Fprintln(w, "# (--workload-metadata-from-node=SECURE is GKE's own concealment, removed from current")
	fmt.Fprintln(w, "#  GKE versions; drop it there: metaconceal conceals instead. The service account change")
	fmt.Fprintln(w, "#  is what closes the Compute Engine API path either way.)")
	return ExitWarnings
}
