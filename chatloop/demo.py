"""`chatloop demo` (`make quick`): the first stages in three minutes, on data the project generates itself.

Steps:
  1. Write the synthetic world (chatloop world): its pretraining text about procedurally made entities.
  2. Train a byte-level BPE tokenizer on it (chatloop tokenizer).
  3. Pretrain a tiny GPT on it (chatloop pretrain), minutes on a laptop CPU.
  4. Print samples (chatloop generate) and the validation loss next to the corpus's unigram entropy.

Steps 1-3 are `chatloop run`'s (chatloop.pipeline.pretrained_model), each a stage with its own directory under
`out`: a finished one is skipped and an interrupted one resumes, so running the demo again picks up where it
stopped.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from chatloop.checkpoint import load_model
from chatloop.engine import generate
from chatloop.model import ModelOverrides
from chatloop.pipeline import pretrained_model
from chatloop.tokenizer import Tokenizer
from chatloop.train.pretrain import PretrainConfig
from chatloop.world.files import WorldConfig


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    """Directory of the demo run; each stage writes a subdirectory."""
    seed: int = 0
    """Seed of the world, the model init and the sampler."""
    world_mb: float = 3.0
    """Size of the generated pretraining text in MB."""
    vocab_size: int = 2048
    """BPE vocabulary size (the world's vocabulary is small and regular)."""
    max_steps: int = 400
    """Pretraining optimizer steps."""
    batch_size: int = 16
    """Sequences per step."""
    seq_len: int = 128
    """Tokens per sequence."""
    lr: float = 2e-3
    """Peak learning rate (a tiny model trains fast at a high rate)."""
    samples: int = 4
    """Samples to print at the end."""


def demo(cfg: DemoConfig) -> dict:
    # step 1-3: the first stages of `chatloop run`, at the demo's sizes
    world_dir, pt_dir = pretrained_model(
        Path(cfg.out), WorldConfig(pretrain_mb=cfg.world_mb), cfg.vocab_size,
        PretrainConfig(preset="tiny", model=ModelOverrides(max_seq_len=cfg.seq_len), seq_len=cfg.seq_len,
                       batch_size=cfg.batch_size, max_steps=cfg.max_steps, lr=cfg.lr,
                       warmup_steps=min(30, cfg.max_steps // 10), eval_every=max(1, cfg.max_steps // 4),
                       save_every=max(1, cfg.max_steps // 4)),
        cfg.seed)
    # step 4
    model = load_model(pt_dir).eval()
    tokenizer = Tokenizer.load(pt_dir)
    lines = [ln for ln in (world_dir / "pretrain.txt").read_text(encoding="utf-8").splitlines() if ln.strip()]
    starts = [" ".join(lines[(i * 997) % len(lines)].split()[:3]) for i in range(cfg.samples)]
    rollout = generate(model, [tokenizer.encode(s) for s in starts], 40, tokenizer.pad_id, tokenizer.stop_ids,
                       temperature=0.8, generator=torch.Generator().manual_seed(cfg.seed))
    print("\nsamples (prompt | continuation):")
    for start, ids in zip(starts, rollout.response_ids()):
        print(f"  {start} | {tokenizer.decode(ids).strip()}")
    metrics = json.loads((pt_dir / "chatloop.json").read_text())["metrics"]
    summary = {"val_loss": metrics["val/loss"], "val_ppl": metrics["val/ppl"],
               "unigram_entropy_nats": metrics["unigram_entropy_nats"],
               "unigram_ppl": math.exp(metrics["unigram_entropy_nats"])}
    print(f"\nvalidation loss {summary['val_loss']:.3f} nats/token (perplexity {summary['val_ppl']:.1f}) against "
          f"the corpus's unigram entropy {summary['unigram_entropy_nats']:.3f} nats (perplexity "
          f"{summary['unigram_ppl']:.1f}): " + ("the model learned the world's grammar and facts, not just its words."
                                                 if summary["val_loss"] < summary["unigram_entropy_nats"] else
                                                 "no better than word frequencies yet: train longer (--max_steps)."))
    print(f"checkpoint (opens in transformers): {pt_dir}")
    return summary
