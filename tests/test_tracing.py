"""Tracing end to end: a real OTLP/HTTP receiver (an aiohttp app decoding the protobuf with
opentelemetry-proto) gets the spans of real requests through an in-process sidecar."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from support import Origin, free_port, make_config, until

TRACE, PARENT = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
SECRET = "s3cr3t-value-77"


class Receiver:
    """An OTLP/HTTP collector: every span it was sent, flattened to a dict."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.url = ""

    async def traces(self, request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest()
        export.ParseFromString(await request.read())
        for resource in export.resource_spans:
            service = {a.key: _value(a.value) for a in resource.resource.attributes}
            for scope in resource.scope_spans:
                for span in scope.spans:
                    self.spans.append({
                        "name": span.name, "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(), "parent": span.parent_span_id.hex(),
                        "kind": span.kind, "status": span.status.code,
                        "links": [(link.trace_id.hex(), link.span_id.hex())
                                  for link in span.links],
                        "attributes": {a.key: _value(a.value) for a in span.attributes},
                        "service": service.get("service.name")})
        return web.Response(status=200, content_type="application/x-protobuf")

    def named(self, prefix: str) -> list[dict[str, Any]]:
        return [span for span in self.spans if span["name"].startswith(prefix)]


def _value(value: Any) -> Any:
    return getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()
    app = web.Application()
    app.router.add_post("/v1/traces", found.traces)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    found.url = f"http://127.0.0.1:{port}"
    yield found
    await runner.cleanup()


def traced(origin: Origin, redis_url: str, receiver: Receiver | None, sample: float = 1.0,
           **extra: Any) -> dict[str, Any]:
    config = make_config(origin.url, redis_url, routes=[
        {"name": "reports", "match": {"path": "/api/reports/**"}, "upstream": "app",
         "offload": {"queue": "default"}},
        {"name": "products", "match": {"path": "/api/products/**"}, "upstream": "app",
         "cache": {"ttl": "60s"}},
        {"name": "default", "match": {"path": "/**"}, "upstream": "app"}], **extra)
    if receiver is not None:
        config["tracing"] = {"endpoint": receiver.url, "sample": sample,
                             "service_name": "shop-sidecar", "batch_delay": "100ms"}
    return config


def seen_by(origin: Origin, path: str) -> dict[str, str]:
    """Script `path` to answer 200 and remember the traceparent it was sent."""
    seen: dict[str, str] = {}

    async def answer(request: web.Request, n: int) -> web.Response:
        seen["traceparent"] = request.headers.get("traceparent", "")
        seen["tracestate"] = request.headers.get("tracestate", "")
        # public: stored although the request carries Authorization (RFC 9111 §3.5)
        return web.Response(text="ok", headers={"Cache-Control": "public, max-age=60"})
    origin.script(path, answer)
    return seen


async def test_the_client_trace_is_continued_and_the_upstream_sees_the_sidecars_span(
        sidecar_factory: Any, origin: Origin, redis_url: str, receiver: Receiver,
        client: aiohttp.ClientSession) -> None:
    seen = seen_by(origin, "/api/products/1")
    sidecar = await sidecar_factory(traced(origin, redis_url, receiver))
    headers = {"traceparent": f"00-{TRACE}-{PARENT}-01", "tracestate": "shop=1",
               "Authorization": f"Bearer {SECRET}"}
    for _ in range(2):  # a miss, then a hit
        async with client.get(sidecar.url + f"/api/products/1?token={SECRET}&lang=en",
                              headers=headers) as response:
            assert response.status == 200

    async def exported() -> bool:
        return len(receiver.named("GET products")) == 2 and len(receiver.named("GET app")) == 1
    await until(exported)
    miss, hit = receiver.named("GET products")
    upstream = receiver.named("GET app")[0]
    for server in (miss, hit):
        assert (server["trace_id"], server["parent"]) == (TRACE, PARENT)
        assert server["kind"] == 2  # SERVER
        assert server["service"] == "shop-sidecar"
        attributes = server["attributes"]
        assert attributes["http.route"] == "products"
        assert attributes["http.request.method"] == "GET"
        assert attributes["http.response.status_code"] == 200
        assert attributes["url.query"] == "token=<redacted>&lang=en"
    assert (miss["attributes"]["sidecar.cache"], hit["attributes"]["sidecar.cache"]) == (
        "miss", "hit")
    # The upstream attempt: a client span under the miss's server span, and the upstream was
    # sent that span as its parent, with the client's tracestate.
    assert (upstream["trace_id"], upstream["parent"], upstream["kind"]) == (
        TRACE, miss["span_id"], 3)
    assert seen["traceparent"] == f"00-{TRACE}-{upstream['span_id']}-01"
    assert seen["tracestate"] == "shop=1"
    assert upstream["attributes"]["http.response.status_code"] == 200
    assert upstream["attributes"]["sidecar.attempt"] == 1
    assert (miss["attributes"]["sidecar.retries"], "sidecar.retries" in hit["attributes"]) == (
        0, False)  # the hit made no attempt
    assert SECRET not in repr(receiver.spans)  # neither the query's token nor Authorization


async def test_untraced_requests_make_no_span_and_pass_the_traceparent_on(
        sidecar_factory: Any, origin: Origin, redis_url: str, receiver: Receiver,
        client: aiohttp.ClientSession) -> None:
    seen = seen_by(origin, "/plain")
    off = await sidecar_factory(traced(origin, redis_url, None), "off.yaml")
    assert off.runtime.tracing is None  # tracing off: nothing is built to make spans
    unsampled = f"00-{TRACE}-{PARENT}-00"
    async with client.get(off.url + "/plain", headers={"traceparent": unsampled}) as response:
        assert response.status == 200
    assert seen["traceparent"] == unsampled  # forwarded as it came

    on = await sidecar_factory(traced(origin, redis_url, receiver, sample=0.0), "on.yaml")
    async with client.get(on.url + "/plain", headers={"traceparent": unsampled}) as response:
        assert response.status == 200
    assert seen["traceparent"] == unsampled  # not sampled upstream of us: not by us either
    async with client.get(on.url + "/plain") as response:  # sample 0: no trace started
        assert response.status == 200
    assert seen["traceparent"] == ""
    sampled = f"00-{TRACE}-{PARENT}-01"
    async with client.get(on.url + "/plain", headers={"traceparent": sampled}) as response:
        assert response.status == 200  # an incoming sampled trace is followed even at 0

    async def one() -> bool:
        return len(receiver.spans) == 2
    await until(one)
    assert sorted(span["name"] for span in receiver.spans) == ["GET app", "GET default"]


async def test_an_offloaded_request_links_its_job_attempt_to_the_request(
        sidecar_factory: Any, origin: Origin, redis_url: str, receiver: Receiver,
        client: aiohttp.ClientSession) -> None:
    seen = seen_by(origin, "/api/reports/day")
    sidecar = await sidecar_factory(traced(origin, redis_url, receiver))
    async with client.post(sidecar.url + "/api/reports/day", data=b"{}",
                           headers={"traceparent": f"00-{TRACE}-{PARENT}-01"}) as response:
        assert response.status == 202

    async def attempted() -> bool:
        return bool(receiver.named("job default")) and len(receiver.named("POST app")) == 1
    await until(attempted)
    server = receiver.named("POST reports")[0]
    enqueue = receiver.named("enqueue")[0]
    job = receiver.named("job default")[0]
    upstream = receiver.named("POST app")[0]
    assert (enqueue["trace_id"], enqueue["parent"]) == (TRACE, server["span_id"])
    assert job["links"] == [(TRACE, enqueue["span_id"])]  # linked, in a trace of its own
    assert job["attributes"]["sidecar.job.attempt"] == 1
    assert upstream["parent"] == job["span_id"]
    assert seen["traceparent"] == f"00-{job['trace_id']}-{upstream['span_id']}-01"
