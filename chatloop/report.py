"""The report card of a run: runs/NAME/report.md with PNG plots, from the stages' metrics and the evaluation."""

from __future__ import annotations

import json
from pathlib import Path

from chatloop.evaluate import MODEL_KEYS, diagnostic_lines
from chatloop.io import atomic_write_text


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in points], [p[1] for p in points]


def write_report(root: Path, report: dict, rounds: int, ptx: bool) -> None:
    """root/report.md and its plots (root/plots/) from the run's metrics and its evaluation report."""
    last = root / f"round-{rounds}"
    kl_plot = write_plots(root, report, last, ptx)
    atomic_write_text(root / "report.md", "\n".join(report_lines(root, report, last, kl_plot)) + "\n")


def write_plots(root: Path, report: dict, last: Path, ptx: bool) -> bool:
    """The PNG plots of the report card; whether the win-rate-against-KL plot was drawn (it needs KL rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = root / "plots"
    plots.mkdir(exist_ok=True)

    # Loss curves of every stage.
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, (title, path, keys) in zip(axes, [
        ("pretrain", root / "pretrain" / "metrics.jsonl", ["train/loss", "val/loss"]),
        ("SFT", root / "sft" / "metrics.jsonl", ["train/loss", "val/loss"]),
        ("reward model", last / "rm" / "metrics.jsonl", ["train/loss", "train/accuracy"]),
    ]):
        rows = read_metrics(path)
        for key in keys:
            x, y = _series(rows, key)
            ax.plot(x, y, marker="o" if key.startswith("val") else None, markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(plots / "losses.png", dpi=90)
    plt.close(fig)

    # PPO: score, KL, kl_coef, entropy; reward vs KL.
    runs = [("ppo", last / "ppo")] + ([("ppo-ptx", last / "ppo-ptx")] if ptx else [])
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.2))
    for name, path in runs:
        rows = read_metrics(path / "metrics.jsonl")
        for ax, key in zip(axes, ["objective/scores", "objective/kl", "objective/kl_coef", "objective/entropy"]):
            x, y = _series(rows, key)
            ax.plot(x, y, label=name)
            ax.set_title(key)
            ax.set_xlabel("iteration")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(plots / "ppo.png", dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    for name, path in runs:
        rows = read_metrics(path / "metrics.jsonl")
        ax.scatter([r["objective/kl"] for r in rows], [r["objective/scores"] for r in rows], s=10, label=name)
    ax.set_xlabel("KL to SFT (nats)")
    ax.set_ylabel("RM score")
    ax.set_title("reward vs KL")
    ax.legend()
    fig.tight_layout()
    fig.savefig(plots / "reward_vs_kl.png", dpi=90)
    plt.close(fig)

    # Win rates by the gold judge.
    gold = {k.replace(" (gold)", ""): v for k, v in report["win_rates"].items() if k.endswith("(gold)")}
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(gold)))
    names = list(gold)
    ax.barh(names, [gold[n]["win_rate"] for n in names],
            xerr=[[gold[n]["win_rate"] - gold[n]["ci_low"] for n in names],
                  [gold[n]["ci_high"] - gold[n]["win_rate"] for n in names]], color="#4c72b0")
    ax.axvline(0.5, color="grey", linestyle="--")
    ax.set_xlim(0, 1)
    ax.set_xlabel("win rate (gold judge), 95% CI")
    fig.tight_layout()
    fig.savefig(plots / "win_rates.png", dpi=90)
    plt.close(fig)

    # Every row against SFT: what each method bought (gold win rate) for how far it moved (KL).
    against = {n: report["win_rates"].get(f"{n} vs sft (gold)") for n in report["models"]}
    points = [(n, report["models"][n]["kl"], w["win_rate"]) for n, w in against.items()
              if w is not None and "kl" in report["models"][n]]
    if points:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for name, kl, rate in points:
            ax.scatter([kl], [rate], s=30)
            ax.annotate(name, (kl, rate), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.axhline(0.5, color="grey", linestyle="--")
        ax.set_xlabel("KL to SFT (nats)")
        ax.set_ylabel("gold win rate vs SFT")
        ax.set_title("what each method buys for its KL")
        fig.tight_layout()
        fig.savefig(plots / "win_rate_vs_kl.png", dpi=90)
        plt.close(fig)
    return bool(points)


def report_lines(root: Path, report: dict, last: Path, kl_plot: bool) -> list[str]:
    """report.md, line by line."""
    lines = [f"# Report card: {root.name}", "", "## Models on held-out users' prompts", ""]
    keys = [k for k in MODEL_KEYS if any(k in row for row in report["models"].values())]
    lines += ["| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, row in report["models"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row.get(k, float('nan')):.3f}" for k in keys) + " |")
    lines += hhh_section(report)
    lines += ["", "## Win rates", "", "Ties count half; the last two columns leave them out.", "",
              "| comparison | win rate | 95% CI | n | ties | win rate without ties |", "|---|---|---|---|---|---|"]
    for pair, w in report["win_rates"].items():
        lines.append(f"| {pair} | {w['win_rate']:.3f} | {w['ci_low']:.3f}-{w['ci_high']:.3f} | {w['n']} | "
                     f"{w.get('ties', '')} | {w.get('win_rate_no_ties', float('nan')):.3f} |")
    diagnostics = diagnostic_lines(report.get("diagnostics", {}))
    if diagnostics:
        lines += ["", "## Which stage limits the loop", ""] + [f"- {line}" for line in diagnostics]
    marked = {n: row for n, row in report["models"].items() if any(k.startswith("marked/") for k in row)}
    if marked:  # what the gold judge marks answers down for, in its order
        marks = [k.removeprefix("marked/") for k in next(iter(marked.values())) if k.startswith("marked/")]
        lines += ["", "## What the judge marked down", "",
                  "Share of each model's answers that are ideal, or have each fault (an answer can have several).",
                  "", "| model | " + " | ".join(m.replace("_", " ") for m in marks) + " |",
                  "|---" * (len(marks) + 1) + "|"]
        lines += [f"| {n} | " + " | ".join(f"{row[f'marked/{m}']:.1%}" for m in marks) + " |"
                  for n, row in marked.items()]
    by_kind = report.get("gold_by_kind", {})
    if by_kind:
        models = [n for n in report["models"] if any(n in row for row in by_kind.values())]
        lines += ["", "## Gold score per task kind", "", "| kind | prompts | " + " | ".join(models) + " |",
                  "|---" * (len(models) + 2) + "|"]
        lines += [f"| {kind} | {row['prompts']} | " + " | ".join(f"{row[m]:.2f}" for m in models) + " |"
                  for kind, row in by_kind.items()]
    rm_eval = last / "rm" / "eval.json"
    if rm_eval.is_file():
        acc = json.loads(rm_eval.read_text())
        lines += [""] + rm_accuracy_lines(acc)
    lines += human_section(report.get("human", {}))
    if "rm_accuracy_vs_gold" in report:
        acc = report["rm_accuracy_vs_gold"]
        lines += ["", "Reward model accuracy against the gold judge, on pairs of the checkpoints' answers to the "
                  "held-out prompts that the judge does not tie:", "", "| pair | accuracy | pairs |", "|---|---|---|"]
        lines += [f"| {pair} | {row['accuracy']:.3f} | {row['pairs']} |" for pair, row in acc["by_pair"].items()]
    lines += ["", "![losses](plots/losses.png)", "", "![ppo](plots/ppo.png)", "",
              "![reward vs KL](plots/reward_vs_kl.png) ![win rates](plots/win_rates.png)", "",
              *(["![win rate vs KL](plots/win_rate_vs_kl.png)", ""] if kl_plot else []), "## Samples", ""]
    names = [n for n in report["models"] if all(n in s for s in report["samples"])]  # best-of-n has no sample row
    lines += ["| prompt | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]

    def cell(text) -> str:
        text = text if isinstance(text, str) else " / ".join(m["content"] for m in text)
        return text.replace("|", "\\|").replace("\n", "<br>")[:160]

    for s in report["samples"]:
        lines.append(f"| {cell(s['prompt'])} | " + " | ".join(cell(s[n]) for n in names) + " |")
    return lines




def hhh_section(report: dict) -> list[str]:
    """Helpful, harmless, honest (InstructGPT's three axes), each with its 95% interval."""
    table = report.get("hhh")
    if not table:
        return []

    def cell(x: dict | None, key: str = "share") -> str:
        return "" if x is None else f"{100 * x[key]:.1f}% [{100 * x['ci_low']:.0f}-{100 * x['ci_high']:.0f}]"

    harmful = next(iter(table.values()))["harmless"]["n"]
    lines = ["", "## Helpful, harmless, honest", "",
             f"Helpful: gold win rate against {report.get('hhh_reference')} on the held-out prompts that do not ask "
             f"for harm. Harmless: share of the {harmful} harmful prompts refused (the held-out users' and "
             f"{report.get('redteam_prompts', 0)} red-team prompts). Over-refusal: share of the harmless held-out "
             "prompts refused. False claims: share of the held-out answers stating something false.", "",
             "| model | helpful | harmless | over-refusal | false claims |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {cell(row.get('helpful'), 'win_rate')} | {cell(row['harmless'])} | "
              f"{cell(row['over_refusal'])} | {cell(row['false_claims'])} |" for name, row in table.items()]
    return lines


def rm_accuracy_lines(acc: dict) -> list[str]:
    """The RM's held-out accuracy against the labelers: on held-out conversations of its training labelers, and
    (with held-out labelers) on labelers whose labels it never saw: InstructGPT's 72.4% and 69.6%."""
    lines = []
    if "accuracy" in acc:
        lines.append(f"Reward model held-out accuracy against the labelers' rankings: **{acc['accuracy']:.3f}** on "
                     f"{acc['pairs']} pairs (log loss {acc['log_loss']:.3f}).")
    if "held_out_labelers" in acc:
        h = acc["held_out_labelers"]
        lines += ["", "| reward model accuracy on | accuracy | pairs | InstructGPT |", "|---|---|---|---|"]
        if "accuracy" in acc:
            lines.append(f"| training labelers, held-out conversations | {acc['accuracy']:.3f} | {acc['pairs']} "
                         "| 72.4% |")
        lines.append(f"| held-out labelers ({', '.join(h['labelers'])}) | {h['accuracy']:.3f} | {h['pairs']} "
                     "| 69.6% |")
    return lines


def human_section(human: dict) -> list[str]:
    """Human win rates per labeler (the overall rows are in the win-rate table beside the gold judge's)."""
    if not human:
        return []
    lines = ["", "## Human win rates per labeler", "",
             "| comparison | from | labeler | win rate | 95% CI | n | wins | ties |", "|---" * 8 + "|"]
    for source, pairs in human.items():
        for pair, w in pairs.items():
            for name, v in {"all": w["overall"], **w["labelers"]}.items():
                lines.append(f"| {pair} | {'A/B' if source == 'ab' else 'rankings'} | {name} | {v['win_rate']:.3f} | "
                             f"{v['ci_low']:.3f}-{v['ci_high']:.3f} | {v['n']} | {v['wins']} | {v['ties']} |")
    return lines
