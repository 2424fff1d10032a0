"""Issue #33's baseline for time to quality: the RL stage of an earlier commit, from a finished run's SFT model and
round-1 RM, beside today's (benchmarks/ppo_world.py --only algorithms), evaluated with today's code.

`train` runs with whichever chatloop comes first on PYTHONPATH (a worktree of the earlier commit) and the PPO
settings of that tree's config; `eval` runs with this checkout's chatloop: the policy at each budget (from the
train states) against SFT by the gold judge on the 300 held-out and 90 red-team prompts, with the training
seconds (rollout + update, metrics.jsonl) up to it. Results: benchmarks/results/rl_baseline.json, keyed by run.

    git worktree add /tmp/wt-834fbac 834fbac
    (cd /tmp/wt-834fbac && PYTHONPATH=. OMP_NUM_THREADS=1 $OLDPWD/.venv/bin/python $OLDPWD/benchmarks/rl_baseline.py \
        train --run $OLDPWD/runs/seed-0 --out $OLDPWD/runs/baseline/seed-0)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rl_baseline.py eval --run runs/seed-0 --out runs/baseline/seed-0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def train(run: Path, out: Path, config: str, every: int) -> None:
    """ppo_world.train's settings, written out here: ppo_world imports modules an earlier commit lacks."""
    import chatloop
    from chatloop.config import parse_args
    from chatloop.pipeline import RunConfig
    from chatloop.train.ppo import ppo

    print("chatloop from", chatloop.__file__, flush=True)
    base = parse_args(RunConfig, ["--config", config]).ppo
    ppo(dataclasses.replace(base, out=str(out), policy=str(run / "sft"), reference=str(run / "sft"),
                            reward_model=str(run / "round-1" / "rm"), prompts=[str(run / "prompt_sets" / "ppo.jsonl")],
                            ptx_data=[], seed=0, progress=False, sample_every=0, save_every=every,
                            keep_states=base.iterations // every))


def evaluate_budgets(run: Path, out: Path, budgets: list[int], limit: int, name: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ppo_world import at_budgets

    table = at_budgets(run, out, budgets, limit, name)
    path = RESULTS / "rl_baseline.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results.setdefault(str(run), {})[name] = table
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("verb", choices=["train", "eval"])
    parser.add_argument("--run", required=True, help="a `chatloop run` directory with sft/ and round-1/rm/")
    parser.add_argument("--out", required=True, help="the baseline's PPO run")
    parser.add_argument("--config", default="configs/tiny.yaml", help="train: its PPO settings (relative to the tree)")
    parser.add_argument("--every", type=int, default=10, help="train: a train state every N iterations")
    parser.add_argument("--budgets", nargs="*", type=int, default=[10, 20, 30], help="eval: iterations to evaluate at")
    parser.add_argument("--limit", type=int, default=300, help="eval: held-out prompts")
    parser.add_argument("--name", default="834fbac", help="eval: the baseline's name in the results")
    args = parser.parse_args()
    if args.verb == "train":
        train(Path(args.run).resolve(), Path(args.out).resolve(), args.config, args.every)
    else:
        evaluate_budgets(Path(args.run), Path(args.out), args.budgets, args.limit, args.name)


if __name__ == "__main__":
    main()
