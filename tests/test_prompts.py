"""The prompt store on real SQLite files: idempotent ingest, bad lines, transactions, export, and the CLI."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import sqlite3
from collections import Counter
from pathlib import Path

import pytest

from chatloop.data.curate import CurateConfig, curate
from chatloop.data.formats import iter_records, read_records
from chatloop.data.pii import scan
from chatloop.data.prompts import (
    EXPORT_FILES,
    IngestConfig,
    PromptExportConfig,
    PromptStatsConfig,
    PromptStore,
    divide_train,
    export,
    ingest,
    normalize_time,
    stats,
)
from chatloop.errors import UserError
from tests.conftest import run_cli


def record(i: int, user: str = "u1", **extra) -> dict:
    return {"id": f"r{i}", "prompt": f"Write a poem number {i} about the sea.", "user_id": user,
            "created_at": f"2024-01-01T00:{i // 60 % 60:02d}:{i % 60:02d}Z", **extra}


def write_jsonl(path: Path, records: list, raw_lines: dict[int, str] | None = None) -> Path:
    lines = [json.dumps(r) for r in records]
    for index, line in (raw_lines or {}).items():
        lines.insert(index, line)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def raw_rows(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT * FROM prompts ORDER BY id").fetchall()


def count(db: Path) -> int:
    return len(raw_rows(db))


# -- ingest --------------------------------------------------------------------------------------------------------


def test_ingest_is_idempotent(tmp_path: Path) -> None:
    db = tmp_path / "p.db"
    data = write_jsonl(tmp_path / "a.jsonl", [record(i) for i in range(20)])
    store = PromptStore(str(db))
    assert store.ingest_file(data).added == 20
    assert store.ingest_file(data).added == 0
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(data.read_bytes().replace(b"\n", b"\r\n"))  # a copy with other line endings
    assert store.ingest_file(copy).added == 0
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(data.read_text(encoding="utf-8"))
    assert store.ingest_file(tmp_path / "a.jsonl.gz").added == 0
    write_jsonl(data, [record(i) for i in range(25)])  # the log grew
    result = store.ingest_file(data)
    assert (result.records, result.added) == (25, 5)
    assert count(db) == 25


def test_identical_lines_are_separate_records(tmp_path: Path) -> None:
    """The same request sent twice is two records; ingesting the file again still adds nothing."""
    same = {"prompt": "hello?", "user_id": "u1"}
    data = write_jsonl(tmp_path / "a.jsonl", [same, same, record(1)])
    store = PromptStore(str(tmp_path / "p.db"))
    assert store.ingest_file(data).added == 3
    assert store.ingest_file(data).added == 0
    write_jsonl(data, [same, same, record(1), same])
    assert store.ingest_file(data).added == 1


def test_the_portable_path_for_other_databases_behaves_the_same(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "a.jsonl", [record(i) for i in range(12)] + [{"prompt": "x?", "user_id": "u"}] * 2)
    store = PromptStore(str(tmp_path / "p.db"))
    store.is_sqlite = False  # key look-up + SQLAlchemy insert, as for PostgreSQL
    assert store.ingest_file(data).added == 14
    assert store.ingest_file(data).added == 0
    assert len(store.load_rows()) == 14


@pytest.mark.parametrize("bad,message", [
    ('{"prompt": "hi", "user_id": "u1"', "invalid JSON"),
    ('{"prompt": "hi", "user_id": "u1"} {"prompt": 2}', "invalid JSON (extra data after the object at column 34)"),
    ('["not", "an", "object"]', "expected a JSON object"),
    ('{"prompt": "hi"}', "field 'user_id': missing"),
    ('{"prompt": "", "user_id": "u1"}', "field 'prompt'"),
    ('{"prompt": [{"role": "assistant", "content": "hi"}], "user_id": "u1"}', "field 'prompt[0].role'"),
    ('{"prompt": "hi", "user_id": "u1", "created_at": "yesterday"}', "field 'created_at': expected an ISO 8601"),
    ('{"prompt": "hi", "user_id": "u1", "sampling": 0.7}', "field 'sampling'"),
])
def test_a_malformed_line_names_file_and_line_and_stores_nothing_of_the_file(tmp_path: Path, bad: str,
                                                                              message: str) -> None:
    db = tmp_path / "p.db"
    store = PromptStore(str(db))
    store.ingest_file(write_jsonl(tmp_path / "old.jsonl", [record(100), record(101)]))
    before = raw_rows(db)
    data = write_jsonl(tmp_path / "new.jsonl", [record(i) for i in range(6)], raw_lines={4: bad})
    with pytest.raises(UserError, match=rf"new.jsonl:5: .*{re.escape(message)}"):
        store.ingest_file(data)
    assert raw_rows(db) == before  # nothing of the file, nothing lost
    result = store.ingest_file(data, skip_invalid=True)
    assert (result.records, result.added, len(result.invalid)) == (6, 6, 1)
    assert "new.jsonl:5" in result.invalid[0]
    assert count(db) == 8 and raw_rows(db)[:2] == before


def test_a_line_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_bytes(json.dumps(record(1)).encode() + b'\n{"prompt": "caf\xe9", "user_id": "u"}\n')
    store = PromptStore(str(tmp_path / "p.db"))
    with pytest.raises(UserError, match=r"a.jsonl:2: not UTF-8"):
        store.ingest_file(path)
    assert store.ingest_file(path, skip_invalid=True).added == 1


def test_a_failed_ingest_in_the_middle_of_a_big_file_rolls_back(tmp_path: Path) -> None:
    """The error comes after several batches were inserted: the transaction still leaves nothing."""
    db = tmp_path / "p.db"
    records = [record(i, user=f"u{i % 7}") for i in range(12000)]
    data = write_jsonl(tmp_path / "big.jsonl", records, raw_lines={11000: "{oops"})
    store = PromptStore(str(db))
    with pytest.raises(UserError, match="big.jsonl:11001: invalid JSON"):
        store.ingest_file(data)
    assert count(db) == 0
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM ingests").fetchone() == (0,)


def test_request_logs_and_labeler_prompts(tmp_path: Path) -> None:
    """The serve log format (model, sampling, created_at) and labeler files with fill-ins share one reader."""
    log = write_jsonl(tmp_path / "requests.jsonl", [
        {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "What is RLHF?"}],
         "user_id": "u9", "source": "api", "model": "runs/ppo", "sampling": {"temperature": 0.7, "top_p": 1.0},
         "created_at": "2024-03-01T12:00:00+02:00"}])
    labeler = write_jsonl(tmp_path / "labeler.jsonl", [{"prompt": "Write a limerick about tea."}])
    db = tmp_path / "p.db"
    results = ingest(IngestConfig(inputs=[str(log)], db=str(db)))
    assert results[0].added == 1
    with pytest.raises(UserError, match="field 'user_id': missing"):
        ingest(IngestConfig(inputs=[str(labeler)], db=str(db)))
    ingest(IngestConfig(inputs=[str(labeler)], db=str(db), source="plain", user_id="labeler-3"))
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT user_id, source, created_at, extra, prompt_text, prompt_messages "
                            "FROM prompts ORDER BY id").fetchall()
    assert rows[0][:3] == ("u9", "api", "2024-03-01T10:00:00.000000Z")  # normalized to UTC
    assert json.loads(rows[0][3]) == {"model": "runs/ppo", "sampling": {"temperature": 0.7, "top_p": 1.0}}
    assert rows[0][4] is None and json.loads(rows[0][5])[-1]["content"] == "What is RLHF?"
    assert rows[1] == ("labeler-3", "plain", None, None, "Write a limerick about tea.", None)


def test_times() -> None:
    assert normalize_time("2024-01-15T10:00:00Z", "x") == "2024-01-15T10:00:00.000000Z"
    assert normalize_time("2024-01-15", "x") == "2024-01-15T00:00:00.000000Z"
    assert normalize_time("2024-01-15T10:00:00.5-05:00", "x") == "2024-01-15T15:00:00.500000Z"
    with pytest.raises(UserError, match="f.jsonl:3: field 'created_at'"):
        normalize_time("15/01/2024", "f.jsonl:3")


def test_missing_inputs_and_stores(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--inputs"):
        ingest(IngestConfig(db=str(tmp_path / "p.db")))
    with pytest.raises(UserError, match="nope.jsonl: file not found"):
        ingest(IngestConfig(inputs=[str(tmp_path / "nope.jsonl")], db=str(tmp_path / "p.db")))
    with pytest.raises(UserError, match="no prompt store"):
        curate(CurateConfig(db=str(tmp_path / "none.db")))
    PromptStore(str(tmp_path / "empty.db"))
    with pytest.raises(UserError, match="has no prompts"):
        curate(CurateConfig(db=str(tmp_path / "empty.db")))
    with pytest.raises(UserError, match="no curation yet"):
        export(PromptExportConfig(db=str(tmp_path / "empty.db"), out=str(tmp_path / "out")))


def test_a_store_of_another_format_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "p.db"
    PromptStore(str(db))
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE meta SET value = '0' WHERE key = 'format'")
    with pytest.raises(UserError, match="format '0'"):
        PromptStore(str(db))


def test_db_as_url_or_path(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "a.jsonl", [record(1)])
    PromptStore(f"sqlite:///{tmp_path / 'p.db'}").ingest_file(data)
    assert PromptStore(str(tmp_path / "p.db"), create=False).ingest_file(data).added == 0


# -- curate and export ------------------------------------------------------------------------------------------------


def small_store(tmp_path: Path) -> Path:
    db = tmp_path / "p.db"
    records = []
    for u in range(40):
        for _ in range(250 if u == 0 else 3 + u % 5):
            records.append(record(len(records), user=f"user{u}", category="generation"))
    records[5]["prompt"] = "My email is jo@example.com. Write a poem number 5 about the sea."
    data = write_jsonl(tmp_path / "a.jsonl", records)
    PromptStore(str(db)).ingest_file(data)
    return db


def test_curation_never_changes_the_raw_prompts(tmp_path: Path) -> None:
    db = small_store(tmp_path)
    before = raw_rows(db)
    first = curate(CurateConfig(db=str(db)))
    second = curate(CurateConfig(db=str(db), seed=1, pii="drop"))
    assert raw_rows(db) == before
    assert second == first + 1
    with sqlite3.connect(db) as conn:
        per_run = dict(conn.execute("SELECT curation_id, count(*) FROM curated GROUP BY curation_id").fetchall())
    assert set(per_run) == {first, second} and per_run[first] == per_run[second] + 1  # drop removed one


def test_export_writes_disjoint_valid_sets(tmp_path: Path) -> None:
    db = small_store(tmp_path)
    curate(CurateConfig(db=str(db), report_dir=str(tmp_path / "report")))
    assert (tmp_path / "report" / "report.md").is_file()
    out = tmp_path / "sets"
    counts = export(PromptExportConfig(db=str(db), out=str(out), sft=0.25, rm=0.25, ppo=0.5))
    sets = {name: list(iter_records(out / f"{name}.jsonl", "prompt")) for name in ("sft", "rm", "ppo", "val", "test")}
    assert {k: len(v) for k, v in sets.items()} == counts
    ids = [r["id"] for records in sets.values() for r in records]
    assert len(ids) == len(set(ids))  # disjoint
    users = {name: {r["user_id"] for r in records} for name, records in sets.items()}
    train_users = users["sft"] | users["rm"] | users["ppo"]
    assert not train_users & users["val"] and not train_users & users["test"] and not users["val"] & users["test"]
    per_user = Counter(r["user_id"] for records in sets.values() for r in records)
    assert per_user["user0"] == 200
    train = sets["sft"] + sets["rm"] + sets["ppo"]
    assert abs(len(sets["sft"]) - 0.25 * len(train)) <= 1
    redacted = [r for r in train + sets["val"] + sets["test"] if "pii_redacted" in r]
    assert [r["prompt"] for r in redacted] == ["My email is [EMAIL]. Write a poem number 5 about the sea."]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == counts
    assert manifest["files"]["sft.jsonl"] == hashlib.sha256((out / "sft.jsonl").read_bytes()).hexdigest()
    report = json.loads((out / "report.json").read_text())
    assert report["curation_id"] == manifest["curation"]
    assert "| dedup |" in (out / "report.md").read_text()
    # a second export replaces the directory as a whole, leaving no temporary files behind
    export(PromptExportConfig(db=str(db), out=str(out), sft=0.2, rm=0.4, ppo=0.4))
    assert sorted(p.name for p in out.iterdir()) == sorted([*EXPORT_FILES, "manifest.json", "report.json",
                                                            "report.md"])
    assert not list(tmp_path.glob(".sets*"))


def test_export_shares(tmp_path: Path) -> None:
    records = [{"id": i} for i in range(10)]
    sets = divide_train(records, {"sft": 0.2, "rm": 0.4, "ppo": 0.4}, seed=0)
    assert [len(v) for v in sets.values()] == [2, 4, 4]
    assert sorted(r["id"] for v in sets.values() for r in v) == list(range(10))
    db = small_store(tmp_path)
    curate(CurateConfig(db=str(db)))
    with pytest.raises(UserError, match="sum to at most 1"):
        export(PromptExportConfig(db=str(db), out=str(tmp_path / "o"), sft=0.5, rm=0.5, ppo=0.5))
    with pytest.raises(UserError, match="--curation: no curation 9"):
        export(PromptExportConfig(db=str(db), out=str(tmp_path / "o"), curation=9))


def test_stats(tmp_path: Path, capsys) -> None:
    db = small_store(tmp_path)
    curate(CurateConfig(db=str(db)))
    s = stats(PromptStatsConfig(db=str(db)))
    assert s["prompts"] == count(db) and s["users"] == 40 and s["curations"][0]["id"] == 1
    assert sum(s["latest_curation_splits"].values()) == s["curations"][0]["prompts"]
    assert "prompts from 40 users" in capsys.readouterr().out


# -- the command line, end to end ---------------------------------------------------------------------------------


def test_end_to_end_on_a_small_world(tmp_path: Path) -> None:
    world, db, out = tmp_path / "world", tmp_path / "prompts.db", tmp_path / "sets"
    r = run_cli("world", "--out", str(world), "--prompts", "2000", "--pretrain_mb", "0.2", "--demonstrations", "20",
                "--rankings", "5", "--ratings", "5", "--agreement_pairs", "10", "--eval_prompts", "10")
    assert r.returncode == 0, r.stderr
    r = run_cli("prompts", "ingest", "--inputs", str(world / "prompts.jsonl"), "--db", str(db))
    assert r.returncode == 0, r.stderr
    assert "2000 added" in r.stdout
    r = run_cli("prompts", "ingest", "--inputs", str(world / "prompts.jsonl"), "--db", str(db))
    assert "0 added, 2000 already stored" in r.stdout
    r = run_cli("prompts", "curate", "--db", str(db), "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert "PII found: email" in r.stdout and "splits: train" in r.stdout
    r = run_cli("prompts", "export", "--db", str(db), "--out", str(out))
    assert r.returncode == 0, r.stderr
    sets = {f: read_records(out / f, "prompt") for f in EXPORT_FILES}
    raw = read_records(world / "prompts.jsonl", "prompt")
    pii_values = _world_pii_values(raw)
    assert pii_values
    user_split: dict[str, set[str]] = {}
    for name, records in sets.items():
        split = name if name in ("val.jsonl", "test.jsonl") else "train"
        for rec in records:
            user_split.setdefault(rec["user_id"], set()).add(split)
            text = json.dumps(rec["prompt"])
            if split == "train":
                assert not any(v in text for v in pii_values), rec
                texts = [rec["prompt"]] if isinstance(rec["prompt"], str) else [m["content"] for m in rec["prompt"]]
                assert all(scan(t) == [] for t in texts)
    assert all(len(s) == 1 for s in user_split.values())  # no user in two splits
    per_user = Counter(rec["user_id"] for records in sets.values() for rec in records)
    assert max(per_user.values()) <= 200
    assert Counter(rec["user_id"] for rec in raw).most_common(1)[0][1] > 200  # the world does have heavy users
    r = run_cli("prompts", "stats", "--db", str(db))
    assert r.returncode == 0 and "2000 prompts" in r.stdout


def _world_pii_values(records: list[dict]) -> set[str]:
    """The e-mail addresses, phone numbers and card numbers the world put into its prompts."""
    values = set()
    for rec in records:
        text = json.dumps(rec["prompt"])
        values.update(re.findall(r"[\w.]+@[\w.]+\.\w+", text))
        values.update(re.findall(r"555-\d{3}-\d{4}", text))
        values.update(re.findall(r"\d{4} \d{4} \d{4} \d{4}", text))
    return values


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "a.jsonl", [record(1)], raw_lines={1: "{broken"})
    r = run_cli("prompts", "ingest", "--inputs", str(data), "--db", str(tmp_path / "p.db"))
    assert r.returncode == 2
    assert r.stderr.strip().endswith("a.jsonl:2: invalid JSON (Expecting property name enclosed in double quotes "
                                     "at column 2)")
    r = run_cli("prompts", "ingest", "--inputs", str(data), "--db", str(tmp_path / "p.db"), "--skip_invalid")
    assert r.returncode == 0 and "1 invalid skipped" in r.stdout and "a.jsonl:2" in r.stderr
    r = run_cli("prompts", "curate", "--db", str(tmp_path / "p.db"), "--train", "0.5")
    assert r.returncode == 2 and "sum to 1" in r.stderr
    r = run_cli("prompts", "curate", "--help")
    assert r.returncode == 0 and "--max_per_user" in r.stdout
