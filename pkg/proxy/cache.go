package proxy

import (
	"cmp"
	"fmt"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/metaconceal/metaconceal/pkg/policy"
)

// The answer cache sits after the policy decision, on the path of allowed ordinary
// GETs only (see Handler.serveGET): a concealed or denied request is answered before
// it, a long poll and a HEAD take their own paths. What it keeps and for how long is
// the table in cachetable.go. Identical concurrent GETs that the cache cannot answer
// share one upstream request (coalesce.go), whether their answer is cacheable or not.

// CacheConfig configures the answer cache.
type CacheConfig struct {
	// Disabled turns the cache off: every allowed request goes upstream. Identical
	// concurrent GETs are still coalesced into one upstream request.
	Disabled bool
	// FactTTL is how long a VM-lifetime fact (project-id, instance/zone, ...) is
	// served from the cache; 0 means DefaultFactTTL, at most MaxFactTTL.
	FactTTL time.Duration
	// MaxEntries bounds the number of entries; 0 means DefaultMaxCacheEntries.
	MaxEntries int
	// MaxEntriesPerPod bounds the entries one pod adds (see store); 0 means
	// MaxEntries/DefaultCachePodShareDiv, at least 1.
	MaxEntriesPerPod int
	// Now is the cache's clock; nil means time.Now. Tests inject a fake one.
	Now func() time.Time
}

// DefaultMaxCacheEntries bounds the cache. Keys carry the client's Metadata-Flavor
// values and the account, scopes and alt it asked for, so a pod could otherwise grow
// it without limit.
const DefaultMaxCacheEntries = 1024

// DefaultCachePodShareDiv: by default one pod adds at most 1/8 of the entries.
const DefaultCachePodShareDiv = 8

// Fairness. Each entry is charged to the pod whose request added it (its owner) and
// the cache keeps, per pod, the entries it added. A pod at its bound
// (MaxEntriesPerPod) makes room among its own entries; when the table is full, room
// is made among the entries of the pod holding the most (the storing pod's own when
// it holds as many). Within one pod's entries, one past its lifetime (never served
// again) goes first, else the least recently served. So a pod spelling keys as many
// ways as it can churns through its own share only: the entries of a pod holding
// fewer are never evicted for it.

// touchEvery is the granularity of an entry's last-served time: a hit writes it at
// most this often, so that hits on a popular entry stay reads.
const touchEvery = 100 * time.Millisecond

// answerCache holds cached answers and the GETs in flight.
type answerCache struct {
	disabled   bool
	factTTL    time.Duration
	maxEntries int
	maxPerPod  int
	now        func() time.Time
	stats      *cacheStats

	mu      sync.RWMutex
	entries map[reqKey]*cacheEntry
	byPod   map[podKey]map[reqKey]*cacheEntry // the entries each pod added

	bg sync.WaitGroup // background refreshes running
}

// Validate refuses a TTL out of range and entry bounds that are negative or
// inconsistent.
func (cfg CacheConfig) Validate() error {
	if cfg.FactTTL < 0 || cfg.FactTTL > MaxFactTTL {
		return fmt.Errorf("proxy: cache TTL %s out of range: 0 (default %s) to %s", cfg.FactTTL, DefaultFactTTL, MaxFactTTL)
	}
	if cfg.MaxEntries < 0 || cfg.MaxEntriesPerPod < 0 {
		return fmt.Errorf("proxy: cache max entries %d (per pod %d): want numbers >= 0 (0: the default)", cfg.MaxEntries, cfg.MaxEntriesPerPod)
	}
	if n := cmp.Or(cfg.MaxEntries, DefaultMaxCacheEntries); cfg.MaxEntriesPerPod > n {
		return fmt.Errorf("proxy: cache max entries per pod %d is more than the cache's %d", cfg.MaxEntriesPerPod, n)
	}
	return nil
}

