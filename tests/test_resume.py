"""Kill -9 in the middle of SFT, RM and PPO, rerun the same command: every step appears once and the run ends
where an uninterrupted run ends (pretraining has its own, stricter test in test_pretrain.py)."""

import json
from pathlib import Path

import pytest
import torch

from chatloop.checkpoint import is_complete, save_model
from chatloop.model import GPT, GPTConfig
from chatloop.tokenizer import Tokenizer
from tests.conftest import FP32, assert_same_run, cli_command, kill_when, metric_rows, run_cli

COLORS = ["red", "blue", "green", "brown"]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("resume")
    tok = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(0)
    save_model(GPT(GPTConfig("llama", tok.vocab_size, 2, 4, 2, 64, max_seq_len=96)), root / "base", tok)
    save_model(GPT(GPTConfig("llama", tok.vocab_size, 2, 4, 2, 64, max_seq_len=96, head="scalar")), root / "rm", tok)
    demos = [{"messages": [{"role": "user", "content": f"Where does the {c} fox run {i}?"},
                           {"role": "assistant", "content": f"The {c} fox runs to the river."}]}
             for i in range(40) for c in COLORS]
    (root / "demos.jsonl").write_text("".join(json.dumps(d) + "\n" for d in demos))
    rankings = []
    for i in range(120):
        answers = [f"The {c} fox runs to the hill." for c in COLORS[i % 4:] + COLORS[: i % 4]]
        rankings.append({"prompt": f"Which fox is best {i % 7}?", "responses": answers,
                         "ranks": [1 + COLORS.index(a.split()[1]) for a in answers]})
    (root / "rankings.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rankings))
    prompts = [{"prompt": f"Where does the {c} fox run?", "user_id": f"u{i}"} for i, c in enumerate(COLORS * 8)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    return root


def stage_args(stage: str, root: Path, out: Path) -> list[str]:
    common = [f"--out={out}", "--progress=false", "--save_every=3", "--log_every=1", FP32]
    if stage == "sft":
        return ["sft", f"--model={root / 'base'}", f"--data={root / 'demos.jsonl'}", "--epochs=2", "--batch_size=8",
                "--seq_len=64", "--lr=1e-3", *common]
    if stage == "rm":
        return ["rm", f"--model={root / 'rm'}", f"--data={root / 'rankings.jsonl'}", "--epochs=2", "--batch_size=8",
                "--seq_len=64", "--lr=1e-3", *common]
    return ["ppo", f"--policy={root / 'base'}", f"--reward_model={root / 'rm'}", f"--prompts={root / 'prompts.jsonl'}",
            "--iterations=12", "--batch_size=8", "--minibatches=2", "--ppo_epochs=2", "--max_new_tokens=12",
            "--max_prompt_tokens=40", "--lr=1e-4", "--warmup_steps=2", "--sample_every=0", *common,
            *(["--algorithm=rloo", "--samples_per_prompt=2"] if stage == "ppo-rloo" else [])]


@pytest.mark.parametrize("stage, loss_key", [("sft", "train/loss"), ("rm", "train/loss"), ("ppo", "loss/policy"),
                                             ("ppo-rloo", "loss/policy")])
@pytest.mark.slow
def test_kill_9_mid_stage_then_the_same_command_finishes_like_an_uninterrupted_run(tmp_path, models, stage,
                                                                                    loss_key):
    reference = tmp_path / "reference"
    assert run_cli(*stage_args(stage, models, reference)).returncode == 0
    want = metric_rows(reference)

    out = tmp_path / "killed"
    kill_when(cli_command(*stage_args(stage, models, out)),
              lambda: len(metric_rows(out)) >= 4 and (out / "train_state" / "latest").exists(), timeout=180)
    killed_at = len(metric_rows(out))
    assert not is_complete(out) and 4 <= killed_at < want[-1]["step"]

    result = run_cli(*stage_args(stage, models, out))
    assert result.returncode == 0, result.stderr
    assert "resuming from" in result.stdout
    assert_same_run(out, reference, loss_key)
