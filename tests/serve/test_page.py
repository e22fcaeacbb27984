"""The page (GET /) in a real headless browser: Chromium (Debian's ``chromium`` package) driven by
Playwright, against a real server on the built-in ``dit-digits`` engines (batch 2).

It loads the page, generates (the image is the API's own answer for the same body, of the size the build
makes, with a positive engine time shown), shows the server's one-line error for a bad value, compares
the methods (one figure each, with speed-up and PSNR), and serves two tabs at once with their own
results. The screenshot of the comparison goes to the test's folder; with CLUSCA_UPDATE_SCREENSHOT=1
to ``docs/serve-page.png`` too (the README's). Skips, saying why, without Playwright or Chromium."""

import base64
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="needs the serve extra: pip install 'clusca-trt[serve]'")
requests = pytest.importorskip("requests")
playwright = pytest.importorskip("playwright.sync_api", reason="needs Playwright: pip install 'clusca-trt[test]'")

from PIL import Image  # noqa: E402

from clusca_trt.runtime.compare import psnr  # noqa: E402
from clusca_trt.runtime.pipeline import Pipeline  # noqa: E402
from clusca_trt.serve.server import Server, ServeOptions  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "docs" / "serve-page.png"
CHROMIUM = os.environ.get("CLUSCA_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 120_000
PSNR_TOL_DB = 0.01  # the page's PSNR (rounded to 3 decimals) against ours from Pipeline.generate


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The built-in trained dit-digits, built for batch 2 (32 px, one channel: pixel space)."""
    from clusca_trt.exporters.build import build_engines
    from clusca_trt.models import load_model
    from clusca_trt.spec import BuildOptions

    out = tmp_path_factory.mktemp("page") / "digits"
    return build_engines(load_model("dit-digits"), BuildOptions(batch=2, clusters=16, order=2), out).manifest


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM:
        pytest.skip("no Chromium to drive (apt-get install chromium, or set CLUSCA_CHROMIUM)")
    with playwright.sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        except playwright.Error as e:
            pytest.skip(f"Chromium at {CHROMIUM} does not start: {str(e).splitlines()[0]}")
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(digits, browser):  # after the browser: no server is started where the test skips
    with Server(ServeOptions(digits.directory, port=0, threads=1, max_batch_wait_ms=50)) as s:
        yield s


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1180, "height": 600})
    tab = context.new_page()
    tab.set_default_timeout(TIMEOUT_MS)
    tab.goto(server.url + "/")
    tab.wait_for_selector("#generate:enabled")
    yield tab
    context.close()


def fill(tab, **fields):
    for name, value in fields.items():
        tab.fill(f"#f-{name}", str(value))


def shown_image(tab, selector="#result img") -> bytes:
    """The bytes of the image the page shows (its blob or data URL), once it has loaded."""
    tab.wait_for_function(f"() => {{ const i = document.querySelector({json.dumps(selector)}); "
                          "return i && i.complete && i.naturalWidth > 0; }")
    data = tab.evaluate(f"""async () => {{
        const r = await fetch(document.querySelector({json.dumps(selector)}).src);
        const bytes = new Uint8Array(await r.arrayBuffer());
        let s = ""; for (const b of bytes) s += String.fromCharCode(b);
        return btoa(s);
    }}""")
    return base64.b64decode(data)


def api_png(server, body) -> bytes:
    r = requests.post(server.url + "/generate", data=json.dumps(dict(body, format="png")), timeout=120)
    assert r.status_code == 200, r.text
    return r.content


def test_the_page_starts_with_the_builds_defaults(page, server):
    info = requests.get(server.url + "/info", timeout=10).json()
    for field in info["form"]["fields"]:
        shown = page.input_value(f"#f-{field['name']}")
        want = ", ".join(map(str, field["default"])) if isinstance(field["default"], list) else str(field["default"])
        assert shown == want, field
    defaults = info["engine"]["defaults"]
    assert page.input_value("#f-interval") == str(defaults["interval"])
    assert page.input_value("#f-propagation") == str(defaults["propagation"])
    assert "dit-digits" in page.inner_text("#engine")


def test_generate_shows_the_image_and_the_engine_seconds(page, server, digits):
    body = {"class_labels": [3, 7], "seed": 5, "steps": 50}
    fill(page, class_labels="3, 7", seed=5, steps=50)
    page.click("#generate")
    assert page.is_disabled("#generate") and page.is_disabled("#compare")  # a request in flight
    png = shown_image(page)
    page.wait_for_selector("#generate:enabled")
    side = digits.model["config"]["input_size"]  # pixel space: the image is the model's input
    assert Image.open(io.BytesIO(png)).size == (2 * side, side)  # two samples side by side
    assert png == api_png(server, body)
    caption = page.inner_text("#result figcaption")
    seconds = float(re.search(r"engine (\S+) s", caption).group(1))
    assert seconds > 0, caption
    assert page.is_hidden("#error")


@pytest.mark.parametrize("field, value, body", [
    ("steps", "0", {"class_labels": [3], "steps": 0}),
    ("class_labels", "3, x", {"class_labels": "3, x"}),
    ("cfg_scale", "strong", {"class_labels": [3], "cfg_scale": "strong"}),
])
def test_a_bad_value_shows_the_servers_one_line_error(page, server, field, value, body):
    fill(page, class_labels="3")
    fill(page, **{field: value})
    page.click("#generate")
    page.wait_for_selector("#error:visible")
    page.wait_for_selector("#generate:enabled")
    want = requests.post(server.url + "/generate", data=json.dumps(dict(body, format="png")), timeout=60)
    assert want.status_code == 400
    assert page.inner_text("#error") == want.json()["error"]
    assert page.query_selector("#result img") is None


def test_compare_shows_every_method_with_its_speedup_and_psnr(page, server, digits, tmp_path):
    fill(page, class_labels="0, 1, 2, 3", seed=3, steps=50)
    page.click("#compare")
    assert page.is_disabled("#compare") and page.is_disabled("#generate")
    page.wait_for_function("() => document.querySelectorAll('#result figure').length === 4")
    page.wait_for_function("() => [...document.querySelectorAll('#result img')].every(i => i.complete && "
                           "i.naturalWidth > 0)")
    figures = page.query_selector_all("#result figure")
    assert [f.get_attribute("data-method") for f in figures] == ["full", "clusca", "fora", "taylorseer"]
    captions = [f.inner_text() for f in figures]
    assert "reference" in captions[0] and "1.00x vs full" in captions[0]
    pipe = Pipeline.load(digits.directory)
    full = pipe.generate(class_labels=[0, 1, 2, 3], seed=3, steps=50, method="full").images
    for figure, caption in zip(figures[1:], captions[1:]):
        assert re.search(r"\d+\.\d\dx vs full", caption), caption
        shown = float(re.search(r"PSNR (\S+) dB vs full", caption).group(1))
        images = pipe.generate(class_labels=[0, 1, 2, 3], seed=3, steps=50,
                               method=figure.get_attribute("data-method")).images
        assert abs(shown - psnr(images, full)) <= PSNR_TOL_DB, (caption, psnr(images, full))
        assert float(figure.get_attribute("data-engine-seconds")) > 0
    pipe.close()
    page.screenshot(path=str(tmp_path / "serve-page.png"), full_page=True)
    assert Image.open(tmp_path / "serve-page.png").size[0] == 1180
    if os.environ.get("CLUSCA_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(tmp_path / "serve-page.png", SCREENSHOT)


def test_tabs_at_once_get_their_own_results(browser, server):
    """Two tabs press Generate together: the server may batch them into one engine run; each tab shows
    its own image (the API's answer for its own body)."""
    context = browser.new_context()
    tabs = [context.new_page() for _ in range(2)]
    bodies = [{"class_labels": [1], "seed": 11, "steps": 40}, {"class_labels": [8], "seed": 12, "steps": 40}]
    for tab, body in zip(tabs, bodies):
        tab.set_default_timeout(TIMEOUT_MS)
        tab.goto(server.url + "/")
        tab.wait_for_selector("#generate:enabled")
        fill(tab, class_labels=body["class_labels"][0], seed=body["seed"], steps=body["steps"])
    for tab in tabs:
        tab.evaluate("() => document.getElementById('generate').click()")
    shown = [shown_image(tab) for tab in tabs]
    assert shown[0] != shown[1]
    assert shown == [api_png(server, body) for body in bodies]
    context.close()
    arrays = [np.asarray(Image.open(io.BytesIO(png))) for png in shown]
    assert all(a.shape == (32, 32) for a in arrays)
