"""Reward models against the gold judge on their own policy's samples: the data PPO optimises on.

Samples 4 answers per held-out prompt from a run's SFT model (temperature 1, seeds 0-3), scores them with the
world's gold judge and with each reward model, and reports per RM:
  - accuracy: how often it orders two answers to a prompt as the judge does (pairs the judge ties left out);
  - best-of-3: the gold win rate of the RM's pick among answers 0-2 against answer 3 (ties count half), next
    to the same pick made by the judge itself (the ceiling of any RM on these samples).
With --variants it first trains RM variants with `chatloop rm`, each changing one thing of the run's round-1 RM
(500 ranked prompts, K = 4..9, 1 epoch at lr 1e-3, from the SFT model): 2.4x the responses (every RM prompt of
the run ranked with K = 9), lr 3e-4 for 2 epochs, and the pretrained model as the start. Results go to
benchmarks/results/rm_own_samples.json.

    python benchmarks/rm_own_samples.py --run runs/tiny [--variants] [--prompts 120] [RM_DIR ...]
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path

import torch

from chatloop.checkpoint import is_complete, load_model
from chatloop.data.formats import read_records
from chatloop.evaluate import rm_scores, win_rate
from chatloop.generate import answer
from chatloop.tokenizer import Tokenizer
from chatloop.world.world import World

RESULTS = Path(__file__).resolve().parent / "results"


def chatloop(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "chatloop.cli", *args], check=True)


def train_variants(run: Path, work: Path) -> dict[str, Path]:
    """The round-1 RM's recipe with one change each (skipped when already trained in `work`)."""
    common = ["--reference", str(run / "world" / "demonstrations.jsonl"), "--seq_len=256", "--batch_size=8",
              "--lr=1e-3", "--epochs=1", "--progress=false"]
    round1 = str(run / "round-1" / "rankings.jsonl")
    k9 = work / "rankings-k9.jsonl"
    if not k9.is_file():
        chatloop("sample", f"--model={run / 'sft'}", f"--prompts={run / 'prompt_sets' / 'rm.jsonl'}",
                 f"--out={work / 'samples-k9.jsonl'}", "--k=9", "--max_new_tokens=40", "--seed=11")
        chatloop("rank", f"--samples={work / 'samples-k9.jsonl'}", f"--world={run / 'world'}", f"--out={k9}",
                 "--seed=11")
    variants = {"all RM prompts, K = 9": (str(k9), []), "lr 3e-4, 2 epochs": (round1, ["--lr=3e-4", "--epochs=2"]),
                "from the pretrained model": (round1, [f"--model={run / 'pretrain'}"])}
    out = {}
    for i, (name, (data, changes)) in enumerate(variants.items()):
        out[name] = work / f"rm-{i}"
        if not is_complete(out[name]):
            chatloop("rm", f"--model={run / 'sft'}", "--data", data, f"--out={out[name]}", *common, *changes)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rms", nargs="*", help="more reward-model checkpoints to measure")
    parser.add_argument("--run", default="runs/tiny", help="a finished `chatloop run` directory")
    parser.add_argument("--prompts", type=int, default=120, help="held-out prompts (4 answers each)")
    parser.add_argument("--variants", action="store_true", help="train and measure the RM variants first")
    parser.add_argument("--work", default="runs/rm-own-samples", help="where the variants are trained")
    args = parser.parse_args()
    run = Path(args.run)
    rms = {"the run's round-1 RM": run / "round-1" / "rm"}
    if args.variants:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        rms |= train_variants(run, Path(args.work))
    rms |= {path: Path(path) for path in args.rms}

    policy, tokenizer, world = load_model(run / "sft").eval(), Tokenizer.load(run / "sft"), World.load(run / "world")
    prompts = [r["prompt"] for r in read_records(run / "world" / "eval_prompts.jsonl", "prompt")][: args.prompts]
    answers = [answer(policy, tokenizer, prompts, 40, 1.0, seed) for seed in range(4)]
    gold = [[world.judge(p, t, ended=e).score for p, t, e in zip(prompts, a.texts, a.ended)] for a in answers]
    judge_pick = [max(range(3), key=lambda a: gold[a][i]) for i in range(len(prompts))]
    results: dict = {"run": str(run), "prompts": len(prompts), "models": {}}
    for name, path in rms.items():
        model = load_model(path).eval()
        with torch.no_grad():
            scores = [rm_scores(model, a) for a in answers]
        right = pairs = 0
        for i in range(len(prompts)):
            for a, b in itertools.combinations(range(4), 2):
                if gold[a][i] != gold[b][i]:
                    pairs += 1
                    right += (gold[a][i] > gold[b][i]) == (scores[a][i] > scores[b][i])
        rm_pick = [max(range(3), key=lambda a: scores[a][i]) for i in range(len(prompts))]
        best_of_3 = win_rate([gold[p][i] for i, p in enumerate(rm_pick)], gold[3])["win_rate"]
        ceiling = win_rate([gold[p][i] for i, p in enumerate(judge_pick)], gold[3])["win_rate"]
        results["models"][name] = {"path": str(path), "accuracy_vs_gold": right / pairs, "pairs": pairs,
                                   "best_of_3_win_rate": best_of_3, "best_of_3_by_judge": ceiling}
        print(f"{name}: accuracy {right / pairs:.3f} on {pairs} pairs; best-of-3 by it wins {best_of_3:.3f} "
              f"(by the judge: {ceiling:.3f})")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "rm_own_samples.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
