"""The GPT decoder, in one file to read top to bottom.

Two styles share one module tree:
- "llama": RMSNorm, rotary positions (RoPE, rotate-half convention as in Hugging Face), SwiGLU MLP,
  grouped-query attention (GQA), optional tied embeddings, optional q/k/v bias (as in Qwen2).
- "gpt2": LayerNorm, learned absolute positions, GELU (tanh) MLP, biases everywhere, tied embeddings.

A model ends in a language-model head (logits over the vocabulary) or, for reward and value models, a scalar
head read at every position. Attention is PyTorch's scaled_dot_product_attention. Left padding is handled
by an attention mask plus position ids that count only real tokens (`position_ids_from_mask`). Decoding
writes keys and values into a preallocated `KVCache`.

Shape legend: B batch, T query length, S key length (cache + T), C d_model, H query heads, G key/value
heads, D head dim, V vocabulary.
"""

from __future__ import annotations

import math
import typing
from dataclasses import asdict, dataclass, fields, make_dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class GPTConfig:
    style: Literal["llama", "gpt2"] = "llama"
    """Architecture family: "llama" (RMSNorm, RoPE, SwiGLU, GQA) or "gpt2" (LayerNorm, learned positions, GELU)."""
    vocab_size: int = 4096
    """Rows of the token embedding; the tokenizer's vocabulary size (rounded up is fine)."""
    n_layer: int = 4
    """Number of transformer blocks."""
    n_head: int = 4
    """Query heads per attention layer."""
    n_kv_head: int | None = None
    """Key/value heads (grouped-query attention); none means n_head (plain multi-head attention)."""
    d_model: int = 256
    """Width of the residual stream."""
    d_ff: int | None = None
    """Hidden width of the MLP; none means 4*d_model (gpt2) or the Llama rule 8/3*d_model rounded up to 64."""
    max_seq_len: int = 256
    """Longest sequence (prompt + response) the model sees; sizes learned positions and the KV cache."""
    rope_theta: float = 10000.0
    """Base of the rotary frequencies (llama style)."""
    norm_eps: float = 1e-5
    """Epsilon of RMSNorm / LayerNorm."""
    tie_embeddings: bool = True
    """Share the token embedding with the output projection (always true for gpt2 style)."""
    qkv_bias: bool = False
    """Bias on the query/key/value projections (Qwen2); gpt2 style always has biases."""
    dropout: float = 0.0
    """Residual dropout on embeddings and on every block's attention and MLP output (InstructGPT SFT: 0.2)."""
    head: Literal["lm", "scalar"] = "lm"
    """Output head: "lm" for next-token logits, "scalar" for a reward/value model (one number per position)."""
    grad_checkpoint: bool = False
    """Recompute each block's activations in the backward pass: less memory, about a third more compute."""

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model if self.style == "gpt2" else 64 * math.ceil(8 * self.d_model / 3 / 64)
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if self.style == "gpt2" and not self.tie_embeddings:
            raise ValueError("gpt2 style always ties the embedding and the output projection")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


# Named shapes. The gpt2-* sizes are OpenAI's GPT-2 (124M, 355M, 774M, 1558M with the 50257 vocabulary);
# gpt1 is Radford et al. 2018 (117M); 1.3b and 6b are GPT-3 XL and 6.7B, InstructGPT's smaller policies.
PRESETS: dict[str, GPTConfig] = {
    "tiny": GPTConfig("llama", 4096, n_layer=4, n_head=4, n_kv_head=2, d_model=256, max_seq_len=256),
    "small": GPTConfig("llama", 8192, n_layer=8, n_head=8, n_kv_head=4, d_model=512, max_seq_len=512),
    "gpt1": GPTConfig("gpt2", 40478, n_layer=12, n_head=12, d_model=768, max_seq_len=512),
    "gpt2-small": GPTConfig("gpt2", 50257, n_layer=12, n_head=12, d_model=768, max_seq_len=1024),
    "gpt2-medium": GPTConfig("gpt2", 50257, n_layer=24, n_head=16, d_model=1024, max_seq_len=1024),
    "gpt2-large": GPTConfig("gpt2", 50257, n_layer=36, n_head=20, d_model=1280, max_seq_len=1024),
    "gpt2-xl": GPTConfig("gpt2", 50257, n_layer=48, n_head=25, d_model=1600, max_seq_len=1024),
    "1.3b": GPTConfig("gpt2", 50257, n_layer=24, n_head=16, d_model=2048, max_seq_len=2048),
    "6b": GPTConfig("gpt2", 50257, n_layer=32, n_head=32, d_model=4096, max_seq_len=2048),
}


