"""Reward model: the grouped K-wise loss, one forward pass per response, ties, normalisation, parity."""

import json
import math
import shutil
from collections import Counter

import pytest
import torch

from chatloop.checkpoint import load_model, save_model
from chatloop.data.formats import ranking_pairs
from chatloop.data.readers import hh_ranking, oasst_rankings, read_rankings
from chatloop.errors import UserError
from chatloop.model import GPT, GPTConfig
from chatloop.tokenizer import Tokenizer
from chatloop.train.reward import RMGroup, encode_rankings, grouped_loss, reward_scores
from chatloop.train.trainer import load_state
from tests.conftest import FP32, need, need_module, run_cli


def test_grouped_loss_equals_the_mean_of_pairwise_losses_on_a_hand_computed_case():
    rewards = torch.tensor([2.0, 0.0, 1.0, 5.0, 4.0])  # prompt A: 3 responses; prompt B: 2
    a = RMGroup([[1]] * 3, [1, 3, 2], ranking_pairs([1, 3, 2]))
    b = RMGroup([[1]] * 2, [2, 1], ranking_pairs([2, 1]))

    def nll(margin):
        return math.log(1 + math.exp(-margin))

    # A: pairs (0 > 1): 2, (0 > 2): 1, (2 > 1): 1; B: (0 > 1) since rank 1 is best: 5 - 4 = 1... reversed: 4 - 5
    expected_a = (nll(2.0) + nll(1.0) + nll(1.0)) / 3
    expected_b = nll(4.0 - 5.0)
    loss, correct, total = grouped_loss(rewards, [a, b])
    assert loss.item() == pytest.approx((expected_a + expected_b) / 2, abs=1e-6)
    assert (correct, total) == (3, 4)


def test_k2_reduces_to_the_pairwise_bradley_terry_loss():
    rewards = torch.tensor([0.3, -1.2])
    loss, _, _ = grouped_loss(rewards, [RMGroup([[1], [2]], [1, 2], ranking_pairs([1, 2]))])
    assert loss.item() == pytest.approx(-torch.nn.functional.logsigmoid(torch.tensor(1.5)).item(), abs=1e-6)


def test_ties_produce_no_pair_and_all_tied_prompts_are_dropped(tokenizer_dir):
    assert ranking_pairs([1, 2, 2, 3]) == [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]
    tok = Tokenizer.load(tokenizer_dir)
    groups = encode_rankings([{"prompt": "q", "responses": ["a", "b"], "ranks": [1, 1]},
                              {"prompt": "q", "responses": ["a", "b", "c"], "ranks": [2, 1, 2]}], tok, 64)
    assert len(groups) == 1 and groups[0].pairs == [(1, 0), (1, 2)]


