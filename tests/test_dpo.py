"""DPO: the grouped loss against hand computations, Plackett-Luce, one forward pass per answer, resume after kill -9,
learning a preference, and two processes against one."""

import json
import math
from collections import Counter

import pytest
import torch

from chatloop.data.formats import ranking_pairs
from chatloop.model import GPT, GPTConfig
from chatloop.tokenizer import Tokenizer
from chatloop.train.dpo import DPOGroup, answer_logps, collate, dpo_loss, encode_rankings, group_loss, reference_logps
from tests import test_resume
from tests.conftest import cli_command, kill_when, metric_rows, run_cli
from tests.test_distributed import assert_same_step, single, torchrun, weights

models = test_resume.models  # the fixture: a tiny base model, demonstrations, K = 4 rankings (red > blue > ...)
CPU = torch.device("cpu")


def tiny_lm(tok: Tokenizer, seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig("llama", tok.vocab_size, 1, 2, 2, 32, max_seq_len=64)).eval()


def by_hand_logp(model: GPT, sequence: list[int], start: int) -> float:
    """log p(answer | prompt) from the model's logits of the sequence alone, token by token."""
    with torch.no_grad():
        logits = model(torch.tensor([sequence]))[0].double()
    return sum(torch.log_softmax(logits[t - 1], -1)[sequence[t]].item() for t in range(start, len(sequence)))


def nll(margin: float) -> float:
    return math.log1p(math.exp(-margin))


