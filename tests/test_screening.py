"""Screening (qualification) batches over a real SQLite store: thresholds per job, gating, decisions in the
audit log, admin reviews of demonstrations, and what `label stats` and the exports show."""

from __future__ import annotations

import json

import pytest

from chatloop.errors import UserError
from chatloop.labeling.answers import BadAnswer, task_item
from chatloop.labeling.commands import LabelExportConfig, export, screening_lines
from chatloop.labeling.quality import flag_agreement, gold_pair_share
from chatloop.labeling.reports import report
from chatloop.labeling.store import Conflict, LabelStore, NotFound
from tests.conftest import run_cli
from tests.test_label import Live, join, make_user

GOLD_RANKING = [  # the answers' numbers are their gold ranks: "1st" is best
    {"prompt": f"screen {i}", "responses": ["3rd", "1st", "4th", "2nd"], "gold": {"ranks": [3, 1, 4, 2]}}
    for i in range(3)
]


def ranking_items(records: list[dict]) -> list[dict]:
    return [task_item("ranking", r, f"t{i}") for i, r in enumerate(records)]


def shown_ranks(view: dict, good: bool) -> list[int]:
    """Ranks in the shown order: gold's (good) or gold's reversed."""
    ranks = [int(text[0]) for text in view["responses"]]
    return ranks if good else [5 - r for r in ranks]


@pytest.fixture
def store(tmp_path):
    s = LabelStore(str(tmp_path / "l.db"), "x" * 40)
    yield s
    s.close()


def take(store: LabelStore, user, good: bool, batch: str | None = None) -> int:
    n = 0
    while (aid := store.next_assignment(user, batch)) is not None:
        view = store.assignment(user, aid)
        if view["kind"] != "ranking":
            return n
        store.submit(user, aid, {"ranks": shown_ranks(view, good)})
        n += 1
    return n


def test_a_candidate_sees_production_work_only_after_passing_and_the_decision_is_logged(store):
    screen = store.create_batch("screen", "ranking", ranking_items(GOLD_RANKING), overlap=1, source="t", actor="root",
                                screening={"ranking": 0.7})
    work = store.create_batch("work", "ranking", ranking_items([{"prompt": "p", "responses": ["a", "b"]}]),
                              overlap=2, source="t", actor="root")
    ann, bob, root = make_user(store, "ann"), make_user(store, "bob"), make_user(store, "root", "admin")
    assert store.qualification(ann) == "screening" and store.qualification(root) == "open"
    assert [b["id"] for b in store.user_summary(ann)[1]] == [screen]  # only the test before passing
    assert store.next_assignment(ann, work) is None  # asking for production work by id gives nothing either

    assert take(store, ann, good=False, batch=screen) == 3  # every candidate takes every task (overlap 1)
    assert store.qualification(ann) == "failed" and store.next_assignment(ann) is None
    assert store.user_summary(ann) == ("failed", [])

    assert take(store, bob, good=True, batch=screen) == 3
    assert store.qualification(bob) == "qualified"
    aid = store.next_assignment(bob)
    assert aid is not None and store.assignment(bob, aid)["batch"] == work  # production work, not the test again
    assert store.next_assignment(root, screen) is not None  # admins are never gated

    decisions = [a for a in store.audit_log() if a["action"] == "screening"]
    assert {(d["detail"]["labeler"], d["detail"]["passed"]) for d in decisions} == {("ann", False), ("bob", True)}
    assert all(d["actor"] == "screening" and d["detail"]["thresholds"] == {"ranking": 0.7} for d in decisions)
    assert {d["detail"]["labeler"]: d["detail"]["scores"]["ranking"] for d in decisions} == {"ann": 0.0, "bob": 1.0}
    (test,) = report(store).screening
    assert {n: (c["status"], c["scores"]["ranking"], c["done"]) for n, c in test["candidates"].items()} == {
        "ann": ("failed", 0.0, 3), "bob": ("passed", 1.0, 3), "root": ("in progress", None, 0)}
    lines = "\n".join(screening_lines(report(store).screening))
    assert "ann: failed; ranking 0.0%; 3 done, 0 skipped of 3 tasks" in lines
    assert "bob: passed; ranking 100.0%" in lines and "pass: ranking >= 0.7" in lines
    assert [b for b in store.batch_list() if b["id"] == screen][0]["remaining"] == 0  # nothing for `label plan`


