"""Evaluation arithmetic on hand-computed cases: win rates with ties and intervals, the RM's accuracy against
the gold judge, the RM's reward of an answer without a stop."""

import pytest
import torch

from chatloop.evaluate import Answers, rm_accuracy_vs_gold, rm_scores, win_rate
from chatloop.model import GPT, GPTConfig
from chatloop.pipeline import rl_rm_accuracy


def test_win_rate_counts_ties_half_and_brackets_itself():
    w = win_rate([1.0, 0.5, 0.0, 0.2], [0.0, 0.5, 1.0, 0.1])  # win, tie, loss, win
    assert w["win_rate"] == pytest.approx(2.5 / 4) and w["n"] == 4
    assert w["ci_low"] < w["win_rate"] < w["ci_high"]
    assert w["ties"] == 1 and w["win_rate_no_ties"] == pytest.approx(2 / 3)  # the tie left out


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
