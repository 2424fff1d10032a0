"""Supervised fine-tuning: masks, packing, truncation, bad input, and real training through the CLI."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from chatloop.data.readers import oasst_best_path, read_demonstrations
from chatloop.errors import UserError
from chatloop.model import GPT, GPTConfig
from chatloop.tokenizer import Tokenizer
from chatloop.train.sft import collate, pack_rows, render_examples, token_losses
from tests.conftest import need, run_cli

CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where does the red fox run?"},
     {"role": "assistant", "content": "To the river."}, {"role": "user", "content": "And the dog?"},
     {"role": "assistant", "content": "It stays on the hill."}],
    [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}],
    [{"role": "user", "content": "The big dog and the small fox run to the town."},
     {"role": "assistant", "content": "The brown fox jumps over the lazy dog and runs to the forest."}],
]


def test_labels_are_the_next_assistant_token_exactly_token_by_token(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    examples = render_examples(CONVERSATIONS[:1], tok, 512, "cut_prompt", Counter())
    ids, labels, _, _ = collate([[0]], examples, tok.pad_id, torch.device("cpu"))
    rendered, mask = tok.render_chat(CONVERSATIONS[0])
    for t in range(len(rendered)):
        expected = rendered[t + 1] if t + 1 < len(rendered) and mask[t + 1] else -100
        assert labels[0, t].item() == expected
    learned = tok.decode([rendered[t + 1] for t in range(len(rendered) - 1) if mask[t + 1]], False)
    assert learned == " To the river.<|end|> It stays on the hill.<|end|>"


def test_packing_gives_the_same_per_example_loss_as_no_packing(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(0)
    model = GPT(GPTConfig("llama", tok.vocab_size, 2, 4, 2, 64, max_seq_len=256)).eval()
    examples = render_examples(CONVERSATIONS * 2, tok, 256, "cut_prompt", Counter())
    cpu = torch.device("cpu")

    def per_example(rows):
        ids, labels, pos, mask = collate(rows, examples, tok.pad_id, cpu)
        with torch.no_grad():
            losses = token_losses(model, ids, labels, pos, mask, cpu, "fp32")
        out = {}
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                n = len(examples[i].ids)
                out[i] = losses[r, at : at + n].sum().item() / (labels[r, at : at + n] != -100).sum().item()
                at += n
        return out

    packed_rows = pack_rows(np.arange(len(examples)), [len(e.ids) for e in examples], 256, packing=True)
    assert any(len(r) > 1 for r in packed_rows)
    packed = per_example(packed_rows)
    alone = per_example([[i] for i in range(len(examples))])
    for i in alone:
        assert packed[i] == pytest.approx(alone[i], abs=1e-4)


def test_truncation_cuts_the_prompt_or_drops_never_the_answer(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    long_prompt = [{"role": "user", "content": "The red fox runs to the river. " * 10},
                   {"role": "assistant", "content": "Blue."}]
    long_answer = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "The dog runs. " * 20}]
    n_answer = len(tok.render_chat(long_prompt)[0]) - sum(1 for m in tok.render_chat(long_prompt)[1] if not m)
    report = Counter()
    kept = render_examples([long_prompt, long_answer], tok, 24, "cut_prompt", report)
    assert report == Counter({"prompt cut": 1, "dropped (too long)": 1})
    assert len(kept) == 1 and len(kept[0].ids) == 24
    assert sum(kept[0].mask) == n_answer  # the whole answer survived
    report = Counter()
    assert render_examples([long_prompt], tok, 24, "drop", report) == [] and report["dropped (too long)"] == 1


@pytest.mark.parametrize(
    "record, message",
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "expected the last message to be from the assistant"),
        ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"},
                       {"role": "assistant", "content": "c"}]}, "expected 'user'"),
        ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "a"}]},
         "[0].content': expected a non-empty string"),
        ({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "a"}]},
         "[0].role': expected one of system, user, assistant"),
    ],
)
def test_bad_records_name_file_line_and_field_or_are_skipped_and_counted(tmp_path, record, message):
    path = tmp_path / "demos.jsonl"
    good = {"messages": CONVERSATIONS[1]}
    path.write_text("\n".join(json.dumps(r) for r in (good, record, good)) + "\n")
    with pytest.raises(UserError) as error:
        read_demonstrations(path)
    assert "demos.jsonl:2: field 'messages" in str(error.value) and message in str(error.value)
    skipped = Counter()
    assert len(read_demonstrations(path, skip_invalid=True, skipped=skipped)) == 2
    assert sum(skipped.values()) == 1


def test_prompt_completion_pairs_and_openassistant_best_path(tmp_path):
    path = tmp_path / "pc.jsonl"
    path.write_text(json.dumps({"prompt": "Name a color.", "completion": "Blue."}) + "\n")
    assert read_demonstrations(path) == [[{"role": "user", "content": "Name a color."},
                                          {"role": "assistant", "content": "Blue."}]]
    tree = {"role": "prompter", "text": "Q1", "replies": [
        {"role": "assistant", "text": "worse", "rank": 1, "replies": []},
        {"role": "assistant", "text": "best", "rank": 0, "replies": [
            {"role": "prompter", "text": "Q2", "replies": [
                {"role": "assistant", "text": "only", "rank": None, "replies": []}]}]}]}
    assert [m["content"] for m in oasst_best_path(tree)] == ["Q1", "best", "Q2", "only"]


def test_an_imported_chat_template_is_used_with_masks_from_its_own_rendering(tokenizer_dir, tmp_path):
    tok = Tokenizer.load(tokenizer_dir)
    tok.chat_template = ("{% for m in messages %}{{ '### ' + m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '### assistant: ' }}{% endif %}")
    ids, mask = tok.render_chat(CONVERSATIONS[1])
    assert tok.decode(ids, False) == "### user: Name a color.\n### assistant: Blue.\n"
    assert tok.decode([i for i, m in zip(ids, mask) if m], False) == "Blue.\n"


@pytest.mark.slow
def test_sft_on_dolly_lowers_validation_loss(tmp_path, shared_data):
    dolly = need(shared_data / "sft" / "dolly-2k-chat" / "dolly_2k_chat.jsonl")
    subset = tmp_path / "dolly.jsonl"
    subset.write_text("".join(dolly.read_text(encoding="utf-8").splitlines(keepends=True)[:400]))
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(m["content"] for c in read_demonstrations(subset) for m in c))
    assert run_cli("tokenizer", f"--inputs={text}", f"--out={tmp_path / 'tok'}", "--vocab_size=1024").returncode == 0
    pre = run_cli("pretrain", f"--tokenizer={tmp_path / 'tok'}", f"--inputs={text}", f"--out={tmp_path / 'pt'}",
                  "--model.n_layer=2", "--model.d_model=96", "--model.n_head=4", "--seq_len=256", "--batch_size=8",
                  "--max_steps=40", "--progress=false")
    assert pre.returncode == 0, pre.stderr
    out = tmp_path / "sft"
    result = run_cli("sft", f"--model={tmp_path / 'pt'}", f"--data={subset}", f"--out={out}", "--seq_len=256",
                     "--epochs=2", "--lr=1e-3", "--batch_size=8", "--progress=false", "--val_fraction=0.1")
    assert result.returncode == 0, result.stderr
    epochs = json.loads((out / "chatloop.json").read_text())["metrics"]["epochs"]
    assert epochs[-1]["val/loss"] < epochs[0]["val/loss"] - 0.2  # epoch 0 is before fine-tuning
    assert (out / "epochs" / "epoch-1" / "model.safetensors").is_file()
    assert "prompt cut" in result.stdout or "truncation" not in result.stdout
