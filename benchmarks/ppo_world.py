"""PPO's acceptance experiments on the synthetic world (issue #6), from a finished `chatloop run`'s SFT and RM.

  1. PPO with 3 seeds: gold win rate against SFT on held-out prompts, each seed.
  2. The ceiling: the same PPO with the gold judge itself as the reward (--reward_fn=chatloop.world.gold:gold_reward,
     a perfect RM), at the config's budget and at the long budget (40 iterations x 64 episodes); and the RM at the
     long budget.
  3. The adaptive KL controller: KL per iteration after warmup, against the target.
  4. beta -> 0 at the long budget: the RM score rises while the gold win rate falls (over-optimisation).
  5. PPO-ptx against PPO: the pretraining validation loss regresses less.
  6. knobs: the gold-reward ceiling at the config's budget with 4 PPO epochs, lr 2e-4, or KL coef 0.02 (does any
     of PPO's knobs lift it?), each against SFT with its ties counted.
  7. algorithms (issue #33): each of --arms (an --algorithm, optionally with changed settings) trained once for the
     largest of --budgets iterations, its policy evaluated at each of them (from the train states, identical to a
     run stopped there) against SFT with the gold judge: helpful, harmless, over-refusal, false claims, and the
     training seconds up to that iteration (rollout + update, from metrics.jsonl). Keyed by --run, so that one
     invocation per world seed fills one table.
Every run uses the run config's PPO settings unless an experiment changes them; results go to
benchmarks/results/ppo_world.json (experiments not run keep their earlier results).

    python benchmarks/ppo_world.py --run runs/tiny [--config configs/tiny.yaml] [--only seeds oracle ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from chatloop.checkpoint import is_complete, load_model, save_model
from chatloop.config import parse_args
from chatloop.evaluate import EvalConfig, evaluate
from chatloop.pipeline import RunConfig
from chatloop.tokenizer import Tokenizer
from chatloop.train.ppo import PPOConfig, ppo
from chatloop.world.gold import gold_judge

RESULTS = Path(__file__).resolve().parent / "results"


LONG = {"iterations": 40, "batch_size": 64, "save_every": 10}


REUSE = False  # --reuse: keep finished experiment runs (same settings) from earlier invocations
TRAINED: set[Path] = set()  # runs this invocation finished: an experiment that needs one again reuses it


def train(run: Path, base, out: Path, gold: bool = False, **changes) -> Path:
    """PPO from the run's SFT model against its round-1 RM, or against the gold judge (the RM still starts the
    value model)."""
    if (REUSE or out in TRAINED) and is_complete(out):
        return out
    shutil.rmtree(out, ignore_errors=True)
    rm = str(run / "round-1" / "rm")
    reward = ({"reward_model": "", "reward_fn": "chatloop.world.gold:gold_reward", "reward_fn_arg": str(run / "world"),
               "reward_scale": 3.0, "value_model": rm} if gold else {"reward_model": rm})
    cfg = PPOConfig(**{**dataclasses.asdict(base), "out": str(out), "policy": str(run / "sft"),
                       "reference": str(run / "sft"), "prompts": [str(run / "prompt_sets" / "ppo.jsonl")],
                       "progress": False, "sample_every": 0, **reward, **changes})
    ppo(cfg)
    TRAINED.add(out)
    return out


def against_sft(run: Path, policy: Path, limit: int, eval_seed: int, redteam: bool = False) -> dict:
    report = evaluate(EvalConfig(models=[str(run / "sft"), str(policy)], names=["sft", "ppo"],
                                 prompts=str(run / "world" / "eval_prompts.jsonl"),
                                 redteam=str(run / "world" / "redteam_prompts.jsonl") if redteam else "",
                                 demonstrations=str(run / "world" / "demonstrations.jsonl"),
                                 reward_model=str(run / "round-1" / "rm"), reference=str(run / "sft"),
                                 pretrain_val=str(run / "world" / "pretrain_val.txt"), limit=limit,
                                 max_new_tokens=40, seed=eval_seed), gold_judge(str(run / "world")))
    ppo_row = report["models"]["ppo"]
    return {"gold_win_rate": report["win_rates"]["ppo vs sft (gold)"], "rm_win_rate":
            report["win_rates"]["ppo vs sft (rm)"]["win_rate"], "gold_score": ppo_row["gold_score"],
            "sft_gold_score": report["models"]["sft"]["gold_score"], "rm_score": ppo_row["rm_score"],
            "kl": ppo_row["kl"], "pretrain_val_loss": ppo_row["pretrain_val_loss"],
            "sft_pretrain_val_loss": report["models"]["sft"]["pretrain_val_loss"], "ended": ppo_row["ended"],
            **({"hhh": report["hhh"]} if redteam else {})}


def snapshot(out: Path, iteration: int) -> Path:
    """The policy of `out`'s train state at `iteration`, saved as a model directory beside it."""
    path = out.parent / f"{out.name}-at-{iteration}"
    if not is_complete(path):
        state = torch.load(out / "train_state" / f"step-{iteration:08d}" / "state.pt", weights_only=False)
        model = load_model(out)
        model.load_state_dict(state["policy"])
        save_model(model, path, Tokenizer.load(out))
    return path


