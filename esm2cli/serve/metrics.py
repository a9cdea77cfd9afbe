"""Prometheus metrics of the server: requests, latency, batch sizes, queue depth, device busy time."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from esm2cli.serve.cache import OPEN_PARTITION, CacheStats, EmbeddingCache

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 128, 256)


class _DeviceBusy:
    """Reads the engine's per-device busy seconds at scrape time."""

    def __init__(self, busy_seconds: Callable[[], dict[str, float]]):
        self._busy_seconds = busy_seconds

    def collect(self):
        family = CounterMetricFamily(
            "esm2cli_device_busy_seconds", "Seconds each device spent computing batches", labels=["device"]
        )
        for device, seconds in self._busy_seconds().items():
            family.add_metric([device], seconds)
        yield family


class _CacheStats:
    """One partition's cache counts, for one scrape."""

    def __init__(self, stats: CacheStats):
        self._stats = stats

    def collect(self):
        hits = CounterMetricFamily("esm2cli_cache_hits", "Sequences of this API key answered from the embedding cache")
        hits.add_metric([], self._stats.hits)
        misses = CounterMetricFamily("esm2cli_cache_misses", "Sequences of this API key looked up and computed")
        misses.add_metric([], self._stats.misses)
        entries = GaugeMetricFamily("esm2cli_cache_entries", "Sequences of this API key held in the embedding cache")
        entries.add_metric([], self._stats.entries)
        yield from (hits, misses, entries)


class ServerMetrics:
    """One registry per app, so that several apps (tests) do not collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._cache: EmbeddingCache | None = None
        self.requests = Counter(
            "esm2cli_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "esm2cli_request_seconds", "Request latency", ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.batch_size = Histogram(
            "esm2cli_batch_size", "Sequences per engine batch", buckets=BATCH_BUCKETS, registry=self.registry
        )
        self.connections_closed = Counter(
            "esm2cli_connections_closed",
            "Connections closed by the server before any request reached the app, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.queue_depth = Gauge("esm2cli_queue_depth", "Requests waiting to be batched", registry=self.registry)
        self.pending = Gauge(
            "esm2cli_pending_sequences",
            "Sequences accepted, not yet answered (the per-pod autoscaling metric)",
            registry=self.registry,
        )

    def connection_closed(self, reason: str) -> None:
        """Counts a connection closed below HTTP: header_timeout, over_capacity, send_timeout or bad_request."""
        self.connections_closed.labels(reason).inc()

    def watch_queue(self, pending: Callable[[], float], waiting: Callable[[], float]) -> None:
        """Reads the batcher's pending sequences and waiting requests at scrape time, so they are never stale."""
        self.pending.set_function(pending)
        self.queue_depth.set_function(waiting)

    def watch_devices(self, busy_seconds: Callable[[], dict[str, float]]) -> None:
        """Exposes the engine's per-device busy time once it is loaded."""
        self.registry.register(_DeviceBusy(busy_seconds))

    def watch_cache(self, cache: EmbeddingCache) -> None:
        """Exposes the embedding cache's hits, misses and size (esm2cli_cache_hits_total, ...), per API key."""
        self._cache = cache

    def render(self, partition: bytes = OPEN_PARTITION) -> bytes:
        """The metrics as a scrape with the key of ``partition`` sees them.

        The cache's counts are that key's own: global counts would tell one key holder how often other
        clients repeat their sequences (and the partitioned cache would be pointless if hits could be
        watched). Everything else is the server's.
        """
        text = generate_latest(self.registry)
        if self._cache is None:
            return text
        own = CollectorRegistry(auto_describe=False)
        own.register(_CacheStats(self._cache.stats(partition)))
        return text + generate_latest(own)