# The same fields, each defaulting to None ("as the preset says"): a stage config nests this to let a user
# change single fields of a preset (`--model.n_layer=2`). Its docs are GPTConfig's.
ModelOverrides = make_dataclass(
    "ModelOverrides",
    [(f.name, typing.get_type_hints(GPTConfig)[f.name] | None, None) for f in fields(GPTConfig)],
)
ModelOverrides.__field_docs_from__ = GPTConfig  # type: ignore[attr-defined]


def preset(name: str, overrides: Any = None) -> GPTConfig:
    """A named shape with the non-None fields of a ModelOverrides (or a dict) applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; expected one of: {', '.join(PRESETS)}")
    changes = overrides if isinstance(overrides, dict) else asdict(overrides) if overrides is not None else {}
    changes = {k: v for k, v in changes.items() if v is not None}
    base = asdict(PRESETS[name])
    if "d_model" in changes and "d_ff" not in changes:
        base["d_ff"] = None  # re-derive the MLP width from the new d_model
    if "n_head" in changes and "n_kv_head" not in changes:
        base["n_kv_head"] = None
    return GPTConfig(**{**base, **changes})


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as Hugging Face's Llama does, so bf16 runs agree with it. F.rms_norm is one fused
        # kernel (forward and backward) instead of six elementwise passes, with the same fp32 arithmetic.
        dtype = x.dtype
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(dtype)


def rope_tables(cfg: GPTConfig, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, T, 1, D) for the rotate-half convention, computed in fp32."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, device=position_ids.device).float() / d))
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
    return emb.cos()[:, :, None], emb.sin()[:, :, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache:
    """Preallocated keys and values for every layer: (L, B, G, max_len, D) each; `length` is filled."""

    def __init__(self, cfg: GPTConfig, batch: int, max_len: int, device, dtype: torch.dtype) -> None:
        shape = (cfg.n_layer, batch, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, G, T, D) new keys/values after the filled part; return all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.k.shape[3]:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.k.shape[3]}")
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        bias = cfg.qkv_bias or cfg.style == "gpt2"
        # One fused projection for q, k and v: a single larger matmul is faster than three small ones.
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=bias)
        self.proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=cfg.style == "gpt2")

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        layer: int,
    ) -> torch.Tensor:
        cfg = self.cfg
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, cfg.n_head + 2 * cfg.n_kv_head, cfg.head_dim)
        qk, v = qkv.split([cfg.n_head + cfg.n_kv_head, cfg.n_kv_head], dim=2)  # (B, T, H+G, D), (B, T, G, D)
        if rope is not None:
            qk = apply_rope(qk, *rope)  # queries and keys rotate in one pass of each elementwise op
        q, k = qk.split([cfg.n_head, cfg.n_kv_head], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D), (B, G, T, D) x2
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, G, S, D)
        # Query head h reads key/value head h // (H/G), the grouping Hugging Face's repeat_kv uses. enable_gqa
        # does that inside the kernel instead of copying every key/value head H/G times (in decoding, the
        # whole cache at every step).
        gqa = cfg.n_kv_head != cfg.n_head
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, cfg.n_head * cfg.head_dim)  # (B, T, H*D)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.style = cfg.style
        if cfg.style == "llama":
            self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.d_ff, bias=False)  # fused gate and up projections
            self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        else:
            self.fc = nn.Linear(cfg.d_model, cfg.d_ff)
            self.proj = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.style == "llama":
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


def make_norm(cfg: GPTConfig) -> nn.Module:
    return RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.style == "llama" else nn.LayerNorm(cfg.d_model, cfg.norm_eps)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, mask, cache, layer):
        x = x + self.dropout(self.attn(self.attn_norm(x), rope, mask, cache, layer))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


def position_ids_from_mask(attention_mask: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Positions that count real tokens only, so a left-padded row starts at 0 like an unpadded one."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0) + offset


def attention_bias(attention_mask: torch.Tensor, query_len: int) -> torch.Tensor:
    """Boolean (B, 1, T, S) mask: causal, real keys only; the query's own position always stays visible,
    so rows of padding never attend to nothing (which would give NaN)."""
    B, S = attention_mask.shape
    key_pos = torch.arange(S, device=attention_mask.device)
    query_pos = key_pos[S - query_len :, None]  # (T, 1): queries are the last T positions
    causal = key_pos[None, :] <= query_pos  # (T, S)
    visible = causal[None] & attention_mask[:, None, :].bool()  # (B, T, S)
    visible |= key_pos[None, None, :] == query_pos[None]
    return visible[:, None]


def last_token_values(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) per-position scalars -> (B,) at each row's last real token (the reward of a response).

    With left padding and responses padded after their stop token, the last real token is the last True
    of the mask, never a pad.
    """
    T = attention_mask.shape[1]
    last = T - 1 - attention_mask.long().flip(-1).argmax(-1)  # (B,)
    return values.gather(1, last[:, None]).squeeze(1)


