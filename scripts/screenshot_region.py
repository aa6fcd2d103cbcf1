"""Screenshot the map page of `geo serve` drawing one query's region, in headless Chromium (docs/region.png).

    python scripts/screenshot_region.py --index BUNDLE --photo examples/osv5m/queries/1373307973052511.jpg \
        --coverage 0.5 --out docs/region.png [--view world|zoom]

`geo serve` runs on a free loopback port (127.0.0.1 only) for the screenshot's time. The picture is the page's
answer panel and map (the uploaded photo, the answer's words, the region at the chosen coverage), not the
gallery thumbnails under them: the repository may hold the vendored OSV-5M photos, not a gallery's own.
Needs Debian's `chromium` and `chromium-driver` and the `selenium` package (as tests/test_serve_browser.py).
The PNG is reduced to a 256-colour palette to stay small.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serving import geo_serve, wait_until  # noqa: E402  (the tests' own: `geo serve` on a free loopback port)


def _driver(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (chromium and driver):
        raise SystemExit("no browser: apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={profile}", "--window-size=1400,1000", "--hide-scrollbars"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def screenshot(url: str, photo: Path, coverage: float, view: str, out: Path) -> str:
    """Upload ``photo`` on the page at ``url`` with the region at ``coverage``; save the answer and map as
    ``out``; return the page's words about the region."""
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    with tempfile.TemporaryDirectory() as tmp:
        driver = _driver(Path(tmp) / "profile")
        try:
            driver.get(url + "/")
            wait_until(lambda: driver.execute_script("return document.querySelectorAll('#map path.land').length"), 120)
            Select(driver.find_element(By.ID, "coverage")).select_by_value(f"{coverage:g}")
            driver.find_element(By.ID, "file").send_keys(str(photo.resolve()))
            wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, "#map #region"), 120, "the region")
            if view == "zoom":
                driver.find_element(By.ID, "view-zoom").click()
            time.sleep(0.5)  # the photo's thumbnail decodes
            shot = Path(tmp) / "page.png"
            driver.find_element(By.TAG_NAME, "main").screenshot(str(shot))
            words = driver.find_element(By.ID, "region-words").text
        finally:
            driver.quit()
        Image.open(shot).convert("RGB").quantize(256).save(out, optimize=True)
    return words


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", required=True, type=Path)
    ap.add_argument("--photo", required=True, type=Path)
    ap.add_argument("--coverage", type=float, default=0.9, choices=(0.5, 0.8, 0.9, 0.95))
    ap.add_argument("--view", default="world", choices=("world", "zoom"))
    ap.add_argument("--out", type=Path, default=Path("docs/region.png"))
    a = ap.parse_args()
    with geo_serve(a.index) as url:
        words = screenshot(url, a.photo, a.coverage, a.view, a.out)
    print(f"{a.out}: {a.out.stat().st_size:,} bytes; {words}")


if __name__ == "__main__":
    main()
