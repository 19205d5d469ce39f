"""The Dagster UI in a real headless Chromium (Debian's chromium and chromium-driver, driven by
selenium): the demo materialized into a fresh instance, one shard broken on purpose, then the pages
a newcomer opens. A screenshot of each page is saved in the test's temporary folder
(``ui-*.png``) for a person to look at."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """The webserver's URL over an instance where the demo ran and two shards then failed."""
    work = tmp_path_factory.mktemp("ui")
    shutil.copy(ROOT / "dagster.yaml", work / "dagster.yaml")
    data = work / "data"
    env = {
        **os.environ,
        "DAGSTER_HOME": str(work),
        "IMG2DS_DAGSTER_STORAGE": str(data / "dagster"),
        "IMG2DS_INBOX": str(data / "inbox"),
        "IMG2DS_STAGING": str(data / "staging"),
        "IMG2DS_DATASETS": str(data / "datasets"),
    }
    demo = subprocess.run(
        [str(BIN / "img2ds"), "demo"], check=False, cwd=work, env=env, capture_output=True, text=True
    )
    assert demo.returncode == 0, demo.stderr[-2000:]
    # Two shards that are not next to each other fail: their staged rows are gone.
    for name in ("00000", "00002"):
        (data / "staging" / "demo" / "shards" / f"{name}.parquet").unlink()
        materialize = [str(BIN / "dagster"), "asset", "materialize", "-m", "img2ds_dagster.definitions"]
        failed = subprocess.run(
            [*materialize, "--select", "shards", "--partition", f"demo/{name}"],
            check=False,
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        assert failed.returncode != 0
    port = _free_port()
    web = subprocess.Popen(
        [
            str(BIN / "dagster-webserver"),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-w",
            str(ROOT / "workspace.yaml"),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/server_info", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline or web.poll() is not None:
                    raise
                time.sleep(0.5)
        yield url, work
    finally:
        web.terminate()
        web.wait(30)


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    assert CHROMIUM, "apt-get install chromium (tests/system-packages.sh does)"
    assert CHROMEDRIVER, "apt-get install chromium-driver (tests/system-packages.sh does)"
    options = Options()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    options.binary_location = str(CHROMIUM)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_until(browser: webdriver.Chrome, what: str, test: Callable[[Any], Any], seconds: float = 30) -> Any:
    try:
        return WebDriverWait(browser, seconds, poll_frequency=0.25).until(test)
    except TimeoutException as err:
        browser.save_screenshot(str(Path(os.environ.get("TMPDIR", "/tmp")) / "ui-timeout.png"))
        raise AssertionError(
            f"the page never showed {what}: {browser.find_element(By.TAG_NAME, 'body').text[:800]}"
        ) from err


def page_text(browser: webdriver.Chrome) -> str:
    return str(browser.find_element(By.TAG_NAME, "body").text)


def open_page(browser: webdriver.Chrome, url: str, shot: Path, *expected: str) -> str:
    browser.get(url)
    wait_until(browser, f"{expected}", lambda b: all(e in page_text(b) for e in expected))
    browser.save_screenshot(str(shot))
    return page_text(browser)


def button(browser: webdriver.Chrome, label: str) -> Any:
    return wait_until(
        browser,
        f"a {label!r} button",
        lambda b: next((e for e in b.find_elements(By.TAG_NAME, "button") if e.text.strip() == label), None),
    )


def test_the_ui_shows_the_pipeline_and_launches_a_backfill_of_failed_shards(
    ui: tuple[str, Path], browser: webdriver.Chrome
) -> None:
    url, work = ui
    text = open_page(
        browser, f"{url}/asset-groups", work / "ui-graph.png", "url_tables", "shards", "download_stats"
    )
    assert "bucketed_dataset" in text
    assert "Join the community" not in text  # the NUX pop-up is off (dagster.yaml)

    text = open_page(
        browser,
        f"{url}/assets/shards?view=partitions",
        work / "ui-partitions.png",
        "demo/00000",
        "Failed (2)",
    )
    assert "demo/00001" in text
    assert "demo/00002" in text

    # A built shard: its metadata, its contact sheet (an image that loads), its checks.
    text = open_page(
        browser,
        f"{url}/assets/shards?view=partitions&partition=demo%2F00001",
        work / "ui-shard.png",
        "successes",
        "contact_sheet",
    )
    assert "input_fingerprint" in text
    # Markdown metadata opens in a dialog: the contact sheet is an image there.
    show = browser.find_elements(
        By.XPATH, "//tr[.//span[text()='contact_sheet']]//a[text()='[Show Markdown]']"
    )
    assert len(show) == 1
    browser.execute_script("arguments[0].scrollIntoView()", show[0])
    show[0].click()
    sheet = wait_until(
        browser,
        "the contact sheet",
        lambda b: next(
            (
                i
                for i in b.find_elements(By.TAG_NAME, "img")
                if (i.get_attribute("src") or "").startswith("data:image/jpeg")
            ),
            None,
        ),
    )
    wait_until(
        browser,
        "the contact sheet loaded",
        lambda b: b.execute_script("return arguments[0].naturalWidth", sheet) > 0,
    )
    browser.save_screenshot(str(work / "ui-contact-sheet.png"))
    button(browser, "Close").click()
    open_page(
        browser,
        f"{url}/assets/shards?view=checks",
        work / "ui-checks.png",
        "shard_is_complete",
        "success_rate",
    )

    # Materialize -> Failed -> launch: a backfill of the two failed shards, under Runs -> Backfills.
    open_page(browser, f"{url}/assets/shards?view=partitions", work / "ui-before-backfill.png", "Failed (2)")
    button(browser, "Materialize…").click()
    button(browser, "Failed").click()
    wait_until(browser, "2 partitions selected", lambda b: "2 partitions" in page_text(b))
    browser.save_screenshot(str(work / "ui-dialog.png"))
    launch = wait_until(
        browser,
        "the launch button",
        lambda b: next(
            (e for e in b.find_elements(By.TAG_NAME, "button") if e.text.startswith("Launch")), None
        ),
    )
    assert launch.text == "Launch backfill"
    launch.click()
    text = open_page(browser, f"{url}/runs?view=backfills", work / "ui-backfills.png", "shards")
    assert "2 partitions" in text or "demo/00000" in text
