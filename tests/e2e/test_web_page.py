"""The web page (issue #14, item 3) in headless Chromium from Debian's packages, driven by
Selenium through /usr/bin/chromedriver, against the live farm: sign in, submit a tiny job
and watch its row reach `succeeded` from the event stream, play its video, cancel another
from its page, upload a batch and read its report, read the farm's tiers. The key never
shows in a URL or in localStorage.

Screenshots go to a temporary folder; FARM_WEB_SCREENSHOT=PATH also copies the jobs table's
to PATH (the README's docs/web-page.png is made with it).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from selenium import webdriver
from selenium.common.exceptions import (
    NoSuchElementException, StaleElementReferenceException, TimeoutException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from farm.policy import get_policy
from tests.conftest import api_client

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
TINY = {"model": "wan-tiny", "size": "64x64", "frames": "5", "steps": "2"}


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium that reaches 127.0.0.1 only: every other host name fails to resolve,
    and no proxy, sync, component update or background request is made."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,900", "--no-proxy-server", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-default-apps", "--autoplay-policy="
                "no-user-gesture-required", "--host-resolver-rules=MAP * ~NOTFOUND, "
                "EXCLUDE 127.0.0.1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("web-page")


def wait(driver, check, timeout: float = 60, what: str = ""):
    """check(driver) once it is truthy; on timeout, says what and the page's error line. An
    element the live page redrew under the check is looked for again at the next poll."""
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2,
                             ignored_exceptions=(NoSuchElementException,
                                                 StaleElementReferenceException)).until(check)
    except TimeoutException:
        shown = driver.find_element(By.ID, "error").text
        raise AssertionError(f"{what}: not within {timeout} s; the page says {shown!r}") from None


def js(driver, script: str, *args):
    return driver.execute_script(script, *args)


def submit(driver, prompt: str, fields: dict[str, str]) -> str:
    """Fill the new-job form and submit; the id of the row the page added for it."""
    driver.get(driver.current_url.split("#")[0] + "#/jobs")
    wait(driver, lambda d: d.find_element(By.ID, "jobs-view").is_displayed())
    before = set(row_ids(driver))
    for name, value in {"prompt": prompt, **fields}.items():
        field = driver.find_element(By.ID, name)
        field.clear()
        field.send_keys(value)
    driver.find_element(By.ID, "submit-job").click()
    return wait(driver, lambda d: next((i for i in row_ids(d) if i not in before), None), 20,
                "the submitted job's row")


def row_ids(driver) -> list[str]:
    """The jobs table's row ids, read in one step inside the page: the table is redrawn as
    events arrive, so elements found one call earlier may be gone the next."""
    return js(driver, "return [...document.querySelectorAll('#jobs tr[data-job]')]"
                      ".map(r => r.dataset.job)")


def sign_in(driver, api_url: str, key: str) -> None:
    driver.get(f"{api_url}/")
    driver.find_element(By.ID, "key").send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "#sign-in button").click()
    wait(driver, lambda d: d.find_element(By.ID, "jobs-view").is_displayed(), 20, "signed in")


def key_leaks(driver, key: str) -> list[str]:
    """Where the key shows that it must not: the URL, any URL the page fetched, localStorage."""
    urls = [driver.current_url, *js(driver, "return performance.getEntries().map(e => e.name)")]
    leaks = [u for u in urls if key in u]
    if js(driver, "return localStorage.length"):
        leaks.append("localStorage")
    return leaks


def test_sign_in_submit_watch_play_and_cancel(browser, shots, api_url, api_key, celery_beat):
    d = browser
    d.get(f"{api_url}/")
    assert d.find_element(By.ID, "sign-in-view").is_displayed()
    d.find_element(By.ID, "key").send_keys("farm_0000_wrong")  # a wrong key: told, not in
    d.find_element(By.CSS_SELECTOR, "#sign-in button").click()
    wait(d, lambda d: "401" in d.find_element(By.ID, "error").text, 10, "the 401 shown")
    assert not js(d, "return sessionStorage.length")
    sign_in(d, api_url, api_key)

    job_id = submit(d, "a red circle moving left", TINY | {"seed": str(int(time.time()) % 10**6)})
    row = f"#jobs tr[data-job='{job_id}']"
    wait(d, lambda d: d.find_element(By.CSS_SELECTOR, row).get_attribute("data-state")
         == "succeeded", 120, "the row reaching succeeded")
    thumb = wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, f"{row} img"), 20, "thumbnail")
    assert thumb[0].get_attribute("src").startswith("blob:")
    wait(d, lambda d: js(d, "return arguments[0].naturalWidth", thumb[0]) > 0, 10, "decoded")
    d.save_screenshot(str(shots / "jobs.png"))

    d.find_element(By.LINK_TEXT, job_id).click()  # its page: the video plays, route, log
    video = wait(d, lambda d: [v for v in d.find_elements(By.ID, "video") if v.is_displayed()],
                 30, "the video shown")[0]
    assert video.get_attribute("src").startswith("blob:")
    first = wait(d, lambda d: js(d, "return arguments[0].currentTime", video) or None, 20,
                 "the video playing")
    wait(d, lambda d: js(d, "return arguments[0].currentTime", video) != first, 10,
         "currentTime advancing")
    assert js(d, "return arguments[0].error", video) is None
    assert '"tier"' in d.find_element(By.ID, "job-route").text
    assert d.find_element(By.ID, "job-state").text == "succeeded"
    assert d.find_elements(By.CSS_SELECTOR, "#job-events tbody tr")
    assert not d.find_element(By.ID, "cancel").is_enabled()
    d.save_screenshot(str(shots / "job.png"))

    long_id = submit(d, "a slow blue square", TINY | {"steps": "200", "frames": "41"})
    d.find_element(By.LINK_TEXT, long_id).click()
    wait(d, lambda d: d.find_element(By.ID, "job-id").text == long_id
         and d.find_element(By.ID, "cancel").is_enabled(), 20, "the long job's page")
    d.find_element(By.ID, "cancel").click()
    wait(d, lambda d: d.find_element(By.ID, "job-state").text == "canceled", 20, "canceled")
    assert d.find_element(By.ID, "retry").is_enabled()
    with api_client(api_url) as client:
        assert client.get(f"/v1/jobs/{long_id}").json()["state"] == "canceled"
    d.get(f"{api_url}/#/jobs")
    wait(d, lambda d: d.find_element(By.CSS_SELECTOR, f"#jobs tr[data-job='{long_id}']")
         .get_attribute("data-state") == "canceled", 20, "the canceled row")
    wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, f"{row} img"), 20, "thumbnail again")
    d.save_screenshot(str(shots / "jobs-after.png"))
    if os.environ.get("FARM_WEB_SCREENSHOT"):
        shutil.copy(shots / "jobs-after.png", os.environ["FARM_WEB_SCREENSHOT"])

    assert key_leaks(d, api_key) == []
    assert js(d, "return sessionStorage.getItem('farm.key')") == api_key  # this tab only
    assert api_key not in d.page_source


def test_batch_page_shows_its_report(browser, shots, api_url, api_key, celery_beat, tmp_path):
    d = browser
    d.get(f"{api_url}/#/jobs")
    if not js(d, "return sessionStorage.getItem('farm.key')"):  # run alone: not signed in
        sign_in(d, api_url, api_key)
    lines = tmp_path / "two.jsonl"
    lines.write_text("".join('{"prompt": "a green dot %d", "model": "wan-tiny", "width": 64, '
                             '"height": 64, "frames": 5, "steps": 1}\n' % i for i in range(2)))
    d.find_element(By.ID, "batch-file").send_keys(str(lines))
    d.find_element(By.CSS_SELECTOR, "#batch-form button").click()
    wait(d, lambda d: d.find_element(By.ID, "batch-view").is_displayed(), 20, "batch page")
    wait(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#batch-jobs tbody tr")) == 2, 10,
         "the batch's two jobs")
    report = wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#batch-report table img"),
                  150, "the report")
    wait(d, lambda d: all(js(d, "return arguments[0].naturalWidth", i) > 0 for i in report),
         20, "the report's thumbnails")
    assert d.find_element(By.ID, "batch-state").text == "done"
    assert "succeeded: 2" in d.find_element(By.ID, "batch-counts").text
    wait(d, lambda d: [c.text for c in d.find_elements(By.CSS_SELECTOR, "#batch-jobs td.state")]
         == ["succeeded"] * 2, 10, "the batch's jobs' states")
    d.save_screenshot(str(shots / "batch.png"))

    d.find_element(By.LINK_TEXT, "Farm").click()
    tiers = get_policy().catalog.tiers
    cpu = wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#farm tr[data-tier='cpu'] td"),
               20, "the farm's tiers")
    assert [c.text for c in cpu[:3]] == ["cpu", tiers["cpu"].gpu, str(tiers["cpu"].gpus)]
    assert len(d.find_elements(By.CSS_SELECTOR, "#farm tbody tr")) >= len(tiers)
    d.save_screenshot(str(shots / "farm.png"))
    assert key_leaks(d, api_key) == []

    d.find_element(By.ID, "sign-out").click()  # signing out forgets the key
    wait(d, lambda d: d.find_element(By.ID, "sign-in-view").is_displayed(), 10, "signed out")
    assert js(d, "return sessionStorage.length") == 0


def test_farm_route_counts_tiers_and_the_page_is_locked_to_self(settings, db_url):
    """GET /v1/farm against the real database: a waiting job shows on its tier; the page's
    Content-Security-Policy allows this origin only (and blob: media the page fetched)."""
    from farm.api.app import create_app
    from farm.jobs import keys

    _, key = keys.create_key(db_url, "web-farm", "web page tests")
    app = create_app(settings)
    with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as client:
        before = {t["tier"]: t for t in client.get("/v1/farm").json()["tiers"]}
        assert set(get_policy().catalog.tiers) <= set(before)
        # An A14B job on the cpu tiers' farm has nowhere to run: it stays waiting or queued.
        job = client.post("/v1/jobs", json={"prompt": "a big one", "model": "wan2.2-t2v-a14b",
                                            "frames": 5, "steps": 1, "hold": True})
        assert job.status_code == 202, job.text
        tier = client.get(f"/v1/jobs/{job.json()['id']}").json()["route"]["tier"]
        after = {t["tier"]: t for t in client.get("/v1/farm").json()["tiers"]}
        assert after[tier]["jobs_waiting"] == before[tier]["jobs_waiting"] + 1
        assert client.post(f"/v1/jobs/{job.json()['id']}/cancel").status_code == 200
        assert set(after[tier]) == {"tier", "gpu", "gpus", "groups_busy", "groups_idle",
                                    "jobs_waiting", "jobs_admitted", "jobs_running"}
        page = client.get("/", headers={"Authorization": ""})
        assert page.status_code == 200 and 'id="sign-in"' in page.text
        csp = page.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self';" in csp
        assert "unsafe-inline" not in csp and "*" not in csp
        assert client.get("/web/app.js").headers["content-type"].startswith("text/javascript")
        assert client.get("/web/index.html").status_code == 404  # the listed files only
