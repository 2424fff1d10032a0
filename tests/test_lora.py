"""LoRA adapters (peft) in SFT, RM, DPO and PPO on a tiny model: the chain of adapter checkpoints, peft's own loader
on the transformers model of the base, one copy of the weights for policy and reference, kill -9 resume."""

import json

import pytest
import torch

from chatloop.checkpoint import is_complete, load_model
from chatloop.lora import adapter_of
from chatloop.model import last_token_values
from chatloop.train.ppo import PPOConfig, load_models
from tests import test_resume
from tests.conftest import FP32, assert_same_run, cli_command, kill_when, metric_rows, run_cli

models = test_resume.models  # the fixture: a tiny base model, demonstrations, K = 4 rankings (red > blue > ...)
LORA = ["--lora_rank=4", "--lora_alpha=8"]


def stage(name: str, root, out, *extra: str) -> list[str]:
    common = [f"--out={out}", "--progress=false", "--log_every=1", FP32, *LORA, *extra]
    if name == "sft":
        return ["sft", f"--model={root / 'base'}", f"--data={root / 'demos.jsonl'}", "--epochs=2", "--batch_size=8",
                "--seq_len=64", "--lr=3e-3", "--save_every=3", *common]
    if name == "rm":
        return ["rm", f"--model={out.parent / 'sft'}", f"--data={root / 'rankings.jsonl'}", "--epochs=1",
                "--batch_size=8", "--seq_len=64", "--lr=3e-3", "--save_every=3", *common]
    if name == "dpo":
        return ["dpo", f"--policy={out.parent / 'sft'}", f"--data={root / 'rankings.jsonl'}", "--epochs=1",
                "--batch_size=8", "--seq_len=64", "--lr=3e-3", "--save_every=3", *common]
    return ["ppo", f"--policy={out.parent / 'sft'}", f"--reward_model={out.parent / 'rm'}",
            f"--prompts={root / 'prompts.jsonl'}", "--iterations=4", "--batch_size=8", "--minibatches=2",
            "--ppo_epochs=1", "--max_new_tokens=12", "--max_prompt_tokens=40", "--lr=3e-3", "--warmup_steps=0",
            "--sample_every=0", "--save_every=2", *common]


@pytest.fixture(scope="module")
def chain(tmp_path_factory, models):
    """SFT, then RM and DPO from the SFT adapter, then PPO from both adapters: every stage with --lora_rank=4."""
    runs = tmp_path_factory.mktemp("lora")
    for name in ("sft", "rm", "dpo", "ppo"):
        result = run_cli(*stage(name, models, runs / name))
        assert result.returncode == 0, result.stderr[-3000:]
    return runs


@pytest.mark.parametrize("name", ["sft", "rm", "dpo", "ppo"])
def test_each_stage_writes_an_adapter_of_its_base_and_small_train_states(chain, models, name):
    out = chain / name
    assert is_complete(out)
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    lineage = json.loads((out / "chatloop.json").read_text())
    base = models / "base" if name == "sft" else chain / "sft"
    assert (out / lineage["adapter"]["base"]).resolve() == base.resolve()
    assert lineage["adapter"]["rank"] == 4
    full = (models / "base" / "model.safetensors").stat().st_size
    assert (out / "adapter_model.safetensors").stat().st_size < full / 4
    states = list((out / "train_state").glob("step-*/state.pt"))
    assert states and all(s.stat().st_size < full for s in states)  # adapters and their AdamW moments only
    model = load_model(out)
    assert adapter_of(model) is None and "blocks.0.attn.qkv.weight" in model.state_dict()  # merged on load


def test_training_moved_the_weights_and_the_reward_model_ranks_its_training_data(chain, models):
    base, sft = load_model(models / "base"), load_model(chain / "sft")
    assert not torch.equal(base.blocks[0].attn.qkv.weight, sft.blocks[0].attn.qkv.weight)
    assert torch.equal(base.tok_emb.weight, sft.tok_emb.weight)  # not a target: untouched
    report = json.loads((chain / "rm" / "chatloop.json").read_text())["metrics"]
    assert report["val/accuracy"] > 0.6  # red > blue > green > brown, learned through an adapter and the head


