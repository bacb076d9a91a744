"""The dashboard (`GET /` on the admin listener) driven in a real headless browser: Debian's
chromium through chromium-driver and selenium. The sidecar runs in the test's event loop; each
browser step runs in a thread (`Browser.do`) so that the sidecar and the upstream keep serving
while the browser waits on the page. No fixed sleeps: WebDriverWait on conditions.

Set SIDECAR_SCREENSHOTS to a folder to have `test_every_tab_renders` save a screenshot of each
tab there (docs/dashboard.md shows them)."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from support import InProcessSidecar, Origin, make_config, until

from sidecar.core.series import Ring, Totals, quantile, route_view
from sidecar.dashboard import assets

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

ADMIN = "dashboard-admin-token-0123"
READ = "dashboard-read-token-01234"
Factory = Callable[..., Awaitable[InProcessSidecar]]


# -- the series, without a browser ---------------------------------------------------------------


def test_quantiles_and_deltas_without_a_socket() -> None:
    bounds = (0.1, 0.5, 1.0)
    assert quantile(0.5, bounds, [0, 0, 0, 0]) is None
    assert quantile(0.5, bounds, [10, 0, 0, 0]) == pytest.approx(0.05)
    assert quantile(0.99, bounds, [0, 0, 0, 5]) == 1.0  # +Inf: the highest bound
    ring = Ring(3)
    counts = (0, 0, 0, 0, 0, 0)
    assert ring.add(1, {"a": Totals(counts, bounds, (0, 0, 0, 0))}) is None  # the baseline
    for second, total in ((2, 10), (3, 30), (4, 31), (5, 40)):
        ring.add(second, {"a": Totals((total, 1, 0, 0, 0, 0), bounds, (total, 0, 0, 0))})
    assert [s.at for s in ring.samples] == [3, 4, 5]  # the oldest went
    view = route_view(ring.last(60), "a", smooth=1)
    assert view["series"]["rps"] == [20, 1, 9]  # type: ignore[index]
    assert view["window"]["requests"] == 30  # type: ignore[index]
    # A counter going back (new buckets after a reload) is an empty second, not negative.
    ring.add(6, {"a": Totals((1, 0, 0, 0, 0, 0), bounds, (1, 0, 0, 0))})
    assert ring.samples[-1].routes["a"] == (0,) * 10


def test_the_page_and_its_assets_are_small() -> None:
    files = assets()
    assert {"index.html", "app.js", "app.css"} <= set(files)
    assert sum(len(body) for body in files.values()) < 300 * 1024


async def test_one_job_is_cancelled_by_id_and_a_read_token_cannot(
        sidecar_factory: Factory, origin: Origin, redis_url: str,
        client: aiohttp.ClientSession) -> None:
    origin.reply("/api/reports/later")
    sidecar = await sidecar_factory(dashboard_config(origin, redis_url))
    admin = {"Authorization": f"Bearer {ADMIN}"}
    async with client.post(sidecar.admin_url + "/admin/queues/reports/pause",
                           headers=admin) as response:
        assert response.status == 200
    async with client.post(sidecar.url + "/api/reports/later", data=b"{}") as response:
        job_id = (await response.json())["id"]
    cancel = f"{sidecar.admin_url}/admin/jobs/{job_id}/cancel"
    async with client.post(cancel, headers={"Authorization": f"Bearer {READ}"}) as response:
        assert response.status == 403
    async with client.post(cancel, headers=admin) as response:
        assert response.status == 200
        assert (await response.json())["status"] == "cancelled"
    async with client.post(cancel, headers=admin) as response:
        assert response.status == 409
    async with client.post(f"{sidecar.admin_url}/admin/jobs/nope.0.x/cancel",
                           headers=admin) as response:
        assert response.status == 404
    assert origin.calls["/api/reports/later"] == 0


# -- the browser ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def driver() -> Iterator[WebDriver]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        pytest.skip("chromium and chromium-driver are not installed "
                    "(scripts/ensure-debian-packages chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1280,900", "--disable-extensions"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=chromedriver)
    browser = webdriver.Chrome(options=options, service=service)
    yield browser
    browser.quit()


class Browser:
    """The page, from the test's event loop: each call runs in a thread."""

    def __init__(self, driver: WebDriver, base: str) -> None:
        self.driver = driver
        self.base = base

    async def do(self, step: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(step, *args)

    async def wait(self, condition: Callable[[WebDriver], Any], what: str,
                   timeout: float = 10.0) -> Any:
        def run() -> Any:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.05,
                                 ignored_exceptions=(WebDriverException,)).until(
                condition, f"{what} (page error: {self.error_text()!r})")
        return await self.do(run)

    def error_text(self) -> str:
        try:
            return str(self.driver.execute_script(
                "const e = document.getElementById('error'); return e && !e.hidden ? "
                "e.textContent : (document.getElementById('login-error') || {}).textContent"))
        except WebDriverException:
            return ""

    async def open(self, token: str | None) -> None:
        await self.do(self.driver.get, self.base + "/")
        if token is not None:
            await self.login(token)
        await self.wait(lambda d: d.find_element(By.ID, "main").is_displayed(),
                        "the dashboard opens")

    async def login(self, token: str) -> None:
        await self.wait(lambda d: d.find_element(By.ID, "login").is_displayed(),
                        "the page asks for the token")

        def submit() -> None:
            field = self.driver.find_element(By.ID, "token")
            field.clear()
            field.send_keys(token)
            self.driver.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()
        await self.do(submit)

    async def tab(self, name: str) -> None:
        await self.do(lambda: self.driver.find_element(
            By.CSS_SELECTOR, f"#tabs button[data-tab={name}]").click())
        await self.wait(lambda d: d.find_element(By.ID, f"tab-{name}").is_displayed(),
                        f"the {name} tab shows")

    def attribute(self, selector: str, name: str) -> str | None:
        found = self.driver.find_elements(By.CSS_SELECTOR, selector)
        return found[0].get_attribute(name) if found else None

    def script_errors(self) -> list[str]:
        """Severe console entries, but for the 401s the page asks for on purpose."""
        return [entry["message"] for entry in self.driver.get_log("browser")
                if entry["level"] == "SEVERE" and "status of 401" not in entry["message"]
                and "status of 403" not in entry["message"]]


