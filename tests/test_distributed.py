"""Many processes: every stage under `torchrun --nproc-per-node 2` (gloo on CPU) against one process.

One step with the same global batch must give the same parameters as one process, within TOL: the two
runs add the same numbers in a different order (per-rank partial gradients, then an all-reduce), which
moves fp32 results by a few ulps; Adam's first step then moves each weight by about lr, so TOL = 1e-5 at
lr 1e-3 still catches any wrong share, scale or normalisation (they change updates by ~lr). Each
comparison also checks that the step moved the weights by far more than TOL.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chatloop.checkpoint import load_model
from tests import test_resume
from tests.conftest import FP32, metric_rows, run_cli

models = test_resume.models  # the fixture: a tiny base model, a reward model, demonstrations, rankings, prompts

TOL = 1e-5
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun_cmd(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "chatloop.cli", *args]


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    result = subprocess.run(torchrun_cmd(*args, nproc=nproc), capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def single(*args: str) -> subprocess.CompletedProcess:
    result = run_cli(*args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def assert_same_step(one: dict[str, torch.Tensor], many: dict[str, torch.Tensor], start: dict[str, torch.Tensor]):
    assert one.keys() == many.keys()
    diff = max((one[k] - many[k]).abs().max().item() for k in one)
    moved = max((one[k] - start[k]).abs().max().item() for k in one if k in start)
    assert diff < TOL, f"1 vs 2 processes differ by {diff:.2e}"
    assert moved > 100 * TOL, f"the step moved the weights by only {moved:.2e}"


# ---------------------------------------------------------------- pretrain


PRETRAIN = ["--preset=tiny", "--model.n_layer=2", "--model.d_model=64", "--model.n_head=4", "--seq_len=32",
            "--batch_size=4", "--grad_accum=2", "--progress=false", "--warmup_steps=0", "--lr=1e-3",
            "--peak_flops=1e12", "--eval_batches=2", "--eval_every=1000", FP32]


def pretrain_args(tokenizer_dir, corpus_file, out, *extra):
    return ["pretrain", f"--tokenizer={tokenizer_dir}", f"--inputs={corpus_file}", f"--out={out}", *PRETRAIN, *extra]


@pytest.fixture(scope="module")
def pretrain_one_step(tmp_path_factory, tokenizer_dir, corpus_file):
    """One pretraining step in one process, and the model before it (max_steps=0 saves the initial one)."""
    root = tmp_path_factory.mktemp("pretrain")
    single(*pretrain_args(tokenizer_dir, corpus_file, root / "start", "--max_steps=0"))
    single(*pretrain_args(tokenizer_dir, corpus_file, root / "one", "--max_steps=1"))
    return weights(root / "one"), weights(root / "start")


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
@pytest.mark.slow
def test_one_pretrain_step_on_two_processes_equals_one_process(tmp_path, tokenizer_dir, corpus_file,
                                                               pretrain_one_step, parallel):
    one, start = pretrain_one_step
    out = tmp_path / parallel
    result = torchrun(*pretrain_args(tokenizer_dir, corpus_file, out, "--max_steps=1", f"--parallel={parallel}"))
    # The checkpoint (gathered from the shards under FSDP) is an ordinary one: it loads in this process.
    assert_same_step(one, weights(out), start)
    assert load_model(out).cfg.n_layer == 2
    assert result.stdout.count("pretrain: done") == 1  # printed by rank 0 only
    assert len(metric_rows(out)) == 1


def _stat(proc_dir: Path) -> list[str]:
    """Fields of /proc/PID/stat after the command name: state, parent pid, ... (empty once it is gone)."""
    try:
        return (proc_dir / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def parent_pid(proc_dir: Path) -> int | None:
    fields = _stat(proc_dir)
    return int(fields[1]) if fields else None


def proc_state(proc_dir: Path) -> str | None:
    fields = _stat(proc_dir)
    return fields[0] if fields else None


@pytest.mark.slow
def test_two_fsdp_processes_killed_then_resumed_by_one_continue_the_same_run(tmp_path, tokenizer_dir, corpus_file):
    common = ["--max_steps=30", "--save_every=4", "--log_every=1", "--keep_states=10"]
    reference = tmp_path / "reference"
    single(*pretrain_args(tokenizer_dir, corpus_file, reference, *common))

    out = tmp_path / "killed"
    proc = subprocess.Popen(torchrun_cmd(*pretrain_args(tokenizer_dir, corpus_file, out, *common, "--parallel=fsdp")),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    deadline = time.time() + 600  # a loaded machine can take minutes to start two processes
    while time.time() < deadline and proc.poll() is None:
        if len(metric_rows(out)) >= 10:
            break
        time.sleep(0.02)
    # torchrun starts each worker in a session of its own: kill the workers (the launcher's children) and it.
    workers = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and parent_pid(p) == proc.pid]
    for pid in [*workers, proc.pid]:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    for pid in workers:  # dead (a zombie, or reaped) before anything reads their files
        end = time.time() + 30
        while time.time() < end and proc_state(Path(f"/proc/{pid}")) not in (None, "Z", "X"):
            time.sleep(0.05)
    if (out / "chatloop.json").exists():
        # The machine was so loaded that the run ended before the kill landed: take it back to a state the two
        # processes wrote half-way, as if it had been killed there.
        (out / "chatloop.json").unlink()
        (out / "train_state" / "latest").write_text("step-00000012\n")
    assert len(metric_rows(out)) >= 10

    resumed = single(*pretrain_args(tokenizer_dir, corpus_file, out, *common))
    resumed_at = int(resumed.stdout.split("resuming from step ")[1].split()[0])
    assert resumed_at >= 8  # a state the two processes wrote (every 4 steps; killed after 10)
    rows, expected = metric_rows(out), metric_rows(reference)
    assert [r["step"] for r in rows] == list(range(1, 31))  # every step once, none lost or repeated
    assert [r["data/sample_index"] for r in rows] == [r["data/sample_index"] for r in expected]
    for got, want in zip(rows, expected):
        assert got["train/loss"] == pytest.approx(want["train/loss"], abs=1e-4)
    final_one, final_resumed = weights(reference), weights(out)
    assert max((final_one[k] - final_resumed[k]).abs().max().item() for k in final_one) < 1e-3


# ---------------------------------------------------------------- SFT, RM, PPO

@pytest.mark.slow
def test_one_sft_step_on_two_processes_equals_one_process(tmp_path, models):
    root = models
    args = ["sft", f"--model={root / 'base'}", f"--data={root / 'demos.jsonl'}", "--seq_len=64", "--epochs=1",
            "--max_steps=1", "--batch_size=3", "--grad_accum=2", "--dropout=0", "--lr=1e-3", "--val_fraction=0.25",
            "--packing=true", "--progress=false", FP32]
    single(*args, f"--out={tmp_path / 'one'}")
    torchrun(*args, f"--out={tmp_path / 'two'}")
    assert_same_step(weights(tmp_path / "one"), weights(tmp_path / "two"), weights(root / "base"))


@pytest.mark.parametrize("members", [1, 2])
@pytest.mark.slow
def test_one_rm_step_on_two_processes_equals_one_process(tmp_path, models, members):
    """With 2 members under FSDP: each member's step sharded, then their weights averaged shard by shard."""
    root = models
    args = ["rm", f"--model={root / 'base'}", f"--data={root / 'rankings.jsonl'}", "--max_steps=1",
            "--batch_size=3", "--grad_accum=2", "--lr=1e-3", "--val_fraction=0.25", "--progress=false", FP32,
            f"--members={members}"]
    single(*args, f"--out={tmp_path / 'one'}")
    torchrun(*args, f"--out={tmp_path / 'two'}", *(["--parallel=fsdp"] if members > 1 else []))
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert_same_step(one, two, weights(root / "base"))
    # Same normalisation: the bias is the mean reference score, computed identically on every rank.
    bias = [json.loads((tmp_path / d / "config.json").read_text())["reward_bias"] for d in ("one", "two")]
    assert bias[0] == pytest.approx(bias[1], abs=1e-5)