def test_peft_opens_the_adapters_on_the_transformers_models_of_their_base(chain, tmp_path, models):
    """peft's own loader on transformers' model of the base gives our logits (SFT) and our scores (RM)."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    ids = torch.tensor([[5, 17, 42, 7, 99, 3, 11, 60], [8, 1, 2, 3, 4, 5, 6, 7]])

    theirs = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(models / "base", dtype=torch.float32), chain / "sft").eval()
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
        ours = load_model(chain / "sft")(ids)
    assert (ours - want).abs().max().item() < 1e-4

    # The RM's base is the SFT adapter: merged into a full checkpoint (`chatloop export`) for transformers.
    from chatloop.checkpoint import save_model
    from chatloop.tokenizer import Tokenizer

    merged_sft = tmp_path / "sft-merged"
    save_model(load_model(chain / "sft", head="scalar"), merged_sft, Tokenizer.load(chain / "sft"))
    rm_base = transformers.AutoModelForSequenceClassification.from_pretrained(merged_sft, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(rm_base, chain / "rm").eval()
    rm = load_model(chain / "rm")
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = theirs(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        ours = last_token_values(rm(ids), mask)
    assert (ours - want).abs().max().item() < 1e-4


def test_ppo_starts_at_kl_zero_and_its_reward_model_is_the_value_model_with_the_adapter_off(chain, models):
    rows = metric_rows(chain / "ppo")
    assert abs(rows[0]["objective/kl"]) < 1e-6  # iteration 1: the policy is its reference (B = 0)
    assert rows[-1]["objective/kl"] != 0.0

    cfg = PPOConfig(policy=str(chain / "sft"), reward_model=str(chain / "rm"), prompts=["-"], lora_rank=4)
    policy, reference, reward_model, value_model = load_models(cfg, torch.device("cpu"))
    assert reward_model.model is value_model and reference.model is policy  # one copy of each base's weights
    for model in (policy, value_model):  # train the adapters (and the value head's copy) a little, by hand
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.05)
    ids = torch.tensor([[5, 17, 42, 7, 99, 3, 11, 60]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        rm, sft = load_model(chain / "rm"), load_model(chain / "sft")
        assert reward_model.reward(ids, mask).item() == pytest.approx(rm.reward(ids, mask).item(), abs=1e-5)
        assert (reference(ids) - sft(ids)).abs().max().item() < 1e-5
        assert (policy(ids) - sft(ids)).abs().max().item() > 1e-3
        assert abs(last_token_values(value_model(ids), mask).item() - rm.reward(ids, mask).item()) > 1e-3


def test_kill_9_mid_lora_sft_then_the_same_command_finishes_like_an_uninterrupted_run(tmp_path, models):
    reference = tmp_path / "reference" / "sft"
    assert run_cli(*stage("sft", models, reference)).returncode == 0
    out = tmp_path / "killed" / "sft"
    kill_when(cli_command(*stage("sft", models, out)),
              lambda: len(metric_rows(out)) >= 4 and (out / "train_state" / "latest").exists(), timeout=180)
    assert not is_complete(out)
    result = run_cli(*stage("sft", models, out))
    assert result.returncode == 0, result.stderr
    assert "resuming from" in result.stdout
    assert_same_run(out, reference, "train/loss")


def test_a_state_saved_with_other_lora_fields_is_refused_by_name(tmp_path, models):
    out = tmp_path / "sft"
    kill_when(cli_command(*stage("sft", models, out)), lambda: (out / "train_state" / "latest").exists(), 180)
    result = run_cli(*stage("sft", models, out, "--lora_targets=[attn.qkv]"))
    assert result.returncode != 0 and "--lora_" in result.stderr and "Traceback" not in result.stderr