@pytest.fixture
async def browser(driver: WebDriver) -> AsyncIterator[Callable[[InProcessSidecar], Browser]]:
    opened: list[Browser] = []

    def make(sidecar: InProcessSidecar) -> Browser:
        page = Browser(driver, sidecar.admin_url)
        opened.append(page)
        return page

    await asyncio.to_thread(driver.get_log, "browser")  # what earlier tests left
    yield make
    for page in opened:
        errors = await asyncio.to_thread(page.script_errors)
        assert not errors, errors
        await asyncio.to_thread(driver.get, "about:blank")


def dashboard_config(origin: Origin, redis_url: str, **sections: Any) -> dict[str, Any]:
    return make_config(
        origin.url, redis_url,
        admin={"token": ADMIN, "tokens": {"viewer": {"token": READ, "scope": "read"}}},
        queues={"reports": {"concurrency": 2}},
        jobs={"visibility_timeout": "2s", "sweep_interval": "1s"},
        metrics={"sla": {"latency_p95": "250ms", "error_ratio": 0.05}},
        routes=[
            {"name": "flaky", "match": {"path": "/flaky"}, "upstream": "app",
             "breaker": {"failures": 2, "reset": "60s"}},
            {"name": "reports", "match": {"path": "/api/reports/**"}, "upstream": "app",
             "offload": {"queue": "reports", "backoff": "50ms"}},
            {"name": "products", "match": {"path": "/api/products/**"}, "upstream": "app",
             "cache": {"ttl": "60s"}},
            {"name": "default", "match": {"path": "/**"}, "upstream": "app"},
        ], **sections)


