// Package fakegce is a fake GCE metadata server, faithful where a metadata proxy
// depends on it: the /computeMetadata/v1/ tree with project, instance, attributes
// (kube-env included) and service accounts; the Metadata-Flavor and X-Forwarded-For
// rules; 301 for directories without their trailing slash; text listings, recursive
// JSON with camelCase keys, alt=text and alt=json; ETags and wait_for_change long
// polls; the legacy /0.1/meta-data/ and /computeMetadata/v1beta1/ APIs that answer
// without the header.
//
// Its path resolution is deliberately lenient (percent-decoding, %2F, dot segments,
// double slashes, trailing slash on a value, case-insensitive names): a proxy tested
// against it must conceal every spelling an upstream could possibly resolve.
package fakegce

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"path"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// KubeEnvMarker appears only in the kube-env attribute's content, so a test can tell
// that kube-env leaked whatever the output format (value, recursive JSON, alt=text).
const KubeEnvMarker = "MCFAKEKUBEENVMARKER7f3c"

// IdentityTokenMarker appears only in identity tokens minted by the fake (in their
// signature part, which is base64url text), so a test can tell that one leaked.
const IdentityTokenMarker = "MCFAKEIDTOKENMARKER9d2e"

// DefaultScopes are the scopes of a GKE node's default service account with the
// default access scopes: none of them reaches the Compute Engine API.
var DefaultScopes = []string{
	"https://www.googleapis.com/auth/devstorage.read_only",
	"https://www.googleapis.com/auth/logging.write",
	"https://www.googleapis.com/auth/monitoring",
	"https://www.googleapis.com/auth/service.management.readonly",
	"https://www.googleapis.com/auth/servicecontrol",
	"https://www.googleapis.com/auth/trace.append",
}

// config holds what the options set.
type config struct {
	projectID, numericProjectID        string
	zone, instanceName, instanceID     string
	clusterName, serviceAccountEmail   string
	machineType, instanceIP, kubeLabel string
	scopes                             []string
	kubeEnv                            string
}

// Option changes the served tree at construction.
type Option func(*config)

// WithProjectID sets project/project-id (default "fake-project").
func WithProjectID(id string) Option { return func(c *config) { c.projectID = id } }

// WithNumericProjectID sets project/numeric-project-id (default "123456789012").
func WithNumericProjectID(id string) Option { return func(c *config) { c.numericProjectID = id } }

// WithZone sets the zone name (default "us-central1-a"); instance/zone is
// projects/<numeric>/zones/<zone>, as on GCE.
func WithZone(zone string) Option { return func(c *config) { c.zone = zone } }

// WithInstanceName sets instance/name (default "gke-fake-cluster-default-pool-0").
func WithInstanceName(name string) Option { return func(c *config) { c.instanceName = name } }

// WithInstanceID sets instance/id (default "4242424242424242424").
func WithInstanceID(id string) Option { return func(c *config) { c.instanceID = id } }

// WithClusterName sets instance/attributes/cluster-name (default "fake-cluster").
func WithClusterName(name string) Option { return func(c *config) { c.clusterName = name } }

// WithServiceAccountEmail sets the node service account's email; the account is
// served as service-accounts/default/ and service-accounts/<email>/.
func WithServiceAccountEmail(email string) Option {
	return func(c *config) { c.serviceAccountEmail = email }
}

// WithScopes sets the node service account's scopes (default DefaultScopes).
func WithScopes(scopes ...string) Option {
	return func(c *config) { c.scopes = slices.Clone(scopes) }
}

// WithInstanceIP sets instance/network-interfaces/0/ip (default "10.128.0.2").
func WithInstanceIP(ip string) Option { return func(c *config) { c.instanceIP = ip } }

// WithKubeEnv replaces the kube-env attribute's content. The caller decides whether
// it carries KubeEnvMarker.
func WithKubeEnv(content string) Option { return func(c *config) { c.kubeEnv = content } }

// valueKind says how a value renders in JSON.
type valueKind int

