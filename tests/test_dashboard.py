"""The dashboard (grid.dashboard) against a live sim cluster: the API behind its token, loopback by
default, and the page in real headless Chromium: it shows the members, a killed one goes."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request

import pytest

from grid.dashboard import Dashboard, dashboard_token
from grid.errors import SecurityError

from .conftest import wait_for

WAIT = 30


def get(url: str, headers: dict | None = None):
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_the_api_needs_the_token_derived_from_the_secret_and_binds_loopback(local_cluster):
    cluster = local_cluster(2)
    client = cluster.connect()
    board = Dashboard(client, secret=cluster.secret)
    try:
        assert board.address[0] == "127.0.0.1"
        assert board.token == dashboard_token(cluster.secret) != dashboard_token("another secret")
        base = f"http://127.0.0.1:{board.address[1]}"
        assert get(base + "/api/status")[0] == 401
        assert get(base + "/api/status", {"Authorization": "Bearer wrong"})[0] == 401
        assert get(base + "/api/logs", {"Cookie": "grid_dashboard=wrong"})[0] == 401
        code, body = get(base + "/api/status", {"Authorization": f"Bearer {board.token}"})
        assert code == 200 and set(json.loads(body)["members"]) == {peer.uuid for peer in cluster.peers}
        code, body = get(base + "/api/logs", {"Cookie": f"grid_dashboard={board.token}"})
        assert code == 200 and isinstance(json.loads(body), list)
        code, page = get(base + "/")
        assert code == 200 and b"<script>" in page and b"http" not in page.split(b"<script>")[1].split(b"fetch(")[0]
        assert b"cdn" not in page.lower() and b"src=" not in page
        with pytest.raises(SecurityError, match="only with a cluster secret"):
            Dashboard(client, host="0.0.0.0", secret=None)
    finally:
        board.close()
        client.close()


def chrome(tmp_path):
    """Headless Chromium driven by selenium (the system's chromium and chromedriver)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1200,900", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(argument)
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def test_the_page_shows_the_members_and_a_killed_one_goes(local_cluster, tmp_path):
    if not (shutil.which("chromium") or shutil.which("chromium-browser")) or not shutil.which("chromedriver"):
        pytest.fail("this test needs Debian's chromium and chromium-driver: bash scripts/test_deps.sh installs them")
    from selenium.webdriver.common.by import By

    cluster = local_cluster(3, heartbeat_interval=0.2, failure_timeout=1.5)
    client = cluster.connect()
    client.get_map("orders").update({n: n for n in range(50)})
    board = Dashboard(client, secret=cluster.secret)
    browser = chrome(tmp_path)
    try:
        browser.get(board.url)
        rows = lambda: browser.find_elements(By.CSS_SELECTOR, "#members tr.member")  # noqa: E731
        wait_for(lambda: len(rows()) == 3, WAIT, "the page to show the three members")
        shown = {row.get_attribute("data-uuid") for row in rows()}
        assert shown == {peer.uuid for peer in cluster.peers}
        assert len(browser.find_elements(By.CSS_SELECTOR, "#partitions div")) == client.partitions().partitions
        wait_for(lambda: "orders" in browser.find_element(By.ID, "structures").text, WAIT)
        assert "token" not in browser.current_url, "the token leaves the address bar (kept in a cookie)"
        cluster.kill(2)
        wait_for(lambda: len(rows()) == 2, WAIT, "the killed member to go from the page")
        assert cluster.peers[2].uuid not in {row.get_attribute("data-uuid") for row in rows()}
        browser.save_screenshot(str(tmp_path / "dashboard.png"))
        assert (tmp_path / "dashboard.png").stat().st_size > 10_000
    finally:
        browser.quit()
        board.close()
        client.close()


def test_a_member_with_dashboard_true_serves_it(local_cluster):
    import re

    cluster = local_cluster(1, dashboard=True, dashboard_port=0)
    wait_for(lambda: "dashboard: http" in cluster.log(0), WAIT, "the member to log its dashboard's address")
    base = re.search(r"dashboard: (http://\S+)/ ", cluster.log(0)).group(1)
    assert base.startswith("http://127.0.0.1:") and "token=" not in cluster.log(0), "the token stays out of the log"
    token = dashboard_token(cluster.secret)  # (what python -m grid dashboard prints for this cluster)
    assert get(base + "/api/status")[0] == 401
    code, body = get(base + "/api/status", {"Authorization": f"Bearer {token}"})
    assert code == 200 and list(json.loads(body)["members"]) == [cluster.peers[0].uuid]
