"""The faults a long run meets, in every training stage, with real processes and real file systems
(docs/FAULTS.md): a SIGTERM (saved, exit 0, the same command resumes), a corrupt newest state (the previous one
is taken), a full disk (one-line error, exit 2, nothing half-written, the same command resumes once there is room),
a diverging loss or reward (exit 2 naming the step, nothing non-finite saved) and a corrupt finished checkpoint
(trained again). Every resumed run ends where an uninterrupted one ends."""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from chatloop.checkpoint import is_complete, load_model
from chatloop.errors import DiskFull, UserError
from chatloop.io import sha256_file
from chatloop.train.trainer import save_state, state_tensors
from tests import test_resume
from tests.conftest import FP32, assert_same_run, cli_command, run_cli, tmpfs
from tests.test_dpo import dpo_args
from tests.test_pretrain import pretrain_args

models = test_resume.models  # the fixture: a tiny base model and RM, demonstrations, rankings, prompts
STAGES = ["pretrain", "sft", "rm", "dpo", "ppo"]
LOSS_KEY = {"pretrain": "train/loss", "sft": "train/loss", "rm": "train/loss", "dpo": "train/loss",
            "ppo": "loss/policy"}


def nan_reward(arg: str, tokenizer, reward_scale: float):
    """A --reward_fn whose scores turn nan at the iteration `arg` says (a reward model blowing up mid-PPO)."""

    class Blowup:
        calls = 0

        def scores(self, prompts, rollout) -> torch.Tensor:
            self.calls += 1
            scores = torch.linspace(-1, 1, rollout.tokens.shape[0])
            return scores * math.nan if self.calls == int(arg) else scores

    return Blowup()


def nan_reward_args(inputs: dict[str, Path]) -> list[str]:
    return ["--reward_fn=tests.test_faults:nan_reward", "--reward_fn_arg=5", "--reward_model=",
            f"--value_model={inputs['root'] / 'rm'}"]


@pytest.fixture(scope="module")
def inputs(models, tokenizer_dir, corpus_file) -> dict[str, Path]:
    return {"root": models, "tokenizer": tokenizer_dir, "corpus": corpus_file}