def test_skips_count_as_wrong_a_new_test_gates_everyone_and_pausing_it_lifts_the_gate(store):
    ann = make_user(store, "ann")
    work = store.create_batch("work", "ranking", ranking_items([{"prompt": "p", "responses": ["a", "b"]}] * 3),
                              overlap=1, source="t", actor="root")
    assert store.qualification(ann) == "open" and store.next_assignment(ann) is not None
    screen = store.create_batch("screen", "ranking", ranking_items(GOLD_RANKING), overlap=1, source="t",
                                actor="root", screening={"ranking": 0.5})
    assert store.qualification(ann) == "screening"  # a new test applies to everyone, from the next task on
    aid = store.next_assignment(ann)
    assert store.assignment(ann, aid)["batch"] == screen
    store.submit(ann, aid, {"ranks": shown_ranks(store.assignment(ann, aid), good=True)})
    store.skip(ann, store.next_assignment(ann), "I do not know")
    store.skip(ann, store.next_assignment(ann), "I do not know")
    assert store.qualification(ann) == "failed"  # 1/3 right: the skips scored as wrong
    assert report(store).screening[0]["candidates"]["ann"]["scores"]["ranking"] == pytest.approx(1 / 3)
    store.update_batch(screen, "root", active=False)  # the admin pauses the test: it gates nobody
    assert store.qualification(ann) == "open" and store.next_assignment(ann, work) is not None


