"""`chatloop run`: the whole InstructGPT loop from one config, on the synthetic world by default.

Stages, each in its own directory under runs/NAME/ (a finished stage is skipped, an interrupted one
resumes, so the run can be killed at any point and restarted with the same command; one rule says what is
finished, `finished`):
  1. world       the synthetic world: pretraining text, user prompts, demonstrations, held-out prompts
  2. tokenizer   byte-level BPE on the pretraining text
  3. pretrain    next-token prediction
  4. sft         fine-tuning on the labelers' demonstrations
  5. prompts     the users' raw prompts through the prompt store (prompts.db): curated (long shared prefixes,
                 200 per user, PII, split by user) and exported to prompt_sets/ (disjoint RM and PPO sets)
  then for each round r = 1..rounds (round-r/):
  6. sample      K = k_min..k_max answers per ranking prompt (the RM split's, and `redteam_rankings` of the
                 labelers' harmful prompts), from SFT (round 1) or the newest policy
  7. rank        simulated labelers rank the samples (noise calibrated to ~73% agreement)
  8. rm          reward model from all rankings so far, starting from SFT (with later_rm_epochs, rounds after
                 the first continue the previous round's RM; with held_out_labelers: never on those labelers'
                 rankings, and its accuracy on them)
  9. ppo         PPO from the newest policy against the new RM, KL to SFT; in the last round PPO-ptx beside it;
                 with `dpo_baseline`, DPO from SFT on all rankings so far (no RM, no sampling): the baseline people
                 compare PPO with
 10. eval        pretrained vs SFT vs (earlier rounds' PPO) vs PPO vs PPO-ptx (vs DPO) on held-out users' prompts,
                 and best-of-4 by the RM; helpful / harmless / honest with the red-team prompts, the RM on known-better
                 pairs; report.md with plots
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from chatloop.checkpoint import checkpoint_problem, read_lineage
from chatloop.data.curate import CurateConfig, curate
from chatloop.data.prompts import IngestConfig, PromptExportConfig, export, ingest
from chatloop.errors import UserError
from chatloop.evaluate import EvalConfig, add_human, diagnostic_lines, evaluate, hhh_lines, human_win_rates
from chatloop.io import atomic_write_jsonl, read_jsonl
from chatloop.report import write_report
from chatloop.sample import SampleConfig, sample
from chatloop.tokenizer import TokenizerConfig, train_tokenizer
from chatloop.train.dpo import DPOConfig, dpo
from chatloop.train.ppo import PPOConfig, ppo
from chatloop.train.pretrain import PretrainConfig, pretrain
from chatloop.train.reward import RMConfig, reward_model
from chatloop.train.sft import SFTConfig, sft
from chatloop.world.files import WorldConfig, write_world
from chatloop.world.gold import gold_judge
from chatloop.world.labelers import RankConfig, rank

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


@dataclass
class RunConfig:
    name: str = "tiny"
    """Run name: everything goes to runs/NAME/ (or `out`)."""
    out: str = ""
    """Run directory; empty means runs/NAME."""
    seed: int = 0
    """Seed of the world and of every stage."""
    rounds: int = 1
    """Rounds of sample -> rank -> RM -> PPO (later rounds rank samples of the newest policy)."""
    ptx: bool = True
    """Also train PPO-ptx beside PPO (same start, same RM), to measure the alignment tax of each."""
    ranking_prompts: int = 200
    """Prompts of the RM split whose samples are ranked, per round."""
    redteam_rankings: int = 0
    """Labelers' harmful prompts (the world's redteam_train.jsonl) ranked beside them each round: the answers a
    policy gives them, refusals and compliance, teach the RM what harm costs."""
    later_rm_epochs: int = 0
    """Rounds after the first: continue the previous round's RM on all rankings so far for this many epochs (its
    normalisation redone); 0 trains each round's RM from SFT for rm.epochs, as InstructGPT did."""
    labelers: int = 8
    """Simulated labelers."""
    noise: float = 0.3
    """Labelers' noise (0.3: ~73% inter-labeler agreement)."""
    held_out_labelers: int = 0
    """Simulated labelers (the last N of `labelers`) whose rankings the RM never trains on: its accuracy on them
    is the second of InstructGPT's two numbers (`rm.val_labelers` names them instead)."""
    human: list[str] = field(default_factory=list)
    """Label exports of people's A/B verdicts and rankings (chatloop eval --human): human win rates in the
    report card beside the gold judge's and the RM's."""
    eval_prompts: int = 200
    """Held-out prompts the final evaluation uses."""
    vocab_size: int = 2048
    """Tokenizer vocabulary size."""
    world: WorldConfig = field(default_factory=WorldConfig)
    """The synthetic world (out and seed are set by the run)."""
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    """Pretraining (paths are set by the run)."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Supervised fine-tuning (paths are set by the run)."""
    sample: SampleConfig = field(default_factory=SampleConfig)
    """Sampling K answers per ranking prompt (paths are set by the run)."""
    rm: RMConfig = field(default_factory=RMConfig)
    """Reward model (paths are set by the run)."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """PPO and PPO-ptx (paths are set by the run; ptx_coef and ptx_ratio apply to the PPO-ptx run)."""
    dpo_baseline: bool = False
    """Also train DPO from SFT on the rankings (each round, beside PPO), as a baseline in the report card."""
    dpo: DPOConfig = field(default_factory=DPOConfig)
    """DPO's settings, when dpo_baseline is on (paths are set by the run)."""


