"""The map page in a real headless Chromium: upload a photo, see the answer marker and the neighbours' thumbnails.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them);
where they are missing the test is skipped and ``scripts/test.sh`` says so.
``GEO_SCREENSHOT=docs/serve.png`` also saves the page as the README shows it.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from serving import geo_serve, wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
QUERY = Path(__file__).resolve().parents[1] / "examples" / "osv5m" / "queries" / "1373307973052511.jpg"
OTHER = QUERY.with_name("143017044806579.jpg")  # another photo: choosing the same file again fires no change

pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="no browser: apt-get install chromium chromium-driver")


def test_map_page_draws_the_answer_and_the_neighbours(cli_bundle, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1250"):
        options.add_argument(arg)
    with geo_serve(cli_bundle[1]) as url:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        try:
            driver.get(url + "/")
            wait_until(lambda: driver.execute_script("return document.querySelectorAll('#map path.land').length"))
            driver.find_element(By.ID, "file").send_keys(str(QUERY))
            marker = wait_until(lambda: driver.find_elements(By.ID, "answer-marker"))[0]
            assert float(marker.get_attribute("r")) > 0
            coords = driver.find_element(By.ID, "coords").text
            assert "(fused)" in coords and "," in coords
            widths = wait_until(lambda: (w := driver.execute_script(
                "return [...document.querySelectorAll('.neighbour img')].map(i => i.complete ? i.naturalWidth : 0)"))
                and all(w) and w)
            assert len(widths) >= 5 and min(widths) > 0  # thumbnails decoded, served by /gallery/{id}/thumbnail
            assert driver.find_elements(By.CSS_SELECTOR, "#map .cell")  # the top cells' shapes
            assert driver.find_elements(By.CSS_SELECTOR, "#map .ring")  # the p_within circles
            assert driver.find_elements(By.CSS_SELECTOR, "#map #region")  # the region at the stated coverage
            assert "Region holding the truth for 90%" in driver.find_element(By.ID, "region-words").text
            errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            assert not errors, errors  # nothing failed to load: no CDN, no tile server, no font host
            shot = tmp_path / "serve.png"
            driver.save_screenshot(str(shot))
            assert shot.stat().st_size > 10_000
            if os.environ.get("GEO_SCREENSHOT"):
                shutil.copy(shot, os.environ["GEO_SCREENSHOT"])
            # the page's coverage control asks the server for the region at another coverage
            Select(driver.find_element(By.ID, "coverage")).select_by_value("0.5")
            driver.find_element(By.ID, "file").send_keys(str(OTHER))
            wait_until(lambda: "for 50%" in driver.find_element(By.ID, "region-words").text)
        finally:
            driver.quit()
