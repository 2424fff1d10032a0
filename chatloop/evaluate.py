"""Evaluation: answers sampled from checkpoints, scored by the synthetic world's gold judge.

`answer` renders prompts in the chat format and samples with the engine; `gold_report` judges the answers.
(Win rates with confidence intervals, RM accuracy, KL and the alignment tax build on these: issue 7.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chatloop.data.formats import prompt_messages
from chatloop.data.world import World
from chatloop.engine import generate
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


@torch.no_grad()
def answer(model: GPT, tokenizer: Tokenizer, prompts: list, max_new_tokens: int = 64, temperature: float = 1.0,
           seed: int = 0, batch_size: int = 64) -> Answers:
    """Sample one answer per prompt, in batches, with a fixed seed."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    texts, ended = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        ids = [tokenizer.render_chat(prompt_messages(p), add_generation_prompt=True)[0] for p in chunk]
        ids = [i[-(model.cfg.max_seq_len - max_new_tokens):] for i in ids]  # keep the end of over-long prompts
        rollout = generate(model, ids, max_new_tokens, tokenizer.pad_id, tokenizer.stop_ids,
                           temperature=temperature, generator=generator)
        texts += [tokenizer.decode(r) for r in rollout.response_ids()]
        ended += rollout.ended.tolist()
    return Answers(prompts, texts, ended)


def gold_report(world: World, answers: Answers) -> dict[str, float]:
    """Mean gold score, mean Likert and the rate of each metadata flag."""
    judgements = [world.judge(p, t, ended=e) for p, t, e in zip(answers.prompts, answers.texts, answers.ended)]
    n = max(1, len(judgements))
    report = {"gold_score": sum(j.score for j in judgements) / n, "likert": sum(j.likert for j in judgements) / n,
              "ended": sum(answers.ended) / n}
    for flag in judgements[0].flags if judgements else []:
        report[f"flag/{flag}"] = sum(bool(j.flags[flag]) for j in judgements) / n
    return report
