"""Prometheus metrics of one server, in a registry of its own (several servers can share a process).

    paramcast_requests_total{method, code}        calls finished, by status code
    paramcast_request_seconds{method}             call latency as the server sees it
    paramcast_queue_seconds                       time a Generate request waited for its batch
    paramcast_batch_size                          requests per generator pass
    paramcast_batch_seconds                       duration of one generator pass (batch compute)
    paramcast_expired_total                       requests dropped before compute, deadline passed
    paramcast_queue_depth                         requests waiting for a batch now
    paramcast_response_bytes_total{method}        serialized response bytes sent
    paramcast_bundle_bytes                        serialized size of each DeltaBundle sent
"""

from __future__ import annotations

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from paramcast.cloud.service.batcher import BatchObserver
from paramcast.cloud.service.interceptor import CallRecorder

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_BYTES_BUCKETS = (256, 512, 1024, 2048, 4096, 8192, 16384, 65536, 262144)


class ServiceMetrics(CallRecorder, BatchObserver):
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("paramcast_requests", "Calls finished, by method and status code",
                                ("method", "code"), registry=r)
        self.latency = Histogram("paramcast_request_seconds", "Call latency seen by the server", ("method",),
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("paramcast_queue_seconds", "Time a Generate request waited for its batch",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("paramcast_batch_size", "Requests per generator pass", buckets=_BATCH_BUCKETS,
                                    registry=r)
        self.batch_time = Histogram("paramcast_batch_seconds", "Duration of one generator pass",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.expired = Counter("paramcast_expired", "Requests dropped before compute because their deadline passed",
                               registry=r)
        self.depth = Gauge("paramcast_queue_depth", "Requests waiting for a batch", registry=r)
        self.bytes_out = Counter("paramcast_response_bytes", "Serialized response bytes sent", ("method",),
                                 registry=r)
        self.bundle_bytes = Histogram("paramcast_bundle_bytes", "Serialized size of each DeltaBundle sent",
                                      buckets=_BYTES_BUCKETS, registry=r)

    # CallRecorder (the error interceptor reports every finished call)
    def call_finished(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        self.requests.labels(method, code.name).inc()
        self.latency.labels(method).observe(seconds)

    # BatchObserver (the micro-batcher)
    def batch_started(self, size: int, queue_seconds: list[float]) -> None:
        self.batch_size.observe(size)
        for s in queue_seconds:
            self.queue_time.observe(s)

    def batch_finished(self, size: int, seconds: float) -> None:
        self.batch_time.observe(seconds)

    def dropped_expired(self, n: int) -> None:
        self.expired.inc(n)

    def queue_depth(self, n: int) -> None:
        self.depth.set(n)

    # the servicer
    def sent(self, method: str, nbytes: int, bundle: bool = False) -> None:
        self.bytes_out.labels(method).inc(nbytes)
        if bundle:
            self.bundle_bytes.observe(nbytes)

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes (also handy in tests)."""
        return generate_latest(self.registry)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """One sample's current value (0 when it has not been recorded yet)."""
        v = self.registry.get_sample_value(name, labels or {})
        return 0.0 if v is None else float(v)
