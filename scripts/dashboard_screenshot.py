"""The README's dashboard picture: a sim cluster doing some work, its dashboard in headless Chromium.

    python scripts/dashboard_screenshot.py [docs/dashboard.png]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from grid.dashboard import Dashboard
from sim import LocalCluster


def main(path: str) -> int:
    with LocalCluster(3) as cluster:
        client = cluster.connect()
        try:
            client.get_map("orders").update({n: n for n in range(500)})
            client.get_queue("jobs").put("job")
            client.get_list("steps").extend(range(20))
            board = Dashboard(client, secret=cluster.secret)
            options = webdriver.ChromeOptions()
            for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1560,840",
                             f"--user-data-dir={tempfile.mkdtemp(prefix='grid-chrome-')}"):
                options.add_argument(argument)
            options.binary_location = shutil.which("chromium")
            browser = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
            try:
                browser.get(board.url)
                executor = client.executor()
                end = time.monotonic() + 6
                while time.monotonic() < end:  # some tasks, for the sparklines
                    list(executor.map(abs, range(2000)))
                if len(browser.find_elements(By.CSS_SELECTOR, "#members tr.member")) != 3:
                    raise SystemExit("the page did not show the members")
                browser.save_screenshot(path)
            finally:
                browser.quit()
                board.close()
        finally:
            client.close()
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "docs/dashboard.png"))