const (
	kindString   valueKind = iota
	kindNumber             // a JSON number (id, numeric-project-id)
	kindLines              // one entry per line; a JSON array (scopes, aliases)
	kindToken              // an OAuth2 access token, reused until near expiry (tokens.go)
	kindIdentity           // minted per request: an identity token (JWT)
)

// node is a directory or a value in the metadata tree.
type node struct {
	dir      bool
	children map[string]*node // directories only
	parent   *node
	// userKeys: the children's names are user data (attribute keys, account emails)
	// and keep their spelling in recursive JSON instead of being camelCased.
	userKeys bool
	// array: the children are 0, 1, ... and render as a JSON array.
	array bool

	kind  valueKind
	value string

	etag    string
	changed chan struct{} // closed and replaced when the node or a descendant changes
}

// Server is the fake metadata server, an http.Handler.
type Server struct {
	cfg config

	mu   sync.RWMutex
	root *node // /computeMetadata/v1/

	discoveryEtag string // the fixed listings of /, /computeMetadata/ and /0.1/

	etagSeed [16]byte
	etagGen  atomic.Uint64

	hooks atomic.Pointer[[]func(*http.Request)]
	hookM sync.Mutex

	waiting atomic.Int64 // long polls currently held

	tokenStore tokenStore // access tokens handed out (tokens.go)
}

// Waiting reports how many long polls (wait_for_change) are being held right now.
// A proxy test can watch it fall to zero when its client goes away.
func (s *Server) Waiting() int { return int(s.waiting.Load()) }

// New returns a server with a GKE-node-like tree.
func New(opts ...Option) *Server {
	cfg := config{
		projectID:        "fake-project",
		numericProjectID: "123456789012",
		zone:             "us-central1-a",
		instanceName:     "gke-fake-cluster-default-pool-0",
		instanceID:       "4242424242424242424",
		clusterName:      "fake-cluster",
		machineType:      "e2-medium",
		instanceIP:       "10.128.0.2",
		scopes:           DefaultScopes,
	}
	for _, o := range opts {
		o(&cfg)
	}
	if cfg.serviceAccountEmail == "" {
		cfg.serviceAccountEmail = cfg.numericProjectID + "-compute@developer.gserviceaccount.com"
	}
	if cfg.kubeEnv == "" {
		cfg.kubeEnv = fakeKubeEnv(cfg)
	}
	s := &Server{cfg: cfg}
	if _, err := rand.Read(s.etagSeed[:]); err != nil {
		panic(fmt.Sprintf("fakegce: crypto/rand failed: %v", err))
	}
	s.root = s.newDir(nil)
	s.discoveryEtag = s.newEtag()
	s.build()
	return s
}

// fakeKubeEnv is a kube-env shaped like GKE's, with fake kubelet key material.
func fakeKubeEnv(c config) string {
	b64 := func(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }
	return strings.Join([]string{
		"ALLOCATE_NODE_CIDRS: \"true\"",
		"CLUSTER_NAME: " + c.clusterName,
		"CA_CERT: " + b64("-----BEGIN CERTIFICATE-----\nFAKE CLUSTER CA\n-----END CERTIFICATE-----\n"),
		"KUBELET_CERT: " + b64("-----BEGIN CERTIFICATE-----\nFAKE KUBELET CERT\n-----END CERTIFICATE-----\n"),
		"KUBELET_KEY: " + b64("-----BEGIN RSA PRIVATE KEY-----\nFAKE KUBELET KEY\n-----END RSA PRIVATE KEY-----\n"),
		"KUBERNETES_MASTER_NAME: 10.0.0.2",
		"METACONCEAL_FAKE_SECRET: " + KubeEnvMarker,
		"TPM_BOOTSTRAP_CERT: " + b64("fake bootstrap cert"),
		"TPM_BOOTSTRAP_KEY: " + b64("fake bootstrap key"),
		"ZONE: " + c.zone,
		"",
	}, "\n")
}