async def get(client: aiohttp.ClientSession, url: str) -> int:
    async with client.get(url) as response:
        await response.read()
        return response.status


async def test_the_page_asks_for_the_token_and_shows_every_route_and_their_rates(
        sidecar_factory: Factory, origin: Origin, redis_url: str,
        client: aiohttp.ClientSession, browser: Callable[[InProcessSidecar], Browser]) -> None:
    origin.reply("/api/products/1")
    sidecar = await sidecar_factory(dashboard_config(origin, redis_url))
    page = browser(sidecar)
    # The files need no token; the API does.
    async with client.get(sidecar.admin_url + "/") as response:
        assert response.status == 200 and "text/html" in response.headers["Content-Type"]
        assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    async with client.get(sidecar.admin_url + "/admin/series") as response:
        assert response.status == 401
    await page.open(ADMIN)
    routes = {"flaky", "reports", "products", "default"}
    await page.wait(lambda d: {e.get_attribute("data-route") for e in d.find_elements(
        By.CSS_SELECTOR, "#routes [data-route]")} == routes, "a card per configured route")
    assert await page.do(page.attribute, "[data-route=products]", "data-rps") == "0.00"
    # A burst moves the route's rate (the series is sampled once a second).
    for _ in range(4):
        assert {await get(client, sidecar.url + "/api/products/1")
                for _ in range(30)} == {200}
    await page.wait(lambda d: float(d.find_element(
        By.CSS_SELECTOR, "[data-route=products]").get_attribute("data-rps")) > 1,
        "the products route's requests/s rises")
    assert await page.do(page.attribute, "[data-route=default]", "data-rps") == "0.00"
    # The token is kept for the tab: a reload opens the page again without asking.
    await page.do(page.driver.refresh)
    await page.wait(lambda d: d.find_element(By.ID, "main").is_displayed(), "reopened")


async def test_a_wrong_token_is_refused_clearly_and_a_read_token_cannot_act(
        sidecar_factory: Factory, origin: Origin, redis_url: str,
        browser: Callable[[InProcessSidecar], Browser]) -> None:
    sidecar = await sidecar_factory(dashboard_config(origin, redis_url))
    page = browser(sidecar)
    await page.do(page.driver.get, page.base + "/")
    await page.login("not-the-token-at-all")
    await page.wait(lambda d: "token was refused" in d.find_element(By.ID, "login-error").text,
                    "a clear refusal")
    assert not await page.do(lambda: page.driver.find_element(By.ID, "main").is_displayed())
    await page.login(READ)
    await page.wait(lambda d: d.find_element(By.ID, "main").is_displayed(), "opens")
    assert "viewer (read)" in await page.do(
        lambda: page.driver.find_element(By.ID, "whoami").text)
    await page.tab("upstreams")
    await page.wait(lambda d: d.find_elements(By.CSS_SELECTOR, "[data-reset='route:flaky']"),
                    "the breakers are listed")
    assert not await page.do(lambda: page.driver.find_element(
        By.CSS_SELECTOR, "[data-reset='route:flaky']").is_enabled())
    await page.tab("cache")
    assert not await page.do(lambda: page.driver.find_element(
        By.CSS_SELECTOR, "#purge button").is_enabled())


async def test_the_purge_form_empties_a_cached_route(
        sidecar_factory: Factory, origin: Origin, redis_url: str,
        client: aiohttp.ClientSession, browser: Callable[[InProcessSidecar], Browser]) -> None:
    origin.reply("/api/products/7", headers={"Cache-Control": "max-age=60"})
    sidecar = await sidecar_factory(dashboard_config(origin, redis_url))
    for _ in range(3):
        assert await get(client, sidecar.url + "/api/products/7") == 200
    assert origin.calls["/api/products/7"] == 1  # stored, then hits
    page = browser(sidecar)
    await page.open(ADMIN)
    await page.tab("cache")

    def purge() -> None:
        Select(page.driver.find_element(By.ID, "purge-kind")).select_by_value("prefix")
        page.driver.find_element(By.ID, "purge-value").send_keys("/api/products/")
        page.driver.find_element(By.CSS_SELECTOR, "#purge button").click()
    await page.do(purge)
    await page.wait(lambda d: d.find_element(By.ID, "purge-result").text.startswith("Purged"),
                    "the purge is confirmed")
    assert await get(client, sidecar.url + "/api/products/7") == 200
    assert origin.calls["/api/products/7"] == 2  # a miss: the upstream answered again
    await page.wait(lambda d: d.find_elements(By.CSS_SELECTOR, "#cache-routes [data-route]"),
                    "the cached routes are listed")


