"""Headless Chromium for tests, driven over the DevTools protocol (test-support code).

    with Browser() as b:
        with b.open(path.as_uri()) as page:
            page.eval("document.title")
            page.click("th")
            page.screenshot(tmp_path / "page.png", full_page=True)
            assert not page.errors

Chromium is looked up on PATH (``chromium``, ``chromium-browser``, ``google-chrome``) or
taken from ``$MEDXFER_CHROMIUM``. When it is missing, :func:`ensure_chromium` installs
Debian's package once per machine (``apt-get update && apt-get install -y chromium``) if the
process is root and apt-get exists, unless ``$MEDXFER_NO_BROWSER_INSTALL`` is set; otherwise
it raises :class:`BrowserUnavailable` with the reason, which the ``browser`` fixture turns
into a skip. A failed install is recorded in ``/var/tmp`` and not retried.

Every browser gets a throwaway profile (``--user-data-dir``) and HOME/XDG directories in a
temporary directory that is removed on close, so nothing is written to the user's home.
Background networking (updates, sync, metrics) is switched off; the pages under test are
local files.
"""
from __future__ import annotations

import base64
import fcntl
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
STATE_DIR = Path("/var/tmp")
INSTALL_LOCK = STATE_DIR / "medxfer-chromium-install.lock"
INSTALL_RECORD = STATE_DIR / "medxfer-chromium-install.json"
INSTALL_LOG = STATE_DIR / "medxfer-chromium-install.log"

FLAGS = (
    "--headless=new", "--remote-debugging-port=0", "--no-first-run", "--no-default-browser-check",
    "--disable-gpu", "--disable-dev-shm-usage", "--disable-extensions", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-default-apps", "--no-pings",
    "--disable-breakpad", "--disable-crash-reporter", "--disable-domain-reliability",
    "--disable-client-side-phishing-detection", "--metrics-recording-only", "--mute-audio",
    "--hide-scrollbars", "--password-store=basic", "--use-mock-keychain", "--window-size=1280,800",
)


class BrowserUnavailable(RuntimeError):
    """No usable Chromium here (and none can be installed); the message says why."""


class BrowserError(RuntimeError):
    """The browser or a DevTools command failed."""


class JavaScriptError(BrowserError):
    """``Page.eval`` threw in the page."""


# --------------------------------------------------------------------------- finding it

def find_chromium() -> str | None:
    """Path of a Chromium-family browser: ``$MEDXFER_CHROMIUM`` or the first on PATH."""
    env = os.environ.get("MEDXFER_CHROMIUM")
    if env:
        return env if os.access(env, os.X_OK) else None
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _why_no_install() -> str | None:
    if os.environ.get("MEDXFER_NO_BROWSER_INSTALL"):
        return "MEDXFER_NO_BROWSER_INSTALL is set"
    if os.geteuid() != 0:
        return "not root, so packages cannot be installed"
    if shutil.which("apt-get") is None:
        return "apt-get not found"
    return None


@dataclass(frozen=True)
class InstallReport:
    """What :func:`ensure_chromium` did: the browser path, and whether (and how long) it installed."""

    path: str
    installed: bool
    seconds: float = 0.0


def ensure_chromium() -> InstallReport:
    """A Chromium path, installing Debian's ``chromium`` package first when allowed."""
    env = os.environ.get("MEDXFER_CHROMIUM")
    if env and not os.access(env, os.X_OK):
        raise BrowserUnavailable(f"$MEDXFER_CHROMIUM={env} is not an executable file")
    path = find_chromium()
    if path:
        return InstallReport(path, installed=False)
    names = ", ".join(CANDIDATES)
    why = _why_no_install()
    if why:
        raise BrowserUnavailable(f"none of {names} on PATH, and {why}")
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(INSTALL_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one install per machine, whatever runs in parallel
        path = find_chromium()
        if path:
            return InstallReport(path, installed=False)
        if INSTALL_RECORD.exists():
            raise BrowserUnavailable(f"an earlier install failed ({INSTALL_RECORD.read_text().strip()}); "
                                     f"delete {INSTALL_RECORD} to try again")
        t0 = time.monotonic()
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        with open(INSTALL_LOG, "a") as out:
            for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
                log.warning("installing the test browser: %s (output in %s)", " ".join(cmd), INSTALL_LOG)
                out.write(f"$ {' '.join(cmd)}\n")
                out.flush()
                rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, check=False).returncode
                if rc != 0:
                    INSTALL_RECORD.write_text(json.dumps({"command": cmd, "returncode": rc, "log": str(INSTALL_LOG),
                                                          "time": time.time()}) + "\n")
                    raise BrowserUnavailable(f"{' '.join(cmd)} failed with exit code {rc}; see {INSTALL_LOG}")
        seconds = time.monotonic() - t0
        path = find_chromium()
        if not path:
            INSTALL_RECORD.write_text(json.dumps({"error": "installed, but not found on PATH"}) + "\n")
            raise BrowserUnavailable(f"apt-get installed chromium but none of {names} is on PATH")
        log.warning("installed %s in %.0f s", path, seconds)
        return InstallReport(path, installed=True, seconds=seconds)


