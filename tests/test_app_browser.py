"""app.py in a real browser: headless Chromium (Debian's chromium and chromium-driver) driven by Selenium.

The page is served by `python app.py` on a free port; the test uploads photos as a user does (into the
``input[type=file]`` of ``#upload``) and reads the ages shown in ``#faces``, which must equal
`AgeEstimator.from_checkpoint()` on the same photos. Chromium resolves no host name but this machine's, and its
network log must hold no request beyond it. ``APP_SCREENSHOT=docs/app.png`` saves the README's screenshot.
"""
import json
import os
import shutil
import signal
import tempfile
import urllib.parse
from pathlib import Path

import pytest
from PIL import Image

from conftest import ROOT
from estimator import AgeEstimator
from geometry import read_rgb
from test_app import ASTRONAUT, REQUEST_S, SHOWN_ROUNDING, family_photos, free_port, start_app, table_rows

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
MISSING = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.is_file()]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=(
    f"Chromium is not installed here ({', '.join(MISSING)} missing) and could not be: .ci/run installs Debian's "
    f"chromium and chromium-driver with apt-get before the tests"))

LOCAL_HOSTS = {"127.0.0.1", "localhost", "[::1]", "::1"}
NETWORK_SCHEMES = {"http", "https", "ws", "wss", "ftp"}
WINDOW = (1280, 1340)
SCREENSHOT_COLOURS = 256
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-default-apps", "--disable-extensions", "--hide-scrollbars",
                  # no name resolves but this machine's: a request that leaves it fails, and the log shows it
                  "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1")


@pytest.fixture(scope="module")
def server():
    port = free_port()
    process, folder, _ = start_app(port)
    yield f"http://127.0.0.1:{port}/"
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=REQUEST_S)
    assert not os.path.exists(folder)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS + (f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    # the driver's path is given, so Selenium Manager never looks for (or downloads) one
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(REQUEST_S)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def reference():
    return AgeEstimator.from_checkpoint()


def open_page(driver, url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, REQUEST_S).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"))


def send_photo(driver, path):
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(path))


def wait_for_result(driver, name):
    """The message once the photo named ``name`` is scored (or refused)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def finished(d):
        text = d.find_element(By.ID, "message").text
        return text if text.startswith(name) else False

    return WebDriverWait(driver, REQUEST_S).until(finished)


def upload(driver, path):
    send_photo(driver, path)
    return wait_for_result(driver, Path(path).name)


def shown_faces(driver):
    from selenium.webdriver.common.by import By

    return table_rows(driver.find_element(By.ID, "faces").get_attribute("innerHTML"))


def assert_ages_shown(driver, expected):
    rows = shown_faces(driver)
    assert len(rows) == len(expected) >= 1
    assert [float(row["age"]) for row in rows] == pytest.approx([face["age"] for face in expected], abs=SHOWN_ROUNDING)
    assert all(row["sd"] for row in rows)


def outside_requests(driver):
    """Every URL the browser asked for beyond this machine, from Chromium's network log."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] in ("Network.requestWillBeSent", "Network.webSocketCreated"):
            url = message["params"].get("request", {}).get("url") or message["params"].get("url", "")
            parts = urllib.parse.urlsplit(url)
            if parts.scheme in NETWORK_SCHEMES and parts.hostname not in LOCAL_HOSTS:
                urls.append(url)
    return urls


def save_screenshot(driver, path):
    """A PNG of the page in 256 colours: small enough to commit."""
    driver.save_screenshot(str(path))
    with Image.open(path) as shot:
        shot.convert("RGB").quantize(SCREENSHOT_COLOURS).save(path, optimize=True)


def test_the_page_scores_an_upload_and_gives_messages_for_bad_files(server, browser, reference, tmp_path):
    from selenium.webdriver.common.by import By

    open_page(browser, server)
    message = upload(browser, ASTRONAUT)
    assert message.startswith("astronaut.jpg: 1 face")
    assert_ages_shown(browser, reference.predict(read_rgb(ASTRONAUT)))
    assert browser.find_element(By.CSS_SELECTOR, "#annotated img").get_attribute("src").startswith("data:image/jpeg")
    assert browser.find_element(By.CSS_SELECTOR, "#distribution img").get_attribute("src").startswith("data:image/png")
    save_screenshot(browser, Path(os.environ.get("APP_SCREENSHOT", tmp_path / "app.png")))

    text = tmp_path / "notes.txt"
    text.write_text("age,name\n34,someone\n")
    assert "is not an image" in upload(browser, text)
    assert shown_faces(browser) == []

    shuttle = tmp_path / "shuttle.png"
    Image.fromarray(read_rgb(ASTRONAUT)[:, 300:]).save(shuttle)
    assert "no face found" in upload(browser, shuttle)
    assert shown_faces(browser) == []
    assert browser.find_elements(By.CSS_SELECTOR, "#annotated img"), "the photo is shown with the message"

    grace = ROOT / "samples" / "grace_hopper.jpg"
    upload(browser, grace)
    assert_ages_shown(browser, reference.predict(read_rgb(grace)))
    assert outside_requests(browser) == []


def test_four_pages_uploading_at_once_each_get_their_own_faces(server, browser, reference, tmp_path):
    photos = family_photos(tmp_path)
    expected = [reference.predict(read_rgb(photo)) for photo in photos]
    open_page(browser, server)
    tabs = [browser.current_window_handle]
    for _ in photos[1:]:
        browser.switch_to.new_window("tab")
        open_page(browser, server)
        tabs.append(browser.current_window_handle)
    for tab, photo in zip(tabs, photos):
        browser.switch_to.window(tab)
        send_photo(browser, photo)
    for tab, photo, faces in zip(tabs, photos, expected):
        browser.switch_to.window(tab)
        wait_for_result(browser, photo.name)
        assert_ages_shown(browser, faces)
    assert outside_requests(browser) == []
