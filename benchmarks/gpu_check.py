"""One stage of benchmarks/gpu_check.sh on the imported model, in this process (under torchrun: one rank of DDP).

    torchrun --standalone --nproc-per-node=N benchmarks/gpu_check.py --stage sft --run-dir runs/gpu-check
    python benchmarks/gpu_check.py --summarize --run-dir runs/gpu-check      # the one JSON file and the table

Each stage runs through chatloop's own function for it (the CLI's code path) for a few steps, with a wrapper around
every GPT's hidden_states that counts the tokens each forward pass takes: with gradients (training: 6N FLOPs per
token with the backward) or without (2N: reference, reward and value passes, sampling). Per stage rank 0 appends a line
to RUN/gpu_check.jsonl: wall seconds, tokens/s (all ranks' tokens over the wall time, model loading and checkpoint
writes included, so a lower bound), MFU (those FLOPs over the measured bf16 matmul peak of every GPU), peak memory
(torch.cuda.max_memory_allocated of rank 0), and the stage's own logged perf/* figures. --dry-run runs the same code
on the CPU with a handful of tiny steps on the model's first 2 blocks (a test that the script works, not a
measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STAGES = ("pretrain", "sft", "rm", "dpo", "ppo", "generate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=STAGES)
    p.add_argument("--run-dir", default=str(REPO / "runs" / "gpu-check"))
    p.add_argument("--data-root", default="", help="shared data folder (default: $CHATLOOP_DATA or ../shared/data)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny steps: checks the script, measures nothing")
    p.add_argument("--prepare", action="store_true", help="import the model and write the data (one process)")
    p.add_argument("--summarize", action="store_true", help="write RUN/gpu_check.json from the stages' lines")
    return p.parse_args(argv)


class TokenCounter:
    """Tokens through every GPT (its `hidden_states`, which forward passes and the engine's prefill both run), split
    by whether gradients were on, and the FLOPs they cost."""

    def __init__(self) -> None:
        import torch

        from chatloop.model import GPT

        self.train_tokens = self.infer_tokens = 0
        self.flops = 0.0
        original = GPT.hidden_states
        counter = self

        def hidden_states(model, input_ids, *args, **kwargs):
            n = input_ids.numel()
            per_token = model.flops_per_token(input_ids.shape[-1]) / 3  # forward only: 2N + 4LTC
            if torch.is_grad_enabled():
                counter.train_tokens += n
                counter.flops += 3 * per_token * n  # with the backward
            else:
                counter.infer_tokens += n
                counter.flops += per_token * n
            return original(model, input_ids, *args, **kwargs)

        GPT.hidden_states = hidden_states


def stage_config(stage: str, run: Path, data: Path, dry: bool):
    """The stage's config: a few steps of realistic size on a GPU, a handful of tiny ones in a dry run."""
    from chatloop.train.dpo import DPOConfig
    from chatloop.train.ppo import PPOConfig
    from chatloop.train.pretrain import PretrainConfig
    from chatloop.train.reward import RMConfig
    from chatloop.train.sft import SFTConfig

    model, out = str(run / "import"), str(run / stage)
    device = "cpu" if dry else "cuda"
    seq, batch, steps = (64, 2, 2) if dry else (512, 16, 20)
    common = dict(out=out, device=device, progress=False, log_every=1, save_every=100000)
    if stage == "pretrain":
        cfg = PretrainConfig(**common)
        cfg.init_from, cfg.inputs = model, [str(data / "pretrain/tinyshakespeare/input.txt")]
        cfg.seq_len, cfg.batch_size, cfg.max_steps, cfg.eval_every, cfg.lr = seq, batch, steps, steps, 1e-5
        return cfg
    if stage == "sft":
        cfg = SFTConfig(**common)
        cfg.model, cfg.data = model, [str(data / "sft/dolly-2k-chat/dolly_2k_chat.jsonl")]
        cfg.seq_len, cfg.batch_size, cfg.max_steps, cfg.epochs, cfg.dropout, cfg.val_fraction = (
            seq, batch, steps, 1, 0.0, 0.01)
        return cfg
    rankings = str(run / "data" / "rankings.jsonl")
    if stage == "rm":
        cfg = RMConfig(**common)
        cfg.model, cfg.data, cfg.seq_len, cfg.batch_size, cfg.max_steps = model, [rankings], seq, batch, steps
        return cfg
    if stage == "dpo":
        cfg = DPOConfig(**common)
        cfg.policy, cfg.data, cfg.seq_len, cfg.batch_size, cfg.max_steps = model, [rankings], seq, batch, steps // 2
        return cfg
    cfg = PPOConfig(**common)  # ppo: PPO-ptx, the stage with the most models (policy, reference, RM, value)
    cfg.policy, cfg.reward_model, cfg.prompts = model, str(run / "rm"), [str(run / "data" / "ppo_prompts.jsonl")]
    cfg.ptx_data = [str(data / "pretrain/llamafactory-wiki-c4-demo/c4_demo.jsonl")]
    cfg.ptx_coef, cfg.ptx_ratio = 1.0, 1.0
    cfg.iterations, cfg.batch_size, cfg.minibatches, cfg.ppo_epochs = (1, 2, 1, 1) if dry else (5, 64, 4, 2)
    cfg.max_new_tokens, cfg.max_prompt_tokens, cfg.sample_every, cfg.warmup_steps = (8 if dry else 64), 128, 0, 0
    return cfg


def generate_check(run: Path, dry: bool) -> dict:
    """Sampling throughput of the engine (what `chatloop sample`, eval, PPO's rollouts and serve run on)."""
    import torch

    from chatloop.checkpoint import load_model
    from chatloop.data.formats import prompt_messages, read_records
    from chatloop.engine import generate
    from chatloop.tokenizer import Tokenizer

    device = "cpu" if dry else "cuda"
    model = load_model(run / "import", device=device, dtype=torch.float32 if dry else torch.bfloat16).eval()
    tok = Tokenizer.load(run / "import")
    prompts = [r["prompt"] for r in read_records(run / "data" / "ppo_prompts.jsonl", "prompt")][: 4 if dry else 64]
    ids = [tok.render_chat(prompt_messages(p), add_generation_prompt=True)[0][-128:] for p in prompts]
    new = 8 if dry else 256
    generate(model, ids, 4, tok.pad_id, [], temperature=1.0)  # warm-up
    start = time.perf_counter()
    rollout = generate(model, ids, new, tok.pad_id, [], temperature=1.0)  # no stop token: every row runs `new`
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"perf/new_tokens_per_s": rollout.mask.sum().item() / seconds, "rows": len(ids), "new_tokens": new,
            "dtype": "bf16 weights" if not dry else "fp32"}


