"""Prometheus metrics of a dispatcher (optional ``/metrics`` endpoint).

Counters and histograms are fed by the dispatcher's observer hook; gauges
(queue depth, ready services) are read from ``edm.system_health`` by the
sweeper loop. A private registry keeps several dispatchers in one process
(tests) from clashing.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
WAIT_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 300, 600, 1800, 3600)


class DispatcherMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.claims = Counter("edm_claims", "Subtasks claimed", registry=r)
        self.claim_calls = Counter("edm_claim_calls", "Calls of edm.claim", registry=r)
        self.sends = Counter("edm_sends", "Send attempts by outcome", ["outcome"], registry=r)
        self.claim_latency = Histogram("edm_claim_latency_seconds", "edm.claim round trip",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.send_latency = Histogram("edm_send_latency_seconds", "Transport send time",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.first_send_wait = Histogram("edm_first_send_wait_seconds",
                                         "scheduled_at to first claim of a task",
                                         buckets=WAIT_BUCKETS, registry=r)
        self.queue_depth = Gauge("edm_queue_depth", "Pending subtasks", registry=r)
        self.leased = Gauge("edm_leased_subtasks", "Subtasks being sent", registry=r)
        self.ready_services = Gauge("edm_ready_services", "Services ready right now", registry=r)
        self.open_alerts = Gauge("edm_open_alerts", "Alerts not resolved", registry=r)

    def observe(self, event: str, data: dict[str, Any]) -> None:
        """The dispatcher's observer hook."""
        if event == "claim":
            self.claim_calls.inc()
            self.claims.inc(data["n"])
            self.claim_latency.observe(data["seconds"])
        elif event == "sent":
            self.sends.labels(outcome=data["outcome"]).inc()
            self.send_latency.observe(data["seconds"])
        elif event == "first_send":
            self.first_send_wait.observe(data["seconds"])

    def set_health(self, health: dict[str, Any]) -> None:
        self.queue_depth.set(health["pending_subtasks"])
        self.leased.set(health["leased_subtasks"])
        self.ready_services.set(health["services_available"])
        self.open_alerts.set(health["open_alerts"])

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        start_http_server(port, addr=addr, registry=self.registry)
