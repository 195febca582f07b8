"""The map explorer in a real headless browser (Debian's chromium driven by Playwright)."""
import shutil

import pytest

from tests.servers import LiveServer

playwright = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt-get install chromium)")]

# Flags for a sandboxed, offline machine: no background network traffic, no GPU.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def page_url(trained_registry):
    with LiveServer(trained_registry, poll_seconds=0) as server:
        yield server.url


@pytest.fixture
def page(page_url):
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page()
        page.problems = []
        page.on("console", lambda message: message.type == "error" and page.problems.append(message.text))
        page.on("pageerror", lambda error: page.problems.append(str(error)))
        page.goto(page_url + "/")
        page.wait_for_function("document.querySelector('#status').textContent.includes('code')", timeout=20_000)
        yield page
        browser.close()


def coloured_pixels(page, canvas: str) -> int:
    return page.evaluate("""(id) => {
        const c = document.getElementById(id), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 0; i < d.length; i += 4) if (d[i + 3] > 0 && !(d[i] > 250 && d[i + 1] > 250 && d[i + 2] > 250)) n++;
        return n;
    }""", canvas)


def test_page_loads_and_shows_the_map_without_console_errors(page):
    models = page.eval_on_selector_all("#model option", "options => options.map(o => o.value)")
    assert "digits-mlp" in models
    assert page.evaluate("state.sample.x.length") == 180  # the digits test split, stored with the version
    assert coloured_pixels(page, "map") > 150
    assert page.locator("#metrics td", has_text="test_sq_err").count() == 1
    assert page.locator("#figures img").count() >= 2
    page.hover("#map", position={"x": 260, "y": 260})
    assert page.problems == []


def test_drawing_and_submitting_shows_a_reconstruction_and_a_marker(page):
    page.select_option("#model", "digits-mlp")
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('digits-mlp')")
    box = page.locator("#draw").bounding_box()
    page.mouse.move(box["x"] + 140, box["y"] + 40)
    page.mouse.down()
    for x, y in ((100, 120), (140, 200), (180, 240), (140, 260)):
        page.mouse.move(box["x"] + x, box["y"] + y, steps=5)
    page.mouse.up()
    page.click("#submit")
    page.wait_for_function("document.querySelector('#score').textContent.includes('percentile')", timeout=10_000)
    assert coloured_pixels(page, "reconstruction") > 100
    marker = page.evaluate("state.marker")
    assert len(marker) == 2 and all(isinstance(v, float) for v in marker)
    assert page.problems == []
