"""The human workflow end to end on the synthetic world, without people: applicants take a screening test
(the too-noisy ones fail), the qualified write demonstrations (SFT trains on them) and rank SFT's samples, the
reward model trains with labelers held out, PPO trains against it, an A/B batch compares SFT and PPO blind,
and `chatloop eval --human` turns the verdicts into win rates equal to the simulated labelers' own count.
Also the human win-rate arithmetic by hand."""

from __future__ import annotations

import json
import random
import sqlite3

import pytest
import torch

from chatloop.checkpoint import save_model
from chatloop.data.readers import read_rankings
from chatloop.evaluate import add_human, human_win_rates
from chatloop.labeling.commands import BatchConfig, LabelExportConfig, batch, export
from chatloop.labeling.secret import load_secret
from chatloop.labeling.store import LabelStore
from chatloop.model import GPT, preset
from chatloop.report import human_section, rm_accuracy_lines
from chatloop.tokenizer import Tokenizer
from chatloop.train.ppo import PPOConfig, ppo
from chatloop.train.sft import SFTConfig, sft
from chatloop.world.labelers import candidate_pool, make_labelers
from chatloop.world.simulate import enroll, screening_items, work
from chatloop.world.world import World
from tests.conftest import FP32, run_cli

CANDIDATES, TOO_NOISY = 8, 2


def test_make_labelers_is_unchanged_and_the_candidate_pool_has_a_few_far_too_noisy():
    world = World.generate(0)
    assert [round(x.noise, 3) for x in make_labelers(world, 3)] == [0.24, 0.3, 0.36]  # the loop's labelers
    assert all(x.flag_noise == 0 for x in make_labelers(world))
    pool = candidate_pool(world, CANDIDATES, TOO_NOISY)
    assert [x.id for x in pool] == [f"candidate-{i:02d}" for i in range(1, 9)]
    assert sum(x.noise > 1 for x in pool) == TOO_NOISY and all(0.2 < x.noise < 0.4 for x in pool if x.noise < 1)
    assert candidate_pool(world, CANDIDATES, TOO_NOISY)[0].noise == pool[0].noise  # seeded


@pytest.fixture(scope="module")
def people(tmp_path_factory, tokenizer_dir):
    """A world directory, prompts of its users, and a tiny (random) pretrained model."""
    root = tmp_path_factory.mktemp("people")
    world = World.generate(0)
    (root / "world").mkdir()
    (root / "world" / "world.json").write_text(json.dumps(world.to_json()))
    rng = random.Random(0)
    texts = [world.render_core(world.sample_task(rng, 0.05), rng) for _ in range(56)]
    for name, part in (("sft", texts[40:]), ("rm", texts[:24]), ("eval", texts[24:40])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": t, "user_id": f"user{i % 5}"}) + "\n"
                                                    for i, t in enumerate(part)))
    tok = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(0)
    cfg = preset("tiny", {"vocab_size": tok.vocab_size, "n_layer": 1, "n_head": 2, "n_kv_head": 1, "d_model": 32,
                          "max_seq_len": 512})
    save_model(GPT(cfg), root / "pretrained", tok)
    return root, world