def at_budgets(run: Path, out: Path, budgets: list[int], limit: int, name: str) -> dict:
    """The PPO run `out` at each of `budgets` iterations against SFT (red-team prompts too), with its training
    seconds (rollout + update, metrics.jsonl) up to there."""
    rows = metrics(out)
    table = {}
    for budget in budgets:
        policy = out if budget == len(rows) else snapshot(out, budget)
        train_s = sum(r["perf/rollout_s"] + r["perf/update_s"] for r in rows[:budget])
        table[budget] = {**against_sft(run, policy, limit, eval_seed=100, redteam=True), "train_s": round(train_s, 1)}
        print(f"{name} at {budget}: {table[budget]['gold_win_rate']['win_rate']:.3f} in {train_s:.0f} s", flush=True)
    return table


ARMS = {  # name -> PPOConfig changes
    "ppo": {"algorithm": "ppo"}, "rloo": {"algorithm": "rloo"}, "grpo": {"algorithm": "grpo"},
    "reinforce++": {"algorithm": "reinforce++"}, "rloo-lr1e-4": {"algorithm": "rloo", "lr": 1e-4},
    "rloo-lr7e-5": {"algorithm": "rloo", "lr": 7e-5},
    "rloo-lr1e-4-kl0.2": {"algorithm": "rloo", "lr": 1e-4, "kl_coef": 0.2},
    "rloo-mb4": {"algorithm": "rloo", "minibatches": 4},
    # the rollout's log-probs from a bf16 forward instead of the fp32 sampling pass (the default before issue 33's
    # last change; the same as rloo under fp32)
    "rloo-forward": {"algorithm": "rloo", "sampling_logprobs": False},
}


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/tiny", help="a finished `chatloop run` directory")
    parser.add_argument("--config", default="configs/tiny.yaml", help="its config (for the PPO settings)")
    parser.add_argument("--limit", type=int, default=200, help="held-out prompts per evaluation")
    parser.add_argument("--work", default="runs/ppo-world", help="where the experiment runs go")
    parser.add_argument("--only", nargs="*", default=["seeds", "oracle", "adaptive", "beta0", "ptx", "knobs"])
    parser.add_argument("--reuse", action="store_true", help="keep finished runs in --work instead of retraining")
    parser.add_argument("--arms", nargs="*", default=list(ARMS)[:5], choices=list(ARMS),
                        help="algorithms: what to train")
    parser.add_argument("--budgets", nargs="*", type=int, default=[8, 12, 20], help="algorithms: iterations to "
                        "evaluate at (the run keeps a train state every greatest common divisor of them)")
    args = parser.parse_args()
    global REUSE
    REUSE = args.reuse
    run, work = Path(args.run), Path(args.work)
    base = parse_args(RunConfig, ["--config", args.config]).ppo
    results: dict = {"run": str(run), "config": args.config, "ppo": dataclasses.asdict(base)}
    t0 = time.time()

    if "seeds" in args.only:  # 1
        results["seeds"] = {}
        for seed in (0, 1, 2):
            out = train(run, base, work / f"seed-{seed}", seed=seed, ptx_data=[])
            results["seeds"][seed] = against_sft(run, out, args.limit, eval_seed=100 + seed)
            rows = metrics(out)
            results["seeds"][seed]["eos_fraction"] = [r["response/eos_fraction"] for r in rows]
            print(f"seed {seed}: {results['seeds'][seed]['gold_win_rate']}")
    if "oracle" in args.only:  # 2
        results["oracle"] = {}
        for name, budget, gold in (("gold", {}, True), ("gold-long", LONG, True), ("rm-long", LONG, False)):
            out = train(run, base, work / name, gold=gold, ptx_data=[], **budget)
            episodes = budget.get("iterations", base.iterations) * budget.get("batch_size", base.batch_size)
            results["oracle"][name] = {**against_sft(run, out, args.limit, eval_seed=100), "episodes": episodes}
            print(f"{name}: {results['oracle'][name]['gold_win_rate']}")
    if "adaptive" in args.only:  # 3
        # 128 episodes per iteration (InstructGPT: 512) so that one batch's KL is a steady measure (+-10%), one PPO
        # epoch to keep the run short, beta starting where this RM's policy settles near the target, and a
        # horizon of 10 batches: beta moves at most 2% per iteration.
        target, warmup = 0.7, 10
        out = train(run, base, work / "adaptive", adaptive_kl=True, kl_target=target, kl_coef=0.1, kl_horizon=1280,
                    iterations=40, batch_size=128, minibatches=4, ppo_epochs=1, save_every=10, ptx_data=[])
        kls = [r["objective/kl"] for r in metrics(out)]
        after = kls[warmup:]
        results["adaptive"] = {"target": target, "warmup_iterations": warmup, "kl": kls,
                               "kl_coef": [r["objective/kl_coef"] for r in metrics(out)],
                               "after_warmup_mean": float(np.mean(after)),
                               "within_20pct": float(np.mean([abs(k / target - 1) <= 0.2 for k in after]))}
    if "beta0" in args.only:  # 4
        results["beta0"] = {}
        for beta in (base.kl_coef, 0.0):  # the first is the oracle experiment's rm-long run
            name = "rm-long" if beta == base.kl_coef else f"beta-{beta:g}"
            out = train(run, base, work / name, kl_coef=beta, ptx_data=[], **LONG)
            results["beta0"][f"{beta:g}"] = against_sft(run, out, args.limit, eval_seed=100)
    if "ptx" in args.only:  # 5
        out = train(run, base, work / "ptx", ptx_data=[str(run / "world" / "pretrain.txt")])
        plain = train(run, base, work / "seed-0", seed=0, ptx_data=[])
        results["ptx"] = {"ppo": against_sft(run, plain, args.limit, eval_seed=100),
                          "ppo-ptx": against_sft(run, out, args.limit, eval_seed=100)}
    if "knobs" in args.only:  # 6
        results["knobs"] = {}
        for name, change in (("gold", {}), ("ppo_epochs-4", {"ppo_epochs": 4}), ("lr-2e-4", {"lr": 2e-4}),
                             ("kl_coef-0.02", {"kl_coef": 0.02})):
            started = time.time()
            out = train(run, base, work / f"knob-{name}", gold=True, ptx_data=[], **change)
            results["knobs"][name] = {**against_sft(run, out, args.limit, eval_seed=0),
                                      "train_s": round(time.time() - started)}
            w = results["knobs"][name]["gold_win_rate"]
            print(f"{name}: {w['win_rate']:.3f}, {w['ties']} ties of {w['n']}, {w['win_rate_no_ties']:.3f} without")
    if "algorithms" in args.only:  # 7
        every = int(np.gcd.reduce(args.budgets))
        iterations = max(args.budgets)
        table = results.setdefault("algorithms", {})[str(run)] = {}
        for arm in args.arms:
            out = train(run, base, work / arm, seed=0, ptx_data=[], iterations=iterations, save_every=every,
                        keep_states=iterations // every, **ARMS[arm])
            table[arm] = at_budgets(run, out, args.budgets, args.limit, arm)
    results["seconds"] = time.time() - t0
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "ppo_world.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    if "algorithms" in results:  # one table per world seed (--run), each from its own invocation
        before = old.get("algorithms", {})
        for run, arms in results["algorithms"].items():  # a budget evaluated again replaces only itself
            kept = before.setdefault(run, {})
            for arm, budgets in arms.items():
                kept[arm] = {**kept.get(arm, {}), **budgets}
        results["algorithms"] = before
    path.write_text(json.dumps({**old, **results}, indent=1) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "ppo"}, indent=1)[:4000])


if __name__ == "__main__":
    main()
