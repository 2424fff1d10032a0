"""Evaluation arithmetic on hand-computed cases: win rates with ties and intervals, the RM's accuracy against
the gold judge, the RM's reward of an answer without a stop."""

import json

import numpy as np
import pytest
import torch

from chatloop.checkpoint import save_model
from chatloop.evaluate import (
    helpful_harmless_honest,
    rm_accuracy_vs_gold,
    rm_probe_accuracy,
    rm_scores,
    share,
    win_rate,
)
from chatloop.generate import Answers
from chatloop.model import GPT, GPTConfig
from chatloop.pipeline import rl_rm_accuracy
from chatloop.tokenizer import Tokenizer
from tests.conftest import run_cli


def test_win_rate_counts_ties_half_and_brackets_itself():
    w = win_rate([1.0, 0.5, 0.0, 0.2], [0.0, 0.5, 1.0, 0.1])  # win, tie, loss, win
    assert w["win_rate"] == pytest.approx(2.5 / 4) and w["n"] == 4
    assert w["ci_low"] < w["win_rate"] < w["ci_high"]
    assert w["ties"] == 1 and w["win_rate_no_ties"] == pytest.approx(2 / 3)  # the tie left out


def test_a_share_brackets_itself_inside_zero_and_one():
    all_ten, three_of_ten = share([True] * 10), share([True] * 3 + [False] * 7)
    assert all_ten["share"] == 1.0 and all_ten["ci_high"] == 1.0 and 0.6 < all_ten["ci_low"] < 0.8  # Wilson: 0.72
    assert three_of_ten["ci_low"] < 0.3 < three_of_ten["ci_high"] and three_of_ten["n"] == 10
    assert np.isnan(share([])["share"])


def test_helpful_harmless_honest_counts_refusals_and_false_claims_per_kind_of_prompt():
    """The world's judge on hand-written answers: a model that refuses the harmful prompts and answers the rest
    ideally against one that complies, refuses a harmless prompt and states a false fact."""
    import random

    from chatloop.world.gold import GoldJudge
    from chatloop.world.judge import REFUSAL, Task, ideal
    from chatloop.world.labelers import perturb
    from chatloop.world.world import World

    world, rng = World.generate(0), random.Random(0)
    tasks = [Task(kind, world.sample_slots(kind, rng) or {}) for kind in ["harm_poison", "qa_color", "qa_color",
                                                                          "qa_home"]]
    prompts = [world.render_core(t, rng) for t in tasks]
    judge = GoldJudge(world)
    good = [REFUSAL] + [ideal(world, t) for t in tasks[1:]]
    bad = [perturb(world, prompts[0], tasks[0], "comply", rng), REFUSAL,
           perturb(world, prompts[2], tasks[2], "wrong_fact", rng), ideal(world, tasks[3])]
    held_out = {n: [judge.verdict(p, a) for p, a in zip(prompts, answers)] for n, answers in [("sft", good),
                                                                                              ("ppo", bad)]}
    redteam_prompt = world.render_core(Task("harm_hurt", world.sample_slots("harm_hurt", rng) or {}), rng)
    redteam = {"sft": [judge.verdict(redteam_prompt, REFUSAL)], "ppo": [judge.verdict(redteam_prompt, REFUSAL)]}
    table = helpful_harmless_honest(judge, prompts, held_out, redteam, reference="sft")
    assert "helpful" not in table["sft"] and table["ppo"]["helpful"]["n"] == 3  # the harmless prompts only
    assert table["ppo"]["helpful"]["win_rate"] == pytest.approx(1 / 6)  # lost two, tied one
    assert (table["sft"]["harmless"]["share"], table["ppo"]["harmless"]["share"]) == (1.0, 0.5)
    assert table["sft"]["harmless"]["n"] == 2  # the held-out harmful prompt and the red-team one
    assert (table["sft"]["over_refusal"]["share"], table["ppo"]["over_refusal"]["share"]) == (0.0, pytest.approx(1 / 3))
    assert (table["sft"]["false_claims"]["share"], table["ppo"]["false_claims"]["share"]) == (0.0, 0.25)


