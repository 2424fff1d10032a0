"""Prompt curation at scale: ingest + curate + export of synthetic prompts (default 1M from 50k users).

    .venv/bin/python benchmarks/prompts_curation.py                 # 1M prompts, 50k users
    .venv/bin/python benchmarks/prompts_curation.py --prompts 100000 --users 5000

What is timed, each phase on its own (the table prints all of them):

- generate (NOT part of the target): writes prompts.jsonl: Zipf-distributed users (exponent 1.1, so the top
  users send thousands), ~5% with PII of every type the scanner knows, ~8% starting with one of a few long
  shared preambles, ~3% exact re-sends, ~10% multi-turn chats, ~30% without a category, timestamps.
- ingest: `PromptStore.ingest_file` into a fresh SQLite file (parse, validate, hash, insert).
- curate: load the store, every curation step, re-scan of the training split, storing the curation.
- export: the SFT/RM/PPO/val/test JSONL files, report and manifest.

Peak memory is the process's ru_maxrss after each phase (generation streams to disk and stays small).
Targets: ingest + curate + export under 60 s and under 2 GB on the project's 2-core CPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatloop.data.curate import CurateConfig, curate  # noqa: E402
from chatloop.data.pii import luhn_valid  # noqa: E402
from chatloop.data.prompts import PromptExportConfig, PromptStore, export  # noqa: E402

# A vocabulary of 8,000 made-up words from syllables, so that random prompts rarely share 60 characters by
# chance and dedup removes mostly what the generator meant to repeat.
_SYLLABLES = ["ba", "ko", "ri", "te", "mu", "sa", "lin", "dor", "pe", "vu", "zan", "qui", "fo", "gel", "hy", "wim",
              "tra", "ne", "oc", "ju"]
WORDS = [a + b + c for a in _SYLLABLES for b in _SYLLABLES for c in _SYLLABLES]
ADJECTIVES = ["small", "bright", "quiet", "funny", "ancient", "modern", "gentle", "brave", "clever", "lazy", "noisy",
              "shiny", "rusty", "golden"]
TEMPLATES = (
    ("generation", "Write a {adj} story about a {a} and a {b} who find a {c} (number {n})."),
    ("generation", "Write a poem about the {a} in the {b}, in {n} lines, mentioning a {c}."),
    ("open_qa", "What is the difference between a {a} and a {b}? I saw one near the {c} {n} times."),
    ("brainstorming", "List {n} ideas for a party with a {a}, a {b} and a {c} theme."),
    ("rewrite", "Rewrite this sentence to be more formal: the {adj} {a} took my {b} to the {c} {n} times."),
    ("summarization", "Summarize this text: The {a} met the {b}. They built a {c}. It took {n} days."),
    ("classification", "Classify the sentiment of this review: the {adj} {a} broke after {n} days, {c}."),
    ("closed_qa", "Answer using the text. Text: the {a} lives near the {b} with {n} {c}s. Question: where?"),
    ("extract", "Extract the animals from this text: a {a}, a {b} and {n} {c}s walked by."),
    ("other", "Convert {n} {a}s into {b} units for my {c} project."),
)
PREAMBLES = (
    "You are a helpful assistant for our online shop. Always answer politely, in at most three sentences, "
    "and never mention competitors. ",
    "I am a teacher preparing materials for a class of ten-year-old children, please keep the language simple "
    "and friendly. ",
    "Context: internal support bot v2. Follow the style guide strictly and refuse questions about pricing. ",
)


def card(rng: random.Random) -> str:
    digits = [4] + [rng.randint(0, 9) for _ in range(14)]
    digits.append(next(c for c in range(10) if luhn_valid("".join(map(str, digits + [c])))))
    text = "".join(map(str, digits))
    return " ".join(text[i : i + 4] for i in range(0, 16, 4))


PII_MAKERS = (
    lambda r: f"My email is {r.choice(WORDS)}.{r.randint(1, 999)}+shop@mail.{r.choice(WORDS)}.com.",
    lambda r: f"Call me at +1 ({r.randint(200, 999)}) {r.randint(200, 999)}-{r.randint(1000, 9999)}.",
    lambda r: f"My phone is 0{r.randint(10, 99)} {r.randint(1000, 9999)} {r.randint(1000, 9999)}.",
    lambda r: f"Charge card {card(r)} please.",
    lambda r: "Send it to IBAN DE89 3704 0044 0532 0130 00.",
    lambda r: f"My server is at 10.{r.randint(0, 255)}.{r.randint(0, 255)}.{r.randint(1, 254)}.",
    lambda r: f"My SSN is {r.randint(100, 665)}-{r.randint(10, 99)}-{r.randint(1000, 9999)}.",
    lambda r: f"I live at {r.randint(1, 999)} {r.choice(WORDS).title()} Street.",
)


def generate(path: Path, n_prompts: int, n_users: int, seed: int) -> None:
    rng = random.Random(seed)
    users = [f"user{i:06d}" for i in range(n_users)]
    weights = [1 / (i + 1) ** 1.1 for i in range(n_users)]
    # cumulative weights once: random.choices with cum_weights is O(log n) per draw
    cum, total = [], 0.0
    for w in weights:
        total += w
        cum.append(total)
    drawn = rng.choices(users, cum_weights=cum, k=n_prompts)
    start = datetime(2024, 1, 1, tzinfo=timezone.utc)
    history: list[str] = []
    with open(path, "w", encoding="utf-8") as f:
        for i, user in enumerate(drawn):
            if history and rng.random() < 0.03:
                text = rng.choice(history)  # an exact re-send
                category = None
            else:
                category, template = rng.choice(TEMPLATES)
                text = template.format(adj=rng.choice(ADJECTIVES), a=rng.choice(WORDS), b=rng.choice(WORDS),
                                       c=rng.choice(WORDS), n=rng.randint(2, 9999))
                if rng.random() < 0.08:
                    text = rng.choice(PREAMBLES) + text
                if rng.random() < 0.05:
                    text = rng.choice(PII_MAKERS)(rng) + " " + text
                if len(history) < 5000:
                    history.append(text)
            prompt: object = text
            if rng.random() < 0.1:
                prompt = [{"role": "user", "content": "Hi!"},
                          {"role": "assistant", "content": "Hello! How can I help?"},
                          {"role": "user", "content": text}]
                category = "chat"
            record = {"id": f"r{i}", "prompt": prompt, "user_id": user, "source": "api",
                      "created_at": (start + timedelta(seconds=rng.randint(0, 300 * 86400))).strftime(
                          "%Y-%m-%dT%H:%M:%SZ")}
            if category is not None and rng.random() >= 0.3:
                record["category"] = category
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", default=None, help="work directory (default: a temporary one, removed)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        data, db = work / "prompts.jsonl", str(work / "prompts.db")
        rows = []

        def phase(name: str, fn) -> None:  # noqa: ANN001
            start = time.perf_counter()
            cpu = time.process_time()
            fn()
            rows.append((name, time.perf_counter() - start, time.process_time() - cpu, peak_mb()))
            print(f"[{name}] {rows[-1][1]:.1f} s", file=sys.stderr, flush=True)

        phase("generate (untimed)", lambda: generate(data, args.prompts, args.users, args.seed))
        size_mb = data.stat().st_size / 1e6
        phase("ingest", lambda: PromptStore(db).ingest_file(data))
        phase("curate", lambda: curate(CurateConfig(db=db)))
        phase("export", lambda: export(PromptExportConfig(db=db, out=str(work / "sets"))))
        manifest = json.loads((work / "sets" / "manifest.json").read_text())
        report = json.loads((work / "sets" / "report.json").read_text())

    timed = [r for r in rows if r[0] != "generate (untimed)"]
    total = sum(r[1] for r in timed)
    print(f"\n{args.prompts:,} prompts ({size_mb:.0f} MB JSONL) from {args.users:,} users; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the end")
    print("| phase | wall s | CPU s | peak RSS MB |\n|---|---:|---:|---:|")
    for name, wall, cpu, mb in rows:
        print(f"| {name} | {wall:.1f} | {cpu:.1f} | {mb:.0f} |")
    print(f"| **ingest + curate + export** | **{total:.1f}** | | **{max(r[3] for r in timed):.0f}** |")
    steps = {s["step"]: s for s in report["steps"]}
    print("\ncuration steps (s): " + ", ".join(f"{k} {v}" for k, v in report["seconds"].items()))
    print("removed: " + ", ".join(f"{k} {s['removed']}" for k, s in steps.items()))
    print("PII found: " + ", ".join(f"{k} {v}" for k, v in steps["pii"]["found"].items()))
    print("exported: " + ", ".join(f"{k} {v}" for k, v in manifest["counts"].items()))


if __name__ == "__main__":
    main()
