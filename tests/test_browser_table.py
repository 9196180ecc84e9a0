"""The Steer tab's vectors table in a real browser (Debian's Chromium, Playwright): its columns are
fixed (no cell or header menu offers to add or delete a column, so values never slide left), and
once a row exists a dashed "+" under the table still adds one (Gradio draws its own only while the
table is empty). Building the page warns about nothing (Gradio 6.31 warned that `column_limits` is
not implemented on every build). Skips like tests/test_browser.py (a failure under
STEERING_REQUIRE_BROWSER=1)."""

from __future__ import annotations

import time
import warnings

import test_browser

from steering.ui import views

browser_page, page = test_browser.browser_page, test_browser.page  # the shared browser fixtures

ROWS = "() => document.querySelectorAll('#vectors-table [role=gridcell][data-col=\"0\"]').length"


def _rows(page) -> list[list[str]]:
    return page.evaluate(
        """() => [...document.querySelectorAll('#vectors-table .virtual-row')].map(r =>
             [...r.querySelectorAll('[role=gridcell]')].map(c => c.querySelector('input[type=checkbox]')
               ? String(c.querySelector('input[type=checkbox]').checked) : c.innerText.replace('⋮', '').trim()))"""
    )


def _menu_items(page) -> list[str]:
    page.locator("#vectors-table [role=menu]").first.wait_for()
    items = page.locator("#vectors-table [role=menuitem]")
    return [items.nth(i).get_attribute("aria-label") for i in range(items.count()) if items.nth(i).is_visible()]


def test_no_menu_deletes_or_adds_a_column_and_rows_can_always_be_added(page):
    page.locator("#new-text textarea").fill("the ocean")
    page.get_by_role("button", name="Add vector").click()
    page.wait_for_function(f"() => ({ROWS})() === 1")
    assert page.locator("#vectors-table .add-row-button").count() == 0  # Gradio's "+" is gone with a row

    # a body cell's menu: rows yes, columns no
    cell = page.locator("#vectors-table [data-testid='cell-0-0']")
    cell.click()
    cell.locator(".cell-menu-button").click()
    items = _menu_items(page)
    assert "Add row below" in items and not [i for i in items if "column" in i.lower()], items
    page.keyboard.press("Escape")
    page.locator("#prompt-box textarea").click()  # closes the menu

    # a header's menu (Gradio draws none for fixed columns): sorting and filtering at most
    buttons = page.locator("#vectors-table [role=columnheader] .cell-menu-button")
    for i in range(buttons.count()):
        buttons.nth(i).click()
        items = _menu_items(page)
        assert not [i for i in items if "column" in i.lower()], items
        page.locator("#prompt-box textarea").click()

    # the dashed "+" under a table with rows adds a row with the defaults
    plus = page.locator("#vectors-table .steering-add-row")
    assert plus.is_visible()
    plus.click()
    page.wait_for_function(f"() => ({ROWS})() === 2")
    deadline = time.monotonic() + 60  # the server's check of the new row fills in its defaults
    while (rows := _rows(page))[1][3:5] != rows[0][3:5] and time.monotonic() < deadline:
        time.sleep(0.2)
    first, second = rows
    assert first[0] == "the ocean" and len(second) == len(views.VECTOR_COLUMNS)
    assert second[0] == "" and second[3:5] == first[3:5]  # coeff and layer: the defaults, as Gradio's "+" gives
    assert second[5:] == ["true", "prompt"]


def test_building_the_page_warns_about_nothing(embedded_dir):
    from steering.ui import build_demo

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_demo().close()
    assert not [str(w.message) for w in caught if "column_limits" in str(w.message)]
