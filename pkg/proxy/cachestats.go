package proxy

import (
	"errors"
	"fmt"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
)

// Refresh outcomes, the result label of metaconceal_proxy_cache_refreshes_total.
const (
	refreshRenewed      = iota // a new answer replaced the entry
	refreshFailed              // the upstream failed or answered an error; the entry is served until its margin
	refreshNotCacheable        // the upstream answered 200, but not a cacheable token (unparsable, past its margin)
	numRefreshResults
)

var refreshResultNames = [numRefreshResults]string{"renewed", "failed", "not_cacheable"}

// Eviction reasons, the reason label of metaconceal_proxy_cache_evictions_total.
const (
	evictPodBound = iota // the storing pod was at its bound: one of its own entries went
	evictFull            // the cache was full: an entry of the pod holding the most went
	numEvictReasons
)

var evictReasonNames = [numEvictReasons]string{"pod_bound", "full"}

// cacheStats are the cache's counters: plain atomics on the hot path, exported by a
// collector when scraped.
type cacheStats struct {
	c         *answerCache
	hits      [3]atomic.Uint64 // by cacheKind
	misses    [3]atomic.Uint64
	refreshes [numRefreshResults]atomic.Uint64
	coalesced atomic.Uint64
	evicted   [numEvictReasons]atomic.Uint64

	hitsDesc, missesDesc, refreshesDesc, coalescedDesc, savedDesc, entriesDesc, evictedDesc *prometheus.Desc
}

func registerCacheStats(m *Metrics, c *answerCache) (*cacheStats, error) {
	s := &cacheStats{c: c}
	s.hitsDesc = prometheus.NewDesc("metaconceal_proxy_cache_hits_total",
		"GETs answered from the cache, by kind (token, fact).", []string{"kind"}, nil)
	s.missesDesc = prometheus.NewDesc("metaconceal_proxy_cache_misses_total",
		"Cacheable GETs the cache could not answer (absent, past its TTL or its token margin) that went upstream, by kind; those that joined one already in flight count in metaconceal_proxy_coalesced_requests_total.", []string{"kind"}, nil)
	s.refreshesDesc = prometheus.NewDesc("metaconceal_proxy_cache_refreshes_total",
		"Background token refreshes, by result (renewed, failed, not_cacheable).", []string{"result"}, nil)
	s.coalescedDesc = prometheus.NewDesc("metaconceal_proxy_coalesced_requests_total",
		"GETs that joined an identical upstream request already in flight instead of sending their own.", nil, nil)
	s.savedDesc = prometheus.NewDesc("metaconceal_proxy_upstream_requests_saved_total",
		"Upstream requests not sent thanks to the cache and coalescing: cache hits plus coalesced GETs (long polls count in metaconceal_proxy_long_polls_coalesced_total).", nil, nil)
	s.entriesDesc = prometheus.NewDesc("metaconceal_proxy_cache_entries",
		"Answers held in the cache.", nil, nil)
	s.evictedDesc = prometheus.NewDesc("metaconceal_proxy_cache_evictions_total",
		"Entries evicted to make room for a new one, by reason: pod_bound (the storing pod was at its bound, one of its own went), full (an entry of the pod holding the most went).", []string{"reason"}, nil)
	if err := m.Registry.Register(s); err != nil {
		if are := (prometheus.AlreadyRegisteredError{}); errors.As(err, &are) {
			return nil, fmt.Errorf("proxy: the metrics are already used by another handler: %w", err)
		}
		return nil, fmt.Errorf("proxy: register cache metrics: %w", err)
	}
	return s, nil
}

// Describe implements prometheus.Collector.
func (s *cacheStats) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{s.hitsDesc, s.missesDesc, s.refreshesDesc, s.coalescedDesc, s.savedDesc, s.entriesDesc, s.evictedDesc} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (s *cacheStats) Collect(ch chan<- prometheus.Metric) {
	var hits uint64
	for _, kind := range []cacheKind{cacheToken, cacheFact} {
		h := s.hits[kind].Load()
		hits += h
		ch <- prometheus.MustNewConstMetric(s.hitsDesc, prometheus.CounterValue, float64(h), kind.String())
		ch <- prometheus.MustNewConstMetric(s.missesDesc, prometheus.CounterValue, float64(s.misses[kind].Load()), kind.String())
	}
	for i, name := range refreshResultNames {
		ch <- prometheus.MustNewConstMetric(s.refreshesDesc, prometheus.CounterValue, float64(s.refreshes[i].Load()), name)
	}
	coalesced := s.coalesced.Load()
	ch <- prometheus.MustNewConstMetric(s.coalescedDesc, prometheus.CounterValue, float64(coalesced))
	ch <- prometheus.MustNewConstMetric(s.savedDesc, prometheus.CounterValue, float64(hits+coalesced))
	s.c.mu.RLock()
	n := len(s.c.entries)
	s.c.mu.RUnlock()
	ch <- prometheus.MustNewConstMetric(s.entriesDesc, prometheus.GaugeValue, float64(n))
	for i, name := range evictReasonNames {
		ch <- prometheus.MustNewConstMetric(s.evictedDesc, prometheus.CounterValue, float64(s.evicted[i].Load()), name)
	}
}
