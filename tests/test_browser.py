"""The real thing: JupyterLab on localhost, ``01_fiber_gallery.ipynb`` in headless Chromium (Playwright's
Python package driving Debian's ``chromium``), Run All, then the gallery images, the plots and a Run-button
round trip are checked in the rendered page and a screenshot is saved under the test's tmp folder.

Skipped (with the reason) only where Chromium or Playwright is missing: ``make browser-deps`` installs
Chromium from apt. Never ``playwright install`` (it downloads a browser): Playwright is pointed at the
system binary with ``executable_path``.
"""
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import fiberbench as fb

pytestmark = pytest.mark.browser

NB = Path(__file__).resolve().parents[1] / "notebooks" / "01_fiber_gallery.ipynb"
CHROMIUM = os.environ.get("FIBERBENCH_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
N, STEPS = 4, 4


def _skip_reason() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"no Chromium at {CHROMIUM} (Debian: `make browser-deps` or `apt-get install chromium`)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (pip install playwright; no browser download)"
    return None


def _get(url: str, token: str, method: str = "GET", timeout: float = 5):
    req = urllib.request.Request(url, method=method, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read()


@pytest.fixture
def lab(tmp_path):
    """JupyterLab serving a copy of notebook 01 with small parameters; yields ``(base_url, token)``."""
    import nbformat

    root = tmp_path / "lab"
    root.mkdir()
    nb = nbformat.read(NB, as_version=4)
    idx = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    clip = "toy/clip"
    if clip not in fb.list_models(kind="clip"):  # while the toy CLIP is not shipped: a tiny random open_clip
        from test_notebooks import _tiny_open_clip

        clip = _tiny_open_clip(tmp_path / "tiny-clip", 0)
    params = nbformat.v4.new_code_cell(
        f"import torch\ntorch.set_num_threads(1)\nN = {N}\nSTEPS = {STEPS}\nSTORE = {str(tmp_path / 'store')!r}\n"
        f"CLIP = {clip!r}")
    params.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(idx + 1, params)
    nbformat.write(nb, root / NB.name)

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for var in ("JUPYTER_CONFIG_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR", "JUPYTERLAB_SETTINGS_DIR",
                "JUPYTERLAB_WORKSPACES_DIR"):
        d = tmp_path / var.lower()
        d.mkdir()
        env[var] = str(d)
    notif = Path(env["JUPYTERLAB_SETTINGS_DIR"]) / "@jupyterlab" / "apputils-extension"
    notif.mkdir(parents=True)
    (notif / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false",
                                                                       "checkForUpdates": False}))
    token = secrets.token_hex(16)
    log = open(tmp_path / "jupyterlab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", "--port=0", "--allow-root",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--LabApp.news_url=None",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.extension_manager=readonly"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = None
    try:
        info = Path(env["JUPYTER_RUNTIME_DIR"]) / f"jpserver-{proc.pid}.json"
        t0 = time.time()
        while time.time() - t0 < 120:
            if proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {proc.returncode}: "
                                   f"{(tmp_path / 'jupyterlab.log').read_text()[-2000:]}")
            if info.exists():
                try:
                    base = f"http://127.0.0.1:{json.loads(info.read_text())['port']}"
                    if _get(f"{base}/api/status", token)[0] == 200:
                        break
                except (OSError, ValueError, KeyError):
                    pass
            time.sleep(0.25)
        else:
            raise RuntimeError("jupyter lab did not become ready within 120 s")
        yield base, token
    finally:
        try:
            if base:
                _get(f"{base}/api/shutdown", token, method="POST")
            proc.wait(timeout=15)
        except Exception:  # noqa: BLE001 - fall back to the server's own process group
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()


KERNEL_READY = """() => {
  const k = document.querySelector('.jp-NotebookPanel-toolbar .jp-KernelName');
  const s = document.querySelector('.jp-NotebookPanel-toolbar .jp-Notebook-ExecutionIndicator');
  const name = k ? k.textContent.trim() : '';
  return name && name !== 'No Kernel' && name !== 'Kernel' && s && s.getAttribute('data-status') === 'idle';
}"""

