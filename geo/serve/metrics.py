"""What ``GET /metrics`` reports, in the Prometheus text format.

prometheus_client writes the exposition format (escaping, histogram buckets,
``_created`` series) that scrapers expect; the metrics live in a registry of
their own per app, so two servers in one process (the tests) never share counts.
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """Request counts by route and status, per-image errors, latency, batch sizes, the model threads' time per part,
    queue depth, bodies in flight."""

    def __init__(self, queue_depth: Callable[[], int], body_bytes: Callable[[], int]):
        self.registry = CollectorRegistry()
        self.requests = Counter("geo_requests", "HTTP requests by route and status code",
                                ("route", "status"), registry=self.registry)
        self.image_errors = Counter("geo_image_errors", "Uploaded images answered with an error instead of a place",
                                    registry=self.registry)
        self.images = Counter("geo_images", "Images and embeddings located", registry=self.registry)
        self.latency = Histogram("geo_request_seconds", "Request latency in seconds by route", ("route",),
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("geo_batch_size", "Images per micro-batch (one forward pass, one FAISS search)",
                                    buckets=_BATCH_BUCKETS, registry=self.registry)
        self.model_seconds = Counter("geo_model_seconds", "Seconds the model threads spent per part of their batches: "
                                     "decode (and preprocess), forward, answer (search, fusion, places, regions)",
                                     ("part",), registry=self.registry)
        self.queue = Gauge("geo_queue_depth", "Images waiting for the model", registry=self.registry)
        self.queue.set_function(queue_depth)
        self.body_bytes = Gauge("geo_body_bytes_in_flight", "Bytes of request bodies being read or answered "
                                "(bounded by max_inflight_mb)", registry=self.registry)
        self.body_bytes.set_function(body_bytes)

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def text(self) -> bytes:
        return generate_latest(self.registry)
