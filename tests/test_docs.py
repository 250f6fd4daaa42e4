"""The documentation site (``make docs``): every public name is in the API reference, and the built site renders
in a real browser (title, sidebar, a code block, a rendered notebook image) served over HTTP."""

from __future__ import annotations

import functools
import http.server
import importlib
import inspect
import pkgutil
import posixpath
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest

import labkit

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "docs" / "_build" / "html"
ARTIFACTS = ROOT / "test-artifacts" / "docs"
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def site() -> Path:
    """The built site; `make test` builds it before the tests (warnings as errors), a lone pytest run builds it."""
    if not (SITE / "objects.inv").exists():
        sphinx = Path(sys.executable).parent / "sphinx-build"
        subprocess.run([str(sphinx), "-b", "html", "-n", "-W", "--keep-going", "-q", "docs", str(SITE)], cwd=ROOT,
                       check=True, timeout=900)
    return SITE


def _inventory(site: Path) -> set[str]:
    from sphinx.util.inventory import InventoryFile

    with (site / "objects.inv").open("rb") as f:
        inventory = InventoryFile.load(f, "", posixpath.join)
    return {name for items in inventory.values() for name in items}


def _public_modules() -> list[types.ModuleType]:
    names = ["labkit"] + [m.name for m in pkgutil.walk_packages(labkit.__path__, "labkit.")
                          if not any(part.startswith("_") for part in m.name.split("."))]
    return [importlib.import_module(n) for n in sorted(names)]


def _documented_as(module: types.ModuleType, name: str) -> set[str]:
    """The inventory names under which ``module.name`` would be documented where it is defined."""
    obj = getattr(module, name)
    if isinstance(obj, types.ModuleType):
        return {obj.__name__}
    if inspect.isclass(obj) or inspect.isfunction(obj):
        return {f"{obj.__module__}.{obj.__qualname__}"}
    # a constant: documented in the module whose source assigns it
    return {f"{m.__name__}.{name}" for m in _public_modules() if vars(m).get(name) is obj}


def test_every_name_in_labkits_all_lists_is_in_the_api_reference(site):
    inventory = _inventory(site)
    exported = [(m, n) for m in _public_modules() for n in getattr(m, "__all__", [])]
    assert len(exported) > 100  # labkit, sampling, interventions, speculative, panels, imaging, beam
    absent = [f"{m.__name__}.{n}" for m, n in exported if not _documented_as(m, n) & inventory]
    assert absent == [], f"exported but not in the API reference: {absent}"


def test_every_public_module_has_an_api_page(site):
    pages = {p.stem for p in (site / "api").glob("labkit*.html")}
    assert {m.__name__ for m in _public_modules()} <= pages


def test_every_teaching_notebook_is_rendered_with_its_stored_outputs(site):
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        page = (site / "notebooks" / f"{notebook.stem}.html").read_text()
        stored_png = notebook.read_text().count('"image/png"')
        assert page.count('src="../_images/') >= min(stored_png, 1), notebook.name
        assert "cell_output" in page, f"{notebook.name}: no output rendered"


@pytest.fixture(scope="module")
def served(site):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # no access log on stderr
            pass

    handler = functools.partial(Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _loaded_images(page) -> int:
    return page.evaluate("[...document.images].filter(i => i.complete && i.naturalWidth > 0).length")


@pytest.mark.slow
def test_the_built_site_renders_in_a_real_browser(served):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: apt-get install -y chromium (make test does this)"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            failed: list[str] = []
            page.on("response", lambda r: failed.append(r.url) if r.status >= 400 else None)

            page.goto(f"{served}/index.html", wait_until="load")
            assert page.title().startswith("labkit")
            sidebar = page.locator(".sidebar-tree")
            assert sidebar.is_visible()
            for link in ("Sampling", "Interventions", "API reference", "Concepts"):
                assert sidebar.get_by_role("link", name=link, exact=False).count() >= 1, link
            assert page.locator("div.highlight pre").first.inner_text().startswith("make lab")
            assert _loaded_images(page) >= 1  # the Lab screenshot
            page.screenshot(path=str(ARTIFACTS / "index.png"))

            page.goto(f"{served}/howto/sampling.html", wait_until="load")
            assert page.locator("h1").first.inner_text().startswith("Sampling")
            assert "Classic(temperature=0.8" in page.locator("div.highlight pre").first.inner_text()
            assert page.locator(".sidebar-tree").is_visible()
            page.screenshot(path=str(ARTIFACTS / "howto_sampling.png"))

            page.goto(f"{served}/notebooks/11_attribution.html", wait_until="load")
            outputs = page.locator(".cell_output img")
            assert outputs.count() >= 1
            assert outputs.first.evaluate("i => i.complete && i.naturalWidth > 100")  # a rendered figure
            page.screenshot(path=str(ARTIFACTS / "notebook_11.png"), full_page=False)

            page.goto(f"{served}/api/labkit.session.html", wait_until="load")
            assert page.locator("dt#labkit\\.session\\.Session").count() == 1
            assert page.locator("dt#labkit\\.session\\.Session\\.generate").count() == 1
            assert failed == [], f"resources that failed to load: {failed}"
        finally:
            browser.close()