def test_an_over_long_response_is_cut_but_keeps_its_end_of_turn_token(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    long, short = "the red fox runs " * 40, "the red fox"
    groups = encode_rankings([{"prompt": "where does the fox run?", "responses": [long, short], "ranks": [2, 1]}],
                             tok, 32)
    cut, whole = groups[0].sequences
    assert len(cut) == 32 and cut[-1] == tok.end_of_turn_id  # the reward is read at an end of turn
    assert cut[1:-1] == tok.encode_reply(long)[: 30] and cut[0] == tok.render_chat(
        [{"role": "user", "content": "where does the fox run?"}], add_generation_prompt=True)[0][-1]
    short_ids = tok.encode_reply(short)
    assert whole[-1] == tok.end_of_turn_id and whole[-len(short_ids) - 1 : -1] == short_ids


def test_exactly_one_forward_pass_per_response(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    model = GPT(GPTConfig("llama", tok.vocab_size, 1, 2, 2, 32, max_seq_len=64, head="scalar"))
    rankings = [{"prompt": f"q{i}", "responses": [f"answer {j}" for j in range(k)], "ranks": list(range(1, k + 1))}
                for i, k in enumerate([4, 9, 6])]
    groups = encode_rankings(rankings, tok, 64)
    rows = []
    handle = model.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    rewards = reward_scores(model, [s for g in groups for s in g.sequences], tok.pad_id, torch.device("cpu"))
    grouped_loss(rewards, groups)[0].backward()
    handle.remove()
    assert rows == [4 + 9 + 6]  # one pass, one row per response: K passes, not 2 * C(K, 2) = 2 * (6 + 36 + 15)


def test_reward_is_read_at_the_last_real_token_not_a_pad(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(0)
    model = GPT(GPTConfig("llama", tok.vocab_size, 1, 2, 2, 32, max_seq_len=64, head="scalar")).eval()
    seqs = [[5, 6, 7], [5, 6, 7, 8, 9]]
    with torch.no_grad():
        batched = reward_scores(model, seqs, tok.pad_id, torch.device("cpu"))
        alone = [model(torch.tensor([s]))[0, -1].item() for s in seqs]
    assert batched.tolist() == pytest.approx(alone, abs=1e-5)


def test_importers_of_openassistant_and_hh():
    tree = {"role": "prompter", "text": "Q", "replies": [
        {"role": "assistant", "text": "b", "rank": 1, "replies": [
            {"role": "prompter", "text": "Q2", "replies": [
                {"role": "assistant", "text": "x", "rank": 0, "replies": []},
                {"role": "assistant", "text": "y", "rank": 1, "replies": []}]}]},
        {"role": "assistant", "text": "a", "rank": 0, "replies": []}]}
    found = list(oasst_rankings(tree))
    assert [(r["responses"], r["ranks"]) for r in found] == [(["b", "a"], [2, 1]), (["x", "y"], [1, 2])]
    assert [m["content"] for m in found[1]["prompt"]] == ["Q", "b", "Q2"]  # context at depth
    pair = hh_ranking({"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go"},
                      "x:1")
    assert pair == {"prompt": [{"role": "user", "content": "hi"}], "responses": ["hello", "go"], "ranks": [1, 2]}


def test_shared_preference_data_imports(shared_data):
    oa = read_rankings(need(shared_data / "preference" / "oasst-en-100-trees" / "en_100_tree.jsonl.gz"))
    assert len(oa) >= 150 and max(len(r["responses"]) for r in oa) >= 5
    path = need(shared_data / "preference" / "hh-rlhf-test" / "helpful-base" / "test.jsonl.gz")
    with pytest.raises(UserError, match=r"test.jsonl.gz:\d+: field 'prompt\[\d+\].content'"):
        read_rankings(path)  # real data has empty turns: named by line and field
    skipped = Counter()
    hh = read_rankings(path, skip_invalid=True, skipped=skipped)
    assert len(hh) > 2000 and all(len(r["responses"]) == 2 for r in hh) and 0 < sum(skipped.values()) < 100


def red_fox_task(tmp_path, tok: Tokenizer):
    """A tiny base model, rankings where answers about the red fox beat the others, and demonstrations:
    (base, rankings file, demonstrations file, rankings, demonstrations)."""
    base = tmp_path / "base"
    torch.manual_seed(0)
    save_model(GPT(GPTConfig("llama", tok.vocab_size, 2, 4, 2, 64, max_seq_len=64)), base, tok)
    colors = ["red", "blue", "green", "brown"]
    rankings, demos = [], []
    for i in range(160):
        answers = [f"The {c} fox runs to the river." for c in colors]
        rankings.append({"prompt": f"Which fox is best {i % 7}?", "responses": answers[i % 4:] + answers[: i % 4],
                         "ranks": [1 if a.startswith("The red") else 2 for a in answers[i % 4:] + answers[: i % 4]]})
        demos.append({"messages": [{"role": "user", "content": "Which fox?"},
                                   {"role": "assistant", "content": answers[i % 4]}]})
    data, ref = tmp_path / "rankings.jsonl", tmp_path / "demos.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rankings))
    ref.write_text("".join(json.dumps(d) + "\n" for d in demos))
    return base, data, ref, rankings, demos


def test_trained_rm_learns_normalises_and_opens_in_transformers(tmp_path, tokenizer_dir):
    """A tiny model learns a rule (answers about the red fox beat the others), then the bias centres the
    reference answers at 0 and transformers reproduces the raw scores."""
    tok = Tokenizer.load(tokenizer_dir)
    base, data, ref, rankings, demos = red_fox_task(tmp_path, tok)
    out = tmp_path / "rm"
    result = run_cli("rm", f"--model={base}", f"--data={data}", f"--out={out}", f"--reference={ref}", "--epochs=3",
                     "--lr=3e-3", "--batch_size=8", "--seq_len=64", "--progress=false", FP32)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "eval.json").read_text())
    assert report["accuracy"] > 0.9 and report["accuracy_by_k"] == {"4": report["accuracy"]}
    rm = load_model(out)
    sequences = [tok.render_chat(d["messages"])[0] for d in demos]
    scores = reward_scores(rm, sequences, tok.pad_id, torch.device("cpu"))
    assert abs(scores.mean().item()) < 1e-3  # the bias centres the reference answers
    # The gain: the K answers to one prompt spread with std 1 (all these prompts are alike, held out or not).
    groups = encode_rankings(rankings, tok, 64)
    spreads = [reward_scores(rm, g.sequences, tok.pad_id, torch.device("cpu")).std().item() for g in groups]
    assert sum(spreads) / len(spreads) == pytest.approx(1.0, abs=0.05)
    assert json.loads((out / "chatloop.json").read_text())["metrics"]["reward_gain"] != 1.0
    transformers = need_module("transformers")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        raw = hf(input_ids=torch.tensor([sequences[0]])).logits[0, 0].item()
    assert raw + rm.reward_bias == pytest.approx(scores[0].item(), abs=1e-4)
    # A reward model continued from this one (a later round's, `chatloop run --later_rm_epochs`) is normalised
    # afresh: its bias is measured without the bias it started with.
    again = tmp_path / "rm-continued"
    result = run_cli("rm", f"--model={out}", f"--data={data}", f"--out={again}", f"--reference={ref}", "--epochs=1",
                     "--lr=3e-3", "--batch_size=8", "--seq_len=64", "--progress=false", FP32)
    assert result.returncode == 0, result.stderr
    continued = reward_scores(load_model(again), sequences, tok.pad_id, torch.device("cpu"))
    assert abs(continued.mean().item()) < 1e-3 and json.loads((again / "eval.json").read_text())["accuracy"] > 0.9


@pytest.mark.slow
def test_members_train_apart_and_are_averaged_weight_by_weight(tmp_path, tokenizer_dir):
    """--members 2: two reward models (their own head initialisation and data order) whose weights, averaged, are
    the saved model's (the head's times the normalising gain); the average still learns the rule."""
    tok = Tokenizer.load(tokenizer_dir)
    base, data, ref, _, _ = red_fox_task(tmp_path, tok)
    out = tmp_path / "rm"
    result = run_cli("rm", f"--model={base}", f"--data={data}", f"--out={out}", f"--reference={ref}", "--epochs=2",
                     "--lr=3e-3", "--batch_size=8", "--seq_len=64", "--progress=false", "--members=2", FP32)
    assert result.returncode == 0, result.stderr
    assert "x 2 members (averaged)" in result.stdout
    members = [load_state(out / "members" / str(i), torch.device("cpu"))["model"] for i in range(2)]
    final = load_model(out).state_dict()
    gain = json.loads((out / "chatloop.json").read_text())["metrics"]["reward_gain"]
    assert max((members[0][k] - members[1][k]).abs().max().item() for k in final) > 1e-2  # they differ
    for k in final:
        mean = (members[0][k] + members[1][k]) / 2 * (gain if k == "score.weight" else 1.0)
        assert torch.allclose(final[k], mean, atol=1e-6), k
    assert json.loads((out / "eval.json").read_text())["accuracy"] > 0.9
    # Interrupted during the second member: the first is not trained again, and the result is the same.
    (out / "chatloop.json").unlink()
    shutil.rmtree(out / "members" / "1")
    again = run_cli("rm", f"--model={base}", f"--data={data}", f"--out={out}", f"--reference={ref}", "--epochs=2",
                    "--lr=3e-3", "--batch_size=8", "--seq_len=64", "--progress=false", "--members=2", FP32)
    assert again.returncode == 0, again.stderr
    assert "rm member 0: resuming from step 36 of 36" in again.stdout
    assert all(torch.equal(final[k], load_model(out).state_dict()[k]) for k in final)


@pytest.mark.slow
def test_val_data_is_used_as_given_and_skip_invalid_still_splits(tmp_path, tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    base = tmp_path / "base"
    save_model(GPT(GPTConfig("llama", tok.vocab_size, 1, 2, 2, 32, max_seq_len=64)), base, tok)
    good = {"prompt": "q", "responses": ["the red fox", "the dog"], "ranks": [1, 2]}
    data, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    data.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "", "responses": ["a", "b"], "ranks": [1, 2]})
                    + "\n" + "".join(json.dumps({**good, "prompt": f"q{i}"}) + "\n" for i in range(9)))
    val.write_text((json.dumps(good) + "\n") * 7)
    common = ["--epochs=1", "--batch_size=4", "--seq_len=64", "--progress=false"]
    given = run_cli("rm", f"--model={base}", f"--data={data}", f"--val_data={val}", "--skip_invalid",
                    f"--out={tmp_path / 'a'}", *common)
    assert given.returncode == 0, given.stderr
    assert json.loads((tmp_path / "a" / "eval.json").read_text())["prompts"] == 7
    # `chatloop rm-eval` reports the trained model's held-out numbers again, and refuses a model without a scalar head.
    again = run_cli("rm-eval", f"--model={tmp_path / 'a'}", f"--data={val}", f"--out={tmp_path / 'again.json'}",
                    "--seq_len=64")
    assert again.returncode == 0, again.stderr
    first, second = (json.loads(p.read_text()) for p in (tmp_path / "a" / "eval.json", tmp_path / "again.json"))
    assert second["prompts"] == 7 and second["accuracy"] == first["accuracy"] and second["pairs"] == first["pairs"]
    refused = run_cli("rm-eval", f"--model={base}", f"--data={val}")
    assert refused.returncode == 2 and "not a reward model" in refused.stderr
    split = run_cli("rm", f"--model={base}", f"--data={data}", "--skip_invalid", "--val_fraction=0.2",
                    f"--out={tmp_path / 'b'}", *common)
    assert split.returncode == 0, split.stderr  # skipped records used to leave the split undone
    assert "skipped 1 invalid record" in split.stdout
    assert json.loads((tmp_path / "b" / "eval.json").read_text())["prompts"] == 2  # 2 of the 10 conversations


