"""Open a local HTML page in Debian's headless Chromium and record what happens.

Chromium is driven through the DevTools protocol (a websocket): the page is
loaded after the listeners are attached, so every uncaught exception, console
error and failed resource load is seen.
"""

import base64
import contextlib
import io
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import websocket


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--enable-unsafe-swiftshader",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
    "--remote-allow-origins=*",
]


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path is not None:
            return path
    raise RuntimeError(
        "Debian's chromium is not installed: run 'apt-get install -y chromium'"
    )


@dataclass
class PageReport:
    status: str
    """value of ``document.body.dataset.chemiscope`` when loading finished"""
    errors: list[str] = field(default_factory=list)
    """uncaught exceptions, console errors and failed loads"""
    dom: dict = field(default_factory=dict)
    screenshot: bytes = b""


class _DevTools:
    def __init__(self, url: str):
        self.socket = websocket.create_connection(url, timeout=120)
        self.ids = itertools.count(1)
        self.events: list[dict] = []

    def call(self, method: str, **params):
        identifier = next(self.ids)
        self.socket.send(
            json.dumps({"id": identifier, "method": method, "params": params})
        )
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == identifier:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            self.events.append(message)

    def evaluate(self, expression: str):
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True
        )
        return result["result"].get("value")


def _errors(events: list[dict]) -> list[str]:
    errors = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            description = details.get("exception", {}).get("description")
            errors.append(f"exception: {description or details.get('text')}")
        elif method == "Runtime.consoleAPICalled" and params["type"] in (
            "error",
            "assert",
        ):
            texts = [str(a.get("value", a.get("description"))) for a in params["args"]]
            errors.append("console.error: " + " ".join(texts))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            entry = params["entry"]
            errors.append(f"log ({entry['source']}): {entry['text']}")
    return errors


def open_page(path: Path, width: int = 1280, height: int = 900, timeout: float = 240):
    """Load ``path`` in headless Chromium, wait for the chemiscope viewer to finish
    loading, let it render, and report errors, DOM facts and a screenshot."""
    chromium = find_chromium()
    # Chromium's helper processes may still write into the profile when the main
    # one is gone: they share its process group, which is killed as a whole, and
    # a file they leave behind must not fail the test
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        process = subprocess.Popen(
            [
                chromium,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            return _drive(process, path, width, height, timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _browser_url(process) -> str:
    deadline = time.monotonic() + 60
    for line in process.stderr:
        match = re.search(r"DevTools listening on (ws://\S+)", line)
        if match:
            return match.group(1)
        if time.monotonic() > deadline:
            break
    raise RuntimeError("chromium did not open its DevTools port")


def _page_url(browser_url: str) -> str:
    import urllib.request

    port = re.search(r":(\d+)/", browser_url).group(1)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as response:
        targets = json.load(response)
    return next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"]


# the chemiscope panels live in shadow roots: walk them
_DOM_FACTS = """(() => {
    const inside = (root, selector) => {
        const found = Array.from(root.querySelectorAll(selector));
        for (const element of root.querySelectorAll('*')) {
            if (element.shadowRoot) {
                found.push(...inside(element.shadowRoot, selector));
            }
        }
        return found;
    };
    const box = (element) => {
        const rect = element.getBoundingClientRect();
        return [rect.x, rect.y, rect.width, rect.height];
    };
    const panel = (id) => {
        const element = document.getElementById(id);
        return {
            box: box(element),
            canvases: inside(element, 'canvas').map(box),
            plots: inside(element, 'svg.main-svg').length,
        };
    };
    return {
        map: panel('chemiscope-map'),
        structure: panel('chemiscope-structure'),
    };
})()"""


def _drive(process, path: Path, width, height, timeout) -> PageReport:
    browser_url = _browser_url(process)
    # keep reading chromium's log so that it never blocks on a full pipe
    import threading

    threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()
    tools = _DevTools(_page_url(browser_url))
    for domain in ("Runtime", "Log", "Page"):
        tools.call(f"{domain}.enable")
    tools.call(
        "Emulation.setDeviceMetricsOverride",
        width=width,
        height=height,
        deviceScaleFactor=1,
        mobile=False,
    )
    tools.call("Page.navigate", url=path.absolute().as_uri())

    deadline = time.monotonic() + timeout
    status = "loading"
    while time.monotonic() < deadline:
        status = tools.evaluate(
            "document.body ? document.body.dataset.chemiscope || 'loading' : 'loading'"
        )
        if status != "loading":
            break
        time.sleep(0.5)
    # let plotly and the WebGL structure viewer draw their first frames
    time.sleep(3)
    dom = tools.evaluate(_DOM_FACTS)
    shot = tools.call("Page.captureScreenshot", format="png")
    # collect events that arrived while waiting
    tools.socket.settimeout(0.5)
    try:
        while True:
            tools.events.append(json.loads(tools.socket.recv()))
    except websocket.WebSocketTimeoutException:
        pass
    tools.socket.close()
    return PageReport(
        status=status,
        errors=_errors(tools.events),
        dom=dom,
        screenshot=base64.b64decode(shot["data"]),
    )


def pixel_spread(png: bytes, box=None) -> float:
    """Standard deviation of the grey levels of an image, or of the region
    ``box = (x, y, width, height)`` of it (0 for a blank one)."""
    import numpy as np
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("L")
    if box is not None:
        x, y, width, height = box
        image = image.crop((int(x), int(y), int(x + width), int(y + height)))
    return float(np.asarray(image, dtype=float).std())
