"""Open rendered reports in headless Chromium (selenium) and check what a reader's browser does:
no console error, no request other than the report file itself, every plot drawn at a non-zero
size, hostile model strings shown as text and never run. Screenshots go to tests/_artifacts/.

Needs Debian ``chromium`` and ``chromium-driver`` and ``pip install selenium``; skipped otherwise.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from profile_factory import HOSTILE, HOSTILE_FRAGMENTS, make_profile, visible_text  # noqa: E402

from geoprobe.report import render_report  # noqa: E402

pytestmark = pytest.mark.browser

ARTIFACTS = Path(__file__).parent / "_artifacts"


def _binaries() -> tuple[str | None, str | None]:
    browser = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser",
                                                           "google-chrome")) if p), None)
    return browser, shutil.which("chromedriver")


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver",
                                    reason="selenium is not installed (pip install selenium)")
    browser, chromedriver = _binaries()
    if browser is None or chromedriver is None:
        pytest.skip("headless Chromium not available: apt-get install -y chromium chromium-driver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-dev-shm-usage", "--window-size=1280,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    drv = webdriver.Chrome(service=Service(chromedriver), options=opts)
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()


def _open(drv, path: Path) -> tuple[list[dict], list[str]]:
    """Load ``path``; return the console entries and every requested URL of that load."""
    drv.get_log("browser")
    drv.get_log("performance")
    drv.get(path.resolve().as_uri())
    drv.execute_script("return document.readyState")
    console = drv.get_log("browser")
    urls = []
    for entry in drv.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg.get("method") == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
        elif msg.get("method") == "Network.webSocketCreated":
            urls.append(msg["params"]["url"])
    return console, urls


def _screenshot(drv, name: str) -> Path:
    """A full-page screenshot (window stretched to the page height, within Chrome's limit)."""
    ARTIFACTS.mkdir(exist_ok=True)
    height = int(drv.execute_script("return document.documentElement.scrollHeight"))
    drv.set_window_size(1280, min(max(height, 900), 16000))
    out = ARTIFACTS / name
    drv.save_screenshot(str(out))
    drv.set_window_size(1280, 900)
    return out


def _check_page(drv, path: Path) -> None:
    console, urls = _open(drv, path)
    assert urls, "the performance log recorded no request at all (logging not working?)"
    report_url = path.resolve().as_uri()
    for url in urls:
        assert url.startswith(("file:", "data:")), f"network request to {url}"
        if url.startswith("file:"):
            assert url == report_url, f"the page requested another file: {url}"
    errors = [e for e in console if e.get("level") == "SEVERE"]
    assert not errors, f"console errors: {errors}"
    n_figures = len(re.findall(r'<figure class="plot[ "]', path.read_text(encoding="utf-8")))
    sizes = drv.execute_script(
        "return Array.from(document.querySelectorAll('figure.plot svg, img'))"
        ".map(e => { const r = e.getBoundingClientRect(); return [r.width, r.height]; });")
    assert len(sizes) == n_figures >= 8
    for w, h in sizes:
        assert w > 100 and h > 50, f"a plot is drawn at {w}×{h}"
    # nothing overflows the viewport horizontally (responsive width)
    overflow = drv.execute_script(
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0


def test_single_report_in_browser(driver, tmp_path):
    path = render_report([make_profile(adapter_plan=True, finetune=True)],
                         tmp_path / "single.html", command="geoprobe report --model smollm2")
    _check_page(driver, path)
    headings = driver.execute_script(
        "return Array.from(document.querySelectorAll('section > h2')).map(h => h.textContent)")
    assert headings == ["Summary", "Token frequency", "Embedding norm and frequency",
                        "δ-hyperbolicity", "Intrinsic dimension", "Adapter plan",
                        "Fine-tune results", "Reproducibility"]
    shot = _screenshot(driver, "report_single.png")
    assert shot.stat().st_size > 10_000
    # a phone-sized window: the page reflows, wide tables scroll inside their own box
    driver.set_window_size(480, 900)
    try:
        overflow = driver.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0
        widths = driver.execute_script(
            "return Array.from(document.querySelectorAll('figure.plot svg'))"
            ".map(e => e.getBoundingClientRect().width)")
        client = driver.execute_script("return document.documentElement.clientWidth")
        assert all(0 < w <= client for w in widths)
    finally:
        driver.set_window_size(1280, 900)


def test_comparison_report_in_browser(driver, tmp_path):
    a = make_profile()
    b = make_profile("all-MiniLM-L6-v2", seed=1, n_layers=6, hidden=384, vocab=30522, zipf_s=1.05,
                     delta_prompt_side="below")
    path = render_report([a, b], tmp_path / "compare.html")
    _check_page(driver, path)
    legends = driver.execute_script(
        "return Array.from(document.querySelectorAll('figure.plot svg text'))"
        ".map(t => t.textContent)")
    assert "SmolLM2-135M-Instruct" in legends and "all-MiniLM-L6-v2" in legends
    _screenshot(driver, "report_compare.png")


CSP = re.compile(r'<meta http-equiv="Content-Security-Policy"[^>]*>')


@pytest.fixture(scope="module")
def hostile_page(tmp_path_factory) -> str:
    hostile = make_profile(HOSTILE[0] + HOSTILE[1], token_strings=list(HOSTILE),
                           extra_words=list(HOSTILE), corpus=HOSTILE[1], command=HOSTILE[0],
                           adapter_plan=True, finetune=True)
    path = render_report([hostile, make_profile("other", seed=3)],
                         tmp_path_factory.mktemp("hostile") / "hostile.html", command=HOSTILE[1])
    return path.read_text(encoding="utf-8")


@pytest.mark.parametrize("strip_csp", [False, True], ids=["with-csp", "without-csp"])
def test_hostile_strings_are_text(driver, tmp_path, hostile_page, strip_csp):
    """The hostile strings show literally and run nothing — also with the page's
    Content-Security-Policy removed, so that escaping alone is what is tested."""
    text = hostile_page
    if strip_csp:
        text = CSP.sub("", text)
        assert text != hostile_page
    path = tmp_path / "hostile.html"
    path.write_text(text, encoding="utf-8")
    _check_page(driver, path)
    assert driver.execute_script("return typeof window.pwned") == "undefined"
    assert driver.execute_script("return document.querySelectorAll('script').length") == 0
    assert driver.execute_script(
        "return document.querySelectorAll('img[src=\"x\"], [onerror]').length") == 0
    everything = driver.execute_script("return document.body.textContent")
    visible = driver.find_element("tag name", "body").text
    for s in HOSTILE:
        assert s in everything
        assert s in visible            # the model name is in the visible title
    assert HOSTILE[0] + HOSTILE[1] in driver.title
    # opened up, every table shows the strings as text (tokens, words, settings, plan, runs)
    driver.execute_script("document.querySelectorAll('details').forEach(d => d.open = true)")
    opened = driver.find_element("tag name", "body").text
    assert opened.count(HOSTILE[0]) >= 10 and opened.count(HOSTILE[1]) >= 10
    if not strip_csp:
        _screenshot(driver, "report_hostile.png")


@pytest.mark.parametrize("strip_csp", [False, True], ids=["with-csp", "without-csp"])
def test_checks_catch_an_external_resource(driver, tmp_path, hostile_page, strip_csp):
    """The page checks fail on a page that asks for something outside itself, and the page's
    policy blocks the load. (The address is a closed local port: nothing leaves the machine.)"""
    url = "http://127.0.0.1:65531/probe.png"
    text = CSP.sub("", hostile_page) if strip_csp else hostile_page
    text = text.replace("</main>", f'<img src="{url}" alt=""></main>', 1)
    path = tmp_path / "leaky.html"
    path.write_text(text, encoding="utf-8")
    console, urls = _open(driver, path)
    assert url in urls
    blocked = any("Content Security Policy" in e.get("message", "") for e in console)
    assert blocked == (not strip_csp)
    with pytest.raises(AssertionError, match=f"network request to {re.escape(url)}"):
        _check_page(driver, path)


HOSTILE_NAMES = st.lists(st.sampled_from(HOSTILE_FRAGMENTS)
                         | st.text(st.characters(exclude_categories=("Cs",)), max_size=12),
                         min_size=1, max_size=4).map("".join)


@settings(max_examples=4, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(names=st.lists(HOSTILE_NAMES, min_size=6, max_size=6))
@example(names=[HOSTILE[1], HOSTILE[0], "</title><!--", "a\x00b\r\nc\x85", "<svg onload=window.pwned=3>",
                "&lt;b&gt;"])
@pytest.mark.filterwarnings("ignore:Glyph .* missing from font")
def test_sampled_hostile_names_render_as_text(driver, tmp_path_factory, names):
    """A sample of generated names (markup, comments, references, controls and arbitrary Unicode,
    mixed) as model name, corpus, command and tokens: in the browser the page runs nothing, loads
    nothing, adds no element, and its text holds every string (controls as their visible forms,
    line ends as the HTML parser normalises them)."""
    model, corpus, command, *tokens = names
    profile = make_profile(model, n_layers=3, corpus=corpus, command=command, token_strings=tokens,
                           adapter_plan=True, finetune=True)
    path = render_report([profile], tmp_path_factory.mktemp("sampled") / "page.html", command=command)
    console, urls = _open(driver, path)
    assert driver.execute_script("return typeof window.pwned") == "undefined"
    assert not [e for e in console if e.get("level") == "SEVERE"], console
    assert all(u == path.resolve().as_uri() or u.startswith("data:") for u in urls), urls
    assert driver.execute_script(
        "return document.querySelectorAll('script, iframe, img, [onerror], [onload]').length") == 0
    text = driver.execute_script("return document.body.textContent")
    for s in names:
        shown = visible_text(s).replace("\r\n", "\n").replace("\r", "\n")
        assert shown in text, s
