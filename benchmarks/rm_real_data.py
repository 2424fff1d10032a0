"""Reward model on real preference data: OpenAssistant rankings and Anthropic HH, held-out accuracy vs chance.

    .venv/bin/python benchmarks/rm_real_data.py --threads 1  # BENCHMARKS.md's figures: ~14 minutes of CPU time
    .venv/bin/python benchmarks/rm_real_data.py              # torch's default threads (slower on a busy box)
    .venv/bin/python benchmarks/rm_real_data.py --quick      # smoke run (a few steps of everything)

Data: $CHATLOOP_DATA, else ../shared/data next to the repository:
  preference/oasst-en-100-trees/en_100_tree.jsonl.gz   212 ranked groups of sibling replies (K = 2..9)
  preference/hh-rlhf-test/helpful-base/test.jsonl.gz   2,354 chosen/rejected transcripts
  sft/dolly-2k-chat, pretrain/llamafactory-wiki-c4-demo (general text for pretraining)
Everything goes under runs/bench-rm-real/ (gitignored); nothing is downloaded.

No pretrained model is available offline, so the script builds one, with the CLI at every stage:

1. Held-out split. `chatloop rm` holds out --val-fraction of the ranked prompts of its --data with
   `split_by_conversation(rankings, val_fraction, seed)`; this script calls that same function on the same list
   first, so that no held-out ranking goes into the tokenizer's or the pretraining text. (The split is by
   conversation: the rankings of one OpenAssistant tree, and HH records with the same opening turn, land on one
   side.) HH records that
   chatloop rejects are skipped (counted) and the rest written as a chatloop rankings file (see the note on
   skip_invalid in BENCHMARKS.md); the OpenAssistant file is read as it is.
2. `chatloop tokenizer`: a byte-level BPE (--vocab) on the plain text of the corpus below.
3. `chatloop pretrain` (--preset, --pretrain-steps) on: every training ranking's prompt + each of its
   responses (chosen and rejected alike, so the text carries no preference), rendered in chatloop's chat
   markup so the model also learns the role tokens; the Dolly-2k conversations; the wiki and C4 demo text.
   This doubles as a (weak) SFT stage; there is no separate one.
4. `chatloop rm` on each data set from that checkpoint (--val_fraction, --epochs), which writes
   OUT/eval.json: held-out pairwise accuracy and log loss.
5. Report: accuracy with a Wilson 95% interval over held-out pairs and an exact one-sided binomial p-value
   against 0.5; because pairs of one prompt are not independent (OpenAssistant K > 2), also a bootstrap
   interval that resamples held-out prompts. The RM is re-scored on the held-out rankings to get the per-pair
   outcomes (and checked to reproduce eval.json's accuracy). For context, the accuracy of "the longer
   response wins" on the same pairs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OA_FILE = Path("preference/oasst-en-100-trees/en_100_tree.jsonl.gz")
HH_FILE = Path("preference/hh-rlhf-test/helpful-base/test.jsonl.gz")
DOLLY_FILE = Path("sft/dolly-2k-chat/dolly_2k_chat.jsonl")
GENERAL_FILES = [Path("pretrain/llamafactory-wiki-c4-demo/c4_demo.jsonl"),
                 Path("pretrain/llamafactory-wiki-c4-demo/wiki_demo.txt")]
SEED = 1337  # RMConfig's default seed: the held-out split depends on it


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default=str(REPO / "runs" / "bench-rm-real"), help="where everything goes")
    p.add_argument("--data-root", default="", help="shared data folder (default: $CHATLOOP_DATA or ../shared/data)")
    p.add_argument("--vocab", type=int, default=4096, help="tokenizer vocabulary size")
    p.add_argument("--preset", default="tiny", help="model shape (chatloop.model.PRESETS)")
    p.add_argument("--seq-len", type=int, default=256, help="pretraining window and RM seq_len")
    p.add_argument("--pretrain-steps", type=int, default=150, help="pretraining steps of 16 x seq-len tokens")
    p.add_argument("--val-fraction", type=float, default=0.2, help="held-out share of the ranked prompts")
    p.add_argument("--rm-lr", type=float, default=1e-4, help="reward-model peak learning rate")
    p.add_argument("--oa-epochs", type=int, default=2, help="RM epochs on OpenAssistant (212 groups)")
    p.add_argument("--hh-epochs", type=int, default=1, help="RM epochs on HH (2,344 usable pairs)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of held-out prompts")
    p.add_argument("--threads", type=int, default=0, help="torch threads of every stage (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="smoke run: a few steps of everything")
    args = p.parse_args(argv)
    if args.quick:
        args.pretrain_steps, args.oa_epochs, args.hh_epochs, args.bootstrap = 10, 1, 1, 200
        args.run_dir = str(Path(args.run_dir).with_name(Path(args.run_dir).name + "-quick"))
    return args


def data_root(arg: str) -> Path:
    if arg:
        return Path(arg)
    return Path(os.environ["CHATLOOP_DATA"]) if os.environ.get("CHATLOOP_DATA") else REPO.parent / "shared" / "data"


# ---------------------------------------------------------------- statistics


def wilson(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion."""
    if n == 0:
        return float("nan"), float("nan")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def binomial_p_above_half(correct: int, n: int) -> float:
    """Exact one-sided p-value P(X >= correct) for X ~ Binomial(n, 1/2)."""
    return sum(math.comb(n, i) for i in range(correct, n + 1)) / 2**n


