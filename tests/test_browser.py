"""The page at ``/`` in headless Chromium (Playwright) against a real ``serve run``: draw digits with the mouse,
upload and drop sample files, read the prediction and the ten bars from the DOM, save a screenshot.

Run: pytest tests/test_browser.py     (needs /usr/bin/chromium: apt-get install -y chromium)
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import require
from tests.helpers import BLANK, SAMPLES, side_by_side, unsure_pairs
from tests.serving import Served

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = [pytest.mark.browser, pytest.mark.integration, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium driven by Playwright (never `playwright install`)."""
    require(CHROMIUM.exists(), f"{CHROMIUM} is missing", "apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any, served: Served) -> Iterator[Any]:
    """The app's page, loaded once the model badge says it is ready; fails on any JavaScript error."""
    context = browser.new_context(viewport={"width": 900, "height": 880})
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    tab.goto(served.url + "/")
    tab.wait_for_selector("#health.ok", timeout=30_000)
    yield tab
    context.close()
    assert not errors, errors


def draw(page: Any, strokes: list[list[tuple[float, float]]]) -> None:
    """Draw on the canvas with mouse events; points are fractions of the canvas size."""
    box = page.locator("#pad").bounding_box()
    for stroke in strokes:
        (x0, y0), rest = stroke[0], stroke[1:]
        page.mouse.move(box["x"] + x0 * box["width"], box["y"] + y0 * box["height"])
        page.mouse.down()
        for x, y in rest:
            page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"], steps=12)
        page.mouse.up()


def result(page: Any, digit: str) -> dict[str, Any]:
    """Wait for ``digit`` as the prediction, then read the result from the DOM."""
    page.wait_for_function(
        "d => document.querySelector('#digit').textContent === d"
        " && document.querySelectorAll('#bars li').length === 10",
        arg=digit,
        timeout=30_000,
    )
    bars = page.eval_on_selector_all(
        "#bars li",
        "items => items.map(li => ({digit: +li.dataset.digit, prob: +li.dataset.prob,"
        " width: li.querySelector('.fill').style.width, label: li.getAttribute('aria-label'), top: li.className}))",
    )
    return {
        "bars": bars,
        "version": page.text_content("#meta-version"),
        "latency": page.text_content("#meta-latency"),
        "seen": page.get_attribute("#seen-img", "src"),
        "error_hidden": page.is_hidden("#error"),
    }


def check_result(shown: dict[str, Any], digit: int, url: str) -> None:
    """The ten bars, the top one on ``digit``, the model's own view, the version and the latency."""
    bars = shown["bars"]
    assert [b["digit"] for b in bars] == list(range(10))
    assert abs(sum(b["prob"] for b in bars) - 1) < 1e-3
    assert max(bars, key=lambda b: b["prob"])["digit"] == digit
    assert [b["top"] for b in bars].count("top") == 1 and bars[digit]["top"] == "top"
    assert all(b["width"].endswith("%") and b["label"].startswith(f"digit {b['digit']}: ") for b in bars)
    assert shown["seen"].startswith("data:image/png;base64,")
    assert shown["version"] == httpx.get(f"{url}/healthz", timeout=5).json()["model_version"]
    assert shown["latency"].endswith(" ms") and shown["error_hidden"]


ONE = [[(0.5, 0.15), (0.5, 0.85)]]
SEVEN = [[(0.25, 0.2), (0.75, 0.2), (0.42, 0.85)]]


@pytest.mark.parametrize(("digit", "strokes"), [(1, ONE), (7, SEVEN)], ids=["one", "seven"])
def test_drawing_a_digit_with_the_mouse(
    page: Any,
    served: Served,
    digit: int,
    strokes: list[list[tuple[float, float]]],
) -> None:
    draw(page, strokes)
    page.click("#predict-drawing")
    check_result(result(page, str(digit)), digit, served.url)
    page.click("#clear")
    white = page.evaluate(
        "() => { const d = document.querySelector('#pad').getContext('2d')"
        ".getImageData(0, 0, 280, 280).data; return d.every(v => v === 255); }"
    )
    assert white  # cleared to opaque white


def test_upload_drop_model_card_errors_and_screenshot(page: Any, served: Served) -> None:
    page.set_input_files("#file", str(SAMPLES / "seven.png"))
    check_result(result(page, "7"), 7, served.url)

    data = base64.b64encode((SAMPLES / "zero.png").read_bytes()).decode()
    page.evaluate(
        """data => {
          const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
          const transfer = new DataTransfer();
          transfer.items.add(new File([bytes], "zero.png", {type: "image/png"}));
          document.querySelector('#drop').dispatchEvent(
            new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
        }""",
        data,
    )
    shown = result(page, "0")
    check_result(shown, 0, served.url)

    card = httpx.get(f"{served.url}/model", timeout=5).json()
    facts = page.text_content("#model-facts")
    assert card["version"] in facts and "test accuracy" in facts
    assert page.locator("#per-digit li").count() == 10
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "page.png"), full_page=True)

    page.set_input_files("#file", files=[{"name": "blank.png", "mimeType": "image/png", "buffer": BLANK}])
    page.wait_for_selector("#error:not([hidden])", timeout=30_000)
    message = page.text_content("#error")
    assert message.startswith("Could not read a digit (422): no digit found"), message
    assert page.text_content("#digit") == "–" and page.locator("#bars li").count() == 0


def test_not_sure_state_names_the_two_likeliest_digits(page: Any, served: Served) -> None:
    pair = side_by_side(*unsure_pairs(served.model_dir)[0])  # two digits the model is not sure of
    expected = httpx.post(f"{served.url}/predict", files={"file": ("pair.png", pair)}, timeout=30).json()
    assert expected["confident"] is False
    page.set_input_files("#file", files=[{"name": "pair.png", "mimeType": "image/png", "buffer": pair}])
    page.wait_for_selector("#unsure:not([hidden])", timeout=30_000)
    shown = result(page, str(expected["prediction"]))
    assert [b["prob"] for b in shown["bars"]] == pytest.approx(expected["probs"], abs=1e-6)
    first, second = sorted(range(10), key=lambda d: -expected["probs"][d])[:2]
    text = " ".join(page.text_content("#unsure").split())
    assert text.startswith("Not sure — is this a single digit? Most likely"), text
    assert f"Most likely {first} (" in text and f") or {second} (" in text, text
    assert "unsure" in page.get_attribute("#digit", "class")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "page-not-sure.png"), full_page=True)

    page.set_input_files("#file", str(SAMPLES / "seven.png"))  # a clear digit clears the state
    result(page, "7")
    page.wait_for_selector("#unsure", state="hidden", timeout=30_000)
    assert "unsure" not in (page.get_attribute("#digit", "class") or "")


def test_phone_width_has_no_horizontal_scroll(browser: Any, served: Served) -> None:
    context = browser.new_context(viewport={"width": 360, "height": 740}, has_touch=True, is_mobile=True)
    tab = context.new_page()
    tab.goto(served.url + "/")
    tab.wait_for_selector("#health.ok", timeout=30_000)
    assert tab.evaluate("() => document.documentElement.scrollWidth") <= 360
    pad = tab.locator("#pad").bounding_box()
    assert pad["width"] >= 250 and pad["x"] >= 0 and pad["x"] + pad["width"] <= 360
    for selector in ("#file", "#pad", "#predict-drawing", "#clear"):  # accessible names
        assert tab.locator(selector).get_attribute("aria-label") or tab.text_content(selector), selector
    ARTIFACTS.mkdir(exist_ok=True)
    tab.screenshot(path=str(ARTIFACTS / "page-phone.png"), full_page=True)
    context.close()