# ------------------------------------------------------------------------- the browser

@dataclass(frozen=True)
class ConsoleEntry:
    """A console message, uncaught exception or browser log entry of a page."""

    kind: str  # "console", "exception" or "log"
    level: str  # "error", "warning", "info", ...
    text: str
    url: str = ""

    def __str__(self) -> str:
        return f"[{self.kind}:{self.level}] {self.text}" + (f" ({self.url})" if self.url else "")


def _remote_text(obj: dict[str, Any]) -> str:
    if "value" in obj:
        return obj["value"] if isinstance(obj["value"], str) else json.dumps(obj["value"])
    return str(obj.get("description") or obj.get("unserializableValue") or obj.get("type", ""))


class Browser:
    """A headless Chromium with a throwaway profile; one DevTools websocket for all pages."""

    def __init__(self, executable: str | None = None, timeout: float = 30.0) -> None:
        self.executable = executable or find_chromium()
        if not self.executable:
            raise BrowserUnavailable(f"none of {', '.join(CANDIDATES)} on PATH")
        self.timeout = timeout
        self.tmp: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._ws: Any = None
        self._next_id = 0
        self._pages: dict[str, Page] = {}

    # lifecycle
    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        import websocket  # websocket-client, in the test extra

        self.tmp = Path(tempfile.mkdtemp(prefix="medxfer-chromium-"))
        profile = self.tmp / "profile"
        env = dict(os.environ)
        for var, sub in (("HOME", "home"), ("XDG_CONFIG_HOME", "config"), ("XDG_CACHE_HOME", "cache"),
                         ("XDG_DATA_HOME", "data"), ("XDG_RUNTIME_DIR", "runtime")):
            (self.tmp / sub).mkdir(mode=0o700)
            env[var] = str(self.tmp / sub)
        args = [self.executable, *FLAGS, f"--user-data-dir={profile}"]
        if os.geteuid() == 0:
            args.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
        args.append("about:blank")
        with open(self.tmp / "chromium.log", "wb") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.tmp / "chromium.log").read_text(errors="replace")[-2000:]
                self.close()
                raise BrowserError(f"Chromium did not open its DevTools port: {tail}")
            time.sleep(0.05)
        port, path = port_file.read_text().splitlines()[:2]
        self._ws = websocket.create_connection(f"ws://127.0.0.1:{port}{path}", timeout=self.timeout,
                                               suppress_origin=True)
        log.info("chromium %s on port %s (profile %s)", self.version(), port, profile)

    def close(self) -> None:
        if self._ws is not None:
            try:
                self.command("Browser.close")
            except (BrowserError, OSError):  # already gone: it is killed below
                log.debug("Browser.close failed", exc_info=True)
            self._ws.close()
            self._ws = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self.proc = None
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    # protocol
    def command(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict:
        """Send one DevTools command and wait for its answer, filing events meanwhile."""
        if self._ws is None:
            raise BrowserError("the browser is not running")
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self._ws.send(json.dumps(msg))
        want = self._next_id
        while True:
            reply = self._receive(time.monotonic() + self.timeout)
            if reply.get("id") == want:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error'].get('message')} {reply['error'].get('data', '')}")
                return reply.get("result", {})

    def _receive(self, deadline: float) -> dict:
        if time.monotonic() > deadline:
            raise BrowserError("timed out waiting for the browser")
        msg = json.loads(self._ws.recv())
        if "method" in msg:
            page = self._pages.get(msg.get("sessionId", ""))
            if page is not None:
                page._event(msg["method"], msg.get("params", {}))
        return msg

    def wait_event(self, page: Page, method: str, timeout: float | None = None) -> dict:
        """The next unconsumed ``method`` event of ``page``, waiting for it if needed."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            for i, (name, params) in enumerate(page._pending):
                if name == method:
                    del page._pending[i]
                    return params
            self._receive(deadline)

    def version(self) -> str:
        return str(self.command("Browser.getVersion").get("product", "?"))

    def open(self, url: str, width: int = 1280, height: int = 800) -> Page:
        """A new tab on ``url``, returned after its load event."""
        target = self.command("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.command("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, target, session)
        self._pages[session] = page
        for domain in ("Runtime", "Log", "Page"):
            page.command(f"{domain}.enable")
        page.command("Emulation.setDeviceMetricsOverride",
                     {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        page.navigate(url)
        return page


class Page:
    """One tab. ``errors``: console errors, uncaught exceptions and browser log errors so far."""

    def __init__(self, browser: Browser, target: str, session: str) -> None:
        self.browser = browser
        self.target = target
        self.session = session
        self.entries: list[ConsoleEntry] = []
        self._pending: list[tuple[str, dict]] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.browser._ws is not None and self.session in self.browser._pages:
            self.browser.command("Target.closeTarget", {"targetId": self.target})
            del self.browser._pages[self.session]

    def _event(self, method: str, params: dict) -> None:
        if method == "Runtime.consoleAPICalled":
            level = {"error": "error", "assert": "error", "warning": "warning"}.get(params.get("type", ""), "info")
            text = " ".join(_remote_text(a) for a in params.get("args", []))
            self.entries.append(ConsoleEntry("console", level, text))
        elif method == "Runtime.exceptionThrown":
            det = params.get("exceptionDetails", {})
            text = det.get("exception", {}).get("description") or det.get("text", "exception")
            self.entries.append(ConsoleEntry("exception", "error", text, det.get("url", "")))
        elif method == "Log.entryAdded":
            e = params.get("entry", {})
            self.entries.append(ConsoleEntry("log", e.get("level", "info"), e.get("text", ""), e.get("url", "")))
        else:
            self._pending.append((method, params))
            del self._pending[:-200]  # keep the recent ones only

    @property
    def errors(self) -> list[ConsoleEntry]:
        return [e for e in self.entries if e.level == "error"]

    def command(self, method: str, params: dict[str, Any] | None = None) -> dict:
        return self.browser.command(method, params, self.session)

    def navigate(self, url: str) -> None:
        self._pending.clear()
        res = self.command("Page.navigate", {"url": url})
        if res.get("errorText"):
            raise BrowserError(f"cannot open {url}: {res['errorText']}")
        self.browser.wait_event(self, "Page.loadEventFired")
        self.settle()

    def eval(self, js: str) -> Any:
        """The value of a JavaScript expression (promises awaited); raises JavaScriptError."""
        res = self.command("Runtime.evaluate", {"expression": js, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in res:
            det = res["exceptionDetails"]
            raise JavaScriptError(det.get("exception", {}).get("description") or det.get("text", "error"))
        return res.get("result", {}).get("value")

    def settle(self) -> None:
        """Wait two animation frames and a task, so layout and pending console events are in."""
        self.eval("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => setTimeout(r, 0))))")

    def bbox(self, selector: str) -> dict[str, float]:
        """x, y, width, height of the first element matching ``selector`` (CSS pixels)."""
        box = self.eval(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            f" if (!e) throw new Error('no element matches ' + {json.dumps(selector)});"
            " const r = e.getBoundingClientRect();"
            " return {x: r.x, y: r.y, width: r.width, height: r.height}; })()"
        )
        return dict(box)

    def click(self, selector: str) -> None:
        """A real mouse click (pressed and released) at the centre of the element."""
        self.eval(f"document.querySelector({json.dumps(selector)})?.scrollIntoView({{block: 'center'}})")
        box = self.bbox(selector)
        if box["width"] <= 0 or box["height"] <= 0:
            raise BrowserError(f"{selector} is not visible (box {box})")
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        self.command("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})
        for kind in ("mousePressed", "mouseReleased"):
            self.command("Input.dispatchMouseEvent",
                         {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1})
        self.settle()

    def screenshot(self, path: Path | str, full_page: bool = True) -> Path:
        """A PNG of the viewport, or of the whole page with ``full_page``."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.command("Page.getLayoutMetrics")["cssContentSize"]
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
        data = base64.b64decode(self.command("Page.captureScreenshot", params)["data"])
        out = Path(path)
        out.write_bytes(data)
        return out


# ----------------------------------------------------------------------------- fixture

@pytest.fixture(scope="session")
def browser(request: pytest.FixtureRequest) -> Iterator[Browser]:
    """One headless Chromium for the session; the test is skipped, with the reason, when
    there is none and none can be installed. Register it with ``from browser import browser``
    in a conftest."""
    try:
        import websocket  # noqa: F401
    except ImportError:
        pytest.skip("websocket-client is not installed (pip install websocket-client)")
    try:
        found = ensure_chromium()
    except BrowserUnavailable as e:
        pytest.skip(f"no headless browser: {e}")
    if found.installed:
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        if reporter is not None and capture is not None:
            with capture.global_and_fixture_disabled():  # shown even though output is captured
                reporter.write_line(f"browser: installed {found.path} with apt-get in {found.seconds:.0f} s "
                                    f"(log: {INSTALL_LOG})")
    with Browser(found.path) as b:
        yield b
