"""SFT throughput: `chatloop sft` against TRL's SFTTrainer on the same checkpoint, data, batch and length.

    .venv/bin/python benchmarks/sft_throughput.py                 # tiny, packed and unpacked, ~5-10 minutes
    .venv/bin/python benchmarks/sft_throughput.py --threads 1 --clock cpu   # steadier on a busy machine
    .venv/bin/python benchmarks/sft_throughput.py --presets tiny small
    .venv/bin/python benchmarks/sft_throughput.py --quick         # smoke run, a few minutes

Needs TRL (`pip install -e .[bench]`); nothing is downloaded. Setup, in the parent process:

- demonstrations: the first --records chat records of dolly_2k_chat.jsonl (from $CHATLOOP_DATA, else
  ../shared/data next to the repository) whose rendering fits in --seq-len tokens, so that neither side
  truncates (ours would cut the prompt, TRL cuts the end) and both train on exactly the same examples;
- a byte-level BPE (chatloop.tokenizer.train_tokenizer, --vocab tokens) learned from those texts;
- a randomly initialised chatloop GPT of each preset (max_seq_len raised to --seq-len), saved with
  chatloop.checkpoint.save_model: a Hugging Face Llama checkpoint directory that both sides load.

Then one worker subprocess per side, per preset and per mode (packed / unpacked), each running its real
end-to-end training entry point:

- ours: `chatloop.train.sft.sft(SFTConfig(...))` itself. Two module attributes of chatloop.train.sft are
  wrapped, both only observing: `lr_at` (called once at the top of every optimizer step) marks the step
  boundary, where the worker answers the parent and waits for the next command, and `collate` counts the
  non-pad tokens of the step's batch. A step's time is from one boundary to the next: collate, forward, loss,
  backward, clipping, AdamW, and the loop's own bookkeeping.
- TRL: `SFTTrainer(...).train()`, with a TrainerCallback whose on_step_end is the boundary, and a
  training_step override that counts the batch's non-pad tokens before calling TRL's own. A step's time is
  from one on_step_end to the next: fetching and collating the batch, TRL's forward (fused LM head, loss,
  entropy/accuracy metrics), backward, clipping, AdamW, scheduler.

The parent warms each worker up, then asks for one step at a time alternating sides (flipping the order each
round), so load from other processes on a shared machine hits both alike. Tokens/s is the median over timed
steps of (non-pad tokens of the step / seconds of the step), counted the same way for both sides. --clock cpu
times by the worker's CPU time instead of the wall clock (with --threads 1), which other processes on a
shared machine do not inflate; both are recorded either way. One-time setup (tokenization, packing, model
load, our initial validation pass, TRL's dataset preparation) happens before the first step and is never
timed. Peak memory is each worker's ru_maxrss (setup included).

What is matched: weights, tokenizer, examples, seq_len, batch size (rows per step), fp32, AdamW (fused;
betas 0.9/0.95, eps 1e-8, no weight decay, lr 1e-4, cosine schedule), grad-norm clipping at 1.0, no
activation checkpointing (TRL's default turns it on), no dropout (HF's Llama has none, so ours runs with
dropout 0), loss on assistant tokens only (content and end of turn; TRL through assistant_only_loss=True and
a copy of our chat template with {% generation %} markers, checked to give identical ids and masks), no
gradient accumulation, no logging, saving or evaluation inside the timed window, dataloader workers 0,
torch's default thread count (or --threads). Unpacked, both sides get the same batches (TRL reads the
examples sequentially in our first-epoch order). Packed, each library packs its own way: ours next-fit in
shuffled order into B rows of <= seq_len, attention confined by a (B, 1, T, T) block-diagonal mask; TRL's
"bfd" (best-fit decreasing) bins, which its padding-free collator concatenates into one (1, B x seq_len) row
that transformers confines by position ids (on a CPU: a dense block-diagonal mask over the whole row).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, TextIO

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA_FILE = Path("sft/dolly-2k-chat/dolly_2k_chat.jsonl")
TARGET_RATIO = 2.5
LR, BETAS, EPS, WEIGHT_DECAY, GRAD_CLIP, SEED = 1e-4, (0.9, 0.95), 1e-8, 0.0, 1.0, 1337

# Our chat template (chatloop.tokenizer.CHAT_TEMPLATE) with TRL's {% generation %} markers around what our
# loss mask covers: an assistant turn's content and its end-of-turn token, not its role token.
TRL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|assistant|>' }}"
    "{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["tiny"], help="chatloop.model.PRESETS names (e.g. tiny small)")
    p.add_argument("--modes", nargs="+", default=["packed", "unpacked"], choices=["packed", "unpacked"])
    p.add_argument("--records", type=int, default=1000, help="demonstrations to use (before the length filter)")
    p.add_argument("--vocab", type=int, default=4096, help="tokenizer vocabulary size")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side")
    p.add_argument("--steps", type=int, default=8, help="timed steps per side")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="time steps by the wall clock or by the worker's CPU time (needs --threads 1)")
    p.add_argument("--data", default="", help=f"demonstrations JSONL (default: $CHATLOOP_DATA/{DATA_FILE})")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny, few records and steps, seq_len 256")
    p.add_argument("--out", default="", help="results JSON (default benchmarks/results/sft_throughput.json)")
    p.add_argument("--verbose", action="store_true", help="show the workers' stderr")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.presets, args.records, args.seq_len, args.batch_size, args.warmup, args.steps = \
            ["tiny"], 300, 256, 4, 1, 3
    args.out = Path(args.out) if args.out else _bench.RESULTS / (
        "sft_throughput_quick.json" if args.quick else "sft_throughput.json")
    return args


def data_path(arg: str) -> Path:
    if arg:
        return Path(arg)
    root = Path(os.environ["CHATLOOP_DATA"]) if os.environ.get("CHATLOOP_DATA") else REPO.parent / "shared" / "data"
    return root / DATA_FILE


# ---------------------------------------------------------------- worker side


class StepChannel:
    """The worker's end of the protocol, driven from inside a training loop.

    `boundary(tokens)` is called between optimizer steps. It answers the running "step" command (seconds since
    it arrived, and `tokens`), then serves commands until the next "step" (returns False: run one more step)
    or "exit" (returns True: stop).
    """

    def __init__(self) -> None:
        import torch

        self.device = torch.device("cpu")
        self.out: TextIO = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)  # library output (progress bars, warnings) must not corrupt the protocol
        self.started: float | None = None
        self.started_cpu = 0.0
        self.rss_setup_mb = _bench.rss_mb()

    def reply(self, record: dict[str, Any]) -> None:
        self.out.write(json.dumps(record) + "\n")
        self.out.flush()

    def boundary(self, tokens: int) -> bool:
        if self.started is not None:
            self.reply({"seconds": time.perf_counter() - self.started,
                        "cpu_seconds": time.process_time() - self.started_cpu, "tokens": tokens})
            self.started = None
        for line in sys.stdin:
            op = json.loads(line)["op"]
            if op == "memory":
                peak = _bench.peak_memory(self.device)["peak_mb"]
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


def ours_worker(spec: dict[str, Any]) -> None:
    import torch

    import chatloop.train.sft as sft_module

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    channel = StepChannel()
    real_lr_at, real_collate = sft_module.lr_at, sft_module.collate
    counted = {"tokens": 0, "stop": False}

    def lr_at(step: int, cfg: Any) -> float:  # the top of every optimizer step
        if not counted["stop"]:
            counted["stop"] = channel.boundary(counted["tokens"])
        counted["tokens"] = 0
        return real_lr_at(step, cfg)

    def collate(rows: list[list[int]], examples: list[Any], pad_id: int, device: Any) -> Any:
        batch = real_collate(rows, examples, pad_id, device)
        counted["tokens"] += int((batch[0] != pad_id).sum())
        return batch

    sft_module.lr_at, sft_module.collate = lr_at, collate
    cfg = sft_module.SFTConfig(
        out=spec["out"], model=spec["dir"], data=[spec["train"]], val_data=[spec["val"]], seq_len=spec["seq_len"],
        packing=spec["mode"] == "packed", epochs=1, max_steps=spec["total_steps"], batch_size=spec["batch_size"],
        lr=LR, beta1=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP,
        dropout=0.0, precision="fp32", device="cpu", seed=SEED, log_every=10**9, save_every=10**9, progress=False,
    )
    sft_module.sft(cfg)  # runs the remaining untimed step and finishes (validation, checkpoint) after "exit"


def trl_worker(spec: dict[str, Any]) -> None:
    import datasets
    import numpy as np
    import torch
    import transformers
    import trl

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    channel = StepChannel()
    tokenizer = transformers.AutoTokenizer.from_pretrained(spec["dir"])
    tokenizer.chat_template = TRL_CHAT_TEMPLATE
    model = transformers.AutoModelForCausalLM.from_pretrained(spec["dir"], dtype=torch.float32,
                                                              attn_implementation="sdpa")
    records = [json.loads(line) for line in Path(spec["train"]).read_text().splitlines() if line.strip()]
    packed = spec["mode"] == "packed"
    if not packed:
        # Unpacked, both sides see the same batches: our sft's first-epoch order, read sequentially by TRL.
        records = [records[i] for i in np.random.default_rng([SEED, 0]).permutation(len(records))]
    dataset = datasets.Dataset.from_list([{"messages": r["messages"]} for r in records])
    args = trl.SFTConfig(
        output_dir=spec["out"], max_length=spec["seq_len"], per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1, packing=packed, packing_strategy="bfd", padding_free=packed,
        assistant_only_loss=True, use_cpu=True, bf16=False, fp16=False, report_to=[], eval_strategy="no",
        save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        dataloader_pin_memory=False, max_steps=spec["total_steps"], learning_rate=LR, lr_scheduler_type="cosine",
        warmup_steps=0, weight_decay=WEIGHT_DECAY, max_grad_norm=GRAD_CLIP, adam_beta1=BETAS[0],
        adam_beta2=BETAS[1], adam_epsilon=EPS, optim="adamw_torch_fused", seed=SEED,
        train_sampling_strategy="random" if packed else "sequential",
        activation_checkpointing=False,  # TRL's default is on (`gradient_checkpointing`); ours recomputes nothing
    )
    counted = {"tokens": 0}
    pad_id = tokenizer.pad_token_id

    class Counting(trl.SFTTrainer):
        def training_step(self, model: Any, inputs: dict[str, Any], *rest: Any, **kwargs: Any) -> Any:
            counted["tokens"] += int((inputs["input_ids"] != pad_id).sum())
            return super().training_step(model, inputs, *rest, **kwargs)

    class Boundary(transformers.TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._boundary(control)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._boundary(control)

        def _boundary(self, control: Any) -> None:
            if channel.boundary(counted["tokens"]):
                control.should_training_stop = True
            counted["tokens"] = 0

    trainer = Counting(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                       callbacks=[Boundary()])
    trainer.train()


# ---------------------------------------------------------------- parent side


def read_records(path: Path, limit: int) -> list[dict[str, Any]]:
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                records.append(json.loads(line))
            if len(records) >= limit:
                break
    return records


def build_tokenizer(records: list[dict[str, Any]], vocab: int, tmp: Path) -> Any:
    from chatloop.tokenizer import TokenizerConfig, train_tokenizer

    texts = tmp / "texts.jsonl"
    with open(texts, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({"text": "\n".join(m["content"] for m in r["messages"])}) + "\n")
    return train_tokenizer(TokenizerConfig(inputs=[str(texts)], out=str(tmp / "tokenizer"), vocab_size=vocab))


def check_trl_rendering(directory: Path, records: list[dict[str, Any]], tokenizer: Any) -> dict[str, Any]:
    """TRL's rendering (apply_chat_template with our marked template) against ours: ids and loss masks."""
    import transformers

    hf = transformers.AutoTokenizer.from_pretrained(directory)
    same_ids = same_masks = 0
    for r in records:
        ids, mask = tokenizer.render_chat(r["messages"])
        out = hf.apply_chat_template(r["messages"], chat_template=TRL_CHAT_TEMPLATE, tokenize=True,
                                     return_dict=True, return_assistant_tokens_mask=True)
        same_ids += out["input_ids"] == ids
        same_masks += [bool(b) for b in out["assistant_masks"]] == mask
    return {"records": len(records), "identical_ids": same_ids, "identical_loss_masks": same_masks}


