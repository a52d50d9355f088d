#!/usr/bin/env python
"""Open every page of the built book in headless Chromium, offline, and check what a reader sees.

For each HTML page of ``_build/html`` (outside the ``_static``-style folders) the check
fails when:

- an ``<img>`` did not load (``naturalWidth`` is 0);
- math is left untypeset: a ``.math`` element without MathJax output, a MathJax error, or
  raw TeX (``$$``, ``\\(``, ``\\[``, ``\\begin{``, ``\\command``) in the visible text;
- a widget placeholder is left on the page (a live widget output that needs a kernel);
- a cell shows an error: a traceback output, or stderr that contains an error;
- the page requests anything over http(s), or a local file it references is missing;
- a script on the page throws.

It saves a 1280x2000 screenshot of each page (the whole page with ``--full-page``) to ``_build/screenshots/`` and exits with
status 1 listing every failure. Chromium runs with host resolution disabled, so a page that
works here works without a network.
"""

from __future__ import annotations

import argparse
import base64
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from devtools import Chromium, DevToolsError, DevToolsSession  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_HINT = "install it with: apt-get update && apt-get install -y chromium (Debian/Ubuntu, as root)"
WINDOW = (1280, 2000)
REDIRECT = re.compile(r'<meta http-equiv="refresh" content="\d+;\s*url=([^"]+)"', re.IGNORECASE)
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--mute-audio",
    # Every host name fails to resolve: nothing outside this machine can be reached.
    "--host-resolver-rules=MAP * ~NOTFOUND",
    f"--window-size={WINDOW[0]},{WINDOW[1]}",
]

# Wait for MathJax to finish typesetting and for lazy images and fonts to load.
SETTLE_SCRIPT = """
(async () => {
  const lazy = [...document.images].filter(img => img.loading === "lazy");
  lazy.forEach(img => { img.loading = "eager"; });
  const pending = [...document.images].filter(img => !img.complete).map(img => new Promise(done => {
    img.addEventListener("load", done); img.addEventListener("error", done); setTimeout(done, 5000);
  }));
  await Promise.all(pending);
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) { await MathJax.startup.promise; }
  if (document.fonts) { await document.fonts.ready; }
  await new Promise(done => setTimeout(done, 300));
  return true;
})()
"""

# Collect what the checks need in one pass over the DOM.
INSPECT_SCRIPT = r"""
(() => {
  const skip = "pre, code, script, style, textarea, mjx-container, .highlight, .MathJax";
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const rawTex = [];
  const rawTables = [];
  const texPattern = /\$\$|\\\(|\\\[|\\begin\{|\\[a-zA-Z]{2,}/;
  // A Markdown table that reached the page as text, such as one glued inline, keeps its rule row:
  // two or more cells of dashes (optionally colon-aligned) between pipes, outer pipes optional.
  const tablePattern = /(^|[\s|]):?-+:?\s*\|\s*:?-+:?(?=[\s|]|$)/;
  const tableSkip = skip + ", kbd, samp, td, th";
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    if (node.parentElement && node.parentElement.closest(skip)) continue;
    const text = node.textContent;
    if (texPattern.test(text)) rawTex.push(text.trim().slice(0, 80));
    if (tablePattern.test(text) && !node.parentElement.closest(tableSkip)) rawTables.push(text.trim().slice(0, 80));
  }
  const outputText = selector => [...document.querySelectorAll(selector)].map(e => e.innerText.trim().slice(0, 160));
  const mathElements = [...document.querySelectorAll(".math")];
  return {
    images: document.images.length,
    brokenImages: [...document.images].filter(img => !img.complete || img.naturalWidth === 0)
      .map(img => (img.getAttribute("src") || img.id || "(no src)").slice(0, 100)),
    math: mathElements.length,
    mathUntypeset: mathElements.filter(e => !e.querySelector("mjx-container"))
      .map(e => e.textContent.trim().slice(0, 80)),
    mathContainers: document.querySelectorAll("mjx-container").length,
    mathErrors: [...document.querySelectorAll("mjx-merror")]
      .map(e => (e.getAttribute("data-mjx-error") || e.textContent).slice(0, 120)),
    rawTex: rawTex,
    rawTables: rawTables,
    widgetPlaceholders: document.querySelectorAll(
      'script[type="application/vnd.jupyter.widget-view+json"], .jupyter-widgets, .widget-subarea').length,
    tracebacks: outputText(".cell_output .output.traceback, .cell_output .output.error"),
    stderr: outputText(".cell_output .output.stderr"),
    remoteReferences: [
      ...[...document.scripts].map(s => s.src),
      ...[...document.querySelectorAll('link[rel="stylesheet"]')].map(l => l.href),
      ...[...document.images].map(img => img.src),
    ].filter(url => /^https?:/.test(url)),
    staticSliders: document.querySelectorAll(".animation").length,
  };
})()
"""


