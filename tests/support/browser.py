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


def fill_number(page, name: str, value: int) -> None:
    """Type ``value`` into the interface's number field ``name`` until it holds.

    A field in an accordion that has just opened can receive its initial value after the
    first fill (gradio mounts it on opening), which silently puts the default back."""
    field = page.locator(f"#ce_{name} input[type=number]")
    for _ in range(10):
        field.fill(str(value))
        field.press("Tab")
        page.wait_for_timeout(300)
        if field.input_value() == str(value):
            return
    raise AssertionError(f"the field {name} does not keep {value}: it shows {field.input_value()!r}")


def start_attack(page, steps: int, name: str) -> None:
    """Open the attack section, set its budget and the embedding's name, and press Attack."""
    page.click("#ce_attack_section")
    fill_number(page, "attack_steps", steps)
    fill_text(page, "attack_name", name)
    page.click("#ce_attack")