func (s *Server) build() {
	c := s.cfg
	set := func(p, v string) { s.setLocked(p, v) }
	set("project/project-id", c.projectID)
	set("project/numeric-project-id", c.numericProjectID)
	set("project/attributes/google-compute-default-region", regionOf(c.zone))
	set("project/attributes/enable-oslogin", "FALSE")

	set("instance/id", c.instanceID)
	set("instance/name", c.instanceName)
	set("instance/hostname", c.instanceName+"."+c.zone+".c."+c.projectID+".internal")
	set("instance/zone", "projects/"+c.numericProjectID+"/zones/"+c.zone)
	set("instance/machine-type", "projects/"+c.numericProjectID+"/machineTypes/"+c.machineType)
	set("instance/cpu-platform", "Intel Broadwell")
	set("instance/image", "projects/cos-cloud/global/images/cos-fake")
	set("instance/tags", `["gke-`+c.clusterName+`-node"]`)
	set("instance/network-interfaces/0/ip", c.instanceIP)
	set("instance/network-interfaces/0/mac", "42:01:0a:80:00:02")
	set("instance/network-interfaces/0/network", "projects/"+c.numericProjectID+"/networks/default")
	set("instance/network-interfaces/0/gateway", "10.128.0.1")
	set("instance/network-interfaces/0/subnetmask", "255.255.240.0")
	set("instance/network-interfaces/0/access-configs/0/external-ip", "203.0.113.10")
	set("instance/network-interfaces/0/access-configs/0/type", "ONE_TO_ONE_NAT")
	set("instance/attributes/cluster-name", c.clusterName)
	set("instance/attributes/cluster-location", c.zone)
	set("instance/attributes/cluster-uid", "0123456789abcdef0123456789abcdef")
	set("instance/attributes/kube-env", c.kubeEnv)
	set("instance/attributes/kube-labels", "cloud.google.com/gke-nodepool=default-pool,cloud.google.com/gke-os-distribution=cos")
	set("instance/attributes/gci-update-strategy", "update_disabled")

	sa := "instance/service-accounts/default/"
	set(sa+"aliases", "default")
	set(sa+"email", c.serviceAccountEmail)
	set(sa+"scopes", strings.Join(c.scopes, "\n"))
	s.lookupPath("instance/service-accounts/default/").children["token"] = s.newValue(s.lookupPath(sa), kindToken, "")
	s.lookupPath("instance/service-accounts/default/").children["identity"] = s.newValue(s.lookupPath(sa), kindIdentity, "")
	// The account's email names the same directory as default/, as on GCE: a Set
	// through either name changes both.
	accounts := s.lookupPath("instance/service-accounts/")
	accounts.children[c.serviceAccountEmail] = accounts.children["default"]
}

func regionOf(zone string) string {
	if i := strings.LastIndexByte(zone, '-'); i > 0 {
		return zone[:i]
	}
	return zone
}

func (s *Server) newEtag() string {
	gen := s.etagGen.Add(1)
	h := sha256.New()
	h.Write(s.etagSeed[:])
	h.Write([]byte(strconv.FormatUint(gen, 10)))
	return hex.EncodeToString(h.Sum(nil)[:8])
}

func (s *Server) newDir(parent *node) *node {
	return &node{dir: true, children: map[string]*node{}, parent: parent, etag: s.newEtag(), changed: make(chan struct{})}
}

func (s *Server) newValue(parent *node, kind valueKind, v string) *node {
	return &node{parent: parent, kind: kind, value: v, etag: s.newEtag(), changed: make(chan struct{})}
}

// kindFor picks how a new value renders in JSON, by its name, as GCE does.
func kindFor(name string) valueKind {
	switch name {
	case "scopes", "aliases":
		return kindLines
	case "id", "numeric-project-id":
		return kindNumber
	}
	return kindString
}

