"""Batched sampling with a preallocated KV cache. The engine knows token ids only.

Prompts are left-padded into one (B, P) batch so that every row's next token sits in the same column;
position ids count real tokens only, so a padded row computes exactly what it would alone. Each step
samples from the temperature-scaled distribution (optionally truncated by top-k / top-p) and records the
log-probability of the sampled token under the temperature-scaled, untruncated distribution: the quantity
PPO recomputes in its forward pass (Huang et al.: divide logits by the temperature). A row stops at its
first stop token; its later tokens are pad and its mask is False there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from chatloop.model import GPT, KVCache


@dataclass
class Rollout:
    tokens: torch.Tensor
    """(B, P + N) left-padded prompts followed by responses (pad after a row's stop token)."""
    attention_mask: torch.Tensor
    """(B, P + N) True on real tokens: prompt tokens and response tokens up to and including the stop."""
    prompt_len: int
    """P: the padded prompt width; responses start at this column."""
    response: torch.Tensor
    """(B, N) sampled response ids, pad after the stop token."""
    logprobs: torch.Tensor
    """(B, N) log-prob of each sampled token under the temperature-scaled distribution (0 where masked)."""
    mask: torch.Tensor
    """(B, N) True on real response tokens (the stop token included)."""
    ended: torch.Tensor
    """(B,) True where the response ended with a stop token within max_new_tokens."""

    def response_ids(self) -> list[list[int]]:
        """Per row, the response ids without padding (the stop token included)."""
        return [row[m].tolist() for row, m in zip(self.response, self.mask)]


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) to -inf; top_k = 0 and top_p = 1 keep everything."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p (the first token always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def generate(
    model: GPT,
    prompts: list[list[int]],
    max_new_tokens: int,
    pad_id: int,
    stop_ids: list[int],
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Sample a response for each prompt (lists of token ids). temperature 0 means greedy decoding."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    B, P = len(prompts), max(len(p) for p in prompts)
    total = P + max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ValueError(f"prompt ({P}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len "
                         f"{model.cfg.max_seq_len}")
    was_training = model.training
    model.eval()

    tokens = torch.full((B, total), pad_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((B, total), dtype=torch.bool, device=device)
    for i, prompt in enumerate(prompts):
        tokens[i, P - len(prompt) : P] = torch.tensor(prompt, device=device)
        attention_mask[i, P - len(prompt) : P] = True
    stops = torch.tensor(stop_ids, device=device)
    logprobs = torch.zeros((B, max_new_tokens), device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    next_position = attention_mask[:, :P].sum(1)  # (B,) position id of the first response token

    cache = KVCache(model.cfg, B, total, device, dtype)
    logits = model(tokens[:, :P], attention_mask=attention_mask[:, :P], cache=cache)[:, -1]  # (B, V)
    steps = 0
    for t in range(max_new_tokens):
        logits = logits.float()
        if temperature > 0:
            logits = logits / temperature
            probs = filter_logits(logits, top_k, top_p).softmax(-1)
            next_token = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B,)
        else:
            next_token = logits.argmax(-1)
        logprob = F.log_softmax(logits, -1).gather(-1, next_token[:, None]).squeeze(1)
        alive = ~done
        tokens[:, P + t] = torch.where(alive, next_token, pad_id)
        attention_mask[:, P + t] = alive
        logprobs[:, t] = torch.where(alive, logprob, 0.0)
        done |= alive & torch.isin(next_token, stops)
        steps = t + 1
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        # Finished rows keep decoding pad (masked out of their results) so the batch stays rectangular.
        logits = model(tokens[:, P + t : P + t + 1], attention_mask=attention_mask[:, : P + t + 1],
                       position_ids=(next_position + t)[:, None], cache=cache)[:, -1]

    model.train(was_training)
    response = tokens[:, P : P + steps]
    return Rollout(
        tokens=tokens[:, : P + steps],
        attention_mask=attention_mask[:, : P + steps],
        prompt_len=P,
        response=response,
        logprobs=logprobs[:, :steps],
        mask=attention_mask[:, P : P + steps],
        ended=done,
    )