BAR_HEIGHTS = """(sel) => Array.from(document.querySelectorAll(sel + ' .barlayer .trace.bars .point path'))
  .map(p => p.getBBox().height)"""

IMAGES_DECODED = """(sel) => Array.from(document.querySelectorAll(sel)).map(i => [i.naturalWidth, i.naturalHeight])"""


@pytest.mark.timeout(600)
def test_fiber_gallery_in_jupyterlab(lab, tmp_path):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    base, token = lab
    shot = tmp_path / "fiber_gallery.png"
    t0 = time.time()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            console = []  # browser-side errors, saved with the failure screenshot
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}") if m.type in ("error", "warning")
                    else None)
            page.goto(f"{base}/lab/tree/{NB.name}?reset&token={token}")
            page.wait_for_function(KERNEL_READY, timeout=180_000)
            page.click(".lm-MenuBar-itemLabel:text-is('Run')")
            page.click(".lm-Menu-itemLabel:text-is('Run All Cells')")
            page.wait_for_selector(f".jp-OutputArea-output:has-text('FIBER_GALLERY_DONE {N + 1}')", timeout=420_000)

            # the gallery: reference + N samples, every <img> decoded by the browser
            sizes = page.evaluate(IMAGES_DECODED, ".fb-gallery-grid img")
            assert len(sizes) == N + 1, sizes
            assert all(w == 96 and h == 96 for w, h in sizes), sizes  # 32 px x scale 3
            assert page.locator(".fb-gallery-reference").count() == 1
            assert page.locator(".fb-preview img").count() == N  # the live x0-hat preview
            status = page.locator(".fb-status").inner_text()
            assert f"{N} samples sampled" in status, status
            # the distance chart (plotly FigureWidget): N bars, drawn with a height
            heights = page.evaluate(BAR_HEIGHTS, ".fb-distance-plot")
            assert len(heights) == N and max(heights) > 0, heights
            # the live loss curve got a line, and fig.show() rendered the static gallery grid and loss curve
            assert page.locator(".fb-loss-plot .scatterlayer .trace").count() >= 1
            # (plotly puts js-plotly-plot on the output element itself: no descendant selectors across them)
            assert page.locator(".jp-RenderedPlotly").count() == 2
            assert page.locator(".jp-RenderedPlotly .imagelayer image").count() == N + 1
            assert page.locator(".js-plotly-plot").count() == 4

            # a user's click on Run: same settings, so the store answers
            page.click(".fb-run")
            page.wait_for_selector(".fb-status:has-text('loaded from the store')", timeout=60_000)
            assert page.locator(".fb-gallery-grid img").count() == N + 1
            page.locator(".fb-fiber-gallery").first.scroll_into_view_if_needed()
            page.screenshot(path=str(shot), full_page=True)
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)  # what the page showed
            (tmp_path / "failure.html").write_text(page.content())
            (tmp_path / "console.log").write_text("\n".join(console))
            raise
        finally:
            browser.close()
    assert shot.exists() and shot.stat().st_size > 20_000
    print(f"browser test: {time.time() - t0:.1f} s in the browser; screenshot {shot}")


# --------------------------------------------------------------------------- notebooks 03 and 08

SING_NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.fixture
def lab_with(lab, tmp_path):
    """The same JupyterLab; ``add(name, params)`` writes a copy of ``notebooks/<name>.ipynb`` with a parameter cell
    (``params`` as Python source) into the folder it serves and returns the file name."""
    import nbformat

    def add(name: str, params: str) -> str:
        nb = nbformat.read(SING_NOTEBOOKS / f"{name}.ipynb", as_version=4)
        idx = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
        cell = nbformat.v4.new_code_cell("import torch\ntorch.set_num_threads(1)\n" + params)
        cell.metadata["tags"] = ["injected-parameters"]
        nb.cells.insert(idx + 1, cell)
        nbformat.write(nb, tmp_path / "lab" / f"{name}.ipynb")
        return f"{name}.ipynb"

    return lab, add


