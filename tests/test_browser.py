"""Real-browser test: JupyterLab on 127.0.0.1 driven by Debian's Chromium through playwright.

Opens a notebook with the Lab panel, runs all cells once the kernel is idle, then: types a prompt and clicks
Generate (tokens appear), hovers a token (its alternatives show), moves the temperature slider (the Python side
reports the new value), checks the attention image has a non-zero natural size and the probability chart has
bars, clicks Stop (generation stops), then clicks a token (the why view shows its attribution strip, the head image
and the ablate buttons). Screenshots go to ``test-artifacts/browser/``. Fails (never skips) when
the browser cannot run: ``make test`` installs chromium when it is missing.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CELLS = [
    "import labkit\nfrom labkit.ui.panels import Lab\nfrom labkit.sampling import Classic\n"
    "s = labkit.Session(progress=False)",
    "lab = Lab(s, prompt='Hello', max_new_tokens=400, sampler=Classic(temperature=0.8))\n"
    "lab.suppress.value = s.tokenizer.eos_token  # so the run lasts until Stop\nlab",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def jupyter(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("browser")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in CELLS]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, root / "lab.ipynb")
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(root / ".config"), "JUPYTER_RUNTIME_DIR": str(root / ".runtime"),
           "JUPYTERLAB_WORKSPACES_DIR": str(root / ".workspaces")}
    cmd = [str(Path(sys.executable).parent / "jupyter"), "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=", "--LabApp.check_for_updates_class="
           "jupyterlab.NeverCheckForUpdate"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    log = open(root / "jupyter.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"JupyterLab did not start:\n{(root / 'jupyter.log').read_text()[-3000:]}")
            time.sleep(0.3)
        yield url, token
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _run_all_cells(page) -> None:
    """Run every cell: focus the notebook, start "run all" (not awaiting its promise, which settles only when every
    cell has run) and check that the first cell started; JupyterLab can ignore a command issued while the notebook
    is still becoming the current widget, so it is issued again then (at most 3 times, only if nothing ran)."""
    started = "[...document.querySelectorAll('.jp-InputPrompt')].some(p => /\\[(\\*|\\d+)\\]/.test(p.innerText))"
    for _ in range(3):
        page.click(".jp-Notebook .jp-Cell >> nth=0")
        page.keyboard.press("Escape")  # command mode
        page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
        try:
            page.wait_for_function(started, timeout=20_000)
            return
        except Exception:
            continue
    raise AssertionError("JupyterLab did not run the notebook's cells")


def test_lab_panel_in_a_real_browser(jupyter):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: apt-get install -y chromium (make test does this)"
    url, token = jupyter
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1700, "height": 1300})
            page.goto(f"{url}/lab/tree/lab.ipynb?token={token}")
            page.wait_for_function("window.jupyterapp !== undefined", timeout=90_000)
            page.wait_for_selector(".jp-Notebook", timeout=90_000)
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
            page.screenshot(path=str(ARTIFACTS / "00_opened.png"), full_page=True)
            _run_all_cells(page)
            page.wait_for_selector(".labkit-lab .lk-stream", timeout=180_000)
            page.screenshot(path=str(ARTIFACTS / "01_panel.png"), full_page=True)

            # type a prompt, Generate: tokens appear
            page.fill(".labkit-prompt textarea", "Tell me a story about a lighthouse keeper.")
            page.click(".labkit-generate")
            page.wait_for_function("document.querySelectorAll('.lk-token').length >= 5", timeout=120_000)
            page.screenshot(path=str(ARTIFACTS / "02_generating.png"), full_page=True)

            # hover a token: its alternatives show
            page.hover(".lk-token >> nth=1")
            page.wait_for_selector(".lk-details .lk-alt", timeout=10_000)
            assert page.locator(".lk-details .lk-alt").count() >= 2
            assert page.locator(".lk-details-head").inner_text().startswith("step 1:")
            page.screenshot(path=str(ARTIFACTS / "03_hover.png"), full_page=True)

            # move the temperature slider: the Python side sees the new value (it writes it back to the label)
            values = page.locator(".labkit-sampler-values")
            assert "temperature=0.8" in values.inner_text()
            handle = page.locator(".labkit-slider-temperature .noUi-handle")
            handle.focus()
            for _ in range(4):
                handle.press("ArrowRight")
            # 4 steps of 0.05 from 0.8: the label (written by Python from the sampler object) says 1
            page.wait_for_function("document.querySelector('.labkit-sampler-values').innerText"
                                   ".endsWith('temperature=1')", timeout=15_000)
            readout = page.locator(".labkit-slider-temperature .widget-readout").inner_text()
            assert float(readout) == 1.0, readout

            # the attention image has a natural size; the probability chart has bars
            width = page.evaluate("document.querySelector('.labkit-attention img').naturalWidth")
            assert width > 0
            assert page.locator(".labkit-probs .bars path").count() >= 5
            page.screenshot(path=str(ARTIFACTS / "04_slider_chart_attention.png"), full_page=True)

            # Stop: generation stops
            page.click(".labkit-stop")
            page.wait_for_function("document.querySelector('.labkit-status').innerText.startsWith('stopped')",
                                   timeout=30_000)
            count = page.locator(".lk-token").count()
            time.sleep(1.5)
            assert page.locator(".lk-token").count() == count < 400
            page.screenshot(path=str(ARTIFACTS / "05_stopped.png"), full_page=True)

            # click a token: the why view renders its attribution strip and the heads that wrote it
            page.click(".lk-token >> nth=2")
            page.wait_for_function("document.querySelectorAll('.labkit-why-strip .lk-attr').length >= 5",
                                   timeout=60_000)
            page.wait_for_function("(e => e && (e.tagName === 'IMG' ? e : e.querySelector('img')).naturalWidth > 0)"
                                   "(document.querySelector('.labkit-why-heads'))", timeout=30_000)
            page.wait_for_function("document.querySelectorAll('.labkit-why-ablate').length === 3", timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "06_why.png"), full_page=True)
        finally:
            browser.close()
