"""`chatloop generate`: sample from a checkpoint, a batch of prompts at once; `answer`: one chat answer per prompt
(what evaluation and the labeling app's comparisons sample)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from chatloop.checkpoint import load_model
from chatloop.data.formats import prompt_messages
from chatloop.device import resolve_device
from chatloop.engine import generate as sample
from chatloop.errors import UserError
from chatloop.io import read_lines
from chatloop.model import GPT
from chatloop.tokenizer import Tokenizer


@dataclass
class Answers:
    prompts: list
    """The prompts (text or messages), in order."""
    texts: list[str]
    """Decoded answers (special tokens removed)."""
    ended: list[bool]
    """Whether each answer ended with a stop token within the length budget."""
    tokens: list[torch.Tensor] = field(default_factory=list)
    """Per batch: (B, P + N) prompt and answer ids as sampled (for KL and RM scoring)."""
    masks: list[torch.Tensor] = field(default_factory=list)
    """Per batch: the attention masks of `tokens`."""
    prompt_lens: list[int] = field(default_factory=list)
    """Per batch: the padded prompt width."""


@torch.no_grad()
def answer(model: GPT, tokenizer: Tokenizer, prompts: list, max_new_tokens: int = 64, temperature: float = 1.0,
           seed: int = 0, batch_size: int = 64) -> Answers:
    """Sample one answer per prompt, in batches, with a fixed seed."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    result = Answers(prompts, [], [])
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        ids = [tokenizer.render_chat(prompt_messages(p), add_generation_prompt=True)[0] for p in chunk]
        ids = [i[-(model.cfg.max_seq_len - max_new_tokens):] for i in ids]  # keep the end of over-long prompts
        rollout = sample(model, ids, max_new_tokens, tokenizer.pad_id, tokenizer.stop_ids, temperature=temperature,
                         generator=generator)
        result.texts += [tokenizer.decode_reply(r) for r in rollout.response_ids()]
        result.ended += rollout.ended.tolist()
        result.tokens.append(rollout.tokens)
        result.masks.append(rollout.attention_mask)
        result.prompt_lens.append(rollout.prompt_len)
    return result


@dataclass
class GenerateConfig:
    model: str = ""
    """Checkpoint directory (chatloop or transformers Llama/Mistral/Qwen2/GPT-2 with tokenizer.json)."""
    prompts: list[str] = field(default_factory=lambda: [""])
    """Prompts, one sample each (comma-separated on the command line); an empty prompt starts from EOS."""
    prompts_file: str = ""
    """A text file with one prompt per line, added to `prompts`."""
    chat: bool = False
    """Render each prompt as a user turn of the chat format and sample the assistant's answer."""
    num_samples: int = 1
    """Samples per prompt."""
    max_new_tokens: int = 64
    """Tokens to generate at most per sample."""
    temperature: float = 1.0
    """Sampling temperature; 0 is greedy decoding."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 keeps all)."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches top_p (1 keeps all)."""
    seed: int = 0
    """Seed of the sampler: the same seed and prompts give the same samples."""
    device: str = "auto"
    """"auto", "cpu" or "cuda"."""


def generate(cfg: GenerateConfig) -> list[str]:
    if not cfg.model:
        raise UserError("--model: give a checkpoint directory")
    device = resolve_device(cfg.device)
    model = load_model(cfg.model, device=device).eval()
    tokenizer = Tokenizer.load(Path(cfg.model))
    prompts = list(cfg.prompts)
    if cfg.prompts_file:
        prompts += [line.rstrip("\n") for _, line in read_lines(cfg.prompts_file)]
    prompts = [p for p in prompts for _ in range(cfg.num_samples)]
    if cfg.chat:
        ids = [tokenizer.render_chat([{"role": "user", "content": p}], add_generation_prompt=True)[0]
               for p in prompts]
    else:
        ids = [tokenizer.encode(p) or [tokenizer.eos_id] for p in prompts]
    room = model.cfg.max_seq_len - max(len(i) for i in ids)
    if room < 1:
        raise UserError(f"a prompt fills the model's context of {model.cfg.max_seq_len} tokens")
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    rollout = sample(model, ids, min(cfg.max_new_tokens, room), tokenizer.pad_id, tokenizer.stop_ids,
                     cfg.temperature, cfg.top_k, cfg.top_p, generator)
    texts = [tokenizer.decode_reply(r) for r in rollout.response_ids()]
    for prompt, text in zip(prompts, texts):
        print(f"--- {prompt!r}\n{prompt}{text}")
    return texts
