"""Make docs/console-overview.png, the README's picture of the console, from a demo hub.

Runs ``hashfed demo`` into a temporary directory, serves it, logs a headless
Chromium in with a console token and saves the overview page. Needs the test
extra (selenium) and Debian's chromium and chromium-driver::

    .venv/bin/python docs/console_screenshot.py
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.common.by import By

DOCS = Path(__file__).resolve().parent
OUT = DOCS / "console-overview.png"


def hashfed(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "federation", *args], capture_output=True, text=True, check=True
    )
    return done.stdout


def main() -> None:
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        raise SystemExit(
            "needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver"
        )
    with tempfile.TemporaryDirectory(prefix="hashfed-screenshot-") as scratch:
        data, keys = Path(scratch) / "hub", Path(scratch) / "keys"
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        hashfed("demo", "--data", str(data), "--keys", str(keys), "--port", str(port), "--quiet")
        token = hashfed("console-token", str(data)).strip()
        server = subprocess.Popen(
            [sys.executable, "-m", "federation", "serve", str(data), "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(200):
                try:
                    with urllib.request.urlopen(url + "/v1/ready", timeout=1):
                        break
                except OSError:
                    time.sleep(0.1)
            options = webdriver.ChromeOptions()
            options.binary_location = chromium
            for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,520"):
                options.add_argument(argument)
            browser = webdriver.Chrome(
                options=options, service=webdriver.ChromeService(executable_path=driver_path)
            )
            try:
                browser.get(url + "/console/login")
                field = browser.find_element(By.NAME, "token")
                field.send_keys(token)
                field.submit()
                browser.save_screenshot(str(OUT))
            finally:
                browser.quit()
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
