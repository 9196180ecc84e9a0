"""The Train tab in a real browser (Debian's Chromium, Playwright): paste examples, Train, see the
per-layer AUROC plot, Add to table puts the trained vector in the Steer tab's table and Generate
steers with it; Read highlights the tokens of pasted texts and draws the two groups' histogram.
Its screenshot goes where tests/test_browser.py's go. Skips like tests/test_browser.py (a
failure under STEERING_REQUIRE_BROWSER=1)."""

from __future__ import annotations

import test_browser
from test_browser import ASSETS, _text, _value, _wait_run_ended
from test_training import OCEAN, OFFICE

browser_page, page = test_browser.browser_page, test_browser.page  # the shared browser fixtures


def _open_train_tab(page) -> None:
    page.get_by_role("tab", name="Train").click()
    page.locator("#train-positives textarea").wait_for()


def test_train_add_to_table_and_generate_with_the_trained_vector(page):
    _open_train_tab(page)
    page.locator("#train-positives textarea").fill("\n".join(OCEAN))
    page.locator("#train-negatives textarea").fill("\n".join(OFFICE))
    page.locator("#train-name textarea").fill("ocean")
    page.locator("#train").click()
    page.wait_for_function("() => (document.querySelector('#train-summary') || {}).innerText.includes('AUROC')")
    summary = _text(page, "train-summary")
    assert "ocean" in summary and "mean_diff" in summary and "held-out" in summary, summary
    assert page.locator("#train-plot svg circle").count() == 30  # one marker per layer of SmolLM2-135M
    page.locator("#train-add").click()
    page.wait_for_function("() => document.querySelector('#train-message').innerText.includes('Added')")
    page.get_by_role("tab", name="Steer").click()
    page.wait_for_function("() => document.querySelector('#vectors-table').innerText.includes('direction')")
    page.locator("#generate").click()
    line = _wait_run_ended(page)
    assert "tokens/s" in line, line
    assert _value(page, "steered-output") != _value(page, "baseline-output")


def test_read_highlights_tokens_and_draws_the_histogram(page):
    _open_train_tab(page)
    page.locator("#train-word-positive textarea").fill("happy")
    page.locator("#train-word-negative textarea").fill("sad")
    page.locator("#train").click()
    page.wait_for_function("() => (document.querySelector('#train-summary') || {}).innerText.includes('AUROC')")
    page.locator("#read-texts textarea").fill("What a wonderful, joyful day!\nI love this.")
    page.locator("#read-negatives textarea").fill("Everything is grey and hopeless.\nI miss them so much.")
    page.locator("#read").click()
    page.wait_for_function("() => document.querySelector('#read-message').innerText.includes('Read 4 texts')")
    assert "wonderful" in _text(page, "read-tokens")  # the tokens are shown, highlighted by projection
    assert page.locator("#read-histogram svg rect").count() > 0
    ASSETS.mkdir(exist_ok=True)
    page.screenshot(path=str(ASSETS / "screenshot-train.png"), full_page=True)  # the README's, with make screenshots
    # A refusal is said beside the button and changes nothing else.
    page.locator("#read-texts textarea").fill("")
    page.locator("#read").click()
    page.wait_for_function("() => document.querySelector('#read-message').innerText.includes('texts:')")
    assert "wonderful" in _text(page, "read-tokens")