func newAnswerCache(cfg CacheConfig, m *Metrics) (*answerCache, error) {
	c := &answerCache{
		disabled:   cfg.Disabled,
		factTTL:    cfg.FactTTL,
		maxEntries: cfg.MaxEntries,
		maxPerPod:  cfg.MaxEntriesPerPod,
		now:        cfg.Now,
		entries:    make(map[reqKey]*cacheEntry),
		byPod:      make(map[podKey]map[reqKey]*cacheEntry),
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if c.factTTL == 0 {
		c.factTTL = DefaultFactTTL
	}
	if c.maxEntries == 0 {
		c.maxEntries = DefaultMaxCacheEntries
	}
	if c.maxPerPod == 0 {
		c.maxPerPod = max(1, c.maxEntries/DefaultCachePodShareDiv)
	}
	if c.now == nil {
		c.now = time.Now
	}
	stats, err := registerCacheStats(m, c)
	if err != nil {
		return nil, err
	}
	c.stats = stats
	return c, nil
}

// cacheKindOf is the table's answer for an allowed decision.
func (c *answerCache) cacheKindOf(d policy.Decision) cacheKind {
	if c.disabled || d.Rule != policy.RuleV1 || d.FilterListing || d.WaitForChange {
		return notCached
	}
	kind := lookupRow(d.Path)
	if kind == notCached || !cacheableQuery(kind, d.RawQuery) {
		return notCached
	}
	return kind
}

// serveGET answers an allowed, ordinary GET, from the cache or through a coalesced
// upstream request. It reports false for anything else (HEAD), which the caller
// forwards itself.
func (a *answerer) serveGET(x *exchange) bool {
	c := a.cache
	if c == nil || x.r.Method != http.MethodGet || x.d.WaitForChange {
		return false
	}
	key := a.requestKey(x)
	kind := c.cacheKindOf(x.d)
	if kind != notCached {
		now := c.now()
		if e := c.get(key); e != nil && now.Before(e.staleAt) {
			c.stats.hits[kind].Add(1)
			e.touch(now)
			if kind == cacheToken && !now.Before(e.refreshAt) {
				a.startRefresh(key, e, now)
			}
			e.write(x.w, now)
			return true
		}
	}
	a.coalescedGET(x, key, kind)
	return true
}

// cacheEntry is one cached 200 answer. Immutable once stored, but for the refresh
// bookkeeping.
type cacheEntry struct {
	kind    cacheKind
	header  http.Header // the upstream's headers, without Date (and for tokens Content-Length)
	staleAt time.Time   // not served from then on

	owner podKey       // the pod charged for it; set before it is stored
	used  atomic.Int64 // unix nanos it was last stored or served, to touchEvery

	// Facts: header also holds their Content-Length.
	body []byte

	// Tokens: the body is prefix, the remaining seconds, suffix.
	prefix, suffix []byte
	expiresAt      time.Time
	refreshAt      time.Time
	lengths        [21][]string // Content-Length by the number of digits
	nextTry        atomic.Int64 // unix nanos before which no refresh starts
	refreshing     atomic.Bool
}

func (c *answerCache) get(k reqKey) *cacheEntry {
	c.mu.RLock()
	e := c.entries[k]
	c.mu.RUnlock()
	return e
}

// touch records that e was served at now.
func (e *cacheEntry) touch(now time.Time) {
	if n := now.UnixNano(); n-e.used.Load() >= int64(touchEvery) {
		e.used.Store(n)
	}
}

// write serves e to a client at now.
func (e *cacheEntry) write(w http.ResponseWriter, now time.Time) {
	dst := w.Header()
	for k, v := range e.header {
		dst[k] = v
	}
	if e.kind != cacheToken {
		w.WriteHeader(http.StatusOK) // e.header holds Content-Length
		_, _ = w.Write(e.body)       // a client gone mid-answer is not our error
		return
	}
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	b := e.appendToken((*bp)[:0], now)
	dst["Content-Length"] = e.lengths[len(b)-len(e.prefix)-len(e.suffix)]
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(b)
	*bp = b[:0]
}

// appendToken appends the token answer at now (expires_in counted down) to b.
func (e *cacheEntry) appendToken(b []byte, now time.Time) []byte {
	b = append(b, e.prefix...)
	b = strconv.AppendInt(b, int64(e.expiresAt.Sub(now)/time.Second), 10)
	return append(b, e.suffix...)
}

// answer returns the header and body e serves at now, for a flight's waiters.
func (e *cacheEntry) answer(now time.Time) (http.Header, []byte) {
	hdr := e.header.Clone()
	if e.kind != cacheToken {
		return hdr, e.body
	}
	body := e.appendToken(nil, now)
	hdr["Content-Length"] = []string{strconv.Itoa(len(body))}
	return hdr, body
}

// store keeps a 200 answer for pod owner when the table says so, making room as
// the fairness rules above say. sent is when the upstream request was sent: every
// lifetime counts from then, so the cache errs early. An entry that replaces one
// (a token refresh) keeps its owner.
func (c *answerCache) store(k reqKey, kind cacheKind, hdr http.Header, body []byte, sent time.Time, owner podKey) bool {
	e := &cacheEntry{kind: kind, header: make(http.Header, len(hdr)), owner: owner}
	for name, v := range hdr {
		if name == "Date" || name == "Content-Length" {
			continue // the server dates each answer; the length is set per answer
		}
		e.header[name] = v
	}
	now := c.now()
	switch kind {
	case cacheFact:
		e.body = body
		e.header["Content-Length"] = []string{strconv.Itoa(len(body))}
		e.staleAt = sent.Add(c.factTTL)
	case cacheToken:
		tok, ok := parseToken(body)
		if !ok {
			return false
		}
		lifetime := time.Duration(tok.expiresIn) * time.Second
		e.prefix, e.suffix = body[:tok.numStart], body[tok.numEnd:]
		e.expiresAt = sent.Add(lifetime)
		e.staleAt = e.expiresAt.Add(-tokenMargin(lifetime))
		e.refreshAt = e.staleAt.Add(-tokenLead(lifetime))
		e.nextTry.Store(sent.Add(refreshRetry).UnixNano())
		for digits := 1; digits < len(e.lengths); digits++ {
			e.lengths[digits] = []string{strconv.Itoa(len(e.prefix) + digits + len(e.suffix))}
		}
	default:
		return false
	}
	if !now.Before(e.staleAt) {
		return false // already past its margin: passed on, never kept
	}
	e.used.Store(now.UnixNano())
	c.mu.Lock()
	defer c.mu.Unlock()
	if old, replacing := c.entries[k]; replacing {
		e.owner = old.owner
		c.byPod[e.owner][k] = e
		c.entries[k] = e
		return true
	}
	switch own := c.byPod[owner]; {
	case len(own) >= c.maxPerPod:
		c.evictFrom(own, now)
		c.stats.evicted[evictPodBound].Add(1)
	case len(c.entries) >= c.maxEntries:
		biggest := own
		for _, other := range c.byPod {
			if len(other) > len(biggest) {
				biggest = other
			}
		}
		c.evictFrom(biggest, now)
		c.stats.evicted[evictFull].Add(1)
	}
	own := c.byPod[owner]
	if own == nil {
		own = make(map[reqKey]*cacheEntry)
		c.byPod[owner] = own
	}
	own[k] = e
	c.entries[k] = e
	return true
}

// evictFrom removes one of a pod's entries: one past its lifetime, else the least
// recently served. It is called with c.mu held and own not empty.
func (c *answerCache) evictFrom(own map[reqKey]*cacheEntry, now time.Time) {
	var victim reqKey
	var oldest int64
	first := true
	for k, e := range own {
		if !now.Before(e.staleAt) {
			victim = k
			break
		}
		if u := e.used.Load(); first || u < oldest {
			victim, oldest, first = k, u, false
		}
	}
	e := c.entries[victim]
	delete(c.entries, victim)
	delete(own, victim)
	if len(own) == 0 {
		delete(c.byPod, e.owner)
	}
}

// startRefresh starts one background refresh of a token entry, unless one is
// running, a request for the same key is already in flight (it will refresh the
// entry), or the last attempt was less than refreshRetry ago.
func (a *answerer) startRefresh(k reqKey, e *cacheEntry, now time.Time) {
	c := a.cache
	if now.UnixNano() < e.nextTry.Load() || !e.refreshing.CompareAndSwap(false, true) {
		return
	}
	f := a.gets.StartIfNone(k) // holds the refresh's own reference
	if f == nil {
		e.refreshing.Store(false)
		return
	}
	c.bg.Add(1)
	go func() {
		defer c.bg.Done()
		stored := a.runGetFlight(f, cacheToken, e.owner)
		switch rp := f.Result(); {
		case stored:
			c.stats.refreshes[refreshRenewed].Add(1)
		case rp.errStatus != 0 || rp.status != http.StatusOK:
			c.stats.refreshes[refreshFailed].Add(1)
		default:
			c.stats.refreshes[refreshNotCacheable].Add(1)
		}
		if !stored {
			// The entry stays, served until its margin; try again later.
			e.nextTry.Store(c.now().Add(refreshRetry).UnixNano())
			e.refreshing.Store(false)
		}
	}()
}
