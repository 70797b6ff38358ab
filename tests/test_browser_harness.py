"""The headless-browser harness (tests/browser.py) on small self-contained pages: it loads
them, sees console errors, CSP violations and uncaught exceptions, measures elements,
clicks, and takes full-page screenshots. No test touches the network."""
from __future__ import annotations

import os
import struct
from pathlib import Path

from browser import Browser

CSP = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:"

PAGE = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<title>harness check</title>
<style>
  body {{ font-family: sans-serif; margin: 2em; }}
  table {{ border-collapse: collapse; }}
  th, td {{ border: 1px solid #999; padding: 4px 12px; }}
  th {{ cursor: pointer; background: #eee; }}
  .spacer {{ height: 1400px; }}
</style></head>
<body>
<h1>Sortable table</h1>
<table id="t"><thead><tr><th data-col="0">model</th><th data-col="1" id="acc">accuracy</th></tr></thead>
<tbody>
<tr><td>resnet50</td><td>71.2</td></tr>
<tr><td>densenet121</td><td>74.9</td></tr>
<tr><td>vit-b16</td><td>68.4</td></tr>
<tr><td>moco-v2</td><td>73.8</td></tr>
</tbody></table>
<svg id="chart" width="240" height="120" viewBox="0 0 240 120" role="img" aria-label="bars">
  <rect x="10" y="20" width="60" height="90" fill="#4477aa"/>
  <rect x="90" y="50" width="60" height="60" fill="#ee6677"/>
  <text x="170" y="70">svg</text>
</svg>
<div class="spacer"></div>
<p id="bottom">end of the page</p>
<script>
  document.querySelectorAll('th').forEach(th => th.addEventListener('click', () => {{
    const col = +th.dataset.col, body = document.querySelector('#t tbody');
    const desc = th.dataset.desc !== '1';
    const key = r => col === 1 ? parseFloat(r.cells[col].textContent) : r.cells[col].textContent;
    [...body.rows].sort((a, b) => (key(a) > key(b) ? 1 : key(a) < key(b) ? -1 : 0) * (desc ? -1 : 1))
      .forEach(r => body.appendChild(r));
    th.dataset.desc = desc ? '1' : '0';
    console.log('sorted by', th.textContent, desc ? 'descending' : 'ascending');
  }}));
</script>
</body></html>
"""

ROWS = "[...document.querySelectorAll('#t tbody tr')].map(r => r.cells[0].textContent)"


def _write(tmp_path: Path, name: str, html: str) -> str:
    path = tmp_path / name
    path.write_text(html, encoding="utf-8")
    return path.as_uri()


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_page_loads_clean_sorts_and_screenshots(browser, tmp_path):
    with browser.open(_write(tmp_path, "page.html", PAGE)) as page:
        assert page.errors == [], [str(e) for e in page.errors]
        assert page.eval("document.title") == "harness check"
        for sel in ("#t", "#chart", "#chart rect"):
            box = page.bbox(sel)
            assert box["width"] > 0 and box["height"] > 0, (sel, box)
        assert page.eval(ROWS) == ["resnet50", "densenet121", "vit-b16", "moco-v2"]
        page.click("#acc")
        assert page.eval(ROWS) == ["densenet121", "moco-v2", "resnet50", "vit-b16"]
        page.click("#acc")  # the second click reverses the order
        assert page.eval(ROWS) == ["vit-b16", "resnet50", "moco-v2", "densenet121"]
        assert any("sorted by accuracy" in e.text for e in page.entries)  # console.log seen, not an error
        shot = page.screenshot(tmp_path / "page.png", full_page=True)
        width, height = _png_size(shot)
        assert width == 1280 and height > 1500  # the whole page, beyond the 800 px viewport
        assert page.errors == []


def test_external_image_is_a_recorded_csp_error(browser, tmp_path):
    html = PAGE.replace("<h1>Sortable table</h1>", '<h1>Sortable table</h1><img src="https://example.com/x.png">')
    with browser.open(_write(tmp_path, "external.html", html)) as page:
        texts = [e.text for e in page.errors]
        assert any("Content Security Policy" in t and "example.com/x.png" in t for t in texts), texts
        assert page.eval("document.querySelector('img').naturalWidth") == 0  # never loaded


def test_script_error_is_recorded(browser, tmp_path):
    html = PAGE.replace("</body>", "<script>undefinedFunction();</script></body>")
    with browser.open(_write(tmp_path, "broken.html", html)) as page:
        errors = [e for e in page.errors if e.kind == "exception"]
        assert len(errors) == 1 and "undefinedFunction is not defined" in errors[0].text
    html = PAGE.replace("</body>", "<script>console.error('bad value', 42);</script></body>")
    with browser.open(_write(tmp_path, "console.html", html)) as page:
        assert [(e.kind, e.text) for e in page.errors] == [("console", "bad value 42")]


def _home_traces(home: Path) -> set[str]:
    """Entries a Chromium run could leave in a home directory."""
    out = set()
    for d in (home, home / ".config", home / ".cache", home / ".local" / "share"):
        if d.is_dir():
            for p in d.iterdir():
                if "chrom" in p.name.lower() or p.name in (".pki", "google-chrome", ".java"):
                    out.add(str(p))
    return out


def test_browser_leaves_nothing_behind(browser, tmp_path):
    home = Path(os.path.expanduser("~"))
    before = _home_traces(home)
    with Browser(browser.executable) as b:
        profile = b.tmp
        assert profile is not None and (profile / "profile" / "DevToolsActivePort").exists()
        with b.open(_write(tmp_path, "page.html", PAGE)) as page:
            assert page.eval("1 + 1") == 2
    assert not profile.exists()  # the throwaway profile is removed on close
    assert _home_traces(home) == before
