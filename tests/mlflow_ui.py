"""The real MLflow UI in a headless Chromium (the OS packages ``chromium`` and ``chromium-driver``, driven by
selenium): open a page of an `mlflow server` (`mlflow_server`) in a fresh browser profile, read what it shows.

Also a command that saves a screenshot of an experiment's runs view (the one in docs/):

    python tests/mlflow_ui.py --store sqlite:///mlflow.db --experiment nomic-embed-demo --screenshot docs/x.png
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from mlflow_server import free_port, mlflow_server

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1500,950")  # fmt: skip


def browser_missing() -> str | None:
    """Why the browser check cannot run here, or None."""
    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (Debian: apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    return None


@contextlib.contextmanager
def browser() -> Iterator[object]:
    """A headless Chromium with a fresh profile (so no UI setting of an earlier visit applies)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def page_text(driver, url: str, until: list[str], timeout: float = 120) -> str:
    """Open ``url`` and wait until the page's text holds every string of ``until`` (or the time is up)."""
    from selenium.webdriver.common.by import By

    driver.get(url)
    deadline = time.monotonic() + timeout
    while True:
        text = driver.find_element(By.TAG_NAME, "body").text
        if all(item in text for item in until) or time.monotonic() > deadline:
            return text
        time.sleep(1)


def main() -> None:
    from mlflow import MlflowClient

    from evaluation.report import ui_path

    parser = argparse.ArgumentParser(description="Screenshot of an experiment's runs view in the MLflow UI")
    parser.add_argument("--store", required=True, help="backend store URI, e.g. sqlite:///mlflow.db")
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--screenshot", required=True, type=Path)
    args = parser.parse_args()
    experiment = MlflowClient(args.store).get_experiment_by_name(args.experiment).experiment_id
    port = free_port()
    command = ["mlflow", "server", "--backend-store-uri", args.store, "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]  # fmt: skip
    with mlflow_server(command, port) as url, browser() as driver:
        page_text(driver, f"{url}/{ui_path(experiment)}", until=["eval "])
        time.sleep(3)  # let the table settle
        driver.save_screenshot(str(args.screenshot))


if __name__ == "__main__":
    main()