def run_stage(args: argparse.Namespace) -> None:
    import torch

    from chatloop import distributed
    from chatloop.device import measure_peak_flops
    from chatloop.realloop import LoopConfig, data_root
    from chatloop.train.dpo import dpo
    from chatloop.train.ppo import ppo
    from chatloop.train.pretrain import pretrain
    from chatloop.train.reward import reward_model
    from chatloop.train.sft import sft

    run, dry = Path(args.run_dir), args.dry_run
    data = Path(args.data_root) if args.data_root else data_root(LoopConfig())
    cuda = torch.cuda.is_available() and not dry
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.reset_peak_memory_stats()
    counter = TokenCounter()
    start = time.perf_counter()
    if args.stage == "generate":
        extra = generate_check(run, dry)
    else:
        fn = {"pretrain": pretrain, "sft": sft, "rm": reward_model, "dpo": dpo, "ppo": ppo}[args.stage]
        cfg = stage_config(args.stage, run, data, dry)
        fn(cfg)  # under torchrun the stage joins the process group itself (chatloop.distributed)
        rows = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines() if line]
        perf = {}
        for row in rows[1:]:  # the first step includes warm-up (compilation of kernels, allocator growth)
            for k, v in row.items():
                if k.startswith("perf/"):
                    perf.setdefault(k, []).append(v)
        extra = {k: sum(v) / len(v) for k, v in perf.items()}
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    world = distributed.world_size() if distributed.active() else int(os.environ.get("WORLD_SIZE", 1))
    totals = [counter.train_tokens, counter.infer_tokens, counter.flops]
    if distributed.active():
        totals = distributed.all_sum(*totals)
    device = torch.device("cuda" if cuda else "cpu")
    peak = measure_peak_flops(device, "bf16" if cuda else "fp32") * world
    line = {
        "stage": args.stage, "processes": world, "device": torch.cuda.get_device_name() if cuda else "cpu (dry run)",
        "seconds": round(seconds, 2), "train_tokens": int(totals[0]), "inference_tokens": int(totals[1]),
        "tokens_per_s": (totals[0] + totals[1]) / seconds, "mfu": totals[2] / seconds / peak,
        "peak_flops_per_device": peak / world,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None, **extra,
    }
    if int(os.environ.get("RANK", 0)) == 0:
        with open(run / "gpu_check.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
        print(json.dumps(line))


def prepare(args: argparse.Namespace) -> None:
    """The imported model (RUN/import) and the data every stage reads (RUN/data: `chatloop loop`'s data step)."""
    import shutil

    from chatloop.model_import import ImportConfig, import_model, smollm2_gguf
    from chatloop.realloop import LoopConfig, write_data

    run = Path(args.run_dir)
    for stage in STAGES:  # a finished stage would be skipped: start each from scratch
        shutil.rmtree(run / stage, ignore_errors=True)
    import_model(ImportConfig(src=os.environ.get("GPU_CHECK_SRC") or str(smollm2_gguf()), out=str(run / "import"),
                              max_seq_len=1024))
    if args.dry_run:  # the model's format at a fraction of its cost: its first 2 blocks
        from chatloop.checkpoint import load_model, save_model
        from chatloop.tokenizer import Tokenizer

        save_model(load_model(run / "import", n_layer=2), run / "import", Tokenizer.load(run / "import"),
                   lineage={"stage": "import", "note": "dry run: the first 2 blocks"})
    write_data(LoopConfig(data_root=args.data_root, rm_oasst=0, rm_hh=400, ppo_prompts=256, eval_prompts=8),
               run / "data")
    (run / "gpu_check.jsonl").unlink(missing_ok=True)


def summarize(args: argparse.Namespace) -> None:
    run = Path(args.run_dir)
    path = run / "gpu_check.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []
    done = {r["stage"] for r in lines}
    record = {"created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "dry_run": args.dry_run, "stages": lines,
              "missing": [s for s in STAGES if s not in done]}
    (run / "gpu_check.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"\n{'stage':<10}{'procs':>6}{'seconds':>9}{'tokens/s':>12}{'MFU':>8}{'peak GiB':>10}")
    for r in lines:
        mem = f"{r['peak_memory_gib']:.1f}" if r.get("peak_memory_gib") is not None else "-"
        print(f"{r['stage']:<10}{r['processes']:>6}{r['seconds']:>9.1f}{r['tokens_per_s']:>12.0f}"
              f"{100 * r['mfu']:>7.1f}%{mem:>10}")
    if record["missing"]:
        print(f"missing (failed or not run): {', '.join(record['missing'])}")
    print(f"wrote {run / 'gpu_check.json'}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.prepare:
        prepare(args)
    elif args.summarize:
        summarize(args)
    elif args.stage:
        run_stage(args)
    else:
        sys.exit("give --stage or --summarize")


if __name__ == "__main__":
    main()