def test_rm_probes_are_scored_per_group(tmp_path, tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(0)
    rm = GPT(GPTConfig("llama", tok.vocab_size, 2, 4, 2, 64, max_seq_len=96, head="scalar")).eval()
    probes = [{"prompt": f"q{i}", "responses": ["yes", "no"], "ranks": [1, 2], "group": g}
              for i, g in enumerate(["a", "a", "a", "b"])]
    (tmp_path / "probes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in probes))
    table = rm_probe_accuracy(rm, tok, str(tmp_path / "probes.jsonl"), "cpu")
    assert {g: row["pairs"] for g, row in table.items()} == {"a": 3, "b": 1}
    assert all(row["accuracy"] in (0.0, 1 / 3, 2 / 3, 1.0) for row in table.values()) and not rm.training
    assert all(row["ci_low"] <= row["accuracy"] <= row["ci_high"] for row in table.values())
    assert table["b"]["ci_high"] - table["b"]["ci_low"] > table["a"]["ci_high"] - table["a"]["ci_low"]  # 1 pair vs 3


def test_rm_accuracy_against_gold_by_pair_skips_gold_ties():
    per_prompt = {"pretrained": {"gold": [0, 0, 1], "rm": [5, 5, 5]},
                  "sft": {"gold": [1, 0, 0], "rm": [1, 0, 0]},
                  "ppo": {"gold": [0, 1, 1], "rm": [0, 1, 2]}}
    acc = rm_accuracy_vs_gold(per_prompt)
    assert acc["by_pair"]["sft vs pretrained"] == {"accuracy": 0.5, "pairs": 2}  # prompt 1 is a gold tie
    assert acc["by_pair"]["ppo vs pretrained"] == {"accuracy": 0.0, "pairs": 1}
    assert acc["by_pair"]["ppo vs sft"] == {"accuracy": 1.0, "pairs": 3}
    assert acc["accuracy"] == pytest.approx(4 / 6) and acc["pairs"] == 6
    assert rl_rm_accuracy(acc) == 1.0  # the pairs without the pretrained model's free text


def test_rm_scores_are_the_reward_ppo_optimizes():
    """An answer that never stopped scores PPO's no_eos_score, whatever the reward model says of it."""
    torch.manual_seed(0)
    rm = GPT(GPTConfig("llama", vocab_size=97, n_layer=1, n_head=2, d_model=32, max_seq_len=16, head="scalar")).eval()
    tokens = torch.randint(1, 97, (4, 8))
    answers = Answers(prompts=["p"] * 4, texts=["a"] * 4, ended=[True, False, True, False], tokens=[tokens],
                      masks=[torch.ones_like(tokens)], prompt_lens=[4])
    raw = rm_scores(rm, answers)
    assert len(set(raw)) == 4  # a random head tells the four apart
    assert rm_scores(rm, answers, no_eos_score=-7.0) == [raw[0], -7.0, raw[2], -7.0]


@pytest.mark.slow
def test_eval_takes_the_gold_judge_it_is_given_by_name(tmp_path, tokenizer_dir):
    """`chatloop eval --judge=module:function --judge_arg=ARG`: the world's judge is a plug-in evaluation loads by
    name; its verdicts give the gold rows, its marks the "why" columns, its kinds the per-kind table."""
    import random

    from chatloop.world.gold import MARKS, gold_judge
    from chatloop.world.judge import Task
    from chatloop.world.world import World

    world = World.generate(0)
    (tmp_path / "world").mkdir()
    (tmp_path / "world" / "world.json").write_text(json.dumps(world.to_json()))
    rng = random.Random(0)
    kinds = ["qa_color", "gen_sentence", "oth_math"]
    prompts = [world.render_core(Task(kind, world.sample_slots(kind, rng) or {}), rng) for kind in kinds * 2]
    records = [{"prompt": p, "user_id": "u1"} for p in prompts]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tok = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(0)
    save_model(GPT(GPTConfig("llama", tok.vocab_size, 2, 4, 2, 64, max_seq_len=96)), tmp_path / "model", tok)
    args = ["eval", f"--models={tmp_path / 'model'}", f"--prompts={tmp_path / 'prompts.jsonl'}",
            "--max_new_tokens=8", "--no-greedy", "--device=cpu"]
    result = run_cli(*args, "--judge=chatloop.world.gold:gold_judge", f"--judge_arg={tmp_path / 'world'}",
                     f"--out={tmp_path / 'eval.json'}")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "eval.json").read_text())
    row = report["models"]["model"]
    judge = gold_judge(str(tmp_path / "world"))
    assert 0.0 <= row["gold_score"] <= 1.0 and 1 <= row["likert"] <= 7
    assert [k for k in row if k.startswith("marked/")] == [f"marked/{m}" for m in MARKS]
    assert {judge.kind(p) for p in prompts} == set(kinds) == set(report["gold_by_kind"])
    assert report["gold_by_kind"]["qa_color"]["prompts"] == 2
    assert report["gold_by_kind"]["qa_color"]["model"] == pytest.approx(np.mean(
        [judge.verdict(p, s["model"]).score for p, s in zip(prompts, report["samples"]) if judge.kind(p) == "qa_color"]
    ), abs=0.35)  # the samples' verdicts, give or take the stop token (ended is not in the samples)
    result = run_cli(*args, f"--out={tmp_path / 'plain.json'}")  # no judge: no gold rows
    assert result.returncode == 0 and "gold_score" not in json.loads((tmp_path / "plain.json").read_text())[
        "models"]["model"]
    bad = run_cli(*args, "--judge=chatloop.world.gold:no_such_judge", f"--judge_arg={tmp_path / 'world'}")
    assert bad.returncode == 2 and "--judge=chatloop.world.gold:no_such_judge" in bad.stderr
