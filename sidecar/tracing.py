"""Tracing with OpenTelemetry: the one module that speaks to its SDK and OTLP exporter.

`tracing:` in the config turns it on (docs/metrics.md, Tracing). Each traced request gets a
server span (the request: route, method, status, cache result as attributes), a client span per
upstream attempt (whose context the upstream receives in `traceparent`), and for an offloaded
route an enqueue span; each job attempt is a span of its own, linked to the request's, from the
trace context stored with the job. Spans are exported in batches by the SDK's own thread,
off the request path.

Which requests are traced is decided first, without the SDK (core/tracecontext.py says why):
an incoming `traceparent` is followed, sampled or not as its flag says, and a request without
one is traced with probability `sample`. With tracing off, the edge holds None here and checks
nothing else.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    StatusCode,
    TraceFlags,
    TraceState,
    set_span_in_context,
)
from opentelemetry.trace import Status as SpanStatus

from .core.tracecontext import Parent, parse_traceparent, traceparent, with_trace_headers

if TYPE_CHECKING:
    from .config import TracingConfig
    from .core.redact import Redactor
    from .http.request import RequestHead

log = logging.getLogger("sidecar.tracing")


def _remote(parent: Parent, state: str | None) -> SpanContext:
    return SpanContext(int(parent.trace_id, 16), int(parent.span_id, 16), is_remote=True,
                       trace_flags=TraceFlags(TraceFlags.SAMPLED),
                       trace_state=TraceState.from_header([state]) if state else None)


class Trace:
    """One traced request: its server span, and the client spans of its upstream calls."""

    __slots__ = ("attempts", "span", "state", "tracing")

    def __init__(self, tracing: Tracing, span: Span, state: str | None) -> None:
        self.tracing = tracing
        self.span = span
        self.state = state  # the client's tracestate, passed on unchanged
        self.attempts = 0  # upstream attempts so far: retries are the ones past the first

    def traceparent(self) -> str:
        context = self.span.get_span_context()
        return traceparent(context.trace_id, context.span_id)

    def upstream(self, upstream: str, head: bytes) -> tuple[Span, bytes]:
        """A client span for one upstream attempt (numbered from 1), and the request head
        carrying it."""
        self.attempts += 1
        span = self.tracing.tracer.start_span(
            f"{head.split(b' ', 1)[0].decode('latin-1')} {upstream}", kind=SpanKind.CLIENT,
            context=set_span_in_context(self.span),
            attributes={"sidecar.upstream": upstream, "sidecar.attempt": self.attempts})
        context = span.get_span_context()
        return span, with_trace_headers(head, traceparent(context.trace_id, context.span_id),
                                        self.state)

    @staticmethod
    def end_upstream(span: Span, status: int | None, error: str | None = None) -> None:
        """Close a client span with the upstream's status, or the error that stood for one."""
        if status is not None:
            span.set_attribute("http.response.status_code", status)
        if error is not None or (status is not None and status >= 500):
            span.set_status(SpanStatus(StatusCode.ERROR, error))
            if error is not None:
                span.set_attribute("error.type", error)
        span.end()

    @staticmethod
    def context_of(span: Span) -> str:
        """A span's `traceparent`: what a job keeps of the request that made it."""
        context = span.get_span_context()
        return traceparent(context.trace_id, context.span_id)

    def child(self, name: str, attributes: Mapping[str, Any]) -> Span:
        return self.tracing.tracer.start_span(name, context=set_span_in_context(self.span),
                                              attributes=attributes)

    def finish(self, route: str, failure: str | None) -> None:
        """End a job attempt's span: its route, and what made it fail, if it did."""
        self.span.set_attribute("http.route", route)
        if failure is not None:
            self.span.set_attribute("error.type", failure)
            self.span.set_status(SpanStatus(StatusCode.ERROR, failure))
        self.span.end()

    def end(self, route: str | None, status: int, attributes: Mapping[str, Any]) -> None:
        span = self.span
        if route is not None:
            span.update_name(f"{span.name} {route}")  # type: ignore[attr-defined]
            span.set_attribute("http.route", route)
        span.set_attribute("http.response.status_code", status)
        if self.attempts:
            span.set_attribute("sidecar.upstream.attempts", self.attempts)
            span.set_attribute("sidecar.retries", self.attempts - 1)
        for key, value in attributes.items():
            if value is not None:
                span.set_attribute(key, value)
        if status >= 500:
            span.set_status(SpanStatus(StatusCode.ERROR))
        span.end()


class Tracing:
    """The worker's tracer: the SDK's provider, its batch exporter, and the sampling rule."""

    def __init__(self, config: TracingConfig, redactor: Redactor, worker_id: int) -> None:
        self.sample = config.sample
        self.redactor = redactor
        resource = Resource.create({"service.name": config.service_name,
                                    "service.instance.id": f"{os.uname().nodename}:"
                                                           f"{os.getpid()}",
                                    "sidecar.worker": worker_id})
        self.provider = TracerProvider(resource=resource, sampler=ALWAYS_ON)
        exporter = OTLPSpanExporter(endpoint=config.endpoint.rstrip("/") + "/v1/traces",
                                    timeout=config.timeout)
        self.provider.add_span_processor(BatchSpanProcessor(
            exporter, schedule_delay_millis=int(config.batch_delay * 1000)))
        self.tracer = self.provider.get_tracer("sidecar")

    def start(self, head: RequestHead) -> Trace | None:
        """The request's trace, or None when it is not traced (see the module's docstring)."""
        parent = parse_traceparent(head.headers.get("traceparent"))
        state = head.headers.get("tracestate") if parent is not None else None
        if parent is None:
            if self.sample <= 0 or random.random() >= self.sample:
                return None
            context = None
        elif not parent.sampled:
            return None
        else:
            context = set_span_in_context(NonRecordingSpan(_remote(parent, state)))
        span = self.tracer.start_span(head.method, kind=SpanKind.SERVER, context=context,
                                      attributes={
                                          "http.request.method": head.method,
                                          "url.path": head.path,
                                          "url.query": self.redactor.target(
                                              "?" + head.query)[1:] if head.query else "",
                                          "url.scheme": head.scheme,
                                          "client.address": head.client or "",
                                      })
        return Trace(self, span, state)

    def job_attempt(self, stored: str | None, job_id: str, queue: str, attempt: int
                    ) -> Trace | None:
        """A span for one attempt of a job, linked to the request that created it (its
        `traceparent` stored with the job); None for a job of an untraced request."""
        parent = parse_traceparent(stored)
        if parent is None:
            return None
        span = self.tracer.start_span(f"job {queue}", kind=SpanKind.CONSUMER,
                                      links=[Link(_remote(parent, None))],
                                      attributes={"sidecar.job.id": job_id,
                                                  "sidecar.job.queue": queue,
                                                  "sidecar.job.attempt": attempt})
        return Trace(self, span, None)

    def shutdown(self) -> None:
        """Export what is buffered (within the exporter's timeout) and stop its thread."""
        try:
            self.provider.shutdown()
        except Exception as exc:  # a collector gone at shutdown must not fail the stop
            log.warning("spans not exported at shutdown", extra={"error": str(exc)})