def find_chromium() -> str:
    """Return the path of a Chromium executable, or exit with how to install one."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    sys.exit(f"check_rendered: no Chromium found (looked for {', '.join(CHROMIUM_NAMES)}); {INSTALL_HINT}")


def book_pages(html_dir: Path) -> list[Path]:
    """Return every HTML page of the book, leaving out asset folders such as ``_static`` and ``_sources``."""
    return sorted(page for page in html_dir.rglob("*.html")
                  if not page.relative_to(html_dir).parts[0].startswith("_"))


def redirect_target(page: Path) -> Path | None:
    """Return the page that ``page`` redirects to with a meta refresh (as Jupyter Book's index.html does), or None."""
    match = REDIRECT.search(page.read_text(errors="replace")[:2000])
    return (page.parent / match.group(1).split("#")[0]).resolve() if match else None


def report_failures(report: dict) -> list[str]:
    """Turn the DOM report of one page into failure messages; an empty list means the page passed."""
    failures = [f"image did not load: {src}" for src in report["brokenImages"]]
    failures += [f"math not typeset by MathJax: {text}" for text in report["mathUntypeset"]]
    if report["math"] and not report["mathContainers"]:
        failures.append(f"{report['math']} math elements but no MathJax output (mjx-container)")
    failures += [f"MathJax error: {text}" for text in report["mathErrors"]]
    failures += [f"raw TeX in the text: {text!r}" for text in report["rawTex"]]
    failures += [f"Markdown table left as text (glue it with the glue:md directive, not the inline role): {text!r}"
                 for text in report["rawTables"]]
    if report["widgetPlaceholders"]:
        failures.append(f"{report['widgetPlaceholders']} widget placeholder(s), which need a kernel: tag the cell "
                        "remove-output and follow it with a static slider (diffinv.widgets.scrub_animation)")
    failures += [f"error output: {text}" for text in report["tracebacks"]]
    failures += [f"stderr output with an error: {text}" for text in report["stderr"]
                 if "Error" in text or "Traceback" in text]
    failures += [f"remote reference (the book must work offline): {url}" for url in report["remoteReferences"]]
    return failures


def event_failures(events: list[dict]) -> list[str]:
    """Return failures seen in protocol events: remote requests, missing local files, script exceptions."""
    failures, urls = [], {}
    for event in events:
        params = event.get("params", {})
        if event["method"] == "Network.requestWillBeSent":
            url = params["request"]["url"]
            urls[params["requestId"]] = url
            if url.startswith(("http://", "https://")):
                failures.append(f"requested a remote resource: {url[:120]}")
        elif event["method"] == "Network.loadingFailed" and not params.get("canceled"):
            url = urls.get(params["requestId"], params["requestId"])
            if not url.startswith(("http://", "https://")):
                failures.append(f"could not load {url[:120]}: {params.get('errorText')}")
        elif event["method"] == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            failures.append(f"script exception: {str(text)[:160]}")
    return failures


def capture(session: DevToolsSession, full_page: bool) -> bytes:
    """Return a PNG of the window, or of the whole page when ``full_page`` is set."""
    if not full_page:
        return base64.b64decode(session.call("Page.captureScreenshot", format="png")["data"])
    size = session.call("Page.getLayoutMetrics")["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": WINDOW[0], "height": size["height"], "scale": 1}
    shot = session.call("Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True)
    return base64.b64decode(shot["data"])


def check_page(session: DevToolsSession, page: Path, screenshot: Path,
               full_page: bool = False) -> tuple[list[str], list[str], dict]:
    """Load ``page``, run the checks and save its screenshot; return failures, warnings and the DOM report."""
    session.events.clear()
    session.call("Page.navigate", url=page.as_uri())
    session.wait_for_event("Page.loadEventFired", timeout=60)
    session.evaluate(SETTLE_SCRIPT, timeout_ms=60000)
    report = session.evaluate(INSPECT_SCRIPT)
    failures = report_failures(report) + event_failures(session.events)
    warnings = [f"stderr output: {text}" for text in report["stderr"]
                if "Error" not in text and "Traceback" not in text]

    screenshot.parent.mkdir(parents=True, exist_ok=True)
    screenshot.write_bytes(capture(session, full_page))
    return failures, warnings, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--html", type=Path, default=ROOT / "_build" / "html", help="built book folder")
    parser.add_argument("--screenshots", type=Path, default=ROOT / "_build" / "screenshots",
                        help="folder for one PNG screenshot per page")
    parser.add_argument("--full-page", action="store_true",
                        help=f"capture each whole page instead of the first {WINDOW[1]} pixels")
    args = parser.parse_args(argv)

    if not (args.html / "index.html").exists():
        sys.exit(f"check_rendered: {args.html / 'index.html'} not found; build the book first with `make book`")
    pages = book_pages(args.html)
    chromium = find_chromium()

    failed = 0
    with Chromium(chromium, CHROMIUM_FLAGS) as session:
        for domain in ("Page", "Network", "Runtime"):
            session.call(f"{domain}.enable")
        session.call("Emulation.setDeviceMetricsOverride", width=WINDOW[0], height=WINDOW[1],
                     deviceScaleFactor=1, mobile=False)
        for page in pages:
            name = str(page.relative_to(args.html))
            target = redirect_target(page)
            if target is not None:
                if not target.exists():
                    failed += 1
                    print(f"FAIL {name}\n  - redirects to {target}, which does not exist")
                else:
                    print(f"ok   {name}: redirects to {target.relative_to(args.html.resolve())}")
                continue
            screenshot = args.screenshots / (name.replace("/", "__").removesuffix(".html") + ".png")
            try:
                failures, warnings, report = check_page(session, page, screenshot, args.full_page)
            except DevToolsError as error:
                failures, warnings, report = [f"could not check the page: {error}"], [], None
            for warning in warnings:
                print(f"  warning {name}: {warning}")
            if failures:
                failed += 1
                print(f"FAIL {name}")
                for failure in failures:
                    print(f"  - {failure}")
            else:
                print(f"ok   {name}: {report['images']} images, {report['mathContainers']} formulas, "
                      f"{report['staticSliders']} static sliders")

    print(f"{len(pages) - failed} of {len(pages)} pages passed; screenshots in {args.screenshots}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
