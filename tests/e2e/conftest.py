"""Browser fixtures: Debian's headless Chromium driven by Selenium against pytest-django's live server,
with the demo organisation loaded. Skipped, with the reason, where Chromium or its driver is not installed."""
import os
from dataclasses import dataclass
from io import StringIO

import pytest
from django.core.management import call_command

from governance import runtime
from governance.demo import DEMO_PASSWORD
from governance.redis import get_redis

try:
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # the dev extra installs it; without it the browser tests skip instead of breaking collection
    webdriver = None

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT_SECONDS = 10


@pytest.fixture
def demo(live_server):
    """The demo organisation, a fresh catalog cache and empty Redis counters (a previous run's database
    reused the same ids, so its budget holds and rate counters must not carry over)."""
    from tests.support.relay_fixtures import forget_open_holds

    forget_open_holds()
    client = get_redis()
    if client is not None:
        client.flushdb()
    call_command("load_demo", stdout=StringIO())
    runtime.drop()
    yield live_server
    runtime.drop()


@pytest.fixture
def driver(tmp_path):
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        pytest.skip(f"headless Chromium not installed ({', '.join(missing)} missing): "
                    "apt-get install chromium chromium-driver (CI installs them)")
    if webdriver is None:
        pytest.skip("selenium is not installed (pip install -e '.[dev]')")

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # with both paths given, Selenium Manager never tries to download a browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1000", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    browser.set_page_load_timeout(30)
    yield browser
    browser.quit()


@dataclass
class Site:
    """What a person does in the browser: open pages, log in and out through the real forms, wait for pages."""
    driver: object
    url: str

    def open(self, path: str) -> None:
        self.driver.get(self.url + path)

    def wait(self) -> "WebDriverWait":
        """A wait that retries chromedriver's transient errors (see submit) until its deadline."""
        return WebDriverWait(self.driver, WAIT_SECONDS, ignored_exceptions=(WebDriverException,))

    def wait_for(self, css: str):
        return self.wait().until(EC.visibility_of_element_located((By.CSS_SELECTOR, css)))

    def wait_until(self, condition, message: str):
        return self.wait().until(condition, message)

    def find(self, css: str):
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css: str):
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def message(self) -> str:
        """The flash message at the top of the page, or a failure that says what the page shows instead."""
        found = self.find_all("main p.message")
        assert found, f"no message on {self.driver.current_url}, the page shows: {self.find('body').text[:300]!r}"
        return found[0].text

    def submit(self, css: str) -> None:
        """Click a submit button and wait until the browser has loaded the next page.

        The old page is marked with a window property and the wait polls for a complete document without
        it. Chromedriver answers some commands sent mid-navigation with transient errors ("unhandled
        inspector error", stale or detached contexts), so those are retried until the wait's deadline
        rather than failing the test; a page that never loads still fails with the message below."""
        self.driver.execute_script("window.__tollgateOldPage = true;")
        self.find(css).click()

        def next_page_loaded(driver) -> bool:
            return driver.execute_script(
                "return document.readyState === 'complete' && window.__tollgateOldPage === undefined;")

        self.wait().until(next_page_loaded, f"clicking {css} did not load a page")

    def log_in(self, username: str) -> None:
        self.open("/accounts/login/")
        self.wait_for("#id_username").send_keys(username)
        self.find("#id_password").send_keys(DEMO_PASSWORD)
        self.submit("main form button[type=submit]")
        assert "/accounts/login/" not in self.driver.current_url, f"{username} was not logged in"
        assert self.find("header.top .account span").text == username

    def log_out(self) -> None:
        self.submit("header.top form button[type=submit]")  # the logout is a POST form in the header
        self.open("/keys/")
        assert "/accounts/login/" in self.driver.current_url, "still logged in after logging out"


@pytest.fixture
def site(driver, demo) -> Site:  # the browser first: where it is missing, skip before loading any data
    return Site(driver, demo.url)