def ppo_args(root: Path, corpus_file: Path, out: Path, *extra: str) -> list[str]:
    return ["ppo", f"--policy={root / 'base'}", f"--reward_model={root / 'rm'}", f"--prompts={root / 'prompts.jsonl'}",
            "--iterations=1", "--batch_size=8", "--minibatches=2", "--ppo_epochs=2", "--max_new_tokens=8",
            "--top_k=1", "--lr=1e-3", "--warmup_steps=0", "--whiten_rewards=true", f"--ptx_data={corpus_file}",
            "--ptx_coef=1", "--ptx_ratio=1", "--ptx_seq_len=16", "--ema_decay=0.5", "--progress=false",
            "--sample_every=0", f"--out={out}", FP32, *extra]


@pytest.fixture(scope="module")
def ppo_one_process(tmp_path_factory, models, corpus_file):
    out = tmp_path_factory.mktemp("ppo") / "one"
    single(*ppo_args(models, corpus_file, out))
    return out


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
@pytest.mark.slow
def test_one_ppo_iteration_on_two_processes_equals_one_process(tmp_path, models, corpus_file, ppo_one_process,
                                                               parallel):
    """Rollouts are spread over the ranks, then gathered; whitening, KL and scores are over all of them.
    top_k=1 makes the rollouts the same whoever samples them (the loss still uses the full distribution),
    so both runs see the same episodes; PPO-ptx, two minibatches, two epochs and the EMA exercise the
    shares; under FSDP the rollouts run on gathered weights and all four models are sharded."""
    one = ppo_one_process
    two = tmp_path / parallel
    torchrun(*ppo_args(models, corpus_file, two, f"--parallel={parallel}"))
    assert_same_step(weights(one), weights(two), weights(models / "base"))  # the EMA policy
    states = [torch.load(d / "train_state" / "step-00000001" / "state.pt", weights_only=False) for d in (one, two)]
    for key in ("policy", "value"):
        assert max((states[0][key][k] - states[1][key][k]).abs().max().item() for k in states[0][key]) < TOL
    first, second = metric_rows(one)[0], metric_rows(two)[0]
    for key in ("objective/kl", "objective/scores", "objective/entropy", "reward/mean", "reward/std", "returns/mean",
                "response/length", "value/explained_variance"):
        assert first[key] == pytest.approx(second[key], abs=1e-4), key