def response_logprobs(model: nn.Module, tokens: torch.Tensor, attention_mask: torch.Tensor | None, prompt_len: int,
                      temperature: float = 1.0, entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, T) rows whose responses start at column prompt_len -> (B, N) log-probs of the response tokens under the
    temperature-scaled distribution, in fp32, and with `entropy` their (B, N) entropies (no gradient).

    The LM head runs only at the N positions that predict a response token (`only_at`): with a 49k vocabulary the
    (B, T, V) logits of the prompt positions were most of a forward's memory and a share of its FLOPs. The
    log-prob is a fused cross-entropy, which keeps no (B, N, V) log-softmax for the backward. `model` is a GPT or
    a wrapper of one (DDP, FSDP, an adapter-off view) whose forward takes `only_at`."""
    B, T = tokens.shape
    N = T - prompt_len
    at = (torch.arange(B, device=tokens.device)[:, None] * T
          + torch.arange(prompt_len - 1, T - 1, device=tokens.device)).flatten()  # position t predicts t + 1
    logits = model(tokens, attention_mask=attention_mask, only_at=at).float()  # (B * N, V)
    if temperature != 1.0:
        logits = logits / temperature
    logp = -F.cross_entropy(logits, tokens[:, prompt_len:].flatten(), reduction="none").view(B, N)
    if not entropy:
        return logp, None
    with torch.no_grad():
        logp_all = F.log_softmax(logits, -1)
        return logp, -(logp_all.exp() * logp_all).sum(-1).view(B, N)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy of (B, T, V) logits against (B, T) targets, in fp32 (bf16 logits from autocast
    are upcast; fp32 ones are used as they are, without a copy)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction=reduction)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.style == "gpt2" else None
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        if cfg.head == "scalar":
            self.score = nn.Linear(cfg.d_model, 1, bias=False)
            self.lm_head = None
        else:
            self.score = None
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
            if cfg.tie_embeddings:
                self.lm_head.weight = self.tok_emb.weight
        self.reward_bias = 0.0
        """Added by `reward` to the scalar head's value: a reward model's normalisation (chatloop rm centres its
        rewards on the demonstrations and folds its gain into the head's weight), kept in config.json."""
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.down.weight", "mlp.proj.weight")):
                # GPT-2: scale residual projections by 1/sqrt(2 * n_layer) so the stream's variance is O(1).
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))
        if self.score is not None:
            # InstructGPT / Huang et al.: reward head ~ N(0, 1/sqrt(d+1)).
            nn.init.normal_(self.score.weight, std=1 / math.sqrt(cfg.d_model + 1))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = False) -> int:
        """Distinct parameters (tied weights counted once); optionally without the embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
        return n

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """(B, T) token ids -> (B, T, C) final-norm hidden states.

        attention_mask: (B, S) with 1 for real tokens, covering the cache and the new tokens; none means
        every token is real (training on packed text takes the fast causal path). A (B, 1, T, S) boolean
        mask is used as it is (True = may attend), with explicit position_ids.
        position_ids: (B, T); by default derived from the mask, or counted on from the cache.
        """
        cfg = self.cfg
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:
                position_ids = position_ids_from_mask(attention_mask)[:, past:]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        mask = None
        if attention_mask is not None and attention_mask.dim() == 4:
            mask = attention_mask.bool()  # a ready (B, 1, T, S) mask, e.g. block-diagonal for packed examples
            if position_ids is None:
                raise ValueError("a 4-D attention mask needs explicit position_ids")
        elif attention_mask is not None:
            mask = attention_bias(attention_mask, T)
        elif cache is not None and past > 0:
            # Decoding with an unpadded cache: every cached key is visible.
            mask = attention_bias(torch.ones(B, past + T, device=input_ids.device, dtype=torch.bool), T)

        x = self.tok_emb(input_ids)  # (B, T, C)
        rope = None
        if cfg.style == "gpt2":
            x = x + self.pos_emb(position_ids)
        else:
            rope = rope_tables(cfg, position_ids)
        x = self.dropout(x)
        for i, block in enumerate(self.blocks):
            if cfg.grad_checkpoint and self.training and cache is None:
                x = checkpoint(block, x, rope, mask, None, i, use_reentrant=False)
            else:
                x = block(x, rope, mask, cache, i)
        if cache is not None:
            cache.length += T
        return self.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        only_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) -> logits (B, T, V) for the lm head, or scalars (B, T) for the scalar head.

        only_at: (M,) indices into the flattened B*T positions: the head runs on those only and the result is
        (M, V) or (M,). A loss on a few positions (DPO's answer tokens) skips the unembedding of the others, a
        quarter of a tiny model's FLOPs; it goes through forward, so DDP and FSDP wrappers see it.
        """
        x = self.hidden_states(input_ids, attention_mask, position_ids, cache)
        if only_at is not None:
            x = x.flatten(0, 1)[only_at]
        if self.score is not None:
            return self.score(x).squeeze(-1)
        return self.lm_head(x)

    def reward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, right_padded: bool = False,
               through: nn.Module | None = None) -> torch.Tensor:
        """(B, T) -> (B,) a reward model's reward of each sequence: the scalar head at its last real token, in fp32,
        plus reward_bias. right_padded: each row's pads follow its tokens, so the causal mask alone keeps them
        from the real tokens and the forward pass runs without an attention mask (the fast path). through: the
        module whose forward runs, when it is not this one (its DDP/FSDP wrapper in training)."""
        values = (through or self)(input_ids, attention_mask=None if right_padded else attention_mask)
        return last_token_values(values.float(), attention_mask) + self.reward_bias

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward) as in the PaLM appendix: 6N + 12 L T C."""
        n = self.num_params(non_embedding=True)
        if self.lm_head is not None:
            n += self.lm_head.weight.numel()  # the unembedding matmul is compute even when tied
        return 6 * n + 12 * self.cfg.n_layer * seq_len * self.cfg.d_model