def _with(cfg, **changes):
    return dataclasses.replace(cfg, **changes)


def finished(output: Path) -> bool:
    """Whether a stage is finished (then says it skips it): the output it writes last exists, a file written
    atomically, the marker file of a directory that appears whole, or a checkpoint's chatloop.json (written last)
    saying complete, of a checkpoint whose files are the ones it records (a corrupt one is unfinished: says so)."""
    if not output.is_file():
        return False
    if output.name == "chatloop.json":
        problem = checkpoint_problem(output.parent)
        if problem is not None:
            print(f"run: {problem}: the checkpoint is corrupt; running its stage again")
            return False
        if (read_lineage(output.parent) or {}).get("status") != "complete":
            return False
    print(f"run: {output.parent if output.name == 'chatloop.json' else output} is already finished; skipping")
    return True


def pretrained_model(root: Path, world: WorldConfig, vocab_size: int, pretrain_cfg: PretrainConfig, seed: int
                     ) -> tuple[Path, Path]:
    """Steps 1-3 (also `chatloop demo`'s): the world, a tokenizer on its text and a model pretrained on it, under
    root; (world directory, pretrained checkpoint)."""
    world_dir, tok_dir, pt_dir = root / "world", root / "tokenizer", root / "pretrain"
    # step 1
    if not finished(world_dir / "world.json"):
        write_world(_with(world, out=str(world_dir), seed=seed))
    # step 2
    if not finished(tok_dir / "tokenizer.json"):
        train_tokenizer(TokenizerConfig(inputs=[str(world_dir / "pretrain.txt")], out=str(tok_dir),
                                        vocab_size=vocab_size))
    # step 3
    if not finished(pt_dir / "chatloop.json"):
        pretrain(_with(pretrain_cfg, out=str(pt_dir), tokenizer=str(tok_dir), inputs=[str(world_dir / "pretrain.txt")],
                       val_inputs=[str(world_dir / "pretrain_val.txt")], seed=seed))
    return world_dir, pt_dir


