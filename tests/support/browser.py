"""Headless Debian Chromium for the browser tests, through Playwright (which never downloads one here)."""

import json
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
# No sandbox (root in CI); no background networking: this machine's closed network refuses it.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"
)


@contextmanager
def chromium():
    """A launched headless Chromium (skips the test if Playwright is not installed)."""
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        try:
            yield browser
        finally:
            browser.close()


# The Concept Erasing interface (the standalone app and the A1111/Forge tab): elements ``#ce_<name>``.
def status(page, element: str = "ce_status") -> str:
    return page.locator(f"#{element}").first.inner_text()  # gradio 3 puts the id on two nested elements


def wait_for_status(page, text: str, timeout_s: float, element: str = "ce_status") -> None:
    page.wait_for_function(
        f"document.querySelector('#{element}').innerText.includes({json.dumps(text)})", timeout=timeout_s * 1000
    )


def fill_text(page, name: str, text: str) -> None:
    """Type into the interface's text field ``name`` (a textarea or an input, by gradio version)."""
    page.locator(f"#ce_{name} textarea, #ce_{name} input").first.fill(text)


def start_attack(page, steps: int, name: str) -> None:
    """Open the attack section, set its budget and the embedding's name, and press Attack."""
    page.click("#ce_attack_section")
    page.locator("#ce_attack_steps input[type=number]").fill(str(steps))
    page.locator("#ce_attack_steps input[type=number]").press("Tab")
    fill_text(page, "attack_name", name)
    page.click("#ce_attack")
