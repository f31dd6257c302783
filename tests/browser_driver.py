"""Driving the `cores demo` page in a headless Chromium (selenium + Debian's chromium-driver).

Every wait is for an event on the page (an element appearing, a value being set); the time limit
is only a safety net against a page that never answers, not a speed budget.
"""

from __future__ import annotations

import shutil
from pathlib import Path

SAFETY_NET_S = 600


def segment_in_browser(url: str, image: Path, question: str, browser: str, tmp: Path) -> tuple[str, str]:
    """Upload ``image``, type ``question``, press Segment; the result image's ``src`` and the answer."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = Options()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", f"--user-data-dir={tmp / 'profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(url)
        wait = WebDriverWait(driver, SAFETY_NET_S)
        upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#cores-image input[type=file]"))
        upload.send_keys(str(image))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#cores-image img"))  # the upload's preview
        driver.find_element(By.CSS_SELECTOR, "#cores-question textarea").send_keys(question)
        driver.find_element(By.ID, "cores-submit").click()
        result = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#cores-result img"))
        answer = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#cores-answer textarea").get_attribute("value"))
        return result[0].get_attribute("src"), answer
    finally:
        driver.quit()