// Set creates or changes the value at p (relative to /computeMetadata/v1/, e.g.
// "instance/attributes/foo"), creating directories on the way. It gives the value and
// every directory above it a new ETag and wakes the long polls waiting on them.
// It panics when p names a directory or passes through a value: that is a bug in the
// calling test.
func (s *Server) Set(p, value string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.setLocked(p, value)
}

func (s *Server) setLocked(p, value string) {
	segs := splitSegments(p)
	if len(segs) == 0 {
		panic(fmt.Sprintf("fakegce: Set(%q): empty path", p))
	}
	dir := s.root
	for i, seg := range segs[:len(segs)-1] {
		child, ok := dir.children[seg]
		if !ok {
			child = s.newDir(dir)
			child.userKeys = seg == "attributes" || seg == "service-accounts"
			child.array = seg == "network-interfaces" || seg == "access-configs"
			dir.children[seg] = child
		} else if !child.dir {
			panic(fmt.Sprintf("fakegce: Set(%q): %q is a value, not a directory", p, strings.Join(segs[:i+1], "/")))
		}
		dir = child
	}
	name := segs[len(segs)-1]
	leaf, ok := dir.children[name]
	switch {
	case !ok:
		leaf = s.newValue(dir, kindFor(name), value)
		dir.children[name] = leaf
	case leaf.dir:
		panic(fmt.Sprintf("fakegce: Set(%q): it is a directory", p))
	default:
		leaf.value = value
	}
	s.bumpLocked(leaf)
}

// bumpLocked gives n and its ancestors new ETags and wakes their waiters.
func (s *Server) bumpLocked(n *node) {
	for ; n != nil; n = n.parent {
		n.etag = s.newEtag()
		close(n.changed)
		n.changed = make(chan struct{})
	}
}

// OnRequest registers f to be called with every request that reaches the server,
// before it is answered. Safe for concurrent use, also while serving.
func (s *Server) OnRequest(f func(*http.Request)) {
	s.hookM.Lock()
	defer s.hookM.Unlock()
	var hooks []func(*http.Request)
	if old := s.hooks.Load(); old != nil {
		hooks = slices.Clone(*old)
	}
	hooks = append(hooks, f)
	s.hooks.Store(&hooks)
}

func splitSegments(p string) []string {
	var segs []string
	for seg := range strings.SplitSeq(p, "/") {
		if seg != "" {
			segs = append(segs, seg)
		}
	}
	return segs
}

// child finds a child by name, exactly or else case-insensitively (leniency: see the
// package comment).
func (n *node) child(name string) (*node, bool) {
	if c, ok := n.children[name]; ok {
		return c, true
	}
	for k, c := range n.children {
		if strings.EqualFold(k, name) {
			return c, true
		}
	}
	return nil, false
}

// lookupPath finds the node at a path relative to the v1 root; nil when absent.
// The caller holds s.mu.
func (s *Server) lookupPath(p string) *node {
	n := s.root
	for _, seg := range splitSegments(p) {
		if !n.dir {
			return nil
		}
		c, ok := n.child(seg)
		if !ok {
			return nil
		}
		n = c
	}
	return n
}