def args(stage: str, inputs: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """The stage's command line (fp32: exactness), saving a state every 3 steps; `extra` replaces flags."""
    if stage == "pretrain":
        line = pretrain_args(inputs["tokenizer"], inputs["corpus"], out, "--max_steps=24", "--eval_every=12",
                             "--save_every=3", "--log_every=1", FP32)
    elif stage == "dpo":
        line = dpo_args(inputs["root"], out, "--epochs=2", "--save_every=3", "--log_every=1")
    else:
        line = test_resume.stage_args(stage, inputs["root"], out)
    replaced = {a.split("=")[0] for a in extra}
    return [a for a in line if a.split("=")[0] not in replaced] + list(extra)


@pytest.fixture(scope="module")
def references(tmp_path_factory, inputs) -> dict[str, Path]:
    """Each stage's uninterrupted run, made once for all the tests of this module."""
    root, made = tmp_path_factory.mktemp("references"), {}

    def reference(stage: str) -> Path:
        if stage not in made:
            result = run_cli(*args(stage, inputs, root / stage))
            assert result.returncode == 0, result.stderr
            made[stage] = root / stage
        return made[stage]

    return reference


def states(out: Path) -> list[Path]:
    return sorted((out / "train_state").glob("step-*"))


def leftovers(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.name.endswith(".tmp") or ".tmp" in p.name]


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_sigterm_saves_and_exits_0_and_a_corrupt_newest_state_falls_back_to_the_previous(tmp_path, inputs,
                                                                                        references, stage):
    reference = references(stage)
    out = tmp_path / "stopped"
    proc = subprocess.Popen(cli_command(*args(stage, inputs, out)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        while proc.poll() is None and len(states(out)) < 2:
            pass
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    stopped = re.search(r"stopped by SIGTERM after (step|iteration) (\d+) of (\d+), its state saved in (.+): run the "
                        r"same command to resume", stderr)
    assert stopped, stderr
    assert "SIGTERM: saving the state at the end of this" in stderr
    assert not is_complete(out) and not leftovers(out)
    newest, previous = states(out)[-1], states(out)[-2]
    assert newest.name == f"step-{int(stopped[2]):08d}"

    # Bytes flipped in the middle of the newest state: the rerun names it and goes on from the previous one.
    data = bytearray((newest / "state.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (newest / "state.pt").write_bytes(bytes(data))
    result = run_cli(*args(stage, inputs, out))
    assert result.returncode == 0, result.stderr
    assert f"{newest / 'state.pt'} differs from what was written" in result.stdout
    assert f"falling back to the previous state {previous}" in result.stdout
    assert f"resuming from {stopped[1]} {int(previous.name[5:])} of" in result.stdout
    assert_same_run(out, reference, LOSS_KEY[stage])


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_a_full_disk_is_one_line_exit_2_nothing_half_written_and_the_same_command_resumes(tmp_path, inputs,
                                                                                        references, stage):
    reference = references(stage)
    one_state = (states(reference)[-1] / "state.pt").stat().st_size
    rest = sum(p.stat().st_size for p in reference.rglob("*") if p.is_file() and "train_state" not in p.parts)
    out = tmp_path / "small-disk"
    with tmpfs(out, rest + one_state * 3 // 2) as resize:  # room for one state, not for a second one
        result = run_cli(*args(stage, inputs, out))
        assert result.returncode == 2, result.stderr
        error = result.stderr.strip().splitlines()[-1]
        assert re.fullmatch(rf"chatloop {stage.split('-')[0]}: error: {out}/\S+: cannot write it: .*needs about "
                            r"[\d.]+ [KMG]?B.*, [\d.]+ [KMG]?B free there\).*run the same command again", error), error
        assert "Traceback" not in result.stderr
        assert not leftovers(out) and not is_complete(out)
        kept = states(out)[-1]  # the last good state, whole: what state.json says was written
        record = json.loads((kept / "state.json").read_text())
        assert sha256_file(kept / "state.pt") == record["sha256"]

        resize(3 * sum(p.stat().st_size for p in reference.rglob("*") if p.is_file()))
        again = run_cli(*args(stage, inputs, out))
        assert again.returncode == 0, again.stderr
        assert "resuming from" in again.stdout
        assert_same_run(out, reference, LOSS_KEY[stage])


def test_a_state_that_meets_a_full_disk_while_written_leaves_no_temporary_and_the_older_states(tmp_path):
    """The write itself failing (the free-space check before it passed): torch.save's "unexpected pos" becomes
    DiskFull naming the file, and the temporary directory goes."""
    state = {"model": {"w": torch.zeros(256 * 1024)}}  # 1 MB
    with tmpfs(tmp_path / "disk", 4 << 20):
        out = tmp_path / "disk" / "stage"
        save_state(out, 3, state, keep=2)
        filler = tmp_path / "disk" / "filler"
        with open(filler, "wb") as f:  # leave the tensors' bytes and one page: less than the whole state takes
            f.write(b"\0" * (shutil.disk_usage(out).free - (1 << 20) - 4096))
        with pytest.raises(DiskFull, match=rf"{out}/train_state/step-00000006/state.pt: cannot write it: No space "
                                           r"left on device \(needs about 1.0 MB, [\d.]+ (MB|KB|bytes) free there\)"):
            save_state(out, 6, state, keep=2)
        assert [p.name for p in (out / "train_state").iterdir()] == ["step-00000003", "latest"] or sorted(
            p.name for p in (out / "train_state").iterdir()) == ["latest", "step-00000003"]
        assert (out / "train_state" / "latest").read_text() == "step-00000003\n"


@pytest.mark.parametrize("stage", STAGES)
def test_a_diverging_loss_or_reward_stops_with_exit_2_naming_the_step_and_saves_nothing_non_finite(tmp_path, inputs,
                                                                                                  stage):
    out = tmp_path / "diverged"
    # AdamW moves each weight by about lr in its first step: 1e30 makes the second step's loss inf or nan.
    blowup = (nan_reward_args(inputs) if stage == "ppo"
              else ["--lr=1e30", "--warmup_steps=0"])
    result = run_cli(*args(stage, inputs, out, *blowup))
    assert result.returncode == 2, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    unit, metric = ("iteration 5", "objective/scores") if stage == "ppo" else ("step 2", r"train/(loss|grad_norm)")
    assert re.match(rf"chatloop {stage}: error: {unit}: {metric} is (nan|inf|-inf).*stopped before applying "
                    rf"it \(nothing non-finite was saved\); (the last good state is {out}/train_state/step-\d+|no "
                    "state was saved yet)", error), error
    assert not (out / "chatloop.json").exists() and not leftovers(out)
    for directory in states(out):
        saved = torch.load(directory / "state.pt", weights_only=False)
        assert all(torch.isfinite(t).all() for _, t in state_tensors(saved) if t.is_floating_point()), directory


def test_ppo_skips_the_update_of_an_iteration_whose_reward_is_not_finite_when_asked(tmp_path, inputs):
    out = tmp_path / "skipped"
    result = run_cli(*args("ppo", inputs, out, *nan_reward_args(inputs), "--on_nonfinite=skip"))
    assert result.returncode == 0, result.stderr
    assert "ppo: iteration 5: objective/scores is nan; skipping its update (--on_nonfinite=skip)" in result.stdout
    assert is_complete(out)
    assert all(torch.isfinite(p).all() for p in load_model(out).parameters())


@pytest.mark.parametrize("stage", STAGES)
def test_a_corrupt_finished_checkpoint_is_named_and_its_stage_runs_again(tmp_path, inputs, references, stage):
    out = tmp_path / "corrupt"
    shutil.copytree(references(stage), out)
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated, as by a full disk
    assert not is_complete(out)
    with pytest.raises(UserError, match=rf"{weights} is [\d,]+ bytes, not the [\d,]+ the \S+ stage wrote "
                                        rf"\(truncated or changed\): the checkpoint {out} is corrupt; delete it"):
        load_model(out)
    result = run_cli(*args(stage, inputs, out))
    assert result.returncode == 0, result.stderr
    assert f"{weights} is" in result.stdout and "the checkpoint is corrupt; training it again" in result.stdout
    assert is_complete(out)
    assert sha256_file(weights) == sha256_file(references(stage) / "model.safetensors")