def run_all_in_browser(base: str, token: str, notebook: str, sentinel: str, shot: Path, check, timeout_ms: int):
    """Open ``notebook`` in JupyterLab, Run All from the menu, wait for ``sentinel`` in an output, ``check(page)``,
    screenshot to ``shot`` (the page, its HTML and console on failure beside it)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        console = []
        page.on("console", lambda m: console.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None)
        try:
            page.goto(f"{base}/lab/tree/{notebook}?reset&token={token}")
            page.wait_for_function(KERNEL_READY, timeout=180_000)
            page.click(".lm-MenuBar-itemLabel:text-is('Run')")
            page.click(".lm-Menu-itemLabel:text-is('Run All Cells')")
            page.wait_for_selector(f".jp-OutputArea-output:has-text('{sentinel}')", timeout=timeout_ms)
            assert page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"
                                ":has-text('Traceback')").count() == 0
            check(page)
            page.screenshot(path=str(shot), full_page=True)
        except Exception:
            page.screenshot(path=str(shot.with_name("failure.png")), full_page=True)
            shot.with_name("failure.html").write_text(page.content())
            shot.with_name("console.log").write_text("\n".join(console))
            raise
        finally:
            browser.close()


@pytest.mark.timeout(600)
def test_null_space_sing_in_jupyterlab(lab_with, tmp_path):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    (base, token), add = lab_with
    clip = "toy/clip" if "toy/clip" in fb.list_models(kind="clip") else None
    if clip is None:
        from test_notebooks import _tiny_open_clip

        clip = _tiny_open_clip(tmp_path / "tiny-clip-03", 0)
    name = add("03_null_space_sing", f"CLIP = {clip!r}\nN_FIT = 300\nN_SCORE = 12\nSTEER_STEPS = 60\n"
                                     "CONCEPTS = ['red', 'circle']\nSTEER_TO = 'blue'")

    def check(page):
        assert page.locator(".jp-RenderedPlotly").count() == 1  # the AS heatmap
        assert page.locator(".jp-RenderedPlotly .heatmaplayer, .jp-RenderedPlotly .hm").count() >= 1
        page.locator(".fb-nullspace").first.scroll_into_view_if_needed()
        assert page.locator(".fb-nullspace").count() == 1 and page.locator(".fb-steer").count() == 1
        page.wait_for_selector(".fb-nullspace-plot .js-plotly-plot .barlayer .trace.bars", timeout=60_000)
        assert page.locator(".jp-OutputArea-output:has-text('Table 1 toward')").count() == 1

    shot = tmp_path / "null_space_sing.png"
    run_all_in_browser(base, token, name, "SING_DONE 24", shot, check, 420_000)
    assert shot.exists() and shot.stat().st_size > 20_000


@pytest.mark.timeout(900)
def test_null_space_pictures_in_jupyterlab(lab_with, tmp_path):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    (base, token), add = lab_with
    # one trajectory per sample: this test is about what JupyterLab shows (the pictures, the bars, the checked finding);
    # test_notebooks runs the notebook at its own defaults (the particle preset), five times slower
    name = add("08_null_space_pictures", 'PRESET = "toy-fast"')

    def check(page):
        assert page.locator(".jp-RenderedPlotly").count() == 3  # the pictures, the IS bars, head vs backbone
        # the pictures: 2 images x 3 targets x (a label cell + 4 samples), every one an <image> in the grid
        assert page.locator(".jp-RenderedPlotly .imagelayer image").count() == 2 * 3 * 5
        heights = page.evaluate(BAR_HEIGHTS, ".jp-RenderedPlotly")
        assert len(heights) > 0 and max(heights) > 0
        assert page.locator(".jp-OutputArea-output:has-text('background kept in @pre_logits fibers')").count() == 1

    shot = tmp_path / "null_space_pictures.png"
    run_all_in_browser(base, token, name, "NULL_PICTURES_DONE 72", shot, check, 720_000)
    assert shot.exists() and shot.stat().st_size > 20_000