def test_rating_screening_scores_likert_within_one_and_flag_agreement(store):
    items = [task_item("rating", {"prompt": f"p{i}", "response": "r", "gold": {"likert": 5, "flags": flags}}, "t")
             for i, flags in enumerate([["hallucination"], [], ["harmful_advice", "contains_pii"]])]
    store.create_batch("screen", "rating", items, overlap=1, source="t", actor="root",
                       screening={"likert": 0.6, "flags": 0.5})
    ann = make_user(store, "ann")
    answers = [{"likert": 6, "flags": ["hallucination"]},  # within 1, flags equal: 1, 1
               {"likert": 2, "flags": []},  # off by 3; no flags on either side: 0, 1
               {"likert": 4, "flags": ["harmful_advice"]}]  # within 1; 1 of 2 flags: 1, 0.5
    while (aid := store.next_assignment(ann)) is not None:
        view = store.assignment(ann, aid)
        store.submit(ann, aid, answers[int(view["prompt"][0]["content"][1])])
    (test,) = store.screening_report()
    assert test["candidates"]["ann"]["scores"] == {"likert": pytest.approx(2 / 3), "flags": pytest.approx(2.5 / 3)}
    assert store.qualification(ann) == "qualified"
    assert flag_agreement([], []) == 1.0 and flag_agreement(["a"], ["b"]) == 0.0
    assert gold_pair_share([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / 3)  # a tie where gold orders: wrong


def test_demonstrations_wait_for_an_admin_review_which_decides(store):
    items = [task_item("demonstration", {"prompt": f"Write a note {i}."}, "t") for i in range(2)]
    screen = store.create_batch("screen", "demonstration", items, overlap=1, source="t", actor="root",
                                screening={"demonstration": 6})
    ann, bob = make_user(store, "ann"), make_user(store, "bob")
    for user in (ann, bob):
        while (aid := store.next_assignment(user)) is not None:
            store.submit(user, aid, {"answer": f"A note by {user.name}."})
    assert store.qualification(ann) == store.qualification(bob) == "review"
    pending = store.pending_reviews()
    assert len(pending) == 4 and {p["labeler"] for p in pending} == {"ann", "bob"}
    assert pending[0]["messages"][-1]["role"] == "assistant"
    with pytest.raises(BadAnswer):
        store.review(pending[0]["label_id"], 8, "root")
    with pytest.raises(NotFound):
        store.review("no-such-label", 5, "root")
    for p in pending:
        store.review(p["label_id"], 7 if p["labeler"] == "ann" else 4, "root")
    assert store.qualification(ann) == "qualified" and store.qualification(bob) == "failed"
    with pytest.raises(Conflict):  # a decided screening is not reopened
        store.review(pending[0]["label_id"], 1, "root")
    decided = [a for a in store.audit_log() if a["action"] == "screening"]
    assert {(d["detail"]["labeler"], d["detail"]["passed"], d["actor"]) for d in decided} == {
        ("ann", True, "root"), ("bob", False, "root")}  # the reviewer's last review decided
    assert sum(a["action"] == "review" for a in store.audit_log()) == 4
    assert store.screening_report()[0]["candidates"]["ann"]["scores"] == {"demonstration": 7.0}
    assert screen in {b["id"] for b in store.batch_list() if b["screening"]}


def test_a_screening_needs_gold_and_thresholds_that_fit_the_job(store):
    plain = ranking_items([{"prompt": "p", "responses": ["a", "b"]}])
    with pytest.raises(UserError, match="task 1 has no gold"):
        store.create_batch("s", "ranking", plain, overlap=1, source="t", actor="r", screening={"ranking": 0.7})
    all_tied = ranking_items([{"prompt": "p", "responses": ["a", "b"], "gold": {"ranks": [1, 1]}}])
    with pytest.raises(UserError, match="two different gold ranks"):
        store.create_batch("s", "ranking", all_tied, overlap=1, source="t", actor="r", screening={"ranking": 0.7})
    gold = ranking_items(GOLD_RANKING)
    for bad, message in [({"likert": 0.5}, "not measured by a ranking"), ({"ranking": 1.5}, "from 0 to 1"),
                         ({}, "at least one")]:
        with pytest.raises(UserError, match=message):
            store.create_batch("s", "ranking", gold, overlap=1, source="t", actor="r", screening=bad)
    bid = store.create_batch("s", "ranking", gold, overlap=1, source="t", actor="r")
    ann = make_user(store, "ann")
    store.submit(ann, store.next_assignment(ann), {"ranks": [1, 2, 3, 4]})
    with pytest.raises(UserError, match="has labels already"):
        store.mark_screening(bid, {"ranking": 0.7}, "r")
    fresh = store.create_batch("s2", "ranking", gold, overlap=1, source="t", actor="r")
    store.mark_screening(fresh, {"ranking": 0.7}, "r")
    assert any(a["action"] == "mark_screening" and a["detail"]["batch"] == fresh for a in store.audit_log())


def test_screening_labels_stay_out_of_the_exports_and_the_cli_makes_and_reports_a_screening(tmp_path):
    db, secret = tmp_path / "label.db", tmp_path / "label.secret"
    data = tmp_path / "screen.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in GOLD_RANKING))
    common = [f"--db={db}", f"--secret_file={secret}"]
    bad = run_cli("label", "batch", "--kind=ranking", f"--data={data}", "--screening", "likert=0.5", *common)
    assert bad.returncode == 2 and "not measured by a ranking batch" in bad.stderr
    made = run_cli("label", "batch", "--kind=ranking", f"--data={data}", "--screening", "ranking=0.7", *common)
    assert made.returncode == 0 and "screening, pass ranking >= 0.7" in made.stdout, made.stderr
    from chatloop.labeling.secret import load_secret

    store = LabelStore(str(db), load_secret(secret))
    ann = make_user(store, "ann")
    assert take(store, ann, good=True) == 3
    store.close()
    stats = run_cli("label", "stats", *common)
    assert stats.returncode == 0 and "ann: passed; ranking 100.0%; 3 done, 0 skipped of 3 tasks" in stats.stdout
    counts = export(LabelExportConfig(out=str(tmp_path / "out"), db=str(db), secret_file=str(secret)))
    assert counts["rankings"] == 0  # a candidate's test is not training data
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["left_out"]["screening"] == 3


def test_only_an_admin_reviews_with_a_csrf_token_and_a_score_from_1_to_7(tmp_path):
    live = Live(tmp_path / "label.db", tmp_path / "label.secret")
    try:
        items = [task_item("demonstration", {"prompt": "Say hi."}, "t")]
        screen = live.store.create_batch("screen", "demonstration", items, overlap=1, source="t", actor="t",
                                         screening={"demonstration": 5})
        ann, root = join(live, "ann"), join(live, "root", "admin")
        view = ann.get("/api/next").json()["assignment"]
        assert view["batch"] == screen
        assert ann.post(f"/api/assignments/{view['id']}", json={"answer": "Hi there!"}).status_code == 200
        assert "reviewing your" in ann.get("/").text
        assert ann.get("/api/next").json() == {"assignment": None, "qualification": "review"}
        admin_page = root.get("/admin").text
        assert "Hi there!" in admin_page and "Screening demonstrations to review" in admin_page
        (pending,) = live.store.pending_reviews()
        url, csrf = f"/admin/reviews/{pending['label_id']}", root.headers["X-CSRF-Token"]
        assert ann.post(url, data={"csrf": ann.headers["X-CSRF-Token"], "score": "7"}).status_code == 403
        assert root.post(url, data={"score": "7"}).status_code == 403  # no CSRF token
        for bad in ("8", "0", "seven", ""):
            assert root.post(url, data={"csrf": csrf, "score": bad}).status_code == 400, bad
        assert root.post("/admin/reviews/nope", data={"csrf": csrf, "score": "5"}).status_code == 404
        assert root.post(url, data={"csrf": csrf, "score": "6"}).status_code == 303
        assert root.post(url, data={"csrf": csrf, "score": "1"}).status_code == 409  # decided: not reopened
        assert live.store.qualification(live.store.user_by_name("ann")) == "qualified"
        report_json = root.get("/api/admin/report").json()
        assert report_json["screening"][0]["candidates"]["ann"]["scores"] == {"demonstration": 6.0}
    finally:
        live.stop()
