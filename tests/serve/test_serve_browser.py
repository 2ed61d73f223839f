"""The search page in a real browser: Debian's headless Chromium, driven by Selenium through
Debian's version-matched chromedriver, against a real uvicorn server on a loopback port."""

from __future__ import annotations

import os
import shutil
import socket
import threading

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("selenium")

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

from clustermac.cli import build_parser
from clustermac.serve.command import build_server

pytestmark = pytest.mark.network

CHROMEDRIVER = "/usr/bin/chromedriver"
BROWSERS = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
HTML_NAME = "<img src=x onerror=alert(1)>.jpg"
WAIT = 90  # seconds: an upper bound for a slow, shared machine, not a timing assertion


def _browser() -> str | None:
    return next((path for path in BROWSERS if os.access(path, os.X_OK)), None) or shutil.which("chromium")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(serve_index):
    """``clustermac serve`` (its parser and uvicorn server) on a free loopback port, in a thread."""
    index, _ = serve_index
    port = _free_port()
    options = ["--port", str(port), "--reload-interval", "0", "--log-level", "warning", "--workers", "2"]
    uvicorn_server = build_server(build_parser().parse_args(["serve", "--index", str(index), *options]))
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    for _ in range(600):
        if uvicorn_server.started or not thread.is_alive():
            break
        threading.Event().wait(0.05)
    assert uvicorn_server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}"
    uvicorn_server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def browser():
    if not os.access(CHROMEDRIVER, os.X_OK) or _browser() is None:
        pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = _browser()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1300"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _severe_console_messages(driver) -> list[str]:
    """Console errors, but the refused thumbnail of link-out.jpg (a link out of the image root)."""
    messages = [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    return [message for message in messages if "link-out.jpg" not in message]


def test_upload_draw_a_box_search_and_inspect_a_result(server, browser, serve_index, tmp_path):
    _, photos = serve_index
    wait = WebDriverWait(browser, WAIT)
    browser.get(server + "/")
    wait.until(EC.text_to_be_present_in_element((By.ID, "about"), "10 images"))

    browser.find_element(By.ID, "file-input").send_keys(str(photos / "photo6.jpg"))
    wait.until(EC.element_to_be_clickable((By.ID, "search-button")))
    canvas = browser.find_element(By.ID, "query-canvas")
    width, height = canvas.size["width"], canvas.size["height"]
    # Drag from near the top-left corner over most of the image (offsets from the centre).
    drag = ActionChains(browser).move_to_element_with_offset(canvas, -width // 2 + 10, -height // 2 + 8)
    drag.click_and_hold().move_by_offset(width * 2 // 3, height * 2 // 3).release().perform()
    box_label = browser.find_element(By.ID, "box-label").text
    assert box_label.startswith("box: ") and "whole" not in box_label, box_label
    x1, y1, x2, y2 = (float(v) for v in box_label[len("box: ") :].split(","))
    assert x2 - x1 > 50 and y2 - y1 > 30

    browser.find_element(By.ID, "rerank").click()
    browser.find_element(By.ID, "search-button").click()
    wait.until(lambda driver: driver.find_elements(By.CSS_SELECTOR, "#results figure"))
    results = browser.find_elements(By.CSS_SELECTOR, "#results figure")
    assert len(results) >= 1
    assert "results" in browser.find_element(By.ID, "status").text
    assert "extract" in browser.find_element(By.ID, "timings").text
    first_name = results[0].get_attribute("title")
    assert first_name in {"photo6.jpg", "photo1.jpg", HTML_NAME}, first_name  # the photo or one of its copies

    results[0].click()
    wait.until(EC.visibility_of_element_located((By.ID, "detail")))
    wait.until(EC.text_to_be_present_in_element((By.ID, "detail-title"), first_name))
    wait.until(
        lambda driver: driver.execute_script(
            "return ['result-clusters', 'query-clusters'].every(id => document.getElementById(id).naturalWidth > 0)"
        )
    )
    screenshot = tmp_path / "serve_page.png"
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
    if os.environ.get("CLUSTERMAC_SCREENSHOT"):  # README screenshot: CLUSTERMAC_SCREENSHOT=path pytest …
        shutil.copy(screenshot, os.environ["CLUSTERMAC_SCREENSHOT"])
    assert _severe_console_messages(browser) == []


def test_browse_the_database_and_names_stay_text(server, browser):
    wait = WebDriverWait(browser, WAIT)
    browser.get(server + "/")
    wait.until(EC.text_to_be_present_in_element((By.ID, "about"), "images"))
    browser.find_element(By.ID, "tab-browse").click()
    wait.until(lambda driver: len(driver.find_elements(By.CSS_SELECTOR, "#browse-grid figure")) == 10)
    captions = [element.text for element in browser.find_elements(By.CSS_SELECTOR, "#browse-grid figcaption")]
    assert HTML_NAME in captions  # shown as text, never parsed as markup
    assert browser.execute_script("return document.querySelectorAll('img[src=\"x\"]').length") == 0
    browser.find_element(By.ID, "prefix").send_keys("photo")
    wait.until(lambda driver: len(driver.find_elements(By.CSS_SELECTOR, "#browse-grid figure")) == 8)
    browser.find_elements(By.CSS_SELECTOR, "#browse-grid figure")[2].click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "canvas-hint"), "photo2.jpg"))
    browser.find_element(By.ID, "search-button").click()  # whole image
    wait.until(lambda driver: driver.find_elements(By.CSS_SELECTOR, "#results figure"))
    assert browser.find_elements(By.CSS_SELECTOR, "#results figure")[0].get_attribute("title") == "photo2.jpg"
