"""Prometheus metrics of one server (its own registry: several apps can live in one process)."""
from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class SwitchCollector:
    """Reads the runtime's own counters at scrape time (store hits/misses/loads, memory, queue).

    A Switch gives one snapshot. A switch that runs on several replicas (Ray Serve) gives one per
    replica through `replica_stats()` ({replica id: stats}); each series then carries a `replica`
    label (sum over it for the deployment's totals)."""

    COUNTERS = (("store_hits", "requests whose expert was already compute-ready"),
                ("store_misses", "requests that had to make their expert compute-ready"),
                ("store_disk_loads", "experts read from disk"),
                ("store_hot_evictions", "compute-ready forms dropped for memory"),
                ("store_packed_evictions", "packed experts dropped from memory"),
                ("store_load_seconds", "seconds spent reading experts from disk"),
                ("store_build_seconds", "seconds spent building compute-ready forms"),
                ("steps", "engine steps (forward passes)"),
                ("tokens_generated", "tokens generated"),
                ("prompt_tokens", "prompt tokens prefilled"))
    GAUGES = (("expert_memory_bytes", "meswitch_expert_memory_bytes", "bytes of expert deltas in RAM (packed + compute-ready)"),
              ("kv_cache_bytes", "meswitch_kv_cache_bytes", "bytes of the KV cache"),
              ("queue_depth", "meswitch_queue_depth", "requests waiting"),
              ("running", "meswitch_running_requests", "requests in the running batch"),
              ("process_resident_bytes", "meswitch_process_resident_bytes", "resident memory of the server"))

    def __init__(self, switch):
        self.switch = switch

    def snapshots(self) -> tuple[list[str], list[tuple[list[str], dict]]]:
        """(label names, [(label values, stats)])."""
        per_replica = getattr(self.switch, "replica_stats", None)
        if per_replica is not None:
            return ["replica"], [([rid], s) for rid, s in sorted(per_replica().items())]
        s = dict(self.switch.stats())
        rss = process_resident_bytes()
        if rss is not None:
            s["process_resident_bytes"] = rss
        return [], [([], s)]

    def collect(self):
        names, snaps = self.snapshots()
        for key, help_ in self.COUNTERS:
            m = CounterMetricFamily(f"meswitch_{key}", help_, labels=names)
            for values, s in snaps:
                m.add_metric(values, float(s[key]))
            yield m
        for key, name, help_ in self.GAUGES:
            m = GaugeMetricFamily(name, help_, labels=names)
            for values, s in snaps:
                if key in s:
                    m.add_metric(values, float(s[key]))
            yield m
        g = GaugeMetricFamily("meswitch_expert_resident", "1 if the expert is in this tier", labels=["expert", "tier", *names])
        for values, s in snaps:
            for name, tier in s["residency"].items():
                for t in ("disk", "packed", "hot"):
                    g.add_metric([name, t, *values], 1.0 if tier == t else 0.0)
        yield g


def process_resident_bytes() -> int | None:
    """Resident memory of this process (Linux /proc), or None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


class ServerMetrics:
    def __init__(self, switch):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("meswitch_requests", "HTTP generation requests", ["endpoint", "expert", "status"], registry=r)
        self.tokens = Counter("meswitch_tokens", "tokens per expert", ["expert", "kind"], registry=r)
        self.latency = Histogram("meswitch_request_latency_seconds", "request latency", ["expert"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("meswitch_time_to_first_token_seconds", "time to first token", ["expert"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.routes = Counter("meswitch_routing_decisions", "auto-routing decisions", ["expert", "fallback"], registry=r)
        self.errors = Counter("meswitch_errors", "error responses", ["status"], registry=r)
        self.in_flight = Gauge("meswitch_http_in_flight", "generation requests being served", registry=r)
        r.register(SwitchCollector(switch))

    def render(self) -> bytes:
        return generate_latest(self.registry)