@pytest.mark.slow
def test_the_human_path_from_screening_to_human_win_rates_on_the_simulated_world(people):
    root, world = people
    db, secret = root / "label.db", root / "label.secret"
    common = [f"--db={db}", f"--secret_file={secret}"]

    # Screening: 30 rankings of 6 perturbed answers, the judge's order as gold; pass at 67.5% of gold's pairs.
    screen = root / "screen.jsonl"
    screen.write_text("".join(json.dumps(r) + "\n" for r in screening_items(world, "ranking", 30, k=6)))
    made = run_cli("label", "batch", "--kind=ranking", f"--data={screen}", "--screening", "ranking=0.675", *common)
    assert made.returncode == 0, made.stderr
    batch(BatchConfig(kind="demonstration", prompts=str(root / "sft.jsonl"), db=str(db), secret_file=str(secret)))
    simulated = run_cli("label", "simulate", f"--world={root / 'world'}", f"--candidates={CANDIDATES}",
                        f"--too_noisy={TOO_NOISY}", *common)
    assert simulated.returncode == 0, simulated.stderr
    pool = candidate_pool(world, CANDIDATES, TOO_NOISY)
    store = LabelStore(str(db), load_secret(secret))
    users = enroll(store, [x.id for x in pool])
    team = [(x, users[x.id]) for x in pool]
    state = {x.id: store.qualification(users[x.id]) for x in pool}
    assert {name for name, s in state.items() if s == "failed"} == {x.id for x in pool if x.noise > 1}
    qualified = sorted(name for name, s in state.items() if s == "qualified")
    assert len(qualified) == CANDIDATES - TOO_NOISY
    assert "candidate" in simulated.stdout and "failed; ranking" in simulated.stdout  # label simulate's report
    stats = run_cli("label", "stats", *common)
    assert all(f"{x.id}: {'failed' if x.noise > 1 else 'passed'}; ranking" in stats.stdout for x in pool)

    # The qualified wrote the demonstrations (label simulate did every open batch): SFT trains on them.
    labels = root / "labels"
    export(LabelExportConfig(out=str(labels), db=str(db), secret_file=str(secret)))
    demonstrations = [json.loads(line) for line in (labels / "demonstrations.jsonl").read_text().splitlines()]
    assert len(demonstrations) == 16 and {d["labeler_id"] for d in demonstrations} <= set(qualified)
    sft(SFTConfig(model=str(root / "pretrained"), data=[str(labels / "demonstrations.jsonl")], out=str(root / "sft"),
                  epochs=2, batch_size=4, seq_len=256, lr=1e-3, progress=False, precision="fp32", device="cpu"))

    # Rankings of the SFT policy's samples, by the qualified only; the RM holds two of them out.
    batch(BatchConfig(kind="ranking", model=[str(root / "sft")], prompts=str(root / "rm.jsonl"), k=4, overlap=1,
                      max_new_tokens=12, db=str(db), secret_file=str(secret)))
    work(store, team)
    export(LabelExportConfig(out=str(labels), db=str(db), secret_file=str(secret)))
    rankings = read_rankings(labels / "rankings.jsonl")
    assert len(rankings) == 24 and {r["labeler_id"] for r in rankings} <= set(qualified)
    by = sorted({r["labeler_id"] for r in rankings}, key=lambda n: -sum(r["labeler_id"] == n for r in rankings))
    held_out = by[-2:]
    rm = run_cli("rm", f"--model={root / 'sft'}", f"--data={labels / 'rankings.jsonl'}", f"--out={root / 'rm'}",
                 f"--val_labelers={','.join(held_out)}", "--batch_size=4", "--seq_len=256", "--progress=false", FP32)
    assert rm.returncode == 0, rm.stderr
    assert "held-out labelers" in rm.stdout
    report = json.loads((root / "rm" / "eval.json").read_text())
    held = report["held_out_labelers"]
    assert held["labelers"] == sorted(held_out)
    assert held["prompts"] == sum(r["labeler_id"] in held_out for r in rankings) and held["pairs"] > 0
    assert json.loads((root / "rm" / "chatloop.json").read_text())["metrics"]["train_prompts"] <= 24 - held["prompts"]
    assert any("held-out labelers" in line and "69.6%" in line for line in rm_accuracy_lines(report))

    # PPO against that RM, then a blind A/B batch of SFT vs PPO on held-out users' prompts.
    ppo(PPOConfig(policy=str(root / "sft"), reward_model=str(root / "rm"), prompts=[str(root / "rm.jsonl")],
                  out=str(root / "ppo"), iterations=1, batch_size=8, minibatches=2, ppo_epochs=1, max_new_tokens=12,
                  max_prompt_tokens=400, warmup_steps=0, progress=False, precision="fp32", device="cpu"))
    ab = batch(BatchConfig(compare=[str(root / "sft"), str(root / "ppo")], prompts=str(root / "eval.jsonl"),
                           overlap=2, max_new_tokens=12, db=str(db), secret_file=str(secret)))
    verdicts = work(store, team, ab)
    assert len(verdicts) == 16 * 2 and {v["labeler"] for v in verdicts} <= set(qualified)
    store.close()

    # What the simulated labelers said, mapped to models from the database itself (the shown order of each
    # assignment and the task's hidden models), not through the export.
    con = sqlite3.connect(db)
    wins = ties = 0
    for v in verdicts:
        shown, hidden = con.execute("SELECT a.shown, t.hidden FROM assignments a JOIN tasks t ON t.id = a.task_id "
                                    "WHERE a.id = ?", (v["assignment"],)).fetchone()
        winner = v["answer"]["winner"]
        if winner == "tie":
            ties += 1
        else:
            wins += json.loads(hidden)["models"][json.loads(shown)["ab".index(winner)]] == str(root / "ppo")
    con.close()

    export(LabelExportConfig(out=str(labels), db=str(db), secret_file=str(secret)))
    out = root / "human.json"
    result = run_cli("eval", f"--human={labels}", f"--out={out}")
    assert result.returncode == 0, result.stderr
    assert "ppo vs sft (human)" in result.stdout  # the later checkpoint's win rate, as --compare SFT PPO asks
    human = json.loads(out.read_text())
    w = human["win_rates"]["ppo vs sft (human)"]
    assert w["n"] == len(verdicts) and w["wins"] == wins and w["ties"] == ties
    assert w["win_rate"] * w["n"] == pytest.approx(wins + 0.5 * ties)
    per = human["human"]["ab"]["ppo vs sft"]["labelers"]
    assert sum(v["n"] for v in per.values()) == len(verdicts) and set(per) <= set(qualified)