// ServeHTTP answers one metadata request.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if hooks := s.hooks.Load(); hooks != nil {
		for _, f := range *hooks {
			f(r)
		}
	}
	h := w.Header()
	h.Set("Metadata-Flavor", "Google")
	h.Set("Server", "Metadata Server for VM")
	h.Set("X-XSS-Protection", "0")
	h.Set("X-Frame-Options", "SAMEORIGIN")

	if _, ok := r.Header["X-Forwarded-For"]; ok {
		textError(w, http.StatusForbidden, "Request denied: X-Forwarded-For header present.")
		return
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		h.Set("Allow", "GET, HEAD")
		textError(w, http.StatusMethodNotAllowed, "Method not allowed.")
		return
	}

	cleaned := path.Clean("/" + r.URL.Path)
	trailingSlash := cleaned != "/" && (strings.HasSuffix(r.URL.Path, "/") || strings.HasSuffix(r.URL.Path, "/.") || strings.HasSuffix(r.URL.Path, "/.."))
	segs := splitSegments(cleaned)

	switch {
	case len(segs) == 0:
		writeText(w, s.discoveryEtag, "0.1/\ncomputeMetadata/\n")
		return
	case strings.EqualFold(segs[0], "computeMetadata"):
		if len(segs) == 1 {
			if !trailingSlash {
				redirectSlash(w, r)
				return
			}
			writeText(w, s.discoveryEtag, "v1/\nv1beta1/\n")
			return
		}
		switch {
		case strings.EqualFold(segs[1], "v1"):
			if !hasMetadataHeader(r) {
				textError(w, http.StatusForbidden, "Missing required header: Metadata-Flavor: Google.")
				return
			}
		case strings.EqualFold(segs[1], "v1beta1"):
			// The deprecated API required no header: the SSRF path a proxy must deny.
		default:
			notFound(w)
			return
		}
		s.serveTree(w, r, segs[2:], trailingSlash, false)
	case segs[0] == "0.1":
		if len(segs) == 1 {
			if !trailingSlash {
				redirectSlash(w, r)
				return
			}
			writeText(w, s.discoveryEtag, "meta-data/\n")
			return
		}
		if !strings.EqualFold(segs[1], "meta-data") {
			notFound(w)
			return
		}
		s.serveTree(w, r, segs[2:], trailingSlash, true)
	default:
		notFound(w)
	}
}

func hasMetadataHeader(r *http.Request) bool {
	return strings.EqualFold(r.Header.Get("Metadata-Flavor"), "Google") ||
		strings.EqualFold(r.Header.Get("X-Google-Metadata-Request"), "True")
}

// serveTree answers a request for segs below the API root. legacy is the 0.1 API,
// whose old layout also had attributes/ at its top; it is served from the instance's.
func (s *Server) serveTree(w http.ResponseWriter, r *http.Request, segs []string, slashed, legacy bool) {
	q := r.URL.Query()
	recursive := boolParam(q.Get("recursive"))
	alt := strings.ToLower(q.Get("alt"))
	if alt != "" && alt != "json" && alt != "text" {
		textError(w, http.StatusBadRequest, "Invalid alt parameter "+strconv.Quote(q.Get("alt"))+": must be json or text.")
		return
	}
	wait := boolParam(q.Get("wait_for_change"))
	lastEtag := q.Get("last_etag")
	timeout := time.Duration(-1) // no timeout_sec: wait until a change
	if ts := q.Get("timeout_sec"); ts != "" {
		sec, err := strconv.Atoi(ts)
		if err != nil || sec < 0 {
			textError(w, http.StatusBadRequest, "Invalid timeout_sec "+strconv.Quote(ts)+".")
			return
		}
		timeout = time.Duration(sec) * time.Second
	}
	rel := strings.Join(segs, "/")

	s.mu.RLock()
	n := s.lookupPath(rel)
	if n == nil && legacy && len(segs) > 0 && strings.EqualFold(segs[0], "attributes") {
		n = s.lookupPath("instance/" + rel)
	}
	if n == nil {
		s.mu.RUnlock()
		notFound(w)
		return
	}
	if n.dir && !slashed {
		s.mu.RUnlock()
		redirectSlash(w, r)
		return
	}
	if wait && (lastEtag == "" || lastEtag == n.etag) {
		changed := n.changed
		s.mu.RUnlock()
		var expired <-chan time.Time
		if timeout >= 0 { // timeout_sec=0 answers at once
			t := time.NewTimer(timeout)
			defer t.Stop()
			expired = t.C
		}
		s.waiting.Add(1)
		select {
		case <-changed:
		case <-expired:
		case <-r.Context().Done():
			s.waiting.Add(-1)
			return
		}
		s.waiting.Add(-1)
		s.mu.RLock()
	}
	// Render under the read lock: the tree is mutated only under the write lock.
	status, ctype, body, etag := s.render(n, q, recursive, alt)
	s.mu.RUnlock()
	if etag != "" {
		w.Header().Set("ETag", etag)
	}
	if status != http.StatusOK {
		textError(w, status, body)
		return
	}
	w.Header().Set("Content-Type", ctype)
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(status)
	if r.Method != http.MethodHead {
		_, _ = w.Write([]byte(body))
	}
}

