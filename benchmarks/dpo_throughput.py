"""DPO throughput: `chatloop dpo` (all C(K,2) pairs of a K-wise ranking from K answers) against TRL's DPOTrainer
on the same pairs, in fp32 and bf16, in one run.

    nice -n 15 .venv/bin/python benchmarks/dpo_throughput.py --threads 1 --clock cpu   # BENCHMARKS.md's figures
    .venv/bin/python benchmarks/dpo_throughput.py --precisions fp32                    # 2 threads, wall clock

Needs TRL (`pip install -e .[bench]`); nothing is downloaded. The point measured (issue 21): a ranking of K answers
holds C(K,2) pairs. chatloop's DPO puts each answer through the policy once (forward and backward) and through the
frozen reference once (no grad), and forms every pair from those K log-probs; a pairwise trainer puts both sides of
every pair through both models (2 C(K,2) sequences each). The ratio of sequences is K - 1 = 3 at K = 4, which is
the target, so it is met only if our cost per sequence is no worse than TRL's.

Setup, in the parent process (never timed), shared with benchmarks/rm_throughput.py:

- text: user turns and assistant replies of the OpenAssistant trees (preference/oasst-en-100-trees);
- a byte-level BPE (--vocab tokens) learned from that text, with chatloop's chat template;
- synthetic K-wise rankings: a prompt (a user turn cut to at most --prompt-tokens tokens) with K distinct
  replies, each cut to a length drawn from --response-tokens, ranks a random order of 1..K (no ties). The
  rankings go to a chatloop rankings file; every pair (winner, loser) becomes one TRL example in the
  conversational format ({"prompt": [user message], "chosen": [assistant message], "rejected": [...]}), which
  TRL renders with the same chat template: the TRL worker checks that its tokenised prompt + chosen and
  prompt + rejected are exactly our sequences, token for token;
- a randomly initialised chatloop GPT of the tiny preset (language-model head), saved with save_model: a
  LlamaForCausalLM directory that both sides load as policy and as reference. A parity check compares our
  answer log-probs with transformers' on a few sequences.

Then, per precision, one worker subprocess per side, each running its real training entry point:

- ours: `chatloop.train.dpo.dpo(DPOConfig(...))` itself, batch_size = P prompts (all K answers of each in one
  policy forward and, since every timed step is in the first epoch, one reference forward). Two module attributes
  are wrapped, both only observing: `lr_at` (called at the top of every optimizer step) marks the step boundary
  and `dpo_loss` counts the step's pairs.
- TRL: `DPOTrainer(...).train()` on the expanded pairs, per_device_train_batch_size = P C(K,2) pairs, so both sides
  learn from the same number of pairs per optimizer step; the reference runs every step (precompute_ref_log_probs
  False, its default), as ours does in the first epoch. A TrainerCallback's on_step_end is the boundary; a
  training_step override counts the batch's pairs.

The parent warms each worker up, then asks for one step at a time, alternating sides and flipping the order each
round (benchmarks/_bench.py). Pairs/s is the median over timed steps of (pairs in the step / seconds of the step);
--clock cpu times by the worker's CPU time (with --threads 1), which other processes on a shared machine do not
inflate; both clocks are recorded either way.

Matched: weights (policy and reference), the tokens of every sequence, pairs per optimizer step, the precision
(fp32, or bf16 autocast over fp32 weights on both sides: TRL's bf16=True), beta 0.1 with the sigmoid loss, AdamW
(fused; betas 0.9/0.95, eps 1e-8, no weight decay, lr 1e-5 cosine, no warmup), grad-norm clipping at 1.0, no
dropout, no gradient checkpointing (DPOConfig turns it on by default; it is turned off here), no gradient
accumulation, no logging, saving or evaluation inside the timed window, dataloader workers 0. Each library keeps
its own batching (ours P x K right-padded answers without an attention mask; TRL's 2 x pairs with one), shuffling
and learning-rate schedule (both cosine).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench  # noqa: E402
import rm_throughput  # noqa: E402  (the OpenAssistant text, tokenizer, synthetic rankings, worker channel)

TARGET = 3.0  # issue 21, K = 4: the ratio of sequences, K - 1
LR, BETAS, EPS, WEIGHT_DECAY, GRAD_CLIP, BETA, SEED = 1e-5, (0.9, 0.95), 1e-8, 0.0, 1.0, 0.1, 1337


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, default=4, help="answers per prompt (K)")
    p.add_argument("--pairs-per-step", type=int, default=24,
                   help="pairs per optimizer step; our batch is this / C(K,2) prompts (must divide)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--preset", default="tiny", help="chatloop.model.PRESETS name")
    p.add_argument("--vocab", type=int, default=4096, help="tokenizer vocabulary size")
    p.add_argument("--seq-len", type=int, default=256, help="our seq_len and TRL's max_length")
    p.add_argument("--prompt-tokens", type=int, default=48, help="prompts are cut to at most this many tokens")
    p.add_argument("--response-tokens", type=int, nargs=2, default=[64, 128], metavar=("MIN", "MAX"),
                   help="each answer is cut to a length drawn uniformly from [MIN, MAX] tokens")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side")
    p.add_argument("--steps", type=int, default=4, help="timed steps per side")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="time steps by the wall clock or by the worker's CPU time (needs --threads 1)")
    p.add_argument("--data", default="",
                   help=f"OpenAssistant trees (default: $CHATLOOP_DATA/{rm_throughput.DATA_FILE})")
    p.add_argument("--out", default="",
                   help="results JSON (default benchmarks/results/dpo_throughput[_cpu_clock].json)")
    p.add_argument("--verbose", action="store_true", help="show the workers' stderr")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.k < 2 or args.pairs_per_step % math.comb(args.k, 2):
        p.error(f"--pairs-per-step={args.pairs_per_step} is not a multiple of C({args.k},2) = {math.comb(args.k, 2)}")
    name = "dpo_throughput" + ("_cpu_clock" if args.clock == "cpu" else "")
    args.out = Path(args.out) if args.out else _bench.RESULTS / f"{name}.json"
    return args


# ---------------------------------------------------------------- worker side


def ours_worker(spec: dict[str, Any]) -> None:
    import torch

    import chatloop.train.dpo as dpo

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    channel = rm_throughput.StepChannel()
    real_lr_at, real_dpo_loss = dpo.lr_at, dpo.dpo_loss
    counted = {"pairs": 0, "sequences": 0, "stop": False}

    def lr_at(step: int, cfg: Any) -> float:  # the top of every optimizer step
        if not counted["stop"]:
            counted["stop"] = channel.boundary(counted["pairs"], counted["sequences"])
        counted["pairs"] = counted["sequences"] = 0
        return real_lr_at(step, cfg)

    def dpo_loss(logps: torch.Tensor, ref_logps: torch.Tensor, groups: list[Any], beta: float, kind: str) -> Any:
        loss, stats = real_dpo_loss(logps, ref_logps, groups, beta, kind)
        counted["pairs"] += int(stats["pairs"])
        counted["sequences"] += int(logps.shape[0])
        return loss, stats

    dpo.lr_at, dpo.dpo_loss = lr_at, dpo_loss
    cfg = dpo.DPOConfig(
        out=spec["out"], policy=spec["dir"], data=[spec["rankings"]],
        val_fraction=0.0,  # split_by_conversation still holds out one ranking (evaluated after the timed window)
        seq_len=spec["seq_len"], epochs=1, max_steps=spec["total_steps"], batch_size=spec["prompts_per_step"],
        beta=BETA, lr=LR, beta1=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP,
        warmup_steps=0, precision=spec["precision"], device="cpu", seed=SEED, log_every=10**9, save_every=10**9,
        progress=False,
    )
    dpo.dpo(cfg)  # runs the remaining untimed step and finishes (evaluation, save) after "exit"


def trl_worker(spec: dict[str, Any]) -> None:
    import datasets
    import torch
    import transformers
    import trl

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    channel = rm_throughput.StepChannel()
    tokenizer = transformers.AutoTokenizer.from_pretrained(spec["dir"])
    model = transformers.AutoModelForCausalLM.from_pretrained(spec["dir"], dtype=torch.float32,
                                                              attn_implementation="sdpa")
    pairs = [json.loads(line) for line in Path(spec["pairs"]).read_text().splitlines() if line.strip()]
    dataset = datasets.Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
    bf16 = spec["precision"] == "bf16"
    args = trl.DPOConfig(
        output_dir=spec["out"], max_length=spec["seq_len"], per_device_train_batch_size=spec["pairs_per_step"],
        gradient_accumulation_steps=1, gradient_checkpointing=False, use_cpu=True, bf16=bf16, fp16=False,
        report_to=[], eval_strategy="no", save_strategy="no", logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, dataloader_pin_memory=False, max_steps=spec["total_steps"], learning_rate=LR,
        lr_scheduler_type="cosine", warmup_steps=0, weight_decay=WEIGHT_DECAY, max_grad_norm=GRAD_CLIP,
        adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS, optim="adamw_torch_fused", seed=SEED,
        beta=BETA, loss_type=["sigmoid"], precompute_ref_log_probs=False, disable_dropout=True,
    )
    counted = {"pairs": 0, "sequences": 0}

    class Counting(trl.DPOTrainer):
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
    prepared = trainer.train_dataset
    if len(prepared) != len(pairs):
        raise RuntimeError(f"TRL dropped {len(pairs) - len(prepared)} pairs")
    for example, pair in zip(prepared, pairs):  # the same tokens on both sides
        if (example["prompt_ids"] + example["chosen_ids"] != pair["chosen_ids"]
                or example["prompt_ids"] + example["rejected_ids"] != pair["rejected_ids"]):
            raise RuntimeError("TRL's tokenisation differs from chatloop's")
    trainer.train()


# ---------------------------------------------------------------- parent side


def parity_check(directory: Path, groups: list[Any], pad_id: int) -> dict[str, Any]:
    """Our answer log-probs against transformers' LlamaForCausalLM on the same right-padded batch."""
    import torch
    import transformers

    from chatloop.checkpoint import load_model
    from chatloop.train.dpo import answer_logps, collate

    ours = load_model(directory).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids, labels = collate(groups, pad_id, torch.device("cpu"))
    mask = torch.tensor([[1] * len(s) + [0] * (ids.shape[1] - len(s)) for g in groups for s in g.sequences])
    with torch.no_grad():
        a = answer_logps(ours, ids, labels, torch.device("cpu"), "fp32")
        logits = hf(input_ids=ids, attention_mask=mask).logits.float()
        lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
        b = (lp * (labels != -100)).sum(-1)
    return {"sequences": int(ids.shape[0]), "max_abs_diff": float((a - b).abs().max()),
            "mean_logp": float(a.mean())}


