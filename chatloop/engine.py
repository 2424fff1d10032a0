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
    entropy: torch.Tensor | None = None
    """(B, N) entropy of each step's temperature-scaled, untruncated distribution (0 where masked), when asked."""

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


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of (B, V) probabilities, by inverting the cumulative distribution.

    Exact like torch.multinomial, but it draws one uniform number per row where multinomial draws one
    exponential per vocabulary entry (a large share of a small model's decoding step on CPU). The sum runs
    in float64 so that tokens of tiny probability keep their share; a token of probability 0 (filtered by
    top-k / top-p) is never chosen, because the search returns the first entry whose cumulative sum
    exceeds the draw, and such an entry adds nothing to the sum.
    """
    cdf = probs.double().cumsum(-1)  # (B, V)
    total = cdf[:, -1:]
    if not bool(((total > 0) & torch.isfinite(total)).all()):
        # torch.multinomial refuses such rows too; sampling from them would hide a diverged model.
        raise ValueError("cannot sample: a row of probabilities is NaN, infinite or all zero")
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=torch.float64)
    index = torch.searchsorted(cdf, u * total, right=True).squeeze(1)
    return index.clamp_(max=probs.shape[-1] - 1)  # guards u * total rounding up to the total


def next_tokens(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step's choice: (B,) next tokens from (B, V) logits and their (B,) log-probs under the
    temperature-scaled, untruncated distribution. temperature 0 is greedy decoding (log-probs at T = 1).
    Shared by `generate` and the serving batcher (chatloop.serve.batcher), which calls it per group of rows
    with the same sampling settings."""
    logits = logits.float()
    if temperature > 0:
        if temperature != 1.0:
            logits = logits / temperature
        probs = filter_logits(logits, top_k, top_p).softmax(-1)
        next_token = sample(probs, generator)
    else:
        next_token = logits.argmax(-1)
    return next_token, F.log_softmax(logits, -1).gather(-1, next_token[:, None]).squeeze(1)


def pack(lengths: list[int], width: int) -> list[list[int]]:
    """First-fit decreasing: prompt indices grouped into rows of at most `width` tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(width - lengths[i])
    return rows


def prefill(model: GPT, prompts: list[list[int]], tokens: torch.Tensor, attention_mask: torch.Tensor,
            cache: KVCache) -> torch.Tensor:
    """Run the left-padded (B, P) prompts through the model, fill the cache; return (B, V) next-token logits.

    Left padding makes the prefill pay for B * P tokens where the prompts hold fewer. When prompts of
    different lengths can share rows, they are packed into fewer rows of width P (a block-diagonal mask
    keeps each prompt to itself, positions restart at 0 per prompt) and their keys and values are then
    copied to where the left-padded layout has them: the cache ends up as the padded prefill would leave it
    (the padded slots, which the mask hides from every query, stay zero). A prompt given several times (PPO's
    samples per prompt, best-of-n) is run once: at 32 prompts x 4 samples, 0.17 s -> 0.08 s on the tiny model.
    """
    B, P = tokens.shape
    first_of: dict[tuple[int, ...], int] = {}  # each distinct prompt -> the index of its first occurrence
    for i, p in enumerate(prompts):
        first_of.setdefault(tuple(p), i)
    if len(first_of) < B:
        row_of = {key: r for r, key in enumerate(first_of)}  # its row in the once-only prefill
        firsts = torch.tensor(list(first_of.values()), device=tokens.device)
        once = KVCache(model.cfg, len(firsts), P, tokens.device, cache.k.dtype)
        logits = prefill(model, [prompts[i] for i in first_of.values()], tokens[firsts], attention_mask[firsts], once)
        copy_rows = torch.tensor([row_of[tuple(p)] for p in prompts], device=tokens.device)  # (B,)
        cache.k[:, :, :, :P] = once.k[:, copy_rows]
        cache.v[:, :, :, :P] = once.v[:, copy_rows]
        cache.length = P
        return logits[copy_rows]
    lengths = [len(p) for p in prompts]
    rows = pack(lengths, P)
    if len(rows) == B:
        hidden = model.hidden_states(tokens, attention_mask=attention_mask, cache=cache)
        # Only the last position's logits are needed: unembedding all P would multiply the largest matmul.
        return model.lm_head(hidden[:, -1])

    device = tokens.device
    R = len(rows)
    packed = torch.zeros((R, P), dtype=torch.long, device=device)
    position_ids = torch.zeros((R, P), dtype=torch.long, device=device)
    segment = torch.full((R, P), -1, dtype=torch.long, device=device)  # prompt index per slot, -1 = unused
    where: list[tuple[int, int]] = [(0, 0)] * B  # (row, offset) of each prompt
    for r, members in enumerate(rows):
        offset = 0
        for i in members:
            n = lengths[i]
            packed[r, offset : offset + n] = tokens[i, P - n :]
            position_ids[r, offset : offset + n] = torch.arange(n, device=device)
            segment[r, offset : offset + n] = i
            where[i] = (r, offset)
            offset += n
    slot = torch.arange(P, device=device)
    causal = slot[None, :] <= slot[:, None]  # (P, P)
    same = segment[:, :, None] == segment[:, None, :]  # (R, P, P)
    # Unused slots see only themselves, so their softmax has a term (they feed nothing real).
    mask = (same & causal & (segment[:, :, None] >= 0)) | torch.eye(P, dtype=torch.bool, device=device)
    packed_cache = KVCache(model.cfg, R, P, device, cache.k.dtype)
    hidden = model.hidden_states(packed, attention_mask=mask[:, None], position_ids=position_ids,
                                 cache=packed_cache)
    for i, (r, offset) in enumerate(where):
        n = lengths[i]
        cache.k[:, i, :, P - n : P] = packed_cache.k[:, r, :, offset : offset + n]
        cache.v[:, i, :, P - n : P] = packed_cache.v[:, r, :, offset : offset + n]
    cache.length = P
    last_row = torch.tensor([r for r, _ in where], device=device)
    last_col = torch.tensor([offset + lengths[i] - 1 for i, (_, offset) in enumerate(where)], device=device)
    return model.lm_head(hidden[last_row, last_col])


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
    entropy: bool = False,
) -> Rollout:
    """Sample a response for each prompt (lists of token ids). temperature 0 means greedy decoding. With
    `entropy`, the Rollout also holds each step's entropy (PPO's metric: one log-softmax of (B, V) per step)."""
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
    entropies = torch.zeros((B, max_new_tokens), device=device) if entropy else None
    done = torch.zeros(B, dtype=torch.bool, device=device)
    next_position = attention_mask[:, :P].sum(1)  # (B,) position id of the first response token

    cache = KVCache(model.cfg, B, total, device, dtype)
    logits = prefill(model, prompts, tokens[:, :P], attention_mask[:, :P], cache)  # (B, V)
    # What each decoding query may attend to, as the ready (B, 1, 1, S) mask the model takes: the real
    # tokens, plus every response column (a finished row's pad query must still see itself; its outputs
    # are discarded). Kept up to date here instead of rebuilding a mask from attention_mask every step.
    visible = attention_mask.clone()
    visible[:, P:] = True
    steps = 0
    for t in range(max_new_tokens):
        next_token, logprob = next_tokens(logits, temperature, top_k, top_p, generator)
        alive = ~done
        tokens[:, P + t] = torch.where(alive, next_token, pad_id)
        attention_mask[:, P + t] = alive
        logprobs[:, t] = torch.where(alive, logprob, 0.0)
        if entropies is not None:
            dist = F.log_softmax(logits.float() / (temperature if temperature > 0 else 1.0), -1)
            entropies[:, t] = torch.where(alive, -(dist.exp() * dist).sum(-1), 0.0)
        done |= alive & torch.isin(next_token, stops)
        steps = t + 1
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        # Finished rows keep decoding pad (masked out of their results) so the batch stays rectangular.
        logits = model(tokens[:, P + t : P + t + 1], attention_mask=visible[:, None, None, : P + t + 1],
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
        entropy=entropies[:, :steps] if entropies is not None else None,
    )