def test_the_answer_is_the_last_assistant_turn_and_ties_are_skipped_and_counted(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    context = [{"role": "user", "content": "the red fox"}, {"role": "assistant", "content": "the dog"},
               {"role": "user", "content": "and then?"}]
    report = Counter()
    groups = encode_rankings([{"prompt": context, "responses": ["runs", "the hill"], "ranks": [1, 1]},
                              {"prompt": context, "responses": ["runs", "the hill", "the town"], "ranks": [2, 1, 2]}],
                             tok, 64, report)
    assert report["tied pairs"] == 2 and report["rankings dropped (all answers tie)"] == 1
    (g,) = groups
    assert g.pairs == [(1, 0), (1, 2)]
    prompt_ids = tok.render_chat(context, add_generation_prompt=True)[0]
    for sequence, start, answer in zip(g.sequences, g.starts, ["runs", "the hill", "the town"]):
        assert sequence[:start] == prompt_ids  # the earlier assistant turn is prompt, not answer
        assert sequence[start:] == tok.encode_reply(answer) + [tok.end_of_turn_id]
    cut = encode_rankings([{"prompt": context, "responses": ["the red fox runs " * 20, "x"], "ranks": [1, 2]}],
                          tok, 16, report)[0]
    assert len(cut.sequences[0]) == 16 and cut.starts[0] == 1  # the answer keeps its start; one prompt token
    x = tok.encode_reply("x") + [tok.end_of_turn_id]
    assert cut.sequences[1][-len(x):] == x and len(cut.sequences[1]) == 16
    assert report["answer cut"] == 1 and report["prompt cut"] == 1


def test_step_0_loss_is_log_2_per_pair_and_implicit_rewards_are_0_when_policy_is_reference(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    model = tiny_lm(tok, 0)
    rankings = [{"prompt": f"where does the fox run {i}?", "responses": [f"to the {p}" for p in places],
                 "ranks": list(range(1, len(places) + 1))}
                for i, places in enumerate([["river", "hill", "town", "forest"], ["hill", "town"], ["town"] * 3])]
    groups = encode_rankings(rankings, tok, 64, Counter())
    ids, labels = collate(groups, tok.pad_id, CPU)
    for precision in ("fp32", "bf16"):
        logps = answer_logps(model, ids, labels, CPU, precision)
        ref = reference_logps(model, [DPOGroup(g.sequences, g.starts, g.ranks, g.pairs) for g in groups], ids, labels,
                              CPU, precision)
        for kind in ("pairwise", "plackett_luce"):
            loss, stats = dpo_loss(logps, ref, groups, 0.1, kind)
            if kind == "pairwise":
                assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
            else:  # each prompt: the mean over its stages of log(answers left at that stage)
                assert loss.item() == pytest.approx(
                    (sum(map(math.log, [4, 3, 2])) / 3 + math.log(2) + (math.log(3) + math.log(2)) / 2) / 3, abs=1e-6)
            assert stats["margin"] == stats["chosen_reward"] == stats["rejected_reward"] == stats["log_ratio"] == 0
            assert stats["correct"] == 0 and stats["pairs"] == 6 + 1 + 3


def test_a_hand_computed_three_response_example_matches_the_grouped_loss(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    policy, reference = tiny_lm(tok, 1), tiny_lm(tok, 2)
    beta = 0.5
    a = {"prompt": "which fox?", "responses": ["the red fox", "the blue fox runs", "a dog"], "ranks": [2, 1, 3]}
    b = {"prompt": "and the dog?", "responses": ["the lazy dog", "big"], "ranks": [2, 1]}
    groups = encode_rankings([a, b], tok, 64, Counter())
    ids, labels = collate(groups, tok.pad_id, CPU)  # right-padded together: must not change any log-prob
    with torch.no_grad():
        loss, stats = dpo_loss(answer_logps(policy, ids, labels, CPU, "fp32"),
                               answer_logps(reference, ids, labels, CPU, "fp32"), groups, beta, "pairwise")
    r = [[beta * (by_hand_logp(policy, s, st) - by_hand_logp(reference, s, st)) for s, st in zip(g.sequences, g.starts)]
         for g in groups]
    # A: answer 1 is best, then 0, then 2: pairs (1 > 0), (1 > 2), (0 > 2). B: answer 1 beats answer 0.
    loss_a = (nll(r[0][1] - r[0][0]) + nll(r[0][1] - r[0][2]) + nll(r[0][0] - r[0][2])) / 3
    loss_b = nll(r[1][1] - r[1][0])
    assert loss.item() == pytest.approx((loss_a + loss_b) / 2, abs=1e-5)  # each prompt weighs the same
    assert group_loss(torch.tensor(r[0]), groups[0], "pairwise").item() == pytest.approx(loss_a, abs=1e-5)
    margins = [r[0][1] - r[0][0], r[0][1] - r[0][2], r[0][0] - r[0][2], r[1][1] - r[1][0]]
    assert stats["pairs"] == 4 and stats["correct"] == sum(m > 0 for m in margins)
    assert stats["margin"] == pytest.approx(sum(margins), abs=1e-5)
    assert stats["chosen_reward"] == pytest.approx(r[0][1] * 2 + r[0][0] + r[1][1], abs=1e-5)
    assert stats["log_ratio"] == pytest.approx(sum(sum(x) for x in r) / beta, abs=1e-4)


def test_plackett_luce_on_a_hand_example_with_and_without_ties():
    def pl(rewards, ranks):
        return group_loss(torch.tensor(rewards), DPOGroup([[1]] * len(ranks), [1] * len(ranks), ranks,
                                                       ranking_pairs(ranks)), "plackett_luce").item()

    def lse(*xs):
        return math.log(sum(math.exp(x) for x in xs))

    # Order best first: answer 2 (2.0), answer 0 (0.5), answer 3 (0.0), answer 1 (-1.0).
    expected = -((2.0 - lse(2.0, 0.5, 0.0, -1.0)) + (0.5 - lse(0.5, 0.0, -1.0)) + (0.0 - lse(0.0, -1.0))) / 3
    assert pl([0.5, -1.0, 2.0, 0.0], [2, 4, 1, 3]) == pytest.approx(expected, abs=1e-6)
    # Ties: the two answers tied at rank 2 are never ordered against each other; only answer 0 beats any.
    assert pl([0.3, 1.0, -0.4], [1, 2, 2]) == pytest.approx(-(0.3 - lse(0.3, 1.0, -0.4)), abs=1e-6)
    # Answers 0 and 1 tie at the top: each competes with answer 2 only.
    assert pl([0.3, 1.0, -0.4], [1, 1, 2]) == pytest.approx((nll(0.3 + 0.4) + nll(1.0 + 0.4)) / 2, abs=1e-6)
    # K = 2: the pairwise loss.
    assert pl([0.2, 0.9], [2, 1]) == pytest.approx(nll(0.7), abs=1e-6)


def test_one_policy_pass_per_answer_and_the_reference_once_per_prompt(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    policy, reference = tiny_lm(tok, 0).train(), tiny_lm(tok, 0)
    rankings = [{"prompt": f"q{i}", "responses": [f"answer {j}" for j in range(k)], "ranks": list(range(1, k + 1))}
                for i, k in enumerate([4, 9, 6])]
    groups = encode_rankings(rankings, tok, 64, Counter())
    rows = {"policy": [], "reference": []}
    for name, model in (("policy", policy), ("reference", reference)):
        model.register_forward_hook(lambda m, args, out, name=name: rows[name].append(args[0].shape[0]))
    for _ in range(2):  # a second epoch over the same prompts reuses the reference's log-probs
        ids, labels = collate(groups, tok.pad_id, CPU)
        ref = reference_logps(reference, groups, ids, labels, CPU, "fp32")
        dpo_loss(answer_logps(policy, ids, labels, CPU, "fp32"), ref, groups, 0.1, "pairwise")[0].backward()
    assert rows == {"policy": [19, 19], "reference": [19]}  # K passes per prompt, not 2 * C(K, 2) = 2 * 57


def dpo_args(root, out, *extra, precision="fp32"):
    """Exactness tests (resume, 1 vs 2 processes) pin fp32 (as conftest.FP32 does); the learning test takes what
    `auto` picks."""
    return ["dpo", f"--policy={root / 'base'}", f"--data={root / 'rankings.jsonl'}", "--seq_len=64",
            "--batch_size=8", "--lr=1e-3", f"--precision={precision}", "--progress=false", f"--out={out}", *extra]


@pytest.mark.slow
def test_kill_9_mid_dpo_then_the_same_command_finishes_like_an_uninterrupted_run(tmp_path, models):
    common = ["--epochs=2", "--save_every=3", "--log_every=1"]
    reference = tmp_path / "reference"
    result = run_cli(*dpo_args(models, reference, *common))
    assert result.returncode == 0, result.stderr
    want = metric_rows(reference)
    assert want[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)  # step 0: policy = reference
    assert want[0]["train/chosen_reward"] == want[0]["train/implicit_kl"] == want[0]["train/reward_margin"] == 0

    out = tmp_path / "killed"
    kill_when(cli_command(*dpo_args(models, out, *common)),
              lambda: len(metric_rows(out)) >= 4 and (out / "train_state" / "latest").exists(), timeout=180)
    killed_at = len(metric_rows(out))
    assert not (out / "chatloop.json").exists() and 4 <= killed_at < want[-1]["step"]

    result = run_cli(*dpo_args(models, out, *common))
    assert result.returncode == 0, result.stderr
    assert "resuming from" in result.stdout
    got = metric_rows(out)
    assert [r["step"] for r in got] == [r["step"] for r in want]  # every step exactly once
    for a, b in zip(got, want):
        same = {k: v for k, v in b.items() if not k.startswith("perf/")}
        assert {k: a[k] for k in same} == pytest.approx(same, abs=1e-5), a["step"]
    final = json.loads((out / "chatloop.json").read_text())["metrics"]
    for key, value in json.loads((reference / "chatloop.json").read_text())["metrics"].items():
        assert final[key] == (pytest.approx(value, abs=1e-5) if isinstance(value, float) else value), key


@pytest.mark.parametrize("loss", ["pairwise", "plackett_luce"])
def test_training_on_a_simple_preference_raises_reward_accuracy(tmp_path, models, loss):
    """The rankings always put the red fox first (then blue, green, brown): held-out accuracy goes from 0
    (all margins 0 at the start) to near 1, and the policy's log-prob of the red answers rises."""
    out = tmp_path / loss
    result = run_cli(*dpo_args(models, out, "--epochs=2", "--log_every=1", f"--loss={loss}", "--beta=0.5",
                               precision="auto"))  # bf16 on AMX CPUs and GPUs, fp32 elsewhere
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "eval.json").read_text())
    assert report["reward_accuracy"] > 0.9 and report["reward_accuracy_by_k"] == {"4": report["reward_accuracy"]}
    assert report["loss"] < 0.5 * math.log(2 if loss == "pairwise" else 4)
    rows = metric_rows(out)
    assert rows[0]["train/reward_accuracy"] == 0 and rows[-1]["train/reward_accuracy"] > 0.9
    assert rows[-1]["train/chosen_reward"] > rows[-1]["train/rejected_reward"]
    assert rows[-1]["val/reward_accuracy"] == pytest.approx(report["reward_accuracy"], abs=1e-6)
    lineage = json.loads((out / "chatloop.json").read_text())
    assert lineage["stage"] == "dpo" and lineage["metrics"]["tied_pairs_skipped"] == 0


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
@pytest.mark.slow
def test_one_dpo_step_on_two_processes_equals_one_process(tmp_path, models, parallel):
    args = dpo_args(models, tmp_path / "one", "--max_steps=1", "--batch_size=3", "--grad_accum=2",
                    "--val_fraction=0.25")
    single(*args)
    torchrun(*args, f"--out={tmp_path / 'two'}", f"--parallel={parallel}")  # the last --out wins
    assert_same_step(weights(tmp_path / "one"), weights(tmp_path / "two"), weights(models / "base"))
    one, two = metric_rows(tmp_path / "one")[0], metric_rows(tmp_path / "two")[0]
    for key in ("train/loss", "train/reward_margin", "val/loss", "val/reward_accuracy", "val/implicit_kl"):
        assert one[key] == pytest.approx(two[key], abs=1e-5), key
