"""The review page driven end to end in a real browser: Debian's headless Chromium
through chromium-driver (selenium), against `synthwatch serve`'s app on uvicorn on
127.0.0.1. Sign in, upload a generated image, see the verdict, open the report, record
a review with a reason; the audit log has it and the list shows the new decision.

A screenshot of every step goes to `test-artifacts/screenshots/` (a CI artefact).
Skipped when chromium or chromedriver is missing, unless SYNTHWATCH_REQUIRE_BROWSER=1.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from synthwatch.pipeline.api import Auth, create_app
from synthwatch.pipeline.scans import ScanService
from tests.api_harness import KEY, KEYS, api_settings, lean_engine, running_service
from tests.media_factory import make_image

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"


def _chromedriver() -> str:
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if Path(driver).is_file() and CHROMIUM.is_file():
        return driver
    message = "Debian's chromium and chromium-driver are not installed"
    if os.environ.get("SYNTHWATCH_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{message} (SYNTHWATCH_REQUIRE_BROWSER=1)")
    pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, ScanService]]:
    settings = api_settings(tmp_path)
    with lean_engine(tmp_path) as engine, running_service(settings, engine) as service:
        port = _free_port()
        config = uvicorn.Config(
            create_app(service, Auth(KEYS)),
            host="127.0.0.1",
            port=port,
            log_config=None,
            lifespan="off",
        )
        uv = uvicorn.Server(config)
        thread = threading.Thread(target=uv.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not uv.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        try:
            yield f"http://127.0.0.1:{port}", service
        finally:
            uv.should_exit = True
            thread.join(10)


@pytest.fixture
def browser() -> Iterator[Any]:
    driver_path = _chromedriver()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument("--window-size=1280,900")
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _shot(driver: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))


def test_upload_see_the_verdict_open_the_report_and_record_a_review(
    server: tuple[str, ScanService], browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    base, service = server
    wait = WebDriverWait(browser, 90)
    image = make_image(tmp_path / "newsroom-photo.png", width=320, height=240, fmt="PNG")

    browser.get(base + "/")
    wait.until(ec.presence_of_element_located((By.ID, "login-key")))
    assert browser.current_url == base + "/login"
    browser.find_element(By.ID, "login-key").send_keys(KEY)
    _shot(browser, "01-sign-in")
    browser.find_element(By.ID, "login-submit").click()
    wait.until(ec.presence_of_element_located((By.ID, "upload-file")))
    assert browser.find_element(By.ID, "client").text == "desk"
    _shot(browser, "02-signed-in")

    browser.find_element(By.ID, "upload-file").send_keys(str(image))
    browser.find_element(By.ID, "upload-submit").click()
    # The scan page refreshes itself until the verdict is in.
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "done"))
    scan_id = browser.current_url.rsplit("/", 1)[-1]
    automatic = browser.find_element(By.ID, "automatic-decision").text
    assert automatic in ("flag", "review", "pass", "inconclusive")
    assert browser.find_element(By.ID, "decision").text == automatic
    _shot(browser, "03-verdict")

    browser.find_element(By.ID, "report-link").click()
    wait.until(lambda d: len(d.window_handles) == 2)
    scan_window = browser.current_window_handle
    browser.switch_to.window(next(h for h in browser.window_handles if h != scan_window))
    wait.until(lambda d: d.current_url.endswith(f"/v1/scans/{scan_id}/report"))
    wait.until(ec.presence_of_element_located((By.TAG_NAME, "body")))
    assert "newsroom-photo.png" in browser.find_element(By.TAG_NAME, "body").text
    _shot(browser, "04-report")
    browser.close()
    browser.switch_to.window(scan_window)

    human = "pass" if automatic == "flag" else "flag"
    reason = "Compared with the uploader's original file; see ticket 4711."
    Select(browser.find_element(By.ID, "review-decision")).select_by_value(human)
    browser.find_element(By.ID, "review-reason").send_keys(reason)
    _shot(browser, "05-review-form")
    browser.find_element(By.ID, "review-submit").click()
    wait.until(ec.presence_of_element_located((By.ID, "reviews")))
    assert browser.find_element(By.ID, "decision").text == human
    assert browser.find_element(By.ID, "automatic-decision").text == automatic
    assert reason in browser.find_element(By.ID, "reviews").text
    _shot(browser, "06-reviewed")

    browser.get(f"{base}/?decision={human}")
    row = wait.until(
        ec.presence_of_element_located((By.CSS_SELECTOR, f'tr[data-scan-id="{scan_id}"]'))
    )
    assert row.get_attribute("data-decision") == human
    assert "reviewed" in row.text
    _shot(browser, "07-list-filtered")

    entries = service.audit.entries()
    reviewed = [e for e in entries if e["event"] == "review_recorded"]
    assert len(reviewed) == 1
    assert reviewed[0]["scan_id"] == scan_id and reviewed[0]["client"] == "desk"
    assert reviewed[0]["decision"] == human and reviewed[0]["reason"] == reason
    assert reviewed[0]["previous_decision"] == automatic
