"""The labeling app in a real browser (Playwright + Debian's chromium): every job done from the keyboard,
XSS payloads shown as text, and an admin's export read back by the reward-model reader."""

from __future__ import annotations

import pytest

from chatloop.data.importers import read_rankings
from chatloop.labeling.store import task_item
from tests.test_label import PASSWORD, Live

XSS = '<img src=x onerror="window.__xss=1"><script>window.__xss=1</script>'
RESPONSES = ["answer zero", f"answer one {XSS}", "answer two", "answer three"]


@pytest.fixture
def live(tmp_path):
    app = Live(tmp_path / "label.db", tmp_path / "label.secret")
    yield app
    app.stop()


def accept_invite(browser, live: Live, name: str, role: str):
    token = live.store.create_invite(name, role, "test")
    page = browser.new_context(accept_downloads=True).new_page()
    page.goto(f"{live.url}/invite/{token}")
    page.keyboard.type(PASSWORD)  # the password field has the focus
    page.keyboard.press("Tab")
    page.keyboard.type(PASSWORD)
    page.keyboard.press("Enter")
    page.wait_for_url(f"{live.url}/admin" if role == "admin" else f"{live.url}/")
    return page


def no_script_ran(page) -> bool:
    return page.evaluate("window.__xss === undefined")


def test_a_labeler_does_every_job_from_the_keyboard_and_an_admin_exports(browser, live):
    store = live.store
    rank = store.create_batch("rank", "ranking", [task_item("ranking", {"prompt": f"Pick the best. {XSS}",
                                                                        "responses": RESPONSES}, "t")],
                              overlap=1, source="test", actor="t")
    demo = store.create_batch("demo", "demonstration", [task_item("demonstration", {"prompt": "Capital of France?"},
                                                                  "t")], overlap=1, source="test", actor="t")
    rate = store.create_batch("rate", "rating", [task_item("rating", {"prompt": "Say hi.", "response": f"hi {XSS}"},
                                                           "t")], overlap=1, source="test", actor="t")
    ab = store.create_batch("ab", "comparison", [task_item("comparison", {"prompt": "2+2?", "a": "4", "b": "5",
                                                                          "models": ["good", "bad"]}, "t")],
                            overlap=1, source="test", actor="t")
    page = accept_invite(browser, live, "lena", "labeler")
    assert page.locator("table").inner_text().count("Start") == 4

    # Ranking, keyboard only: best first "answer two", then "answer zero" tied with "answer three", then "answer one".
    page.goto(f"{live.url}/next?batch={rank}")
    assert XSS in page.inner_text(".prompt") and XSS in page.inner_text("#ranking")  # shown as text
    assert page.locator("main img, main script").count() == 0
    cards = page.locator("#ranking .card .text")

    def texts() -> list[str]:
        return [t.split(" <img")[0] for t in cards.all_inner_texts()]

    def focus(i: int) -> None:
        at = page.evaluate("Array.from(document.querySelectorAll('#ranking .card')).indexOf(document.activeElement)")
        for _ in range(abs(i - at)):
            page.keyboard.press("j" if i > at else "k")

    focus(texts().index("answer one"))
    while texts()[-1] != "answer one":
        page.keyboard.press("Shift+ArrowDown")
    focus(texts().index("answer two"))
    page.keyboard.press("1")
    focus(texts().index("answer zero"))
    page.keyboard.press("2")
    assert texts() == ["answer two", "answer zero", "answer three", "answer one"]
    focus(2)
    page.keyboard.press("t")  # answer three ties with answer zero
    assert page.locator("#ranking .badge").all_inner_texts() == ["1", "2", "2", "3"]
    page.keyboard.press("Control+Enter")
    page.wait_for_selector("text=Nothing left for you here")
    assert no_script_ran(page)
    ranking = store.label_rows("ranking")
    assert [r["answer"] for r in ranking] == [{"ranks": [2, 3, 1, 2], "none_acceptable": False}]

    # Demonstration with a follow-up turn.
    page.goto(f"{live.url}/next?batch={demo}")
    page.keyboard.type("Paris.")
    page.keyboard.press("Tab")  # to "Add a follow-up turn"
    page.keyboard.press("Enter")
    page.keyboard.type("And of Italy?")
    page.keyboard.press("Tab")
    page.keyboard.type("Rome.")
    page.keyboard.press("Control+Enter")
    page.wait_for_selector("text=Nothing left for you here")
    assert [m["content"] for m in store.label_rows("demonstration")[0]["answer"]["messages"]] == [
        "Capital of France?", "Paris.", "And of Italy?", "Rome."]

    # Rating: 6, then the third flag (hallucination) with Tab and Space.
    page.goto(f"{live.url}/next?batch={rate}")
    assert XSS in page.inner_text("#response") and no_script_ran(page)
    page.keyboard.press("6")
    for _ in range(3):
        page.keyboard.press("Tab")
    page.keyboard.press("Space")
    page.keyboard.press("Control+Enter")
    page.wait_for_selector("text=Nothing left for you here")
    assert store.label_rows("rating")[0]["answer"] == {"likert": 6, "flags": ["hallucination"]}

    # A/B: the order is random; the labeler picks "4" wherever it is shown.
    page.goto(f"{live.url}/next?batch={ab}")
    assert "good" not in page.inner_text("main") and "bad" not in page.inner_text("main")  # identities hidden
    page.keyboard.press("a" if page.inner_text("#response-a") == "4" else "b")
    page.keyboard.press("Control+Enter")
    page.wait_for_selector("text=Nothing left for you here")
    assert store.label_rows("comparison")[0]["answer"] == {"winner": "a"}  # "4" is the task's a

    # The admin sees the labeler and downloads the rankings, which the reward model's reader reads.
    admin = accept_invite(browser, live, "root", "admin")
    assert "lena" in admin.inner_text("main")
    with admin.expect_download() as download:
        admin.click("#export-rankings")
    path = download.value.path()
    records = read_rankings(path)
    assert [(r["responses"], r["ranks"], r["labeler_id"]) for r in records] == [(RESPONSES, [2, 3, 1, 2], "lena")]
    assert any(a["action"] == "export" for a in store.audit_log())


def test_ranking_by_dragging_none_acceptable_and_skipping_with_a_reason(browser, live):
    store = live.store
    rank = store.create_batch("rank", "ranking", [task_item("ranking", {"prompt": f"Question {i}?",
                                                                        "responses": ["w", "x", "y", "z"]}, "t")
                                                  for i in range(2)], overlap=1, source="test", actor="t")
    page = accept_invite(browser, live, "dana", "labeler")
    page.goto(f"{live.url}/next?batch={rank}")
    cards = page.locator("#ranking .card")
    before = cards.locator(".text").all_inner_texts()
    cards.nth(3).drag_to(cards.nth(0))  # the last response dragged to the top
    after = cards.locator(".text").all_inner_texts()
    assert after == [before[3], *before[:3]]
    page.keyboard.press("n")
    assert page.is_checked("#none-acceptable")
    page.click("#submit")
    page.wait_for_url(f"{live.url}/a/*")  # the second task
    label = store.label_rows("ranking")[0]["answer"]
    assert label["none_acceptable"] and [label["ranks"]["wxyz".index(t)] for t in after] == [1, 2, 3, 4]
    page.keyboard.press("s")
    page.keyboard.type("I cannot judge this topic")
    page.keyboard.press("Enter")
    page.wait_for_selector("text=Nothing left for you here")
    assert store.batch_list()[0]["skipped"] == 1 and len(store.label_rows()) == 1
