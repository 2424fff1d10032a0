"""One stage of benchmarks/gpu_check.sh on the imported model, in this process (under torchrun: one rank of DDP).

    torchrun --standalone --nproc-per-node=N benchmarks/gpu_check.py --stage sft --run-dir runs/gpu-check
    python benchmarks/gpu_check.py --summarize --run-dir runs/gpu-check      # the one JSON file and the table

Each stage runs through chatloop's own function for it (the CLI's code path) for a few steps, with a wrapper around
every GPT's hidden_states that counts the tokens each forward pass takes: with gradients (training: 6N FLOPs per
token with the backward) or without (2N: reference, reward and value passes, sampling). Per stage rank 0 appends a line
to RUN/gpu_check.jsonl: wall seconds, tokens/s (all ranks' tokens over the wall time, model loading and checkpoint
writes included, so a lower bound), MFU (those FLOPs over the measured bf16 matmul peak of every GPU), peak memory
(torch.cuda.max_memory_allocated of rank 0), and the stage's own logged perf/* figures. --dry-run runs the same code
on the CPU with a handful of tiny steps on the model's first 2 blocks (a test that the script works, not a
measurement).

Two stages also give quality results on real data (Anthropic HH helpful-base, benchmarks/rm_real_data.py's held-out
split: `split_by_conversation(rankings, 0.2, seed 1337)`, 1,876 training / 468 held-out pairs):
  rm-quality   `chatloop rm` (full weights) from the imported model on the training pairs; its accuracy on the
               held-out pairs with a Wilson 95% interval, beside "the longer answer wins" on the same pairs.
  dpo-quality  `chatloop dpo` with a LoRA adapter (rank 16) from the imported model on the same training pairs;
               then `chatloop eval`'s function samples both the DPO policy and the imported model on held-out HH
               prompts and scores them with rm-quality's RM (a model that did not train the policy): the win rate
               of DPO over the imported model with its 95% interval, and each one's mean RM score.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

from rm_real_data import HH_FILE, SEED, longer_wins, wilson  # noqa: E402

# In the order gpu_check.sh runs them: the quality stages first, so that a short budget cuts throughput figures.
STAGES = ("rm-quality", "dpo-quality", "pretrain", "sft", "rm", "dpo", "ppo", "generate")

# The quality stages' settings (GPU; the dry run's in QUALITY_DRY). Why these:
#   rm-quality: every training pair (1,876), 1 epoch (the RM overfits after one: InstructGPT, RMConfig's default),
#     8 prompts (16 answers) a step = ~235 steps, lr 3e-5 for full weights with 10 warmup steps (rm_real_model.py's
#     settings, so the figure sits beside its CPU runs on parts of the same split), seq_len 384 (88% of HH's
#     prompt + answer sequences fit whole in SmolLM2 tokens, median 180; longer ones lose the prompt's start).
#   dpo-quality: the same pairs, epoch, batch and seq_len; LoRA rank 16 (alpha 32) on every linear layer, lr 5e-5
#     (LoRA takes a larger rate than full weights; TRL's LoRA DPO example's 5e-6 is over thousands of steps, these
#     are 235), beta 0.1 (DPOConfig's default); its own held-out reward accuracy and implicit KL show how far it
#     moved. Scored on 256 held-out prompts (their rendered chat at most 320 tokens, so prompt + answer fit the
#     RM's 384), 64 new tokens at temperature 0.7, one sample each, the same sampler seed for both models; an answer
#     cut at 64 tokens is scored as it stands (no_eos_score off: both models are cut alike, and a fixed score would
#     turn the win rate into "which one stops sooner").
QUALITY = dict(train_pairs=0, val_pairs=0, batch=8, seq_len=384, rm_lr=3e-5, dpo_lr=5e-5, warmup=10, lora_rank=16,
               beta=0.1, prompts=256, max_prompt_tokens=320, new_tokens=64, temperature=0.7)
QUALITY_DRY = dict(QUALITY, train_pairs=16, val_pairs=8, batch=4, seq_len=64, warmup=0, prompts=4, new_tokens=8)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=STAGES)
    p.add_argument("--run-dir", default=str(REPO / "runs" / "gpu-check"))
    p.add_argument("--data-root", default="", help="shared data folder (default: $CHATLOOP_DATA or ../shared/data)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny steps: checks the script, measures nothing")
    p.add_argument("--prepare", action="store_true", help="import the model and write the data (one process)")
    p.add_argument("--summarize", action="store_true", help="write RUN/gpu_check.json from the stages' lines")
    return p.parse_args(argv)


class TokenCounter:
    """Tokens through every GPT (its `hidden_states`, which forward passes and the engine's prefill both run), split
    by whether gradients were on, and the FLOPs they cost."""

    def __init__(self) -> None:
        import torch

        from chatloop.model import GPT

        self.train_tokens = self.infer_tokens = 0
        self.flops = 0.0
        original = GPT.hidden_states
        counter = self

        def hidden_states(model, input_ids, *args, **kwargs):
            n = input_ids.numel()
            per_token = model.flops_per_token(input_ids.shape[-1]) / 3  # forward only: 2N + 4LTC
            if torch.is_grad_enabled():
                counter.train_tokens += n
                counter.flops += 3 * per_token * n  # with the backward
            else:
                counter.infer_tokens += n
                counter.flops += per_token * n
            return original(model, input_ids, *args, **kwargs)

        GPT.hidden_states = hidden_states


def stage_config(stage: str, run: Path, data: Path, dry: bool):
    """The stage's config: a few steps of realistic size on a GPU, a handful of tiny ones in a dry run."""
    from chatloop.train.dpo import DPOConfig
    from chatloop.train.ppo import PPOConfig
    from chatloop.train.pretrain import PretrainConfig
    from chatloop.train.reward import RMConfig
    from chatloop.train.sft import SFTConfig

    model, out = str(run / "import"), str(run / stage)
    device = "cpu" if dry else "cuda"
    seq, batch, steps = (64, 2, 2) if dry else (512, 16, 20)
    common = dict(out=out, device=device, progress=False, log_every=1, save_every=100000)
    if stage == "pretrain":
        cfg = PretrainConfig(**common)
        cfg.init_from, cfg.inputs = model, [str(data / "pretrain/tinyshakespeare/input.txt")]
        cfg.seq_len, cfg.batch_size, cfg.max_steps, cfg.eval_every, cfg.lr = seq, batch, steps, steps, 1e-5
        return cfg
    if stage == "sft":
        cfg = SFTConfig(**common)
        cfg.model, cfg.data = model, [str(data / "sft/dolly-2k-chat/dolly_2k_chat.jsonl")]
        cfg.seq_len, cfg.batch_size, cfg.max_steps, cfg.epochs, cfg.dropout, cfg.val_fraction = (
            seq, batch, steps, 1, 0.0, 0.01)
        return cfg
    q = QUALITY_DRY if dry else QUALITY
    hh_train, hh_val = [str(run / "data" / "hh_train.jsonl")], [str(run / "data" / "hh_val.jsonl")]
    if stage == "rm-quality":
        cfg = RMConfig(**common)
        cfg.model, cfg.data, cfg.val_data, cfg.epochs, cfg.max_steps = model, hh_train, hh_val, 1, 0
        cfg.batch_size, cfg.seq_len, cfg.lr, cfg.warmup_steps = q["batch"], q["seq_len"], q["rm_lr"], q["warmup"]
        return cfg
    if stage == "dpo-quality":
        cfg = DPOConfig(**common)
        cfg.policy, cfg.data, cfg.val_data, cfg.epochs, cfg.max_steps = model, hh_train, hh_val, 1, 0
        cfg.batch_size, cfg.seq_len, cfg.lr, cfg.warmup_steps = q["batch"], q["seq_len"], q["dpo_lr"], q["warmup"]
        cfg.lora_rank, cfg.beta = q["lora_rank"], q["beta"]
        return cfg
    rankings = str(run / "data" / "rankings.jsonl")
    if stage == "rm":
        cfg = RMConfig(**common)
        cfg.model, cfg.data, cfg.seq_len, cfg.batch_size, cfg.max_steps = model, [rankings], seq, batch, steps
        return cfg
    if stage == "dpo":
        cfg = DPOConfig(**common)
        cfg.policy, cfg.data, cfg.seq_len, cfg.batch_size, cfg.max_steps = model, [rankings], seq, batch, steps // 2
        return cfg
    cfg = PPOConfig(**common)  # ppo: PPO-ptx, the stage with the most models (policy, reference, RM, value)
    cfg.policy, cfg.reward_model, cfg.prompts = model, str(run / "rm"), [str(run / "data" / "ppo_prompts.jsonl")]
    cfg.ptx_data = [str(data / "pretrain/llamafactory-wiki-c4-demo/c4_demo.jsonl")]
    cfg.ptx_coef, cfg.ptx_ratio = 1.0, 1.0
    cfg.iterations, cfg.batch_size, cfg.minibatches, cfg.ppo_epochs = (1, 2, 1, 1) if dry else (5, 64, 4, 2)
    cfg.max_new_tokens, cfg.max_prompt_tokens, cfg.sample_every, cfg.warmup_steps = (8 if dry else 64), 128, 0, 0
    return cfg


def generate_check(run: Path, dry: bool) -> dict:
    """Sampling throughput of the engine (what `chatloop sample`, eval, PPO's rollouts and serve run on)."""
    import torch

    from chatloop.checkpoint import load_model
    from chatloop.data.formats import prompt_messages, read_records
    from chatloop.engine import generate
    from chatloop.tokenizer import Tokenizer

    device = "cpu" if dry else "cuda"
    model = load_model(run / "import", device=device, dtype=torch.float32 if dry else torch.bfloat16).eval()
    tok = Tokenizer.load(run / "import")
    prompts = [r["prompt"] for r in read_records(run / "data" / "ppo_prompts.jsonl", "prompt")][: 4 if dry else 64]
    ids = [tok.render_chat(prompt_messages(p), add_generation_prompt=True)[0][-128:] for p in prompts]
    new = 8 if dry else 256
    generate(model, ids, 4, tok.pad_id, [], temperature=1.0)  # warm-up
    start = time.perf_counter()
    rollout = generate(model, ids, new, tok.pad_id, [], temperature=1.0)  # no stop token: every row runs `new`
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"perf/new_tokens_per_s": rollout.mask.sum().item() / seconds, "rows": len(ids), "new_tokens": new,
            "dtype": "bf16 weights" if not dry else "fp32"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def rm_quality(run: Path) -> dict:
    """rm-quality's RM on the held-out HH pairs (`chatloop rm`'s own eval.json) against "the longer answer wins"
    (SmolLM2 tokens; a tie counts as wrong) on the same pairs, each with a Wilson 95% interval."""
    from chatloop.tokenizer import Tokenizer

    report = json.loads((run / "rm-quality" / "eval.json").read_text())
    val = read_jsonl(run / "data" / "hh_val.jsonl")
    pairs = report["pairs"]
    correct = round(report["accuracy"] * pairs)
    baseline = longer_wins(val, Tokenizer.load(run / "import"))
    base_correct, base_pairs = sum(sum(o) for o in baseline), sum(len(o) for o in baseline)
    metrics = read_jsonl(run / "rm-quality" / "metrics.jsonl")
    train_acc = [m["train/accuracy"] for m in metrics if "train/accuracy" in m]
    return {"held_out_prompts": report["prompts"], "held_out_pairs": pairs, "accuracy": report["accuracy"],
            "wilson_95": list(wilson(correct, pairs)), "log_loss": report["log_loss"],
            "longer_wins_accuracy": base_correct / max(1, base_pairs), "longer_wins_pairs": base_pairs,
            "longer_wins_wilson_95": list(wilson(base_correct, base_pairs)),
            "margin_over_longer_wins": report["accuracy"] - base_correct / max(1, base_pairs),
            "train_pairs": len(read_jsonl(run / "data" / "hh_train.jsonl")),
            "train_steps": max((m["step"] for m in metrics), default=0),
            "train_accuracy_last_20_steps": sum(train_acc[-20:]) / max(1, len(train_acc[-20:]))}


def dpo_quality(run: Path, dry: bool, device: str) -> dict:
    """The DPO policy and the imported model, sampled on held-out HH prompts (chatloop.evaluate.evaluate, what
    `chatloop eval` runs) and scored by rm-quality's RM: the win rate (chatloop.evaluate.win_rate: ties count
    half, 95% normal interval) and the mean RM scores; DPO's own held-out metrics (its eval.json) beside them."""
    from chatloop.checkpoint import is_complete
    from chatloop.evaluate import EvalConfig, evaluate

    q = QUALITY_DRY if dry else QUALITY
    rm = run / "rm-quality"
    if not is_complete(rm):
        raise SystemExit(f"dpo-quality: {rm} holds no finished reward model (did rm-quality fail?): nothing to score "
                         "the policies with")
    cfg = EvalConfig(models=[str(run / "import"), str(run / "dpo-quality")], names=["imported", "dpo-lora"],
                     prompts=str(run / "data" / "hh_val_prompts.jsonl"), reward_model=str(rm), limit=q["prompts"],
                     max_new_tokens=q["new_tokens"], temperature=q["temperature"], greedy=False, best_of=0,
                     seed=SEED, out=str(run / "dpo-quality-eval.json"), device=device)
    cfg.no_eos_score = None  # type: ignore[assignment]  # score a cut answer as it stands (QUALITY's comment)
    report = evaluate(cfg)
    win = report["win_rates"]["dpo-lora vs imported (rm)"]
    own = json.loads((run / "dpo-quality" / "eval.json").read_text())
    metrics = read_jsonl(run / "dpo-quality" / "metrics.jsonl")
    return {"judge": "rm-quality's RM (trained on the same training pairs, not used to train the policy)",
            "prompts": report["prompts"], "max_new_tokens": q["new_tokens"], "temperature": q["temperature"],
            "win_rate_dpo_vs_imported": win["win_rate"], "win_rate_95": [win["ci_low"], win["ci_high"]],
            "ties": win["ties"], "win_rate_no_ties": win["win_rate_no_ties"],
            "rm_score_dpo": report["models"]["dpo-lora"]["rm_score"],
            "rm_score_imported": report["models"]["imported"]["rm_score"],
            "length_chars_dpo": report["models"]["dpo-lora"]["length"],
            "length_chars_imported": report["models"]["imported"]["length"],
            "dpo_held_out_reward_accuracy": own.get("reward_accuracy"), "dpo_held_out_pairs": own.get("pairs"),
            "dpo_held_out_implicit_kl": own.get("implicit_kl"), "dpo_held_out_loss": own.get("loss"),
            "train_steps": max((m["step"] for m in metrics), default=0), "report": cfg.out}


def run_stage(args: argparse.Namespace) -> None:
    import torch

    from chatloop import distributed
    from chatloop.device import measure_peak_flops
    from chatloop.realloop import LoopConfig, data_root
    from chatloop.train.dpo import dpo
    from chatloop.train.ppo import ppo
    from chatloop.train.pretrain import pretrain
    from chatloop.train.reward import reward_model
    from chatloop.train.sft import sft

    run, dry = Path(args.run_dir), args.dry_run
    data = Path(args.data_root) if args.data_root else data_root(LoopConfig())
    cuda = torch.cuda.is_available() and not dry
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.reset_peak_memory_stats()
    counter = TokenCounter()
    start = time.perf_counter()
    if args.stage == "generate":
        extra = generate_check(run, dry)
    else:
        fn = {"pretrain": pretrain, "sft": sft, "rm": reward_model, "dpo": dpo, "ppo": ppo, "rm-quality": reward_model,
              "dpo-quality": dpo}[args.stage]
        cfg = stage_config(args.stage, run, data, dry)
        fn(cfg)  # under torchrun the stage joins the process group itself (chatloop.distributed)
        rows = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines() if line]
        perf = {}
        for row in rows[1:]:  # the first step includes warm-up (compilation of kernels, allocator growth)
            for k, v in row.items():
                if k.startswith("perf/"):
                    perf.setdefault(k, []).append(v)
        extra = {k: sum(v) / len(v) for k, v in perf.items()}
        if int(os.environ.get("RANK", 0)) == 0 and args.stage in ("rm-quality", "dpo-quality"):
            # Rank 0 only (the other ranks wait in the all_sum below): the stage's checkpoint is written by now.
            extra["quality"] = (rm_quality(run) if args.stage == "rm-quality"
                                else dpo_quality(run, dry, "cuda" if cuda else "cpu"))
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    world = distributed.world_size() if distributed.active() else int(os.environ.get("WORLD_SIZE", 1))
    totals = [counter.train_tokens, counter.infer_tokens, counter.flops]
    if distributed.active():
        totals = distributed.all_sum(*totals)
    device = torch.device("cuda" if cuda else "cpu")
    peak = measure_peak_flops(device, "bf16" if cuda else "fp32") * world
    line = {
        "stage": args.stage, "processes": world, "device": torch.cuda.get_device_name() if cuda else "cpu (dry run)",
        "seconds": round(seconds, 2), "train_tokens": int(totals[0]), "inference_tokens": int(totals[1]),
        "tokens_per_s": (totals[0] + totals[1]) / seconds, "mfu": totals[2] / seconds / peak,
        "peak_flops_per_device": peak / world,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None, **extra,
    }
    if int(os.environ.get("RANK", 0)) == 0:
        with open(run / "gpu_check.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
        print(json.dumps(line))


def prepare(args: argparse.Namespace) -> None:
    """The imported model (RUN/import) and the data every stage reads (RUN/data: `chatloop loop`'s data step)."""
    import shutil

    from chatloop.model_import import ImportConfig, import_model, smollm2_gguf
    from chatloop.realloop import LoopConfig, write_data

    run = Path(args.run_dir)
    for stage in STAGES:  # a finished stage would be skipped: start each from scratch
        shutil.rmtree(run / stage, ignore_errors=True)
    (run / "dpo-quality-eval.json").unlink(missing_ok=True)
    if args.dry_run:  # its 2-block cut is "another checkpoint" to a second import into the same folder
        shutil.rmtree(run / "import", ignore_errors=True)
    import_model(ImportConfig(src=os.environ.get("GPU_CHECK_SRC") or str(smollm2_gguf()), out=str(run / "import"),
                              max_seq_len=1024))
    if args.dry_run:  # the model's format at a fraction of its cost: its first 2 blocks
        from chatloop.checkpoint import load_model, save_model
        from chatloop.tokenizer import Tokenizer

        save_model(load_model(run / "import", n_layer=2), run / "import", Tokenizer.load(run / "import"),
                   lineage={"stage": "import", "note": "dry run: the first 2 blocks"})
    write_data(LoopConfig(data_root=args.data_root, rm_oasst=0, rm_hh=400, ppo_prompts=256, eval_prompts=8),
               run / "data")
    write_hh_split(args, run)
    (run / "gpu_check.jsonl").unlink(missing_ok=True)


def write_hh_split(args: argparse.Namespace, run: Path) -> None:
    """The quality stages' data: rm_real_data.py's split of HH helpful-base (training and held-out rankings) and
    the held-out prompts the policies answer (those whose chat rendering fits QUALITY's max_prompt_tokens)."""
    from collections import Counter

    from chatloop.data.formats import prompt_messages
    from chatloop.data.readers import read_rankings
    from chatloop.realloop import LoopConfig, data_root
    from chatloop.tokenizer import Tokenizer
    from chatloop.train.reward import split_by_conversation

    q = QUALITY_DRY if args.dry_run else QUALITY
    root = Path(args.data_root) if args.data_root else data_root(LoopConfig())
    skipped: Counter = Counter()
    rankings = read_rankings(root / HH_FILE, skip_invalid=True, skipped=skipped)
    train, val = split_by_conversation(rankings, 0.2, SEED)
    train, val = train[: q["train_pairs"] or len(train)], val[: q["val_pairs"] or len(val)]
    tokenizer = Tokenizer.load(run / "import")
    prompts, seen = [], set()
    for r in split_by_conversation(rankings, 0.2, SEED)[1]:  # every held-out prompt, even in a dry run
        key = json.dumps(r["prompt"])
        ids = tokenizer.render_chat(prompt_messages(r["prompt"]), add_generation_prompt=True)[0]
        if key not in seen and len(ids) <= q["max_prompt_tokens"]:
            seen.add(key)
            prompts.append({"prompt": r["prompt"], "user_id": f"hh-held-out-{len(prompts)}"})
    prompts = prompts[: q["prompts"]]
    for name, records in (("hh_train", train), ("hh_val", val), ("hh_val_prompts", prompts)):
        (run / "data" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    print(f"HH helpful-base: {len(rankings)} rankings ({sum(skipped.values())} skipped), {len(train)} training / "
          f"{len(val)} held-out pairs used, {len(prompts)} held-out prompts to answer")


def summarize(args: argparse.Namespace) -> None:
    run = Path(args.run_dir)
    path = run / "gpu_check.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []
    done = {r["stage"] for r in lines}
    quality = {r["stage"]: r["quality"] for r in lines if "quality" in r}
    record = {"created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "dry_run": args.dry_run, "stages": lines,
              "quality": quality, "missing": [s for s in STAGES if s not in done]}
    (run / "gpu_check.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"\n{'stage':<13}{'procs':>6}{'seconds':>9}{'tokens/s':>12}{'MFU':>8}{'peak GiB':>10}")
    for r in lines:
        mem = f"{r['peak_memory_gib']:.1f}" if r.get("peak_memory_gib") is not None else "-"
        print(f"{r['stage']:<13}{r['processes']:>6}{r['seconds']:>9.1f}{r['tokens_per_s']:>12.0f}"
              f"{100 * r['mfu']:>7.1f}%{mem:>10}")
    for line in quality_lines(quality):
        print(line)
    if args.dry_run and quality:
        print("(dry run: 2 blocks, a handful of pairs and prompts; the quality figures mean nothing)")
    if record["missing"]:
        print(f"missing (failed or not run): {', '.join(record['missing'])}")
    print(f"wrote {run / 'gpu_check.json'}")


def quality_lines(quality: dict) -> list[str]:
    """The quality stages' results as sentences (the summary's printout)."""
    def ci(pair: list[float]) -> str:
        return f"[{pair[0]:.3f}-{pair[1]:.3f}]"

    lines = []
    if "rm-quality" in quality:
        q = quality["rm-quality"]
        lines.append(f"rm-quality:  RM accuracy {q['accuracy']:.3f} {ci(q['wilson_95'])} (Wilson 95%) on "
                     f"{q['held_out_pairs']} held-out HH pairs ({q['train_steps']} steps on {q['train_pairs']} "
                     f"training pairs; log loss {q['log_loss']:.3f}); the longer answer wins "
                     f"{q['longer_wins_accuracy']:.3f} {ci(q['longer_wins_wilson_95'])} on the same "
                     f"{q['longer_wins_pairs']} pairs: {100 * q['margin_over_longer_wins']:+.1f} pts")
    if "dpo-quality" in quality:
        q = quality["dpo-quality"]

        def num(x: float | None) -> str:
            return "-" if x is None else f"{x:.3f}"

        lines.append(f"dpo-quality: win rate DPO-LoRA vs imported, by rm-quality's RM, "
                     f"{q['win_rate_dpo_vs_imported']:.3f} {ci(q['win_rate_95'])} (95%) on {q['prompts']} held-out "
                     f"HH prompts ({q['ties']} ties; {q['max_new_tokens']} new tokens, T={q['temperature']}); mean "
                     f"RM score DPO {q['rm_score_dpo']:.3f} vs imported {q['rm_score_imported']:.3f}; length (chars) "
                     f"{q['length_chars_dpo']:.0f} vs {q['length_chars_imported']:.0f}; DPO's own held-out reward "
                     f"accuracy {num(q['dpo_held_out_reward_accuracy'])} on {q['dpo_held_out_pairs']} pairs, "
                     f"implicit KL {num(q['dpo_held_out_implicit_kl'])} ({q['train_steps']} steps)")
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.prepare:
        prepare(args)
    elif args.summarize:
        summarize(args)
    elif args.stage:
        run_stage(args)
    else:
        sys.exit("give --stage or --summarize")


if __name__ == "__main__":
    main()
