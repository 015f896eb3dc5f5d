"""A real headless Chromium for browser tests, driven over the DevTools protocol through a pipe (no extra package).

    executable = chromium_executable()          # PATH, else Debian's package installed with apt-get (once)
    with HeadlessChromium(executable) as browser:
        browser.open(Path("site/index.html").as_uri(), ready="document.body.dataset.ready === '1'")
        browser.evaluate("document.title")
        browser.type_text("#search", "the")
        browser.screenshot("index.png")
        browser.requests                         # every URL the page asked for (Network.requestWillBeSent)

``--remote-debugging-pipe`` makes Chromium read protocol messages (JSON, each ended by a NUL byte) from file
descriptor 3 and write its answers and events to descriptor 4, so no port and no websocket client are needed. The
browser runs with networking pinned shut (every host name resolves to nothing, a dead proxy), so a page that tried to
reach the network would fail to, and the attempt would still show in :attr:`HeadlessChromium.requests`.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """A Chromium on PATH ($HF_SAE_CHROMIUM first), or None."""
    explicit = os.environ.get("HF_SAE_CHROMIUM")
    if explicit:
        return explicit
    for name in NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def chromium_executable() -> tuple[str | None, str]:
    """(path, "") of a Chromium, installing Debian's ``chromium`` package with apt-get when none is on PATH (root
    only; ``apt-get update`` first if the plain install fails); (None, why) when that is impossible."""
    found = find_chromium()
    if found:
        return found, ""
    apt = shutil.which("apt-get")
    if apt is None:
        return None, "no Chromium on PATH and no apt-get to install Debian's chromium package"
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        return None, "no Chromium on PATH, and installing Debian's chromium package needs root (apt-get)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log = []
    for command in ([apt, "install", "-y", "chromium"], [apt, "update"], [apt, "install", "-y", "chromium"]):
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        log.append(f"{' '.join(command)}: exit {done.returncode} {done.stderr.strip()[-300:]}")
        if command[-1] == "chromium" and done.returncode == 0 and find_chromium():
            return find_chromium(), ""
    return None, "apt-get could not install chromium: " + " | ".join(log)


class BrowserError(RuntimeError):
    """The browser answered a protocol call with an error, exited, or did not answer in time."""


class HeadlessChromium:
    """One headless Chromium with one page, driven over ``--remote-debugging-pipe`` (module docstring)."""

    def __init__(self, executable: str, *, width: int = 1280, height: int = 900, timeout: float = 30.0):
        self.timeout = timeout
        self.requests: list[str] = []
        self.console: list[str] = []
        self.events: list[dict] = []
        self._profile = tempfile.mkdtemp(prefix="hf-sae-chromium-")
        to_browser_read, self._write_fd = os.pipe()
        self._read_fd, from_browser_write = os.pipe()

        def descriptors() -> None:  # the child reads commands on fd 3 and writes answers on fd 4
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser_read, from_browser_write)]
            os.dup2(high[0], 3)  # dup2 leaves them inheritable: they survive exec, the pipes' own fds do not
            os.dup2(high[1], 4)

        arguments = [
            executable,
            "--headless",
            "--remote-debugging-pipe",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--proxy-server=http://127.0.0.1:9",
            f"--user-data-dir={self._profile}",
            f"--window-size={width},{height}",
            "about:blank",
        ]
        self._process = subprocess.Popen(
            arguments,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=descriptors,
            close_fds=False,  # only fds 3 and 4 are inheritable (Python opens every other one close-on-exec)
        )
        os.close(to_browser_read)
        os.close(from_browser_write)
        self._next_id = 0
        self._buffer = b""
        self.session: str | None = None
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Network", "Runtime"):
            self.call(f"{domain}.enable")
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )

    # ------------------------------------------------------------------------------------------ the protocol
    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError("Chromium did not answer in time")
            ready, _, _ = select.select([self._read_fd], [], [], left)
            if ready:
                chunk = os.read(self._read_fd, 1 << 20)
                if not chunk:
                    raise BrowserError(f"Chromium closed the pipe (exit status {self._process.poll()})")
                self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def _record(self, message: dict) -> None:
        method = message.get("method")
        params = message.get("params", {})
        if method == "Network.requestWillBeSent":
            self.requests.append(params["request"]["url"])
        elif method == "Runtime.consoleAPICalled":
            self.console.append(" ".join(str(arg.get("value", arg.get("description", ""))) for arg in params["args"]))
        elif method == "Runtime.exceptionThrown":
            self.console.append("exception: " + json.dumps(params.get("exceptionDetails", {}))[:500])
        self.events.append(message)

    def call(self, method: str, params: dict | None = None) -> dict:
        """Send one protocol command (to the page's session once attached) and return its result."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if self.session is not None:
            message["sessionId"] = self.session
        os.write(self._write_fd, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            answer = self._read_message(deadline)
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise BrowserError(f"{method}: {answer['error']}")
                return answer.get("result", {})
            self._record(answer)

    def _drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        try:
            while True:
                self._record(self._read_message(deadline))
        except BrowserError:
            pass

    # --------------------------------------------------------------------------------------------- the page
    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (awaited when it is a promise)."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression!r} raised {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float | None = None) -> Any:
        """Poll ``expression`` until it is truthy (an exception counts as false: the document may still be
        loading); return its value."""
        deadline = time.monotonic() + (timeout or self.timeout)
        last = None
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except BrowserError as error:
                value, last = None, error
            if value:
                return value
            self._drain(0.05)
        raise BrowserError(
            f"{expression!r} stayed false for {timeout or self.timeout} s (last error: {last}); console: {self.console}"
        )

    def open(self, url: str, ready: str = "document.readyState === 'complete'") -> None:
        """Navigate to ``url`` and wait until ``ready`` holds."""
        self.call("Page.navigate", {"url": url})
        self.wait_for(ready)

    def type_text(self, selector: str, text: str) -> None:
        """Focus the element and type ``text`` into it, as a user's keyboard would (input events fire)."""
        self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        self.call("Input.insertText", {"text": text})

    def screenshot(self, path: str | os.PathLike, full_page: bool = True) -> Path:
        """A PNG of the page (the whole page height when ``full_page``)."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            metrics = self.call("Page.getLayoutMetrics")["cssContentSize"]
            params.update(
                captureBeyondViewport=True,
                clip={"x": 0, "y": 0, "width": metrics["width"], "height": metrics["height"], "scale": 1},
            )
        data = base64.b64decode(self.call("Page.captureScreenshot", params)["data"])
        path = Path(path)
        path.write_bytes(data)
        return path

    def close(self) -> None:
        try:
            self.session = None
            self.call("Browser.close")
        except (BrowserError, OSError):
            pass
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        for fd in (self._read_fd, self._write_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> HeadlessChromium:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
