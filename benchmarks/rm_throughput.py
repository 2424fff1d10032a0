"""Reward-model throughput: `chatloop rm` (grouped K-wise loss) against TRL's RewardTrainer on pairs.

    .venv/bin/python benchmarks/rm_throughput.py --threads 1 --clock cpu   # steadier on a busy machine
    .venv/bin/python benchmarks/rm_throughput.py          # K = 4 and 9, 2 threads, wall clock (for an idle box)
    .venv/bin/python benchmarks/rm_throughput.py --quick  # smoke run, a few minutes

Needs TRL (`pip install -e .[bench]`); nothing is downloaded. The point measured (issue 5): a ranking of K
responses to one prompt holds C(K,2) comparisons. chatloop's grouped loss scores each response once (K forward
passes per prompt) and forms all its pairs from those K rewards; a pairwise trainer puts both sides of every
pair through the model (2 C(K,2) passes). The ratio of passes is K - 1: 3 at K = 4, 8 at K = 9, which are the
targets, so they are met only if our cost per forward/backward sequence is no worse than TRL's.

Setup, in the parent process (never timed):

- text: user turns and assistant replies of the OpenAssistant trees (preference/oasst-en-100-trees, from
  $CHATLOOP_DATA, else ../shared/data next to the repository);
- a byte-level BPE (chatloop.tokenizer.train_tokenizer, --vocab tokens) learned from that text;
- for each K: synthetic rankings, each a prompt (a user turn cut to at most --prompt-tokens tokens) with K
  distinct replies, each cut to a length drawn uniformly from --response-tokens, and a random order of ranks
  1..K (no ties). The rankings go to a chatloop rankings file; `chatloop.train.reward.encode_rankings` (our
  own tokenisation) turns them into token ids, and every pair (winner, loser) of every ranking becomes one
  TRL example with exactly those ids as chosen_ids / rejected_ids, so both sides see the same tokens;
- a randomly initialised chatloop GPT of the tiny preset with the scalar head, saved with
  chatloop.checkpoint.save_model: a LlamaForSequenceClassification (num_labels = 1) directory that both sides
  load. A parity check compares our rewards with transformers' on a few sequences.

Then, per K, one worker subprocess per side, each running its real end-to-end training entry point:

- ours: `chatloop.train.reward.reward_model(RMConfig(...))` itself, batch_size = P prompts (all K responses
  of each in one forward pass: reward_scores, grouped_loss, backward, clipping, fused AdamW). Two module
  attributes are wrapped, both only observing: `lr_at` (called at the top of every optimizer step) marks the
  step boundary, and `grouped_loss` counts the step's comparisons.
- TRL: `RewardTrainer(...).train()` on the expanded pairs, per_device_train_batch_size = P C(K,2) pairs, so
  both sides process the same number of comparisons per optimizer step. A TrainerCallback's on_step_end is
  the boundary; a training_step override counts the batch's pairs.

The parent warms each worker up, then asks for one step at a time, alternating sides and flipping the order
each round, so load from other processes on a shared machine hits both alike. Comparisons/s is the median
over timed steps of (pairs in the step / seconds of the step). --clock cpu times by the worker's CPU time
instead of the wall clock (with --threads 1), which other processes on a shared machine do not inflate; both
are recorded either way. Peak memory is each worker's ru_maxrss.

Matched: weights, tokens of every response, comparisons per step, fp32, AdamW (fused; betas 0.9/0.95,
eps 1e-8, no weight decay, lr 5e-5), grad-norm clipping at 1.0, no dropout, no gradient checkpointing (TRL's
RewardConfig turns it on by default; it is turned off here), no gradient accumulation, no logging, saving or
evaluation inside the timed window, dataloader workers 0, torch's default thread count. Each library keeps
its own: batching (ours P prompts x K responses right-padded to the longest, no attention mask; TRL's 2 x
pairs right-padded with an attention mask), shuffling, and learning-rate schedule (both cosine).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA_FILE = Path("preference/oasst-en-100-trees/en_100_tree.jsonl.gz")
TARGETS = {4: 3.0, 9: 8.0}  # issue 5; for another K the target is the ratio of forward passes, K - 1
LR, BETAS, EPS, WEIGHT_DECAY, GRAD_CLIP, SEED = 5e-5, (0.9, 0.95), 1e-8, 0.0, 1.0, 1337


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ks", nargs="+", type=int, default=[4, 9], help="responses per prompt (K)")
    p.add_argument("--pairs-per-step", type=int, default=72,
                   help="comparisons per optimizer step; our batch is this / C(K,2) prompts (must divide)")
    p.add_argument("--preset", default="tiny", help="chatloop.model.PRESETS name")
    p.add_argument("--vocab", type=int, default=4096, help="tokenizer vocabulary size")
    p.add_argument("--seq-len", type=int, default=256, help="our seq_len and TRL's max_length")
    p.add_argument("--prompt-tokens", type=int, default=48, help="prompts are cut to at most this many tokens")
    p.add_argument("--response-tokens", type=int, nargs=2, default=[64, 128], metavar=("MIN", "MAX"),
                   help="each response is cut to a length drawn uniformly from [MIN, MAX] tokens")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side")
    p.add_argument("--steps", type=int, default=10, help="timed steps per side")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="time steps by the wall clock or by the worker's CPU time (needs --threads 1)")
    p.add_argument("--data", default="", help=f"OpenAssistant trees (default: $CHATLOOP_DATA/{DATA_FILE})")
    p.add_argument("--quick", action="store_true", help="smoke run: fewer steps")
    p.add_argument("--out", default="", help="results JSON (default benchmarks/results/rm_throughput.json)")
    p.add_argument("--verbose", action="store_true", help="show the workers' stderr")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.warmup, args.steps = 1, 3
    for k in args.ks:
        if k < 2 or args.pairs_per_step % math.comb(k, 2):
            p.error(f"--pairs-per-step={args.pairs_per_step} is not a multiple of C({k},2) = {math.comb(k, 2)}")
    name = "rm_throughput" + ("_cpu_clock" if args.clock == "cpu" else "") + ("_quick" if args.quick else "")
    args.out = Path(args.out) if args.out else _bench.RESULTS / f"{name}.json"
    return args


def data_path(arg: str) -> Path:
    if arg:
        return Path(arg)
    root = Path(os.environ["CHATLOOP_DATA"]) if os.environ.get("CHATLOOP_DATA") else REPO.parent / "shared" / "data"
    return root / DATA_FILE


# ---------------------------------------------------------------- worker side


class StepChannel:
    """The worker's end of the protocol, driven from inside a training loop.

    `boundary(pairs)` is called between optimizer steps. It answers the running "step" command (seconds since
    it arrived, and `pairs`), then serves commands until the next "step" (returns False: run one more step)
    or "exit" (returns True: stop).
    """

    def __init__(self) -> None:
        self.out: TextIO = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)  # library output (progress bars, warnings) must not corrupt the protocol
        self.started: float | None = None
        self.started_cpu = 0.0
        self.rss_setup_mb = _bench.rss_mb()

    def reply(self, record: dict[str, Any]) -> None:
        self.out.write(json.dumps(record) + "\n")
        self.out.flush()

    def boundary(self, pairs: int, sequences: int) -> bool:
        if self.started is not None:
            self.reply({"seconds": time.perf_counter() - self.started,
                        "cpu_seconds": time.process_time() - self.started_cpu, "pairs": pairs,
                        "sequences": sequences})
            self.started = None
        for line in sys.stdin:
            op = json.loads(line)["op"]
            if op == "memory":
                peak = _bench.peak_memory(_cpu())["peak_mb"]
                self.reply({"peak_mb": peak, "rss_at_first_step_mb": self.rss_setup_mb})
            elif op == "ready":
                self.rss_setup_mb = _bench.rss_mb()
                self.reply({"ok": True})
            elif op == "step":
                self.started, self.started_cpu = time.perf_counter(), time.process_time()
                return False
            elif op == "exit":
                return True
            else:
                raise ValueError(f"unknown op {op!r}")
        return True


def _cpu() -> Any:
    import torch

    return torch.device("cpu")


def ours_worker(spec: dict[str, Any]) -> None:
    import torch

    import chatloop.train.reward as rm

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    channel = StepChannel()
    real_lr_at, real_grouped_loss = rm.lr_at, rm.grouped_loss
    counted = {"pairs": 0, "sequences": 0, "stop": False}

    def lr_at(step: int, cfg: Any) -> float:  # the top of every optimizer step
        if not counted["stop"]:
            counted["stop"] = channel.boundary(counted["pairs"], counted["sequences"])
        counted["pairs"] = counted["sequences"] = 0
        return real_lr_at(step, cfg)

    def grouped_loss(rewards: torch.Tensor, groups: list[Any]) -> Any:
        loss, correct, total = real_grouped_loss(rewards, groups)
        counted["pairs"] += total
        counted["sequences"] += int(rewards.shape[0])
        return loss, correct, total

    rm.lr_at, rm.grouped_loss = lr_at, grouped_loss
    cfg = rm.RMConfig(
        out=spec["out"], model=spec["dir"], data=[spec["rankings"]],
        val_fraction=0.0,  # reward_model still holds out one ranking (evaluated after the timed window)
        seq_len=spec["seq_len"], epochs=1, max_steps=spec["total_steps"], batch_size=spec["prompts_per_step"],
        lr=LR, beta1=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP,
        warmup_steps=0, precision="fp32", device="cpu", seed=SEED, log_every=10**9, save_every=10**9,
        progress=False,
    )
    rm.reward_model(cfg)  # runs the remaining untimed step and finishes (normalisation, eval, save) after "exit"


def trl_worker(spec: dict[str, Any]) -> None:
    import datasets
    import torch
    import transformers
    import trl

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    channel = StepChannel()
    tokenizer = transformers.AutoTokenizer.from_pretrained(spec["dir"])
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        spec["dir"], dtype=torch.float32, attn_implementation="sdpa")
    pairs = [json.loads(line) for line in Path(spec["pairs"]).read_text().splitlines() if line.strip()]
    dataset = datasets.Dataset.from_list(pairs)
    args = trl.RewardConfig(
        output_dir=spec["out"], max_length=spec["seq_len"], per_device_train_batch_size=spec["pairs_per_step"],
        gradient_accumulation_steps=1, gradient_checkpointing=False, use_cpu=True, bf16=False, fp16=False,
        report_to=[], eval_strategy="no", save_strategy="no", logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, dataloader_pin_memory=False, max_steps=spec["total_steps"], learning_rate=LR,
        lr_scheduler_type="cosine", warmup_steps=0, weight_decay=WEIGHT_DECAY, max_grad_norm=GRAD_CLIP,
        adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS, optim="adamw_torch_fused", seed=SEED,
    )
    counted = {"pairs": 0, "sequences": 0}

    class Counting(trl.RewardTrainer):
        def training_step(self, model: Any, inputs: dict[str, Any], *rest: Any, **kwargs: Any) -> Any:
            rows = int(inputs["input_ids"].shape[0])  # chosen then rejected
            counted["pairs"] += rows // 2
            counted["sequences"] += rows
            return super().training_step(model, inputs, *rest, **kwargs)

    class Boundary(transformers.TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._boundary(control)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._boundary(control)

        def _boundary(self, control: Any) -> None:
            if channel.boundary(counted["pairs"], counted["sequences"]):
                control.should_training_stop = True
            counted["pairs"] = counted["sequences"] = 0

    trainer = Counting(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                       callbacks=[Boundary()])
    if len(trainer.train_dataset) != len(pairs):
        raise RuntimeError(f"TRL dropped {len(pairs) - len(trainer.train_dataset)} pairs longer than max_length")
    trainer.train()


# ---------------------------------------------------------------- parent side


def oasst_texts(path: Path) -> tuple[list[str], list[str]]:
    """(user turns, assistant replies) of every usable message of the OpenAssistant trees."""
    from chatloop.io import read_jsonl

    users: list[str] = []
    replies: list[str] = []

    def walk(node: dict[str, Any]) -> None:
        text = str(node.get("text", "")).strip()
        if text and not node.get("deleted"):
            (users if node["role"] == "prompter" else replies).append(text)
        for child in node.get("replies", []):
            walk(child)

    for _, obj in read_jsonl(path):
        walk(obj["prompt"])
    return users, replies


def build_tokenizer(texts: list[str], vocab: int, tmp: Path) -> Any:
    from chatloop.tokenizer import TokenizerConfig, train_tokenizer

    source = tmp / "texts.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return train_tokenizer(TokenizerConfig(inputs=[str(source)], out=str(tmp / "tokenizer"), vocab_size=vocab))


def make_rankings(users: list[str], replies: list[str], tokenizer: Any, k: int, n: int,
                  args: argparse.Namespace, seed: int) -> list[dict[str, Any]]:
    """n synthetic K-wise rankings of real text: cut prompts and replies, random ranks without ties."""
    rng = random.Random(seed)
    lo, hi = args.response_tokens
    reply_ids = [ids for ids in tokenizer.encode_batch(replies) if len(ids) >= hi]
    prompt_ids = tokenizer.encode_batch(users)
    rankings = []
    for _ in range(n):
        prompt = tokenizer.decode(rng.choice(prompt_ids)[: args.prompt_tokens]).strip() or "Hello"
        responses = [tokenizer.decode(ids[: rng.randint(lo, hi)]) for ids in rng.sample(reply_ids, k)]
        ranks = list(range(1, k + 1))
        rng.shuffle(ranks)
        rankings.append({"prompt": prompt, "responses": responses, "ranks": ranks})
    return rankings


def parity_check(directory: Path, sequences: list[list[int]], pad_id: int) -> dict[str, Any]:
    """Our rewards against transformers' LlamaForSequenceClassification on the same right-padded batch."""
    import torch
    import transformers

    from chatloop.checkpoint import load_model
    from chatloop.train.reward import reward_scores

    ours = load_model(directory, head="scalar").eval()
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(directory, dtype=torch.float32).eval()
    width = max(len(s) for s in sequences)
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in sequences])
    mask = (torch.arange(width)[None] < torch.tensor([len(s) for s in sequences])[:, None]).long()
    with torch.no_grad():
        a = reward_scores(ours, sequences, pad_id, torch.device("cpu"))
        b = hf(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    return {"sequences": len(sequences), "max_abs_diff": float((a - b).abs().max()),
            "reward_std": float(a.std())}


def run_pair(spec: dict[str, Any], args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Both sides of one K: warmup, alternating timed steps, memory."""
    replies, setup, memory = _bench.run_sides(__file__, spec, ("ours", "trl"), tmp, args.warmup, args.steps,
                                              args.verbose)
    key = "cpu_seconds" if args.clock == "cpu" else "seconds"
    result: dict[str, Any] = {}
    for side, rows in replies.items():
        result[side] = {
            "comparisons_per_s": round(statistics.median(r["pairs"] / r[key] for r in rows), 2),
            "sequences_per_s": round(statistics.median(r["sequences"] / r[key] for r in rows), 2),
            "comparisons_per_s_aggregate": round(sum(r["pairs"] for r in rows) / sum(r[key] for r in rows), 2),
            "step_s": {k: round(v, 4) if isinstance(v, float) else v
                       for k, v in _bench.summary([r[key] for r in rows]).items()},
            "wall_step_median_s": round(statistics.median(r["seconds"] for r in rows), 4),
            "cpu_step_median_s": round(statistics.median(r["cpu_seconds"] for r in rows), 4),
            "comparisons_per_step": statistics.median(r["pairs"] for r in rows),
            "sequences_per_step": statistics.median(r["sequences"] for r in rows),
            "setup_s": round(setup[side], 1),
            "peak_rss_mb": round(memory[side]["peak_mb"], 1),
            "rss_at_first_step_mb": round(memory[side]["rss_at_first_step_mb"], 1),
            "steps": [[round(r["seconds"], 4), round(r["cpu_seconds"], 4), r["pairs"], r["sequences"]]
                      for r in rows],
        }
    result["ratio"] = round(result["ours"]["comparisons_per_s"] / result["trl"]["comparisons_per_s"], 3)
    return result


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        (ours_worker if spec["side"] == "ours" else trl_worker)(spec)
        return

    import torch
    import transformers
    import trl

    from chatloop.checkpoint import save_model
    from chatloop.model import GPT, preset
    from chatloop.train.reward import encode_rankings

    source = data_path(args.data)
    if not source.is_file():
        sys.exit(f"{source}: OpenAssistant trees not found (set CHATLOOP_DATA or pass --data)")
    _bench.check_clock(args.clock, args.threads, torch.device("cpu"))
    info = _bench.machine(torch.device("cpu"))
    info.update(clock=args.clock, trl=trl.__version__, uptime_start=uptime(),
                worker_threads=args.threads or info["threads"])
    print(f"# RM throughput, cpu fp32: {info['cpu']}, {info['worker_threads']} threads, {args.clock} clock; "
          f"torch {info['torch']}, "
          f"transformers {info['transformers']}, trl {info['trl']}")
    print(f"uptime (start): {info['uptime_start']}")

    results: dict[str, Any] = {}
    data: dict[str, Any] = {"file": str(source)}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        users, replies = oasst_texts(source)
        tokenizer = build_tokenizer(users + replies, args.vocab, tmp)
        torch.manual_seed(SEED)
        model = GPT(preset(args.preset, {"vocab_size": tokenizer.vocab_size, "max_seq_len": args.seq_len,
                                         "head": "scalar"}))
        directory = tmp / "model"
        save_model(model, directory, tokenizer)
        data.update(user_turns=len(users), replies=len(replies), tokenizer_vocab=tokenizer.vocab_size,
                    params=model.num_params())
        total_steps = args.warmup + args.steps + 1
        for k in args.ks:
            pairs_per_prompt = math.comb(k, 2)
            prompts_per_step = args.pairs_per_step // pairs_per_prompt
            # Enough rankings that our first epoch covers every step (reward_model holds one out).
            n = total_steps * prompts_per_step + 1
            rankings = make_rankings(users, replies, tokenizer, k, n, args, SEED + k)
            groups = encode_rankings(rankings, tokenizer, args.seq_len)
            lengths = [len(s) for g in groups for s in g.sequences]
            # Neither side may cut anything: ours would shorten the prompt, TRL would drop the pair.
            if max(lengths) >= args.seq_len:
                sys.exit(f"a sequence of {max(lengths)} tokens does not fit in --seq-len={args.seq_len}")
            rankings_file, pairs_file = tmp / f"rankings-k{k}.jsonl", tmp / f"pairs-k{k}.jsonl"
            rankings_file.write_text("".join(json.dumps(r) + "\n" for r in rankings), encoding="utf-8")
            pairs_file.write_text("".join(
                json.dumps({"chosen_ids": g.sequences[w], "rejected_ids": g.sequences[l_]}) + "\n"
                for g in groups for w, l_ in g.pairs))
            if k == args.ks[0]:
                data["parity_check"] = parity_check(directory, [s for g in groups[:4] for s in g.sequences],
                                                    tokenizer.pad_id)
                print(f"parity, our rewards vs transformers': {data['parity_check']}")
            data[f"k{k}"] = {"rankings": len(rankings), "pairs": sum(len(g.pairs) for g in groups),
                             "mean_tokens": round(statistics.mean(lengths), 1), "max_tokens": max(lengths)}
            spec = {"dir": str(directory), "rankings": str(rankings_file), "pairs": str(pairs_file),
                    "seq_len": args.seq_len, "prompts_per_step": prompts_per_step,
                    "pairs_per_step": args.pairs_per_step, "total_steps": total_steps, "threads": args.threads}
            print(f"K={k}: {len(rankings)} rankings, ours {prompts_per_step} prompts x {k} responses per step, "
                  f"TRL {args.pairs_per_step} pairs per step; {data[f'k{k}']['mean_tokens']} tokens per "
                  f"sequence on average; running ({uptime()})", flush=True)
            results[f"k{k}"] = {"k": k, "prompts_per_step": prompts_per_step, "target": TARGETS.get(k, k - 1.0),
                                **run_pair(spec, args, tmp / f"k{k}")}

    info["uptime_end"] = uptime()
    print(f"uptime (end): {info['uptime_end']}")
    print("\n| K | ours comparisons/s | TRL comparisons/s | ratio | target | met? | ours peak RSS MiB |"
          " TRL peak RSS MiB | ours step s | TRL step s |")
    print("|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    for r in results.values():
        o, t = r["ours"], r["trl"]
        print(f"| {r['k']} | {o['comparisons_per_s']:,.1f} | {t['comparisons_per_s']:,.1f} | {r['ratio']:.2f}x | "
              f">= {r['target']:g}x | {_bench.verdict(r['ratio'], r['target'])} | {o['peak_rss_mb']:,.0f} | "
              f"{t['peak_rss_mb']:,.0f} | {o['step_s']['median_s']:.3f} | {t['step_s']['median_s']:.3f} |")

    record = {"benchmark": "rm_throughput", "command": " ".join(["benchmarks/rm_throughput.py", *sys.argv[1:]]),
              "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": info, "precision": "fp32",
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "trl": trl.__version__},
              "preset": args.preset, "pairs_per_step": args.pairs_per_step, "seq_len": args.seq_len,
              "prompt_tokens": args.prompt_tokens, "response_tokens": args.response_tokens,
              "warmup": args.warmup, "steps": args.steps, "clock": args.clock, "threads": args.threads,
              "data": data, "results": results, "step_columns": ["wall_s", "cpu_s", "pairs", "sequences"]}
    _bench.write_results(args.out, record)


if __name__ == "__main__":
    main()