def test_the_held_out_split_keeps_each_conversation_on_one_side():
    from chatloop.train.reward import split_by_conversation

    def tree(root: str, depth: int) -> dict:  # a ranking deeper in a conversation that starts with `root`
        messages = [{"role": "user", "content": root}] + [
            {"role": r, "content": f"{root} turn {i}"} for i, r in enumerate(["assistant", "user"] * depth)]
        return {"prompt": messages if depth else root, "responses": ["a", "b"], "ranks": [1, 2]}

    rankings = [tree(f"conversation {c}", depth) for c in range(20) for depth in range(3)]
    train, held = split_by_conversation(rankings, 0.25, seed=0)
    assert len(held) == 5 * 3 and len(train) + len(held) == len(rankings)
    roots = {json.dumps(r["prompt"] if isinstance(r["prompt"], str) else r["prompt"][0]["content"]) for r in held}
    assert len(roots) == 5
    assert not roots & {json.dumps(r["prompt"] if isinstance(r["prompt"], str) else r["prompt"][0]["content"])
                        for r in train}
    assert split_by_conversation(rankings, 0.25, seed=0) == (train, held)  # deterministic
    one = [tree("the only one", 0), tree("the only one", 1)]
    assert split_by_conversation(one, 0.5, seed=0) == (one, [])  # never hold out everything
