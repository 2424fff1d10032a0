"""The labeling app in a real browser (Playwright + Debian's chromium): every job done from the keyboard,
XSS payloads shown as text, and an admin's export read back by the reward-model reader."""

from __future__ import annotations

import pytest

from chatloop.data.readers import read_rankings
from chatloop.labeling.answers import task_item
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
    wait_for_focus(page, "password")
    page.keyboard.type(PASSWORD)
    page.keyboard.press("Tab")
    page.keyboard.type(PASSWORD)
    page.keyboard.press("Enter")
    page.wait_for_url(f"{live.url}/admin" if role == "admin" else f"{live.url}/")
    return page


def wait_for_focus(page, element_id: str) -> None:
    """`autofocus` is applied at a rendering step after the load event: wait for it (and so check it) before typing,
    or the first keys go nowhere."""
    page.wait_for_function(f"document.activeElement && document.activeElement.id === '{element_id}'",
                           timeout=10_000)


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
    wait_for_focus(page, "answer")
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


def rank_as(page, best_first: list[str]) -> None:
    """Order the ranking's cards from the keyboard: each text in turn is focused and put at its place."""
    for place, text in enumerate(best_first, 1):
        at = page.locator("#ranking .card .text").all_inner_texts().index(text)
        page.locator("#ranking .card").nth(at).focus()
        page.keyboard.press(str(place))
    assert page.locator("#ranking .card .text").all_inner_texts() == best_first
    page.keyboard.press("Control+Enter")


def test_a_candidate_fails_the_screening_and_sees_no_work_another_passes_and_ranks_the_admin_sees_both(browser, live):
    store = live.store
    gold = ["best", "good", "poor", "worst"]
    screen = store.create_batch("Screening test", "ranking", [
        task_item("ranking", {"prompt": f"Which answer is best? ({i})", "responses": ["poor", "best", "worst", "good"],
                              "gold": {"ranks": [3, 1, 4, 2]}}, "t") for i in range(2)],
        overlap=1, source="test", actor="root", screening={"ranking": 0.7})
    work = store.create_batch("Production rankings", "ranking", [
        task_item("ranking", {"prompt": "Rank these.", "responses": ["w", "x", "y", "z"]}, "t")],
        overlap=2, source="test", actor="root")

    carl = accept_invite(browser, live, "carl", "labeler")
    assert "take the screening test" in carl.inner_text("#screening-state")
    assert "Screening test" in carl.inner_text("table") and "Production" not in carl.inner_text("main")
    carl.click("#start-any")
    for _ in range(2):
        carl.wait_for_selector("#ranking")
        rank_as(carl, list(reversed(gold)))  # every pair the wrong way round
    carl.wait_for_selector("#screening-state")
    assert "did not pass" in carl.inner_text("#screening-state")
    carl.goto(f"{live.url}/")
    assert "did not pass" in carl.inner_text("#screening-state") and carl.locator("table").count() == 0
    carl.goto(f"{live.url}/next?batch={work}")  # the production batch by its id: nothing either
    assert "did not pass" in carl.inner_text("main") and carl.locator("#ranking").count() == 0

    dina = accept_invite(browser, live, "dina", "labeler")
    dina.click("#start-any")
    for _ in range(2):
        dina.wait_for_selector("#ranking")
        rank_as(dina, gold)
    dina.wait_for_selector("text=Nothing left for you here")
    dina.goto(f"{live.url}/")
    assert dina.locator("#screening-state").count() == 0 and "Production rankings" in dina.inner_text("table")
    dina.click("#start-any")
    dina.wait_for_selector("#ranking")
    assert dina.inner_text(".prompt").endswith("Rank these.")
    rank_as(dina, ["z", "y", "x", "w"])
    dina.wait_for_selector("text=Nothing left for you here")
    assert [(r["labeler"], r["batch"]) for r in store.label_rows() if not r["screening"]] == [
        ("dina", "Production rankings")]

    admin = accept_invite(browser, live, "root", "admin")
    table = admin.locator(f"#screening-{screen}")
    carl_row, dina_row = table.locator("tr[data-candidate=carl]"), table.locator("tr[data-candidate=dina]")
    assert "0.0%" in carl_row.inner_text() and "failed" in carl_row.locator(".decision").inner_text()
    assert "100.0%" in dina_row.inner_text() and "passed" in dina_row.locator(".decision").inner_text()
    assert "2 / 0 / 2" in carl_row.inner_text() and "2 / 0 / 2" in dina_row.inner_text()
    audit = admin.locator("table").last.locator("tbody tr").all_inner_texts()  # the decisions, in the audit log
    decisions = [row for row in audit if "\tscreening\t" in row]
    assert len(decisions) == 2 and any("carl" in r and '"passed": false' in r for r in decisions), decisions