def run(cfg: RunConfig) -> dict:
    root = Path(cfg.out or f"runs/{cfg.name}")
    held_out = cfg.rm.val_labelers or held_out_labelers(cfg)  # checked before any stage runs
    root.mkdir(parents=True, exist_ok=True)
    # step 1-3
    world_dir, pt_dir = pretrained_model(root, _with(cfg.world, stats=False), cfg.vocab_size, cfg.pretrain, cfg.seed)
    # step 4
    sft_dir = root / "sft"
    if not finished(sft_dir / "chatloop.json"):
        sft(_with(cfg.sft, out=str(sft_dir), model=str(pt_dir), data=[str(world_dir / "demonstrations.jsonl")],
                  seed=cfg.seed))
    # step 5
    prompt_sets = curated_prompts(root, world_dir, cfg.seed)

    policy, rankings = sft_dir, []
    for r in range(1, cfg.rounds + 1):
        rd = root / f"round-{r}"
        rd.mkdir(exist_ok=True)
        # step 6
        samples = rd / "samples.jsonl"
        if not finished(samples):
            sample(_with(cfg.sample, model=str(policy), prompts=str(ranking_prompts(cfg, rd, prompt_sets, world_dir)),
                         out=str(samples), seed=cfg.seed + r))
        # step 7
        ranked = rd / "rankings.jsonl"
        if not finished(ranked):
            rank(RankConfig(samples=str(samples), world=str(world_dir), out=str(ranked), labelers=cfg.labelers,
                            noise=cfg.noise, seed=cfg.seed + r))
        rankings.append(str(ranked))
        # step 8
        rm_dir, rm_start = rd / "rm", {"model": str(sft_dir)}
        if r > 1 and cfg.later_rm_epochs:
            rm_start = {"model": str(root / f"round-{r - 1}" / "rm"), "epochs": cfg.later_rm_epochs}
        if not finished(rm_dir / "chatloop.json"):
            reward_model(_with(cfg.rm, out=str(rm_dir), data=list(rankings), **rm_start,
                               reference=[str(world_dir / "demonstrations.jsonl")], seed=cfg.seed,
                               val_labelers=held_out))
        # step 9
        ppo_prompts = [str(prompt_sets / "ppo.jsonl")]
        ppo_dir = rd / "ppo"
        if not finished(ppo_dir / "chatloop.json"):
            ppo(_with(cfg.ppo, out=str(ppo_dir), policy=str(policy), reference=str(sft_dir), reward_model=str(rm_dir),
                      prompts=ppo_prompts, ptx_data=[], seed=cfg.seed))
        if cfg.ptx and r == cfg.rounds and not finished(rd / "ppo-ptx" / "chatloop.json"):  # only the last is evaluated
            ppo(_with(cfg.ppo, out=str(rd / "ppo-ptx"), policy=str(policy), reference=str(sft_dir),
                      reward_model=str(rm_dir), prompts=ppo_prompts, ptx_data=[str(world_dir / "pretrain.txt")],
                      seed=cfg.seed))
        if cfg.dpo_baseline and not finished(rd / "dpo" / "chatloop.json"):
            dpo(_with(cfg.dpo, out=str(rd / "dpo"), policy=str(sft_dir), data=list(rankings), seed=cfg.seed))
        policy = ppo_dir

    # step 10
    last = root / f"round-{cfg.rounds}"
    models = [("pretrained", pt_dir), ("sft", sft_dir)]
    models += [(f"ppo-round-{r}", root / f"round-{r}" / "ppo") for r in range(1, cfg.rounds)]  # what a round bought
    models.append(("ppo", last / "ppo"))
    if cfg.ptx:
        models.append(("ppo-ptx", last / "ppo-ptx"))
    if cfg.dpo_baseline:
        models.append(("dpo", last / "dpo"))
    eval_path = root / "eval.json"
    if not finished(eval_path):
        evaluate(EvalConfig(models=[str(m) for _, m in models], names=[n for n, _ in models],
                            prompts=str(world_dir / "eval_prompts.jsonl"),
                            redteam=str(world_dir / "redteam_prompts.jsonl"),
                            rm_probes=str(world_dir / "rm_probes.jsonl"),
                            demonstrations=str(world_dir / "demonstrations.jsonl"),
                            reward_model=str(last / "rm"), no_eos_score=cfg.ppo.no_eos_score, reference=str(sft_dir),
                            pretrain_val=str(world_dir / "pretrain_val.txt"), limit=cfg.eval_prompts,
                            max_new_tokens=cfg.ppo.max_new_tokens, seed=cfg.seed, out=str(eval_path)),
                 gold_judge(str(world_dir)))
    report = json.loads(eval_path.read_text())
    if cfg.human:  # read afresh every time: people's labels keep coming
        add_human(report, human_win_rates(cfg.human, [n for n, _ in models], [str(m) for _, m in models]))
    write_report(root, report, rounds=cfg.rounds, ptx=cfg.ptx)
    print_summary(root, report)
    return report


def ranking_prompts(cfg: RunConfig, round_dir: Path, prompt_sets: Path, world_dir: Path) -> Path:
    """The prompts whose samples a round ranks: the first `ranking_prompts` of the RM split, then the first
    `redteam_rankings` red-team prompts of the labelers (round_dir/ranking_prompts.jsonl)."""
    users = [obj for _, obj in read_jsonl(prompt_sets / "rm.jsonl")][: cfg.ranking_prompts]
    redteam = [obj for _, obj in read_jsonl(world_dir / "redteam_train.jsonl")][: cfg.redteam_rankings]
    path = round_dir / "ranking_prompts.jsonl"
    atomic_write_jsonl(path, users + redteam)
    return path


