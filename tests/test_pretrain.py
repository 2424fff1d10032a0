"""Pretraining end to end through the CLI: learning, kill -9 and resume, bad input."""

import json
from pathlib import Path

import pytest

from chatloop.checkpoint import is_complete, load_model
from tests.conftest import FP32, cli_command, kill_when, metric_rows, run_cli

TINY = ["--preset=tiny", "--model.n_layer=2", "--model.d_model=64", "--model.n_head=4", "--seq_len=32",
        "--batch_size=8", "--progress=false", "--warmup_steps=5", "--lr=3e-3"]


def pretrain_args(tokenizer_dir, corpus_file, out, *extra):
    return ["pretrain", f"--tokenizer={tokenizer_dir}", f"--inputs={corpus_file}", f"--out={out}", *TINY, *extra]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_pretraining_learns_and_writes_a_complete_checkpoint(tmp_path, tokenizer_dir, corpus_file):
    out = tmp_path / "pt"
    result = run_cli(*pretrain_args(tokenizer_dir, corpus_file, out, "--max_steps=60", "--eval_every=20"))
    assert result.returncode == 0, result.stderr
    rows = metrics(out)
    val = [r["val/loss"] for r in rows if "val/loss" in r]
    lineage = json.loads((out / "chatloop.json").read_text())
    assert val[-1] < val[0] - 1.0
    assert val[-1] < 0.5 * lineage["metrics"]["unigram_entropy_nats"]
    assert lineage["data"][0]["sha256"] and lineage["config"]["max_steps"] == 60
    assert all(k in rows[-1] for k in ("train/loss", "perf/tokens_per_s", "perf/mfu", "val/ppl"))
    assert list((out / "tb").iterdir())  # TensorBoard events
    assert load_model(out).cfg.n_layer == 2
    # A finished stage is skipped when run again.
    again = run_cli(*pretrain_args(tokenizer_dir, corpus_file, out, "--max_steps=60"))
    assert again.returncode == 0 and "already finished" in again.stdout


@pytest.mark.slow
def test_kill_9_then_the_same_command_continues_with_the_same_batches_and_losses(tmp_path, tokenizer_dir,
                                                                                  corpus_file):
    common = ["--max_steps=60", "--save_every=7", "--log_every=1", "--eval_every=1000", FP32]
    reference = tmp_path / "reference"
    assert run_cli(*pretrain_args(tokenizer_dir, corpus_file, reference, *common)).returncode == 0

    out = tmp_path / "killed"
    kill_when(cli_command(*pretrain_args(tokenizer_dir, corpus_file, out, *common)),
              lambda: len(metric_rows(out)) >= 25, timeout=120)
    assert not is_complete(out)
    killed_at = len(metric_rows(out))
    assert 25 <= killed_at < 60

    result = run_cli(*pretrain_args(tokenizer_dir, corpus_file, out, *common))
    assert result.returncode == 0, result.stderr
    assert "resuming from step" in result.stdout
    got, want = metrics(out), metrics(reference)
    assert [r["step"] for r in got] == list(range(1, 61))  # every step exactly once
    assert [r["data/sample_index"] for r in got] == [r["data/sample_index"] for r in want]
    for a, b in zip(got, want):
        assert a["train/loss"] == pytest.approx(b["train/loss"], abs=1e-5)
    assert json.loads((out / "chatloop.json").read_text())["metrics"]["val/loss"] == pytest.approx(
        json.loads((reference / "chatloop.json").read_text())["metrics"]["val/loss"], abs=1e-5)


@pytest.mark.parametrize(
    "setup, args, message",
    [
        (None, ["--inputs=missing.txt"], "missing.txt: file not found"),
        (b"", ["--inputs=empty.txt"], "empty.txt: file is empty"),
        (b"\xff\xfe bad bytes\n", ["--inputs=bad.txt"], "bad.txt:1: not UTF-8"),
        (None, ["--inputs=x.txt", "--no_such_field=3"], "unknown field 'no_such_field'"),
        (None, ["--inputs=x.txt", "--max_steps=many"], "--max_steps: expected an integer, got 'many'"),
        (None, ["--inputs=x.txt", "--preset=gpt5"], "unknown model preset 'gpt5'"),
    ],
)
def test_bad_input_gives_one_clear_line_and_writes_nothing(tmp_path, tokenizer_dir, setup, args, message):
    names = {"--inputs=empty.txt": "empty.txt", "--inputs=bad.txt": "bad.txt"}
    for arg in args:
        if arg in names:
            (tmp_path / names[arg]).write_bytes(setup)
    (tmp_path / "x.txt").write_text("some text\n" * 100)
    out = tmp_path / "out"
    result = run_cli("pretrain", f"--tokenizer={tokenizer_dir}", f"--out={out}", *args, "--max_steps=2",
                     cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not out.exists() or not (out / "model.safetensors").exists()


def test_a_checkpoint_missing_a_file_is_a_clear_error(tmp_path, tokenizer_dir, corpus_file):
    out = tmp_path / "pt"
    assert run_cli(*pretrain_args(tokenizer_dir, corpus_file, out, "--max_steps=2")).returncode == 0
    (out / "model.safetensors").unlink()
    result = run_cli("generate", f"--model={out}", "--prompts=The red")
    assert result.returncode == 2 and "model.safetensors is missing (written by the pretrain stage)" in result.stderr


@pytest.mark.slow
def test_generate_prints_samples_reproducibly(tmp_path, tokenizer_dir, corpus_file):
    out = tmp_path / "pt"
    assert run_cli(*pretrain_args(tokenizer_dir, corpus_file, out, "--max_steps=40")).returncode == 0
    args = ["generate", f"--model={out}", "--prompts", "The red fox", "The blue", "--max_new_tokens=12",
            "--top_k=5", "--top_p=0.9", "--temperature=0.8", "--seed=3"]
    first, second = run_cli(*args), run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and "The red fox" in first.stdout


def test_length_grouped_order_is_a_seeded_permutation_of_batches_of_similar_length():
    import numpy as np

    from chatloop.train.trainer import length_grouped_order

    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 300, size=1000).tolist()
    order = length_grouped_order(lengths, seed=1, epoch=2, batch_size=8)
    assert sorted(order.tolist()) == list(range(1000))  # every example once
    assert (order == length_grouped_order(lengths, seed=1, epoch=2, batch_size=8)).all()  # resumable
    assert not (order == length_grouped_order(lengths, seed=1, epoch=3, batch_size=8)).all()  # reshuffled per epoch
    padded = sum(8 * max(lengths[i] for i in order[b : b + 8]) for b in range(0, 1000, 8))
    shuffled = rng.permutation(1000)
    padded_random = sum(8 * max(lengths[i] for i in shuffled[b : b + 8]) for b in range(0, 1000, 8))
    assert padded < 0.7 * padded_random  # batches pad to their own lengths
