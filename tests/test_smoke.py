"""End to end through the sidecar: the backend's answer with the proxy's own headers."""


async def test_proxied_response_has_via_and_request_id(sidecar, client):
    async with client.get(sidecar.url + "/api/products/42") as response:
        assert response.status == 200
        body = await response.json()
        assert body["id"] == "42"
        assert response.headers["Via"] == "1.1 sidecar"
        assert len(response.headers["X-Request-ID"]) == 32


async def test_healthz(sidecar, client):
    async with client.get(sidecar.admin_url + "/healthz") as response:
        assert response.status == 200
        assert (await response.json())["status"] == "ok"