def held_out_labelers(cfg: RunConfig) -> list[str]:
    """The ids of the last `held_out_labelers` simulated labelers (make_labelers names them labeler-01..)."""
    if not 0 <= cfg.held_out_labelers < cfg.labelers:
        raise UserError(f"--held_out_labelers: expected 0 to {cfg.labelers - 1} of the {cfg.labelers} labelers, "
                        f"got {cfg.held_out_labelers}")
    return [f"labeler-{i:02d}" for i in range(cfg.labelers - cfg.held_out_labelers + 1, cfg.labelers + 1)]


def curated_prompts(root: Path, world_dir: Path, seed: int) -> Path:
    """The world's raw user prompts, ingested, curated and exported as the RM and PPO prompt sets.

    Demonstrations come with the world, so the training split goes half to RM ranking, half to PPO. The
    export directory appears whole (its manifest last), so its presence means the stage is done.
    """
    out, db = root / "prompt_sets", f"sqlite:///{root / 'prompts.db'}"
    if not finished(out / "manifest.json"):
        ingest(IngestConfig(inputs=[str(world_dir / "prompts.jsonl")], db=db))
        curate(CurateConfig(db=db, seed=seed))
        export(PromptExportConfig(db=db, out=str(out), sft=0.0, rm=0.5, ppo=0.5, seed=seed))
    return out


def rl_rm_accuracy(accuracy: dict) -> float:
    """The RM's accuracy against the gold judge on pairs of SFT, PPO and PPO-ptx answers (what it was trained
    on and what PPO optimises), leaving out the pretrained model's free text."""
    rows = [row for pair, row in accuracy["by_pair"].items() if "pretrained" not in pair]
    pairs = sum(r["pairs"] for r in rows)
    return sum(r["accuracy"] * r["pairs"] for r in rows if r["pairs"]) / pairs if pairs else float("nan")


def print_summary(root: Path, report: dict) -> None:
    print(f"\n== chatloop run: {root} ==")
    for name, row in report["models"].items():
        parts = [f"gold {row.get('gold_score', float('nan')):.3f}"]
        if "gold_score_greedy" in row:
            parts.append(f"greedy {row['gold_score_greedy']:.3f}")
        if "likert" in row:
            parts.append(f"likert {row['likert']:.2f}")
        if "kl" in row:
            parts.append(f"KL {row['kl']:.2f}")
        if "pretrain_val_loss" in row:
            parts.append(f"pretrain loss {row['pretrain_val_loss']:.3f}")
        if "marked/ideal" in row:  # the judge's reasons, in short (report.md has them all)
            parts.append(f"ideal {row['marked/ideal']:.0%}, pleasantry {row['marked/pleasantry']:.0%}, "
                         f"no stop {row['marked/no_stop']:.0%}")
        print(f"  {name:<11} " + ", ".join(parts))
    for line in hhh_lines(report):
        print(f"  {line}")
    for pair, w in report["win_rates"].items():
        if "(gold)" in pair or "(human" in pair:
            print(f"  win rate {pair}: {100 * w['win_rate']:.1f}% [{100 * w['ci_low']:.0f}-{100 * w['ci_high']:.0f}] "
                  f"(ties half; {100 * w['win_rate_no_ties']:.1f}% without its {w['ties']} ties)")
    last = max(root.glob("round-*"), key=lambda d: int(d.name.split("-")[1]), default=root / "round-1")
    rm_eval = last / "rm" / "eval.json"
    if rm_eval.is_file():
        rm = json.loads(rm_eval.read_text())
        if "accuracy" in rm:
            print(f"  RM held-out accuracy ({last.name}, against labelers): {rm['accuracy']:.3f} on {rm['pairs']} "
                  f"untied pairs ({rm.get('tied_pairs', 0)} tied)")
        if "held_out_labelers" in rm:
            h = rm["held_out_labelers"]
            print(f"  RM accuracy on held-out labelers ({', '.join(h['labelers'])}): {h['accuracy']:.3f} on "
                  f"{h['pairs']} pairs (InstructGPT: 69.6% against 72.4% on its training labelers)")
    if "rm_accuracy_vs_gold" in report:
        print(f"  RM accuracy against the gold judge (held-out prompts, SFT and RL answers): "
              f"{rl_rm_accuracy(report['rm_accuracy_vs_gold']):.3f}")
    for line in diagnostic_lines(report.get("diagnostics", {})):
        print(f"  {line}")
    print(f"  report: {root / 'report.md'}")