// render produces the answer for n. The caller holds s.mu (read).
func (s *Server) render(n *node, q map[string][]string, recursive bool, alt string) (status int, ctype, body, etag string) {
	const textType, jsonType = "application/text", "application/json"
	get := func(k string) string {
		if v := q[k]; len(v) > 0 {
			return v[0]
		}
		return ""
	}
	switch {
	case n.dir && recursive:
		if alt == "text" {
			var b strings.Builder
			flattenText(&b, "", n)
			return http.StatusOK, textType, b.String(), n.etag
		}
		out, err := json.Marshal(jsonOf(n))
		if err != nil {
			return http.StatusInternalServerError, "", "fakegce: " + err.Error(), ""
		}
		return http.StatusOK, jsonType, string(out), n.etag
	case n.dir:
		names := listing(n)
		if alt == "json" {
			out, _ := json.Marshal(names)
			return http.StatusOK, jsonType, string(out), n.etag
		}
		return http.StatusOK, textType, strings.Join(names, "\n") + "\n", n.etag
	case n.kind == kindToken:
		tok, expiresIn := s.accessToken(n, get("scopes")) // tokens.go
		if alt == "text" {
			return http.StatusOK, textType, "access_token " + tok + "\nexpires_in " + strconv.FormatInt(expiresIn, 10) + "\ntoken_type Bearer\n", n.etag
		}
		out, _ := json.Marshal(map[string]any{"access_token": tok, "expires_in": expiresIn, "token_type": "Bearer"})
		return http.StatusOK, jsonType, string(out), n.etag
	case n.kind == kindIdentity:
		aud := get("audience")
		if aud == "" {
			return http.StatusBadRequest, "", "non-empty audience parameter required", ""
		}
		tok := s.mintIdentityToken(aud, boolParam(get("format")) || strings.EqualFold(get("format"), "full"), boolParam(get("licenses")))
		return http.StatusOK, textType, tok, n.etag
	case alt == "json" || recursive:
		out, _ := json.Marshal(jsonValue(n))
		return http.StatusOK, jsonType, string(out), n.etag
	default:
		return http.StatusOK, textType, n.value, n.etag
	}
}

// listing is a directory's text listing: sorted, subdirectories with a '/'.
func listing(n *node) []string {
	names := make([]string, 0, len(n.children))
	for k, c := range n.children {
		if c.dir {
			k += "/"
		}
		names = append(names, k)
	}
	slices.Sort(names)
	return names
}