def test_held_out_labelers_are_split_off_and_a_name_nobody_has_is_caught(capsys):
    from chatloop.errors import UserError
    from chatloop.train.reward import check_held_out, split_by_labeler

    rankings = [{"labeler_id": name, "i": i} for i, name in enumerate(["ann", "bob", "ann", "cyd"])]
    others, held = split_by_labeler(rankings, ["ann"])
    assert [r["i"] for r in others] == [1, 3] and [r["i"] for r in held] == [0, 2]
    check_held_out(["ann", "dee"], rankings)
    assert "no rankings by held-out labeler(s) dee" in capsys.readouterr().out
    with pytest.raises(UserError, match="no rankings by dee"):
        check_held_out(["dee"], rankings)


def test_human_win_rates_from_ab_verdicts_and_rankings_by_hand(tmp_path):
    prompt = "p"
    comparisons = [{"prompt": prompt, "a": "x", "b": "y", "winner": w, "models": m, "labeler_id": who,
                    "compare": ["runs/sft", "runs/ppo"]}
                   for w, m, who in [("a", ["runs/ppo", "runs/sft"], "ann"), ("b", ["runs/sft", "runs/ppo"], "ann"),
                                     ("tie", ["runs/ppo", "runs/sft"], "bob"), ("a", ["runs/sft", "runs/ppo"], "bob")]]
    rankings = [{"prompt": prompt, "responses": ["x", "y", "z"], "ranks": [2, 1, 2], "labeler_id": "ann",
                 "models": ["runs/sft", "runs/ppo", "runs/dpo"], "same_answer": {"runs/pt": "runs/sft"},
                 "compare": ["runs/pt", "runs/sft", "runs/ppo", "runs/dpo"]}]
    (tmp_path / "comparisons.jsonl").write_text("".join(json.dumps(r) + "\n" for r in comparisons))
    (tmp_path / "rankings.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rankings))
    human = human_win_rates([str(tmp_path)])
    ab = human["ab"]["ppo vs sft"]  # B vs A of --compare A B
    assert ab["overall"]["win_rate"] == pytest.approx(2.5 / 4) and ab["overall"]["wins"] == 2
    assert ab["labelers"]["ann"]["win_rate"] == 1.0 and ab["labelers"]["bob"]["win_rate"] == pytest.approx(0.25)
    ranked = human["rankings"]
    assert ranked["ppo vs sft"]["overall"]["win_rate"] == 1.0  # ppo ranked 1, sft 2
    assert ranked["dpo vs sft"]["overall"]["win_rate"] == 0.5  # both ranked 2: a tie
    assert ranked["pt vs sft"]["overall"]["win_rate"] == 0.5  # pt's answer was sft's: the same rank
    assert ranked["pt vs ppo"]["overall"]["win_rate"] == 0.0  # pt first compared after sft and ppo: the later
    assert set(ranked) == {"ppo vs sft", "dpo vs sft", "pt vs sft", "dpo vs ppo", "pt vs ppo", "dpo vs pt"}
    # With eval's models, names and order are eval's; the rows sit right after the pair's gold and RM rows.
    named = human_win_rates([str(tmp_path / "comparisons.jsonl")], ["ppo", "sft"], ["runs/ppo", "runs/sft"])
    assert named["ab"]["sft vs ppo"]["overall"]["win_rate"] == pytest.approx(1.5 / 4)
    report = {"win_rates": {"ppo vs sft (gold)": {}, "ppo vs sft (rm)": {}, "dpo vs sft (gold)": {}}}
    add_human(report, human)
    assert list(report["win_rates"])[:4] == ["ppo vs sft (gold)", "ppo vs sft (rm)", "ppo vs sft (human)",
                                             "ppo vs sft (human, rankings)"]
    assert list(report["win_rates"])[4:6] == ["dpo vs sft (gold)", "dpo vs sft (human, rankings)"]
    assert any("| ppo vs sft | A/B | ann | 1.000 |" in line for line in human_section(human))
    missing = run_cli("eval", f"--human={tmp_path / 'nothing'}")
    assert missing.returncode == 2 and "no such file or directory" in missing.stderr
