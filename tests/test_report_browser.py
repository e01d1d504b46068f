"""report.html in a real headless browser (Debian's `chromium`): the page loads with no console message at all and
every image renders (naturalWidth > 0). A copy of the page gets a small script that counts the images after the
load event and writes the result into document.title, which `--dump-dom` prints; console messages come on stderr.
A control page with a broken image and a console error shows that the check can fail. Skips without a browser."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_inspect import write_run

from lmforge.recipes.report import ReportConfig, run_report

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHECK = """<script>
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).length;
  document.title = "LMFORGE-CHECK images=" + images.length + " broken=" + broken;
});
</script>"""
TITLE = re.compile(r"<title>LMFORGE-CHECK images=(\d+) broken=(\d+)</title>")
ONE_PIXEL_PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")


@pytest.fixture(scope="module")
def browser() -> str:
    found = next((path for name in BROWSERS if (path := shutil.which(name))), None)
    if found is None:
        pytest.skip("no headless browser (install Debian's chromium: apt-get install chromium)")
    return found


def load_in_browser(browser: str, page: Path, work: Path) -> tuple[int, int, list[str]]:
    """(images, broken images, console lines) of `page` after its load event."""
    checked = work / f"checked-{page.name}"
    text = page.read_text(encoding="utf-8")
    checked.write_text(text.replace("</body>", CHECK + "</body>"), encoding="utf-8")
    result = subprocess.run(
        [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
         f"--user-data-dir={work / 'profile'}", "--host-resolver-rules=MAP * ~NOTFOUND",  # nothing reachable
         "--no-first-run", "--dump-dom", checked.resolve().as_uri()],
        capture_output=True, text=True, timeout=120)
    found = TITLE.search(result.stdout)
    assert found, f"the page did not finish loading: {result.stderr[-2000:]}"
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    return int(found.group(1)), int(found.group(2)), console


def test_the_report_loads_without_console_messages_and_every_image_renders(browser, tmp_path):
    write_run(tmp_path / "run", "causal")
    report = run_report(ReportConfig(run_dir=str(tmp_path / "run"), max_new_tokens=4))
    images, broken, console = load_in_browser(browser, report, tmp_path)
    assert images == report.read_text(encoding="utf-8").count("<img ") >= 4
    assert broken == 0
    assert console == []


def test_the_check_sees_a_broken_image_and_a_console_error(browser, tmp_path):
    page = tmp_path / "control.html"
    page.write_text('<!DOCTYPE html><html><head><title>control</title></head><body>'
                    '<img src="data:image/png;base64,AAAA">'
                    f'<img src="data:image/png;base64,{ONE_PIXEL_PNG}">'
                    '<script>console.error("control-error")</script></body></html>')
    images, broken, console = load_in_browser(browser, page, tmp_path)
    assert (images, broken) == (2, 1)
    assert any("control-error" in line for line in console)