def run_precision(spec: dict[str, Any], args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Both sides in one precision: warmup, alternating timed steps, memory."""
    replies, setup, memory = _bench.run_sides(__file__, spec, ("ours", "trl"), tmp, args.warmup, args.steps,
                                              args.verbose)
    key = "cpu_seconds" if args.clock == "cpu" else "seconds"
    result: dict[str, Any] = {}
    for side, rows in replies.items():
        result[side] = {
            "pairs_per_s": round(statistics.median(r["pairs"] / r[key] for r in rows), 2),
            "sequences_per_s": round(statistics.median(r["sequences"] / r[key] for r in rows), 2),
            "pairs_per_s_aggregate": round(sum(r["pairs"] for r in rows) / sum(r[key] for r in rows), 2),
            "step_s": {k: round(v, 4) if isinstance(v, float) else v
                       for k, v in _bench.summary([r[key] for r in rows]).items()},
            "wall_step_median_s": round(statistics.median(r["seconds"] for r in rows), 4),
            "cpu_step_median_s": round(statistics.median(r["cpu_seconds"] for r in rows), 4),
            "pairs_per_step": statistics.median(r["pairs"] for r in rows),
            "policy_sequences_per_step": statistics.median(r["sequences"] for r in rows),
            "setup_s": round(setup[side], 1),
            "peak_rss_mb": round(memory[side]["peak_mb"], 1),
            "steps": [[round(r["seconds"], 4), round(r["cpu_seconds"], 4), r["pairs"], r["sequences"]]
                      for r in rows],
        }
    result["ratio"] = round(result["ours"]["pairs_per_s"] / result["trl"]["pairs_per_s"], 3)
    return result


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
    from chatloop.device import cpu_has_fast_bf16
    from chatloop.model import GPT, preset
    from chatloop.train.dpo import encode_rankings

    source = rm_throughput.data_path(args.data)
    if not source.is_file():
        sys.exit(f"{source}: OpenAssistant trees not found (set CHATLOOP_DATA or pass --data)")
    _bench.check_clock(args.clock, args.threads, torch.device("cpu"))
    precisions = [p for p in args.precisions if p == "fp32" or cpu_has_fast_bf16()]
    info = _bench.machine(torch.device("cpu"))
    info.update(clock=args.clock, trl=trl.__version__, uptime_start=_bench.uptime(),
                worker_threads=args.threads or info["threads"])
    print(f"# DPO throughput, cpu {'/'.join(precisions)}: {info['cpu']}, {info['worker_threads']} threads, "
          f"{args.clock} clock; torch {info['torch']}, transformers {info['transformers']}, trl {info['trl']}")
    print(f"uptime (start): {info['uptime_start']}")

    k = args.k
    prompts_per_step = args.pairs_per_step // math.comb(k, 2)
    total_steps = args.warmup + args.steps + 1
    results: dict[str, Any] = {}
    data: dict[str, Any] = {"file": str(source)}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        users, replies = rm_throughput.oasst_texts(source)
        tokenizer = rm_throughput.build_tokenizer(users + replies, args.vocab, tmp)
        torch.manual_seed(SEED)
        model = GPT(preset(args.preset, {"vocab_size": tokenizer.vocab_size, "max_seq_len": args.seq_len}))
        directory = tmp / "model"
        save_model(model, directory, tokenizer)
        # Enough rankings that every step is in our first epoch (dpo holds out one).
        rankings = rm_throughput.make_rankings(users, replies, tokenizer, k, total_steps * prompts_per_step + 1,
                                               args, SEED + k)
        report: Counter = Counter()
        groups = encode_rankings(rankings, tokenizer, args.seq_len, report)
        lengths = [len(s) for g in groups for s in g.sequences]
        if report["answer cut"] or report["prompt cut"] or max(lengths) >= args.seq_len:
            sys.exit(f"a sequence of {max(lengths)} tokens does not fit in --seq-len={args.seq_len}")
        rankings_file, pairs_file = tmp / "rankings.jsonl", tmp / "pairs.jsonl"
        rankings_file.write_text("".join(json.dumps(r) + "\n" for r in rankings), encoding="utf-8")
        pairs_file.write_text("".join(json.dumps({
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "chosen": [{"role": "assistant", "content": r["responses"][w]}],
            "rejected": [{"role": "assistant", "content": r["responses"][l_]}],
            "chosen_ids": g.sequences[w], "rejected_ids": g.sequences[l_]}) + "\n"
            for r, g in zip(rankings, groups) for w, l_ in g.pairs), encoding="utf-8")
        data.update(user_turns=len(users), replies=len(replies), tokenizer_vocab=tokenizer.vocab_size,
                    params=model.num_params(), rankings=len(rankings), pairs=sum(len(g.pairs) for g in groups),
                    mean_tokens=round(statistics.mean(lengths), 1), max_tokens=max(lengths))
        data["parity_check"] = parity_check(directory, groups[:4], tokenizer.pad_id)
        print(f"parity, our answer log-probs vs transformers': {data['parity_check']}")
        for precision in precisions:
            spec = {"dir": str(directory), "rankings": str(rankings_file), "pairs": str(pairs_file),
                    "seq_len": args.seq_len, "prompts_per_step": prompts_per_step,
                    "pairs_per_step": args.pairs_per_step, "total_steps": total_steps, "threads": args.threads,
                    "precision": precision}
            print(f"{precision}: K={k}, ours {prompts_per_step} prompts x {k} answers per step, TRL "
                  f"{args.pairs_per_step} pairs per step; {data['mean_tokens']} tokens per sequence on average; "
                  f"running ({_bench.uptime()})", flush=True)
            results[precision] = {"precision": precision, "k": k, "prompts_per_step": prompts_per_step,
                                  "target": TARGET, **run_precision(spec, args, tmp / precision)}

    info["uptime_end"] = _bench.uptime()
    print(f"uptime (end): {info['uptime_end']}")
    print("\n| precision | K | ours pairs/s | TRL pairs/s | ratio | target | met? | ours step s (policy sequences) |"
          " TRL step s (policy sequences) | ours peak RSS MiB | TRL peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    for r in results.values():
        o, t = r["ours"], r["trl"]
        print(f"| {r['precision']} | {r['k']} | {o['pairs_per_s']:,.1f} | {t['pairs_per_s']:,.1f} | "
              f"{r['ratio']:.2f}x | >= {r['target']:g}x | {_bench.verdict(r['ratio'], r['target'])} | "
              f"{o['step_s']['median_s']:.3f} ({o['policy_sequences_per_step']:g}) | "
              f"{t['step_s']['median_s']:.3f} ({t['policy_sequences_per_step']:g}) | "
              f"{o['peak_rss_mb']:,.0f} | {t['peak_rss_mb']:,.0f} |")

    record = {"benchmark": "dpo_throughput", "command": " ".join(["benchmarks/dpo_throughput.py", *sys.argv[1:]]),
              "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": info,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "trl": trl.__version__},
              "preset": args.preset, "k": k, "pairs_per_step": args.pairs_per_step, "seq_len": args.seq_len,
              "prompt_tokens": args.prompt_tokens, "response_tokens": args.response_tokens, "beta": BETA,
              "warmup": args.warmup, "steps": args.steps, "clock": args.clock, "threads": args.threads,
              "data": data, "results": results, "step_columns": ["wall_s", "cpu_s", "pairs", "policy_sequences"]}
    _bench.write_results(args.out, record)


if __name__ == "__main__":
    main()