async def test_a_breaker_reset_from_the_page_closes_it(
        sidecar_factory: Factory, origin: Origin, redis_url: str,
        client: aiohttp.ClientSession, browser: Callable[[InProcessSidecar], Browser]) -> None:
    origin.reply("/flaky", status=503, body="down")
    sidecar = await sidecar_factory(dashboard_config(origin, redis_url))
    for _ in range(3):
        assert await get(client, sidecar.url + "/flaky") == 503
    breaker = sidecar.runtime.breakers.breakers["route:flaky"]
    assert breaker.state.value == "open"
    page = browser(sidecar)
    await page.open(ADMIN)
    await page.tab("upstreams")
    row = "[data-breaker='route:flaky']"
    await page.wait(lambda d: d.find_element(By.CSS_SELECTOR, row).get_attribute("data-state")
                    == "open", "the breaker shows open")
    await page.do(lambda: page.driver.find_element(
        By.CSS_SELECTOR, "[data-reset='route:flaky']").click())
    await page.wait(lambda d: d.find_element(By.CSS_SELECTOR, row).get_attribute("data-state")
                    == "closed", "the breaker shows closed")
    assert breaker.state.value == "closed"


async def test_an_offloaded_jobs_progress_bar_advances_to_done(
        sidecar_factory: Factory, origin: Origin, redis_url: str,
        client: aiohttp.ClientSession, browser: Callable[[InProcessSidecar], Browser]) -> None:
    steps = [asyncio.Event(), asyncio.Event()]

    async def report(request: web.Request, n: int) -> web.Response:
        url = request.headers["X-Sidecar-Progress-URL"]
        secret = {"X-Sidecar-Progress-Token": request.headers["X-Sidecar-Progress-Token"]}
        async with aiohttp.ClientSession() as session:
            for percent, step in ((30, steps[0]), (70, steps[1])):
                async with session.post(url, json={"progress": percent}, headers=secret) as r:
                    assert r.status == 204
                await step.wait()  # until the page has shown it
        return web.Response(text="the report")

    origin.script("/api/reports/monthly", report)
    sidecar = await sidecar_factory(dashboard_config(origin, redis_url))
    async with client.post(sidecar.url + "/api/reports/monthly", data=b"{}") as response:
        assert response.status == 202
        job_id = (await response.json())["id"]
    page = browser(sidecar)
    await page.open(ADMIN)
    await page.tab("jobs")
    row = f"[data-job='{job_id}']"
    for percent, step in ((30, steps[0]), (70, steps[1])):
        await page.wait(lambda d, p=percent: d.find_element(By.CSS_SELECTOR, row)
                        .get_attribute("data-progress") == str(p), f"the bar shows {percent}%")
        assert await page.do(page.attribute, row, "data-status") == "running"
        step.set()
    await page.wait(lambda d: d.find_element(By.CSS_SELECTOR, row).get_attribute("data-status")
                    == "succeeded", "the job is done")
    assert await page.do(page.attribute, f"{row} progress", "value") == "100"
    # Its detail opens from the list.
    await page.do(lambda: page.driver.find_element(By.CSS_SELECTOR, f"{row} a.job").click())
    await page.wait(lambda d: '"succeeded"' in d.find_element(By.ID, "job-detail-body").text,
                    "the job's detail")