def steps_available(lengths: list[int], seq_len: int, batch_size: int, packing: bool) -> int:
    """Optimizer steps in our first epoch (our sft plans with the permutation of seed [SEED, 0])."""
    import numpy as np

    from chatloop.train.sft import pack_rows

    order = np.random.default_rng([SEED, 0]).permutation(len(lengths))
    return len(pack_rows(order, lengths, seq_len, packing)) // batch_size


def run_pair(spec: dict[str, Any], args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Both sides of one (preset, mode): warmup, alternating timed steps, memory."""
    replies, setup, memory = _bench.run_sides(__file__, spec, ("ours", "trl"), tmp, args.warmup, args.steps,
                                              args.verbose)
    key = "cpu_seconds" if args.clock == "cpu" else "seconds"
    result: dict[str, Any] = {}
    for side, rows in replies.items():
        result[side] = {
            "tokens_per_s": round(statistics.median(r["tokens"] / r[key] for r in rows), 1),
            "tokens_per_s_aggregate": round(sum(r["tokens"] for r in rows) / sum(r[key] for r in rows), 1),
            "step_s": {k: round(v, 4) if isinstance(v, float) else v
                       for k, v in _bench.summary([r[key] for r in rows]).items()},
            "wall_step_median_s": round(statistics.median(r["seconds"] for r in rows), 4),
            "cpu_step_median_s": round(statistics.median(r["cpu_seconds"] for r in rows), 4),
            "tokens_per_step_median": statistics.median(r["tokens"] for r in rows),
            "setup_s": round(setup[side], 1),
            "peak_rss_mb": round(memory[side]["peak_mb"], 1),
            "rss_at_first_step_mb": round(memory[side]["rss_at_first_step_mb"], 1),
            "steps": [[round(r["seconds"], 4), round(r["cpu_seconds"], 4), r["tokens"]] for r in rows],
        }
    result["ratio"] = round(result["ours"]["tokens_per_s"] / result["trl"]["tokens_per_s"], 3)
    return result


def code_state() -> dict[str, Any]:
    """The commit measured, and which of chatloop's files differ from it (others edit the tree meanwhile)."""
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], capture_output=True, text=True, check=True, cwd=REPO).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    changed = [line[3:] for line in git("status", "--porcelain", "--", "chatloop").splitlines()]
    return {"commit": git("rev-parse", "HEAD"), "uncommitted_chatloop_files": changed}


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
    from chatloop.train.sft import render_examples

    source = data_path(args.data)
    if not source.is_file():
        sys.exit(f"{source}: demonstrations not found (set CHATLOOP_DATA or pass --data)")
    _bench.check_clock(args.clock, args.threads, torch.device("cpu"))
    info = _bench.machine(torch.device("cpu"))
    info.update(clock=args.clock, trl=trl.__version__, uptime_start=uptime(), code=code_state(),
                worker_threads=args.threads or info["threads"])
    print(f"# SFT throughput, cpu fp32: {info['cpu']}, {info['worker_threads']} threads, {args.clock} clock; "
          f"torch {info['torch']}, transformers {info['transformers']}, trl {info['trl']}")
    print(f"uptime (start): {info['uptime_start']}")

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        records = read_records(source, args.records)
        tokenizer = build_tokenizer(records, args.vocab, tmp)
        report: Counter = Counter()
        examples = render_examples([r["messages"] for r in records], tokenizer, args.seq_len, "drop", report)
        kept = [r for r in records if len(tokenizer.render_chat(r["messages"])[0]) <= args.seq_len]
        assert len(kept) == len(examples)
        val, train = kept[:16], kept[16:]  # our sft needs a validation set (evaluated outside the timed window)
        lengths = [len(tokenizer.render_chat(r["messages"])[0]) for r in train]
        for name, rows in (("train", train), ("val", val)):
            (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        data = {"file": str(source), "records_read": len(records), "dropped_too_long": len(records) - len(kept),
                "train_examples": len(train), "tokens": sum(lengths),
                "mean_tokens": round(sum(lengths) / len(train), 1)}
        print(f"data: {data['train_examples']} examples (of {len(records)} read; {data['dropped_too_long']} longer "
              f"than {args.seq_len} dropped), {data['mean_tokens']} tokens each on average; "
              f"tokenizer {tokenizer.vocab_size} tokens")
        total_steps = args.warmup + args.steps + 1
        for mode in args.modes:
            have = steps_available(lengths, args.seq_len, args.batch_size, mode == "packed")
            if have < total_steps:
                sys.exit(f"only {have} {mode} steps in {len(train)} examples; need {total_steps}: raise --records")

        for name in args.presets:
            torch.manual_seed(SEED)
            model = GPT(preset(name, {"vocab_size": tokenizer.vocab_size, "max_seq_len": args.seq_len}))
            directory = tmp / name
            save_model(model, directory, tokenizer)
            if name == args.presets[0]:
                data["trl_rendering_check"] = check_trl_rendering(directory, train, tokenizer)
                print(f"TRL rendering vs ours: {data['trl_rendering_check']}")
            results[name] = {"params": model.num_params(), "modes": {}}
            for mode in args.modes:
                spec = {"dir": str(directory), "train": str(tmp / "train.jsonl"), "val": str(tmp / "val.jsonl"),
                        "mode": mode, "seq_len": args.seq_len, "batch_size": args.batch_size,
                        "total_steps": total_steps, "threads": args.threads}
                print(f"{name} {mode}: running ({uptime()})", flush=True)
                results[name]["modes"][mode] = run_pair(spec, args, tmp / f"{name}-{mode}")

    info["uptime_end"] = uptime()
    print(f"uptime (end): {info['uptime_end']}")
    print("\n| preset | mode | ours tokens/s | TRL tokens/s | ratio | target | ours peak RSS MiB | TRL peak RSS MiB |"
          " ours step s | TRL step s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        for mode, m in r["modes"].items():
            o, t = m["ours"], m["trl"]
            print(f"| {name} ({r['params'] / 1e6:.1f}M) | {mode} | {o['tokens_per_s']:,.0f} | "
                  f"{t['tokens_per_s']:,.0f} | "
                  f"{m['ratio']:.2f}x | >= {TARGET_RATIO}x ({_bench.verdict(m['ratio'], TARGET_RATIO)}) | "
                  f"{o['peak_rss_mb']:,.0f} | {t['peak_rss_mb']:,.0f} | {o['step_s']['median_s']:.3f} | "
                  f"{t['step_s']['median_s']:.3f} |")

    record = {"benchmark": "sft_throughput", "command": " ".join(["benchmarks/sft_throughput.py", *sys.argv[1:]]),
              "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": info, "precision": "fp32",
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "trl": trl.__version__},
              "batch_size": args.batch_size, "seq_len": args.seq_len, "warmup": args.warmup, "steps": args.steps,
              "clock": args.clock, "threads": args.threads, "data": data, "target_ratio": TARGET_RATIO,
              "presets": results, "step_columns": ["wall_s", "cpu_s", "non_pad_tokens"]}
    _bench.write_results(args.out, record)


if __name__ == "__main__":
    main()
