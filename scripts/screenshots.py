"""Screenshots of the `latentforge serve` page for the docs: docs/serve/page.png (after generating) and
docs/serve/inpaint.png (the img2img panel with a painted mask, after inpainting).

Starts the server in-process on a free port with the default model, drives Debian's Chromium with Playwright
(pip install playwright; apt install chromium), with fixed seeds so the pictures are reproducible.

    .venv/bin/python scripts/screenshots.py [--out docs/serve] [--chromium /usr/bin/chromium]
"""

from __future__ import annotations

import argparse
import contextlib
import os

from playwright.sync_api import sync_playwright

from latentforge.server import Settings, running

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WAIT_MS = 120_000


@contextlib.contextmanager
def serve():
    """The server's base URL while the block runs (uvicorn in a thread)."""
    with running(Settings(port=0)) as (url, _):
        yield url


def generate(page, prompt: str, seed: int, batch: int) -> None:
    page.fill("#prompt", prompt)
    page.fill("#seed", str(seed))
    page.fill("#batch", str(batch))
    old = page.get_attribute("body", "data-job")
    page.click("#generate")
    page.wait_for_function(
        "old => document.body.dataset.job !== old && document.body.dataset.state === 'done'", arg=old
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "serve"))
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    with serve() as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.set_default_timeout(WAIT_MS)
        page.goto(url)
        page.wait_for_selector("body[data-ready]")
        generate(page, "a small green triangle in the lower right corner on a white background", 11, 2)
        generate(page, "a big yellow square in the center on a blue background", 5, 2)
        generate(page, "a big red circle in the upper left corner on a black background", 1, 4)
        path = os.path.join(args.out, "page.png")
        page.screenshot(path=path, full_page=True)
        print(f"wrote {path}")

        # inpainting: the first result to img2img, a mask over its lower right quarter, a new prompt there
        page.locator("#gallery figure").first.locator("button.to-init").click()
        page.wait_for_selector("#paint:not([hidden])")
        page.fill("#brush", "60")
        page.fill("#denoise", "1")
        page.select_option("#fill", "2")
        mask = page.locator("#mask")
        mask.scroll_into_view_if_needed()
        box = mask.bounding_box()
        for y in (0.65, 0.8):
            page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * y)
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] * 0.85, box["y"] + box["height"] * y, steps=10)
            page.mouse.up()
        generate(page, "a big red circle in the upper left corner and a small blue square in the lower right "
                       "corner on a black background", 3, 1)  # fmt: skip
        page.evaluate("window.scrollTo(0, 0)")
        path = os.path.join(args.out, "inpaint.png")
        page.screenshot(path=path, full_page=True)
        print(f"wrote {path}")
        browser.close()


if __name__ == "__main__":
    main()