async def test_every_tab_renders(
        sidecar_factory: Factory, origin: Origin, redis_url: str,
        client: aiohttp.ClientSession, browser: Callable[[InProcessSidecar], Browser]) -> None:
    origin.reply("/api/products/1", headers={"Cache-Control": "max-age=60"})
    origin.reply("/flaky", status=503, body="down")
    origin.reply("/api/reports/q1")
    sidecar = await sidecar_factory(dashboard_config(origin, redis_url))
    for path in ("/flaky", "/flaky", *["/api/products/1"] * 20, "/other"):
        await get(client, sidecar.url + path)
    async with client.post(sidecar.url + "/api/reports/q1", data=b"{}") as response:
        assert response.status == 202
    await until(lambda: _series_has_traffic(client, sidecar))
    folder = os.environ.get("SIDECAR_SCREENSHOTS")
    if folder:  # some history for the sparklines: traffic until the series spans 20 s
        await _traffic_for(client, sidecar, 20)
    page = browser(sidecar)
    await page.open(ADMIN)
    ready = {
        "routes": "#routes [data-route=products] polyline",
        "upstreams": "[data-breaker='route:flaky']",
        "cache": "#layers tbody tr",
        "traffic": "#traffic [data-route]",
        "jobs": "#jobs [data-status=succeeded]",
        "config": "#reloads tbody tr",
    }
    for name, selector in ready.items():
        await page.tab(name)
        await page.wait(lambda d, s=selector: d.find_elements(By.CSS_SELECTOR, s),
                        f"the {name} tab fills")
        assert not await page.do(lambda: page.driver.find_element(By.ID, "error").is_displayed())
        if folder:
            await page.do(page.driver.save_screenshot, str(Path(folder) / f"dashboard-{name}.png"))
    assert ADMIN not in await page.do(lambda: page.driver.find_element(By.ID, "config").text)
    await page.do(page.driver.set_window_size, 390, 844)  # a phone
    await page.tab("routes")
    width = await page.do(lambda: page.driver.execute_script(
        "return document.documentElement.scrollWidth"))
    assert width <= 390
    if folder:
        await page.do(page.driver.save_screenshot, str(Path(folder) / "dashboard-phone.png"))
    await page.do(page.driver.set_window_size, 1280, 900)
    # Dark when the system says so (prefers-color-scheme).
    background = "return getComputedStyle(document.body).backgroundColor"
    light = await page.do(page.driver.execute_script, background)
    await page.do(page.driver.execute_cdp_cmd, "Emulation.setEmulatedMedia", {
        "features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    try:
        await page.wait(lambda d: d.execute_script(background) != light, "the dark colours")
        if folder:
            await page.do(page.driver.save_screenshot,
                          str(Path(folder) / "dashboard-dark.png"))
    finally:
        await page.do(page.driver.execute_cdp_cmd, "Emulation.setEmulatedMedia",
                      {"features": []})


async def _series_has_traffic(client: aiohttp.ClientSession, sidecar: InProcessSidecar) -> bool:
    async with client.get(sidecar.admin_url + "/admin/series",
                          headers={"Authorization": f"Bearer {ADMIN}"}) as response:
        data = await response.json()
    return any(r["window"]["requests"] for r in data["routes"] if r["name"] == "products")


async def _traffic_for(client: aiohttp.ClientSession, sidecar: InProcessSidecar,
                       seconds: int) -> None:
    """Uneven traffic on every route until the series holds `seconds` samples."""
    n = 0
    while len(sidecar.runtime.series.ring.samples) < seconds:
        n += 1
        for path in ("/api/products/1", "/api/products/1", f"/other/{n % 7}",
                     *(["/flaky"] if n % 5 == 0 else []),
                     *([f"/api/products/{n}"] if n % 3 == 0 else [])):
            await get(client, sidecar.url + path)
        await asyncio.sleep(0.01 * (n % 10))  # a wavy rate for the pictures, not a wait