def bootstrap_by_prompt(outcomes: list[list[bool]], resamples: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of pairwise accuracy when whole prompts (with all their pairs) are resampled."""
    rng = random.Random(seed)
    values = []
    for _ in range(resamples):
        sample = [outcomes[rng.randrange(len(outcomes))] for _ in outcomes]
        n = sum(len(s) for s in sample)
        values.append(sum(sum(s) for s in sample) / n)
    values.sort()
    return values[int(0.025 * resamples)], values[min(resamples - 1, int(0.975 * resamples))]


# ---------------------------------------------------------------- steps


def chat_markup(messages: list[dict[str, str]]) -> str:
    """chatloop's chat rendering as text (its tokenizer maps the markup to the role and end-of-turn tokens)."""
    return "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages)


def run(cmd: list[str], log: Path, threads: int) -> float:
    """Run a chatloop CLI command, its output to `log` (and its last lines to the console); seconds taken."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    print(("" if env is None else f"OMP_NUM_THREADS={threads} ") + "$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env, check=False)
    seconds = time.perf_counter() - start
    tail = [line for line in log.read_text(encoding="utf-8").splitlines() if line.strip()][-6:]
    print("\n".join("    " + line for line in tail), flush=True)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}); see {log}")
    return seconds


def tree_of(ranking: dict[str, Any]) -> str:
    """The conversation a ranking belongs to: its first user turn."""
    prompt = ranking["prompt"]
    return prompt if isinstance(prompt, str) else prompt[0]["content"]


def rescore(rm_dir: Path, val: list[dict[str, Any]], seq_len: int, batch: int = 16) -> list[list[bool]]:
    """Per held-out prompt, whether the RM orders each of its pairs right (as evaluate_rm counts them)."""
    import torch

    from chatloop.checkpoint import load_model
    from chatloop.tokenizer import Tokenizer
    from chatloop.train.reward import encode_rankings, reward_scores

    model = load_model(rm_dir).eval()
    tokenizer = Tokenizer.load(rm_dir)
    groups = encode_rankings(val, tokenizer, seq_len)
    outcomes = []
    with torch.no_grad():
        for b in range(0, len(groups), batch):
            chunk = groups[b : b + batch]
            rewards = reward_scores(model, [s for g in chunk for s in g.sequences], tokenizer.pad_id,
                                    torch.device("cpu"))
            at = 0
            for g in chunk:
                r = rewards[at : at + len(g.sequences)]
                at += len(g.sequences)
                outcomes.append([bool(r[w] - r[l_] > 0) for w, l_ in g.pairs])
    return outcomes


def longer_wins(val: list[dict[str, Any]], tokenizer: Any) -> list[list[bool]]:
    """The same pairs judged by "the response with more tokens is better" (a tie counts as wrong)."""
    from chatloop.data.formats import ranking_pairs

    outcomes = []
    for r in val:
        lengths = [len(tokenizer.encode(x)) for x in r["responses"]]
        outcomes.append([lengths[w] > lengths[l_] for w, l_ in ranking_pairs(r["ranks"])])
    return [o for o in outcomes if o]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    import torch

    from chatloop.data.formats import ranking_pairs
    from chatloop.data.readers import read_demonstrations, read_rankings
    from chatloop.tokenizer import Tokenizer
    from chatloop.train.reward import split_by_conversation

    if args.threads:
        torch.set_num_threads(args.threads)
    root = data_root(args.data_root)
    for rel in [OA_FILE, HH_FILE, DOLLY_FILE, *GENERAL_FILES]:
        if not (root / rel).is_file():
            sys.exit(f"{root / rel}: not found (set CHATLOOP_DATA or pass --data-root)")
    run_dir = Path(args.run_dir)
    if run_dir.exists():  # chatloop's stages would skip or resume from an earlier run's outputs
        print(f"removing the earlier run in {run_dir}")
        shutil.rmtree(run_dir)
    work = run_dir / "data"
    work.mkdir(parents=True, exist_ok=True)
    chatloop = [str(Path(sys.executable).with_name("chatloop"))]  # the console script of this environment
    started = time.perf_counter()
    uptime_start = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"uptime (start): {uptime_start}")

    # 1. the rankings, and the split `chatloop rm` will make
    skipped: Counter = Counter()
    hh = read_rankings(root / HH_FILE, skip_invalid=True, skipped=skipped)
    hh_file = work / "hh_helpful_test_rankings.jsonl"
    hh_file.write_text("".join(json.dumps(r) + "\n" for r in hh), encoding="utf-8")
    sets: dict[str, dict[str, Any]] = {
        "OpenAssistant": {"data": root / OA_FILE, "rankings": read_rankings(root / OA_FILE), "skipped": {},
                          "epochs": args.oa_epochs, "batch_size": 8, "out": run_dir / "rm-oasst"},
        "HH helpful-base": {"data": hh_file, "rankings": hh, "skipped": dict(skipped), "epochs": args.hh_epochs,
                            "batch_size": 16, "out": run_dir / "rm-hh"},
    }
    for name, s in sets.items():
        s["train"], s["val"] = split_by_conversation(s["rankings"], args.val_fraction, SEED)
        train_trees = {tree_of(r) for r in s["train"]}
        train_prompts = {json.dumps(r["prompt"]) for r in s["train"]}
        s["val_sharing_first_turn"] = sum(tree_of(r) in train_trees for r in s["val"])
        s["val_same_prompt"] = sum(json.dumps(r["prompt"]) in train_prompts for r in s["val"])
        print(f"{name}: {len(s['rankings'])} rankings ({sum(s['skipped'].values())} skipped: {s['skipped']}); "
              f"{len(s['train'])} train / {len(s['val'])} held out; held-out rankings whose first user turn "
              f"(conversation) is also in training: {s['val_sharing_first_turn']}, whose whole prompt is: "
              f"{s['val_same_prompt']}")

    # 2-3. tokenizer and pretraining text (no held-out ranking in it)
    conversations = [chat_markup([*r["prompt"], {"role": "assistant", "content": x}])
                     for s in sets.values() for r in s["train"] for x in r["responses"]]
    dolly = [chat_markup(c) for c in read_demonstrations(root / DOLLY_FILE)]
    random.Random(SEED).shuffle(conversations)
    corpus = work / "conversations.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in conversations + dolly), encoding="utf-8")
    plain = work / "tokenizer_text.jsonl"  # the tokenizer learns from content only, not the markup
    with open(plain, "w", encoding="utf-8") as f:
        for s in sets.values():
            for r in s["train"]:
                for text in [m["content"] for m in r["prompt"]] + r["responses"]:
                    f.write(json.dumps({"text": text}) + "\n")
        for c in read_demonstrations(root / DOLLY_FILE):
            f.write(json.dumps({"text": "\n".join(m["content"] for m in c)}) + "\n")
    general = [str(root / g) for g in GENERAL_FILES]
    seconds: dict[str, float] = {}
    tok_dir, pre_dir = run_dir / "tokenizer", run_dir / "pretrain"
    seconds["tokenizer"] = run([*chatloop, "tokenizer", "--inputs", str(plain), *general, f"--vocab_size={args.vocab}",
                                f"--out={tok_dir}"], run_dir / "tokenizer.log", args.threads)
    seconds["pretrain"] = run([
        *chatloop, "pretrain", "--inputs", str(corpus), *general, f"--tokenizer={tok_dir}", f"--out={pre_dir}",
        f"--preset={args.preset}", f"--seq_len={args.seq_len}", f"--model.max_seq_len={args.seq_len}",
        f"--max_steps={args.pretrain_steps}", "--batch_size=16", "--lr=1e-3",
        f"--warmup_steps={min(50, args.pretrain_steps // 5)}", f"--eval_every={args.pretrain_steps}",
        "--eval_batches=10", f"--save_every={args.pretrain_steps}", "--val_fraction=0.02", "--device=cpu",
        "--precision=fp32", "--peak_flops=1e11", "--no-progress", f"--seed={SEED}",
    ], run_dir / "pretrain.log", args.threads)
    pre_metrics = [json.loads(line) for line in (pre_dir / "metrics.jsonl").read_text().splitlines() if line]
    pre_val = [m for m in pre_metrics if "val/loss" in m]

    # 4. the reward models
    for name, s in sets.items():
        seconds[f"rm {name}"] = run([
            *chatloop, "rm", f"--model={pre_dir}", "--data", str(s["data"]), f"--out={s['out']}",
            f"--val_fraction={args.val_fraction}", f"--epochs={s['epochs']}", f"--batch_size={s['batch_size']}",
            f"--lr={args.rm_lr}", f"--seq_len={args.seq_len}", "--device=cpu", "--precision=fp32",
            "--no-progress", f"--seed={SEED}",
        ], run_dir / f"{s['out'].name}.log", args.threads)

    # 5. report
    tokenizer = Tokenizer.load(tok_dir)
    rows = []
    for name, s in sets.items():
        report = json.loads((s["out"] / "eval.json").read_text())
        outcomes = rescore(s["out"], s["val"], args.seq_len)
        pairs = sum(len(o) for o in outcomes)
        correct = sum(sum(o) for o in outcomes)
        if pairs != report["pairs"] or abs(correct / pairs - report["accuracy"]) > 1e-9:
            sys.exit(f"{name}: re-scoring ({correct}/{pairs}) does not reproduce eval.json "
                     f"({report['accuracy']:.4f} on {report['pairs']}): the split was not reproduced")
        baseline = longer_wins(s["val"], tokenizer)
        base_pairs = sum(len(o) for o in baseline)
        lo, hi = wilson(correct, pairs)
        blo, bhi = bootstrap_by_prompt(outcomes, args.bootstrap, SEED)
        metrics = [json.loads(line) for line in (s["out"] / "metrics.jsonl").read_text().splitlines() if line]
        train_acc = [m["train/accuracy"] for m in metrics if "train/accuracy" in m]
        rows.append({
            "dataset": name, "file": str(s["data"]), "skipped_records": s["skipped"],
            "train_prompts": len(s["train"]),
            "train_pairs": sum(len(ranking_pairs(r["ranks"])) for r in s["train"]),
            "val_prompts": report["prompts"], "val_pairs": pairs, "accuracy": report["accuracy"],
            "wilson_95": [lo, hi], "bootstrap_by_prompt_95": [blo, bhi],
            "p_value_vs_chance": binomial_p_above_half(correct, pairs), "log_loss": report["log_loss"],
            "chance_log_loss": math.log(2), "longer_wins_accuracy": sum(sum(o) for o in baseline) / base_pairs,
            "accuracy_by_k": report["accuracy_by_k"], "calibration": report["calibration"],
            "epochs": s["epochs"], "batch_size": s["batch_size"], "last_train_accuracy": train_acc[-1],
            "val_sharing_first_turn": s["val_sharing_first_turn"], "val_same_prompt": s["val_same_prompt"],
        })

    uptime_end = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    usage = [resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)]
    cpu_seconds = sum(u.ru_utime + u.ru_stime for u in usage)
    wall_seconds = time.perf_counter() - started
    print(f"\nuptime (end): {uptime_end}; {wall_seconds:.0f} s wall, {cpu_seconds:.0f} s CPU in all")
    print(f"pretraining: {args.pretrain_steps} steps; final val loss "
          f"{pre_val[-1]['val/loss'] if pre_val else float('nan'):.3f}")
    print("\n| dataset | train prompts / pairs | held-out prompts / pairs | accuracy | 95% CI (Wilson, pairs) |"
          " 95% CI (bootstrap, prompts) | p vs 0.5 | log loss (chance 0.693) | longer-wins accuracy |")
    print("|---|---:|---:|---:|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['dataset']} | {r['train_prompts']:,} / {r['train_pairs']:,} | {r['val_prompts']:,} / "
              f"{r['val_pairs']:,} | {r['accuracy']:.3f} | {r['wilson_95'][0]:.3f}-{r['wilson_95'][1]:.3f} | "
              f"{r['bootstrap_by_prompt_95'][0]:.3f}-{r['bootstrap_by_prompt_95'][1]:.3f} | "
              f"{r['p_value_vs_chance']:.2g} | {r['log_loss']:.3f} | {r['longer_wins_accuracy']:.3f} |")
    record = {
        "benchmark": "rm_real_data", "command": " ".join(["benchmarks/rm_real_data.py", *sys.argv[1:]]),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "uptime_start": uptime_start, "uptime_end": uptime_end,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "seconds": seconds,
        "wall_seconds": round(wall_seconds), "cpu_seconds": round(cpu_seconds),
        "settings": {k: v for k, v in vars(args).items()}, "seed": SEED,
        "pretrain": {"steps": args.pretrain_steps, "tokens_seen": args.pretrain_steps * 16 * args.seq_len,
                     "val_loss": pre_val[-1]["val/loss"] if pre_val else None,
                     "conversation_documents": len(conversations), "dolly_documents": len(dolly)},
        "results": rows,
    }
    (run_dir / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"\nwrote {run_dir / 'results.json'}")


if __name__ == "__main__":
    main()
