"""`chatloop sample`: K answers per prompt from a checkpoint, the input that gets ranked (by people in the labeling
app, or by the synthetic world's simulated labelers: `chatloop rank`, chatloop.world.labelers).

A samples record is `{"prompt", "responses": [K strings], "ended": [K bools], "model", "sampling", "seed",
"k", "draws"}`: K distinct answers (InstructGPT ranks K distinct outputs; two copies of one text carry no
preference), drawn again where a draw repeats an earlier answer, up to `max_draws` answers per wanted one; `k` is
the K wanted, `draws` how many answers were sampled.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from chatloop.checkpoint import load_model
from chatloop.data.formats import prompt_messages, read_records
from chatloop.device import resolve_device
from chatloop.engine import generate
from chatloop.errors import UserError
from chatloop.io import atomic_write_jsonl
from chatloop.tokenizer import Tokenizer


@dataclass
class SampleConfig:
    model: str = ""
    """Checkpoint to sample from (the SFT model, or the newest policy in later rounds)."""
    prompts: str = ""
    """Prompt records (JSONL: {"prompt": text or messages, ...})."""
    out: str = "runs/samples.jsonl"
    """Samples file to write (atomically)."""
    k: int = 0
    """Answers per prompt; 0 draws K uniformly from k_min..k_max per prompt."""
    k_min: int = 4
    """Smallest K when drawing (InstructGPT: 4)."""
    k_max: int = 9
    """Largest K when drawing (InstructGPT: 9)."""
    limit: int = 0
    """Use only the first N prompts (0: all)."""
    max_new_tokens: int = 64
    """Answer length budget in tokens."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1 keeps everything)."""
    seed: int = 0
    """Seed of the K draw and of the sampler."""
    max_draws: int = 4
    """Answers sampled per wanted one at most: a draw identical to an earlier answer to the same prompt is drawn
    again until the prompt has K distinct answers or k x max_draws draws; a prompt with fewer than 2 distinct
    answers is left out (counted)."""
    batch_size: int = 64
    """Sequences per engine call."""
    device: str = "auto"
    """"auto", "cpu" or "cuda"."""


def sample(cfg: SampleConfig) -> list[dict]:
    if not cfg.model or not cfg.prompts:
        raise UserError("--model and --prompts are required")
    if not 1 <= cfg.k_min <= cfg.k_max:
        raise UserError("--k_min/--k_max: expected 1 <= k_min <= k_max")
    device = resolve_device(cfg.device)
    model = load_model(cfg.model, device=device).eval()
    tokenizer = Tokenizer.load(cfg.model)
    prompts = [r["prompt"] for r in read_records(cfg.prompts, "prompt")]
    prompts = prompts[: cfg.limit] if cfg.limit else prompts
    rng = random.Random(cfg.seed)
    ks = [cfg.k or rng.randint(cfg.k_min, cfg.k_max) for _ in prompts]
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    budget = model.cfg.max_seq_len - cfg.max_new_tokens
    encoded = [tokenizer.render_chat(prompt_messages(p), add_generation_prompt=True)[0][-budget:] for p in prompts]
    found: list[dict[str, bool]] = [{} for _ in prompts]  # per prompt: distinct answer text -> ended, in draw order
    draws = [0] * len(prompts)
    while True:
        # Each round draws, for every prompt still short of K distinct answers, as many as it lacks (within budget).
        flat = [i for i, k in enumerate(ks) for _ in range(min(k - len(found[i]), k * cfg.max_draws - draws[i]))]
        flat.sort(key=lambda i: len(encoded[i]))  # an engine batch pads its prompts to the longest one
        if not flat:
            break
        for start in range(0, len(flat), cfg.batch_size):
            chunk = flat[start : start + cfg.batch_size]
            rollout = generate(model, [encoded[i] for i in chunk], cfg.max_new_tokens, tokenizer.pad_id,
                               tokenizer.stop_ids, temperature=cfg.temperature, top_p=cfg.top_p, generator=generator)
            for i, response, ended in zip(chunk, rollout.response_ids(), rollout.ended.tolist()):
                draws[i] += 1
                text = tokenizer.decode_reply(response)
                if text not in found[i] and len(found[i]) < ks[i]:
                    found[i][text] = ended
    sampling = {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens}
    records, short = [], 0
    for i, (prompt, k) in enumerate(zip(prompts, ks)):
        if len(found[i]) < 2:
            short += 1
            continue
        records.append({"id": f"s{i:06d}", "prompt": prompt, "responses": list(found[i]),
                        "ended": list(found[i].values()), "model": str(cfg.model), "sampling": sampling,
                        "seed": cfg.seed, "k": k, "draws": draws[i]})
    answers = sum(len(r["responses"]) for r in records)
    full = sum(len(r["responses"]) == r["k"] for r in records)
    atomic_write_jsonl(cfg.out, records)
    print(f"sample: {len(records)} prompts, {answers} distinct answers from {sum(draws)} draws ({full} prompts with "
          f"all K ({min(ks)}-{max(ks)}) distinct, {short} left out with fewer than 2) -> {cfg.out}")
    return records
