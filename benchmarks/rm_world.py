"""The reward model on the synthetic world against the gold judge (issue #5's acceptance).

Trains `chatloop rm` from a run's SFT checkpoint on the world's labeler rankings (noise on: each prompt ranked
by one simulated labeler, ~73% inter-labeler agreement), holding out the last prompts; those are ranked again by
the gold judge itself (noise 0), and `chatloop rm` reports its held-out accuracy on them. Results go to
benchmarks/results/rm_world.json.

    python benchmarks/rm_world.py --run runs/tiny [--held_out 60]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def chatloop(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "chatloop.cli", *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/tiny", help="a `chatloop run` directory with world/ and sft/")
    parser.add_argument("--held_out", type=int, default=60, help="ranked prompts held out and ranked by the judge")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    run = Path(args.run)
    rows = [json.loads(line) for line in (run / "world" / "rankings.jsonl").read_text().splitlines() if line.strip()]
    train, held = rows[: -args.held_out], rows[-args.held_out :]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
        (work / "held.jsonl").write_text("".join(json.dumps(
            {"id": r["id"], "prompt": r["prompt"], "responses": r["responses"], "ended": [True] * len(r["responses"])}
        ) + "\n" for r in held))
        chatloop("rank", f"--samples={work / 'held.jsonl'}", f"--world={run / 'world'}", f"--out={work / 'gold.jsonl'}",
                 "--noise=0")
        chatloop("rm", f"--model={run / 'sft'}", f"--data={work / 'train.jsonl'}", f"--val_data={work / 'gold.jsonl'}",
                 f"--out={work / 'rm'}", f"--reference={run / 'world' / 'demonstrations.jsonl'}", "--seq_len=256",
                 "--batch_size=8", f"--epochs={args.epochs}", f"--lr={args.lr}", "--progress=false")
        report = json.loads((work / "rm" / "eval.json").read_text())
    result = {"run": str(run), "train_prompts": len(train), "held_out_prompts": len(held), "epochs": args.epochs,
              "lr": args.lr, "accuracy_vs_gold": report["accuracy"], "pairs": report["pairs"],
              "log_loss": report["log_loss"], "accuracy_by_rank_distance": report["accuracy_by_rank_distance"]}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "rm_world.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
