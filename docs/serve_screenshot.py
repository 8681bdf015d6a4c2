"""Draw docs/serve.png, the README's picture of the page ``--mode serve`` puts at ``/``.

    python docs/serve_screenshot.py [--workdir /tmp/optqa-serve-shot] [--out docs/serve.png]

Trains three deltas (adapter, lora, bitfit) with ``--mode demo`` on the bundled sample (the demo builds the
same tiny random OPT each time, so they share one backbone), serves them with ``--mode serve``, and in
headless Chromium (Debian's chromium + chromium-driver, driven by selenium) asks a training question on the
page and saves the screenshot. Offline; a few minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUESTION = "Which gas do green plants take in from the air to make their own food?"


def optqa(*args: str, **kwargs) -> subprocess.Popen | subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "optqa", *args]
    if kwargs.pop("background", False):
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    return subprocess.run(command, check=True, capture_output=True, text=True, env=env, cwd=REPO)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "optqa-serve-shot"))
    parser.add_argument("--out", default=str(REPO / "docs" / "serve.png"))
    args = parser.parse_args()
    work = Path(args.workdir)
    deltas = {}
    for delta in ("adapter", "lora", "bitfit"):
        folder = work / delta / "demo" / "delta_ckpts"
        if not (folder / "optqa_manifest.json").is_file():
            print(f"training {delta} with --mode demo ...", flush=True)
            optqa("--mode", "demo", "--delta_type", delta, "--output_dir", str(work / delta))
        deltas[delta] = folder
    server = optqa("--mode", "serve", "--port", "0", "--deltas", *[f"{k}={v}" for k, v in deltas.items()],
                   background=True)
    try:
        line = server.stdout.readline()
        if not line.startswith("serving "):
            raise SystemExit(f"server did not start: {line}{server.stderr.read()[-2000:]}")
        url = line.split(" at ")[1].split("/ ")[0]
        shoot(url, Path(args.out))
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e3:.0f} kB)")


def shoot(url: str, out: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1100,700",
                 "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser") or ""
    browser = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".delta-choice")) == 3)
        browser.find_element(By.ID, "question").send_keys(QUESTION)
        browser.find_element(By.ID, "ask").click()
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".answer[data-done]")) == 3)
        out.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(out))
    finally:
        browser.quit()


if __name__ == "__main__":
    main()
