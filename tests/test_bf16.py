"""The bf16 path (autocast: what `precision: auto` picks on AMX CPUs and GPUs) on every machine: a few steps of
every training stage with --precision=bf16. Tiny sizes: without bf16 units the CPU emulates it, ~100x slower.

Tolerances come from bf16's precision: 8 bits of mantissa, a relative rounding error of up to 2^-8 per
operation, so results are compared relative to their own scale, never to 1e-5."""

import json
import math

import pytest
import torch

from chatloop.checkpoint import is_complete, load_model
from chatloop.tokenizer import Tokenizer
from chatloop.train.reward import reward_scores
from tests import test_resume
from tests.conftest import metric_rows, run_cli

models = test_resume.models  # the fixture: a tiny base model, a reward model, demonstrations, rankings, prompts

BF16 = "--precision=bf16"
BF16_EPS = 2.0**-8


def finite_metrics(out) -> list[dict]:
    rows = metric_rows(out)
    assert rows, f"{out}: no metrics"
    for row in rows:
        bad = {k: v for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)}
        assert not bad, (row["step"], bad)
    return rows


def test_pretrain_under_bf16_learns(tmp_path, tokenizer_dir, corpus_file):
    out = tmp_path / "pt"
    result = run_cli("pretrain", f"--tokenizer={tokenizer_dir}", f"--inputs={corpus_file}", f"--out={out}",
                     "--preset=tiny", "--model.n_layer=2", "--model.d_model=64", "--model.n_head=4", "--seq_len=32",
                     "--batch_size=8", "--max_steps=12", "--lr=3e-3", "--warmup_steps=2", "--progress=false",
                     "--log_every=1", "--eval_every=1000", BF16)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cpu bf16" in result.stdout or "cuda bf16" in result.stdout
    rows = finite_metrics(out)
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
    assert is_complete(out)


def test_sft_and_ppo_with_ptx_run_under_bf16(tmp_path, models, corpus_file):
    sft = tmp_path / "sft"
    result = run_cli("sft", f"--model={models / 'base'}", f"--data={models / 'demos.jsonl'}", f"--out={sft}",
                     "--epochs=1", "--max_steps=4", "--batch_size=8", "--seq_len=64", "--lr=1e-3", "--progress=false",
                     "--log_every=1", BF16)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [r["train/loss"] for r in finite_metrics(sft) if "train/loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0]
    ppo = tmp_path / "ppo"
    result = run_cli("ppo", f"--policy={sft}", f"--reward_model={models / 'rm'}",
                     f"--prompts={models / 'prompts.jsonl'}", f"--out={ppo}", "--iterations=2", "--batch_size=8",
                     "--minibatches=2", "--ppo_epochs=1",
                     "--max_new_tokens=8", "--max_prompt_tokens=40", "--lr=1e-4", "--warmup_steps=0",
                     f"--ptx_data={corpus_file}", "--ptx_coef=1", "--ptx_ratio=1", "--ptx_seq_len=16",
                     "--sample_every=0", "--progress=false", BF16)
    assert result.returncode == 0, result.stderr[-3000:]
    first = finite_metrics(ppo)[0]
    # The old log-probs are the fp32 sampling pass's, the new ones a bf16 forward's: the first minibatch's ratio
    # is 1 up to bf16 rounding (~2e-3 per token on the tiny world's SFT model; 1e-2 leaves room for this tiny one).
    assert first["policy/first_ratio_mean"] == pytest.approx(1.0, abs=1e-2)
    assert first["policy/ratio_mean"] == pytest.approx(1.0, abs=0.05)
    assert is_complete(ppo)


def test_rm_under_bf16_centres_its_reference_answers_in_either_precision(tmp_path, models):
    out = tmp_path / "rm"
    result = run_cli("rm", f"--model={models / 'base'}", f"--data={models / 'rankings.jsonl'}", f"--out={out}",
                     f"--reference={models / 'demos.jsonl'}", "--epochs=1", "--batch_size=8", "--seq_len=64",
                     "--lr=1e-3", "--progress=false", BF16)
    assert result.returncode == 0, result.stderr[-3000:]
    finite_metrics(out)
    assert json.loads((out / "eval.json").read_text())["pairs"] > 0
    tok = Tokenizer.load(out)
    rm = load_model(out).eval()
    demos = [json.loads(line)["messages"] for line in (models / "demos.jsonl").read_text().splitlines()]
    sequences = [tok.render_chat(m)[0] for m in demos]
    cpu = torch.device("cpu")
    with torch.no_grad():
        fp32 = reward_scores(rm, sequences, tok.pad_id, cpu, "fp32")
        bf16 = reward_scores(rm, sequences, tok.pad_id, cpu, "bf16")
    # The bias is computed in fp32 (the checkpoint's precision): exact there, within bf16 rounding under autocast,
    # measured against the scale of the scores themselves.
    scale = fp32.abs().max().item() + abs(rm.reward_bias)
    assert abs(fp32.mean().item()) < 1e-4 * max(1.0, scale)
    assert abs(bf16.mean().item()) < 8 * BF16_EPS * max(1.0, scale)