func sortedKeys(n *node) []string {
	keys := make([]string, 0, len(n.children))
	for k := range n.children {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// jsonOf is the recursive JSON form of a directory. Tokens are never minted in a
// recursive listing, as on GCE.
func jsonOf(n *node) any {
	if !n.dir {
		return jsonValue(n)
	}
	keys := sortedKeys(n)
	if n.array {
		slices.SortFunc(keys, func(a, b string) int {
			ai, _ := strconv.Atoi(a)
			bi, _ := strconv.Atoi(b)
			return ai - bi
		})
		arr := make([]any, 0, len(keys))
		for _, k := range keys {
			arr = append(arr, jsonOf(n.children[k]))
		}
		return arr
	}
	obj := make(map[string]any, len(keys))
	for _, k := range keys {
		c := n.children[k]
		if c.kind == kindToken || c.kind == kindIdentity {
			continue
		}
		name := k
		if !n.userKeys {
			name = camelCase(k)
		}
		obj[name] = jsonOf(c)
	}
	return obj
}

func jsonValue(n *node) any {
	switch n.kind {
	case kindNumber:
		if _, err := strconv.ParseInt(n.value, 10, 64); err == nil {
			return json.Number(n.value)
		}
	case kindLines:
		lines := []string{}
		for l := range strings.SplitSeq(n.value, "\n") {
			if l != "" {
				lines = append(lines, l)
			}
		}
		return lines
	}
	return n.value
}

// flattenText writes a recursive alt=text listing: one "path value" line per line
// of every value below n.
func flattenText(b *strings.Builder, prefix string, n *node) {
	for _, k := range sortedKeys(n) {
		c := n.children[k]
		p := prefix + k
		switch {
		case c.dir:
			flattenText(b, p+"/", c)
		case c.kind == kindToken || c.kind == kindIdentity:
		default:
			for l := range strings.SplitSeq(strings.TrimSuffix(c.value, "\n"), "\n") {
				b.WriteString(p)
				b.WriteByte(' ')
				b.WriteString(l)
				b.WriteByte('\n')
			}
		}
	}
}

// camelCase turns "numeric-project-id" into "numericProjectId", as GCE does for the
// keys of its own (non-user) entries.
func camelCase(k string) string {
	parts := strings.Split(k, "-")
	for i := 1; i < len(parts); i++ {
		if parts[i] != "" {
			parts[i] = strings.ToUpper(parts[i][:1]) + parts[i][1:]
		}
	}
	return strings.Join(parts, "")
}

func boolParam(v string) bool {
	b, err := strconv.ParseBool(v)
	return err == nil && b
}

func randomB64(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(fmt.Sprintf("fakegce: crypto/rand failed: %v", err))
	}
	return base64.RawURLEncoding.EncodeToString(b)
}

func (s *Server) mintAccessToken() string {
	return "ya29.fake-" + randomB64(36)
}

// mintIdentityToken returns a JWT-shaped token (three base64url parts) whose
// signature part carries IdentityTokenMarker in clear.
func (s *Server) mintIdentityToken(audience string, full, licenses bool) string {
	now := time.Now().Unix()
	header := map[string]any{"alg": "RS256", "kid": "fakegce", "typ": "JWT"}
	claims := map[string]any{
		"aud":            audience,
		"azp":            "100000000000000000000",
		"email":          s.cfg.serviceAccountEmail,
		"email_verified": true,
		"exp":            now + 3600,
		"iat":            now,
		"iss":            "https://accounts.google.com",
		"sub":            "100000000000000000000",
	}
	if full {
		ce := map[string]any{
			"instance_creation_timestamp": now - 86400,
			"instance_id":                 s.cfg.instanceID,
			"instance_name":               s.cfg.instanceName,
			"project_id":                  s.cfg.projectID,
			"project_number":              s.cfg.numericProjectID,
			"zone":                        s.cfg.zone,
		}
		if licenses {
			ce["license_id"] = []string{"1001010"}
		}
		claims["google"] = map[string]any{"compute_engine": ce}
	}
	hj, _ := json.Marshal(header)
	cj, _ := json.Marshal(claims)
	return base64.RawURLEncoding.EncodeToString(hj) + "." +
		base64.RawURLEncoding.EncodeToString(cj) + "." +
		IdentityTokenMarker + randomB64(64)
}

func redirectSlash(w http.ResponseWriter, r *http.Request) {
	loc := r.URL.EscapedPath() + "/"
	if r.URL.RawQuery != "" {
		loc += "?" + r.URL.RawQuery
	}
	w.Header().Set("Location", loc)
	textError(w, http.StatusMovedPermanently, "")
}

func notFound(w http.ResponseWriter) {
	textError(w, http.StatusNotFound, "Not Found")
}

func writeText(w http.ResponseWriter, etag, body string) {
	if etag != "" {
		w.Header().Set("ETag", etag)
	}
	w.Header().Set("Content-Type", "application/text")
	_, _ = w.Write([]byte(body))
}

func textError(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Content-Type", "text/html; charset=UTF-8")
	w.WriteHeader(status)
	if msg != "" {
		_, _ = w.Write([]byte(msg + "\n"))
	}
}
