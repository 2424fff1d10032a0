"""`chatloop ppo`: PPO (and PPO-ptx) against the reward model, or a critic-free estimator of the same family
(RLOO, GRPO, REINFORCE++: --algorithm) with the same KL, ptx, whitening and resume (docs/RECIPE.md §4, §5, §7).

Models: the policy starts from the SFT model; the frozen reference is the same SFT model; the value model is
separate and starts from the reward model (only with --algorithm=ppo); the reward model is frozen. Dropout is off
in all of them.

Steps of one iteration:
  1. Take the next `batch_size / samples_per_prompt` prompts of the seeded prompt order (the iteration number is
     the position), each `samples_per_prompt` times.
  2. Roll out: sample one response per copy of a prompt with the engine (temperature 1, no top-k/top-p by
     default), truncated at the stop token.
  3. Score: the reward model at the last real token (normalised), or the `RewardSource` that --reward_fn names (the
     synthetic world's gold judge: chatloop.world.gold, an oracle); a response without a stop token gets `no_eos_score`
     instead (Huang et al.). With several samples per prompt, each score taken relative to its prompt's group
     (`relative_scores`: less the others' mean for ppo/rloo, less the group mean for reinforce++, standardised for
     grpo): what is left is how much better this answer is than the policy's usual answer to the same prompt,
     not how easy the prompt is.
  4. The policy's per-token log-probs of the temperature-scaled distribution: the sampling pass's own in fp32
     (--sampling_logprobs), else recomputed with a forward pass; the reference's and the value model's values
     (zero without a critic) with forward passes that run the LM head at response positions only.
  5. Per-token rewards: -kl_coef * (logp - ref_logp) on every response token (not for grpo), plus the score on
     the last. Optionally whiten the rewards without shifting their mean.
  6. Generalised advantage estimation (gamma, lam) backwards over the response; returns = advantages +
     values; advantages whitened over the batch's real tokens (not for grpo). Without a critic (values 0, lam 1)
     a token's advantage is the return that follows it (grpo: its group-standardised score).
  7. PPO: `ppo_epochs` passes over `minibatches` shuffled minibatches: the clipped policy loss (grpo: plus
     kl_coef times the k3 KL to the reference per token), the clipped value loss (with a critic), and for PPO-ptx
     ptx_coef times the language-model loss on pretraining windows, accumulated into the same optimizer step. (At
     the first minibatch of an iteration the ratio is 1: exactly when step 4 ran a forward, within 1e-5 with the
     sampling pass's log-probs in fp32, within ~2e-3 per token under bf16.)
  8. Update the adaptive KL controller with the batch's KL, and the EMA of the policy weights.
  9. Log every metric of docs/RECIPE.md §7; print samples every `sample_every` iterations; save the state.
Finally the policy (its EMA if enabled) is saved as the stage's checkpoint.

Logged metrics (docs/METRICS.md says what healthy runs look like):
  objective/kl            mean over episodes of sum over tokens of (logp - ref_logp)
  objective/kl_coef       the beta of this batch's penalty (adaptive: before the batch's update of it)
  objective/entropy       mean per-token entropy of the policy on its samples
  objective/scores        mean reward-model score (after the no-EOS penalty)
  objective/rlhf_reward   scores - kl_coef * kl
  policy/approxkl         0.5 * mean((logp_new - logp_old)^2) over the PPO updates
  policy/clipfrac         share of tokens whose ratio was clipped
  policy/ratio_mean, policy/ratio_var
  loss/policy, loss/value, loss/ptx
  loss/kl                 GRPO only: the k3 estimate of KL(policy || reference) per token, in the loss
  value/clipfrac          share of tokens whose value was clipped (value metrics only with a critic)
  value/explained_variance  1 - Var(returns - values) / Var(returns)
  returns/mean, returns/var
  response/length         mean response tokens; response/eos_fraction: share ending with a stop token
  reward/mean, reward/std of the per-token rewards' sum per episode
  perf/episodes_per_s, perf/rollout_s, perf/update_s
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from tqdm import tqdm

from chatloop import distributed, lora
from chatloop.checkpoint import data_record, load_model, save_model
from chatloop.config import resolve_function
from chatloop.data.corpus import TokenWindows, build_shards
from chatloop.data.formats import Prompt, prompt_messages, read_records
from chatloop.device import autocast
from chatloop.engine import Rollout, generate
from chatloop.errors import UserError
from chatloop.io import disk_full, no_room
from chatloop.lora import LoraFields
from chatloop.model import GPT, lm_loss, response_logprobs
from chatloop.tokenizer import Tokenizer
from chatloop.train.trainer import (
    StageGuard,
    TrainConfig,
    apply_update,
    config_record,
    open_stage,
    resume,
    set_lr,
)


@dataclass
class PPOConfig(TrainConfig, LoraFields):
    out: str = "runs/ppo"
    """Output directory: the policy checkpoint, train_state/, metrics.jsonl, tb/, samples.jsonl."""
    policy: str = ""
    """The SFT checkpoint: the policy's start and the frozen KL reference."""
    reference: str = ""
    """The frozen KL reference; empty means the policy's starting checkpoint (the SFT model)."""
    reward_model: str = ""
    """The reward-model checkpoint (frozen); the value model starts from it unless value_model is given."""
    value_model: str = ""
    """Checkpoint for the value model; empty means the reward model (Stiennon et al.)."""
    reward_fn: str = ""
    """A reward other than a reward model, as `module:function`: function(reward_fn_arg, tokenizer, reward_scale)
    returns a `RewardSource` that scores the episodes, e.g. chatloop.world.gold:gold_reward with
    --reward_fn_arg=runs/NAME/world: the synthetic world's gold judge, an oracle for experiments (Gao et al.'s gold
    reward: what PPO reaches with a perfect RM). Needs --value_model with a critic."""
    reward_fn_arg: str = ""
    """What reward_fn's function is given (the gold judge's: the world's directory)."""
    reward_scale: float = 1.0
    """Multiplier of reward_fn's scores (the gold judge's are in [0, 1]: 3 gives about the spread of an RM's scores
    against the KL penalty)."""
    algorithm: Literal["ppo", "rloo", "grpo", "reinforce++"] = "ppo"
    """The RL estimator, one field for the family (docs/RECIPE.md §4):
    ppo: a value model (started from the RM) and GAE over the per-token rewards (InstructGPT);
    rloo: no critic; each score less the mean of its prompt's other samples (leave-one-out), the KL penalty in the
      per-token reward, a token's advantage the return that follows it, whitened over the batch (Ahmadian et al.);
    grpo: no critic; each score standardised within its prompt's group ((score - mean) / std), the same advantage
      on every token, not whitened; the KL to the reference in the loss (the k3 estimator, weight kl_coef), not in
      the reward (Shao et al.);
    reinforce++: no critic; each score less its group's mean (REINFORCE++-baseline; the raw score with one sample
      per prompt), the KL penalty in the reward, the returns whitened over the whole batch (Hu et al.).
    The critic-free ones do half the update's compute and carry no critic's noise; rloo and grpo need
    samples_per_prompt >= 2. All keep PPO's clipped ratio, ppo_epochs and minibatches."""
    prompts: list[str] = field(default_factory=list)
    """Prompt records (JSONL) to roll out on; cycled in a seeded order."""
    iterations: int = 100
    """PPO iterations (each: batch_size episodes, then the updates)."""
    batch_size: int = 64
    """Episodes (responses) per iteration (InstructGPT: 512)."""
    samples_per_prompt: int = 1
    """Responses per prompt in a batch (1: InstructGPT's one episode per prompt). Above 1, each score is taken
    relative to its prompt's group before the KL penalty and the advantages: as `algorithm` says (ppo as rloo)."""
    minibatches: int = 4
    """Minibatches per PPO epoch (InstructGPT: 8 of 64)."""
    ppo_epochs: int = 4
    """Passes over each batch (InstructGPT: 1; Ziegler/Stiennon: 4)."""
    max_new_tokens: int = 48
    """Response length budget in tokens."""
    max_prompt_tokens: int = 192
    """Prompts are cut to their last this many tokens."""
    temperature: float = 1.0
    """Sampling temperature; log-probs for the loss use the same temperature (Huang et al.)."""
    top_k: int = 0
    """Top-k truncation of rollouts (0: none; truncation biases the KL estimate negative)."""
    top_p: float = 1.0
    """Nucleus truncation of rollouts (1: none)."""
    kl_coef: float = 0.02
    """beta of the per-token KL penalty (InstructGPT: 0.02); the start value when adaptive. It weighs nats against
    the RM's units: `chatloop rm` scales those so that the answers to one prompt spread with std 1."""
    adaptive_kl: bool = False
    """Adapt beta toward kl_target (Ziegler et al.)."""
    kl_target: float = 6.0
    """Target KL (nats per episode) of the adaptive controller."""
    kl_horizon: float = 10000.0
    """Horizon (episodes) of the adaptive controller."""
    no_eos_score: float = -1.0
    """Score given to responses that do not end with a stop token within max_new_tokens."""
    whiten_rewards: bool = False
    """Scale per-token rewards to unit variance over the batch, without shifting their mean."""
    gamma: float = 1.0
    """Discount of GAE (InstructGPT: 1)."""
    lam: float = 0.95
    """Lambda of GAE (InstructGPT: 0.95); the critic-free algorithms use 1 (the return that follows a token)."""
    cliprange: float = 0.2
    """PPO ratio clip."""
    cliprange_value: float = 0.2
    """Value clip around the rollout's values."""
    vf_coef: float = 0.1
    """Value-loss coefficient (Ziegler et al.: 0.1)."""
    lr: float = 1e-5
    """Policy learning rate (constant after warmup)."""
    value_lr: float = 0.0
    """Value-model learning rate; 0 means the policy's."""
    eps: float = 1e-5
    """Adam epsilon (Huang et al.: 1e-5; PyTorch's 1e-8 makes early updates too aggressive)."""
    warmup_steps: int = 10
    """Iterations of linear warmup from lr/10 (InstructGPT: 10)."""
    lr_decay: bool = False
    """Decay the learning rate linearly to 0 over the iterations (Ziegler et al.) instead of keeping it."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    ema_decay: float = 0.0
    """EMA of the policy weights used for evaluation and saving (InstructGPT: 0.992); 0 disables."""
    ptx_data: list[str] = field(default_factory=list)
    """Pretraining text for PPO-ptx (files as for `chatloop pretrain`); empty disables it."""
    ptx_coef: float = 27.8
    """gamma of PPO-ptx: weight of the pretraining log-likelihood (InstructGPT: 27.8); used with ptx_data."""
    ptx_ratio: float = 8.0
    """Pretraining sequences per RL episode in each minibatch (InstructGPT: 8)."""
    ptx_seq_len: int = 64
    """Tokens per pretraining sequence."""
    grad_checkpoint: bool = False
    """Recompute activations in the backward pass of the policy and value model (less memory)."""
    sampling_logprobs: bool = True
    """Take the rollout's policy log-probs from the sampling pass (fp32, KV cache) instead of a forward pass over
    the rollout: one forward fewer per iteration. In fp32 they equal the update's first forward within 1e-5 (the
    first minibatch's ratio is 1 within that). Under bf16 autocast the update's forward rounds differently from
    the fp32 sampler: ~2e-3 per token on average (0.1 at most, on the tiny world's SFT model), far inside the clip
    range; false runs the forward, so that the ratio starts at exactly 1 and the KL penalty compares two bf16
    forwards."""
    sample_every: int = 10
    """Print and record samples every this many iterations."""
    save_every: int = 10
    """Save the resumable state every this many iterations."""
    log_every: int = 1
    """Log metrics every this many iterations."""

    @property
    def critic(self) -> bool:
        """Whether a value model is trained (algorithm ppo)."""
        return self.algorithm == "ppo"


class AdaptiveKLController:
    """Ziegler et al.: beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n_episodes / horizon."""

    def __init__(self, value: float, target: float, horizon: float) -> None:
        self.value, self.target, self.horizon = value, target, horizon

    def update(self, kl: float, n_episodes: int) -> None:
        error = float(np.clip(kl / self.target - 1, -0.2, 0.2))
        self.value *= 1 + error * n_episodes / self.horizon


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over the masked elements (Huang et al.: the unbiased estimate matters here)."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    return ((x - mean) ** 2 * mask).sum() / (n - 1).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) advantages and returns; the value after the last real token is 0 (the episode ends)."""
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], device=rewards.device)
    values = values * mask
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * mask


def policy_logprobs(model: GPT, rollout_tokens: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                    temperature: float, device, precision) -> torch.Tensor:
    """(B, N) log-probs of the response tokens under the temperature-scaled distribution (fp32)."""
    with autocast(device, precision):
        return response_logprobs(model, rollout_tokens, attention_mask, prompt_len, temperature)[0]


def response_values(value_model: GPT, tokens, attention_mask, prompt_len: int, device, precision) -> torch.Tensor:
    """(B, N) values of the states before each response token (aligned with the log-probs)."""
    with autocast(device, precision):
        values = value_model(tokens, attention_mask=attention_mask)
    return values[:, prompt_len - 1 : -1].float()


@dataclass
class Chunk:
    """Rows of a rollout of similar length, and the columns they need: [P - prompt, P + response)."""

    rows: torch.Tensor  # (b,) row indices into the rollout (or into the minibatch's selection)
    prompt: int  # the longest real prompt among the rows
    response: int  # the longest response among the rows (at least 1)

    def cut(self, tokens: torch.Tensor, attention: torch.Tensor, P: int) -> tuple[torch.Tensor, torch.Tensor]:
        cols = slice(P - self.prompt, P + self.response)
        return tokens[self.rows, cols], attention[self.rows, cols]


def length_chunks(rollout: Rollout, rows: torch.Tensor, max_rows: int = 32) -> list[Chunk]:
    """`rows` of the rollout sorted by length and cut into chunks of at most max_rows, each trimmed to its own
    longest prompt and response. Prompts are left-padded to the batch's longest (often 4x the mean) and responses
    right-padded to theirs, so a forward pass over the whole batch computes mostly padding; per chunk it does not,
    and position ids (counted from the mask) and each row's results are unchanged."""
    P = rollout.prompt_len
    prompt_lens = rollout.attention_mask[rows, :P].sum(1)
    response_lens = rollout.mask[rows].sum(1).clamp(min=1)
    order = torch.argsort(prompt_lens * (rollout.mask.shape[1] + 1) + response_lens, stable=True)
    chunks = []
    for start in range(0, len(order), max_rows):
        part = order[start : start + max_rows]
        chunks.append(Chunk(rows[part], int(prompt_lens[part].max()), int(response_lens[part].max())))
    return chunks


def chunked(fn, rollout: Rollout, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """fn(tokens, attention, prompt_len) -> tensors of (b, n), run on each length chunk of the rollout's `rows`;
    the results as (len(rows), N) tensors in the order of `rows` (0 past each chunk's longest response)."""
    B, N = rollout.mask.shape
    results: list[torch.Tensor] = []
    for chunk in length_chunks(rollout, rows):
        parts = fn(*chunk.cut(rollout.tokens, rollout.attention_mask, rollout.prompt_len), chunk.prompt)
        results = results or [torch.zeros(B, N, device=part.device) for part in parts]
        for result, part in zip(results, parts):
            result[chunk.rows, : chunk.response] = part
    return tuple(result[rows] for result in results)


@dataclass
class Batch:
    """One iteration's rollouts and everything PPO needs from them (all (B, N) unless noted)."""

    rollout: Rollout
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    scores: torch.Tensor  # (B,)
    kl: torch.Tensor  # (B,) summed over tokens
    entropy: torch.Tensor  # scalar
    kl_coef: float  # the KL weight of this batch: in its rewards, or (GRPO) in its loss


class RewardSource(Protocol):
    """What PPO scores its episodes with: a reward model (`ModelReward`), or what --reward_fn names (the synthetic
    world's gold judge: chatloop.world.gold)."""

    def scores(self, prompts: list[Prompt], rollout: Rollout) -> torch.Tensor:
        """(B,) the score of each rollout row's response to its prompt (`prompts`: the rows' prompt records)."""
        ...


class ModelReward:
    """A reward model's reward of each episode (`GPT.reward`)."""

    def __init__(self, model: GPT, device: torch.device, precision: str) -> None:
        self.model, self.device, self.precision = model, device, precision

    def scores(self, prompts: list[Prompt], rollout: Rollout) -> torch.Tensor:
        def rewards(t, a, _):  # (b, 1)
            with autocast(self.device, self.precision):
                return (self.model.reward(t, a)[:, None],)

        rows = torch.arange(rollout.tokens.shape[0], device=rollout.tokens.device)
        return chunked(rewards, rollout, rows)[0][:, 0]


def ppo(cfg: PPOConfig) -> Path:
    """PPO from cfg.policy against cfg.reward_model, or against cfg.reward_fn's reward (cfg.value_model is then
    needed to start a critic from)."""
    out = Path(cfg.out)
    opened = open_stage("ppo", cfg)
    if opened is None:
        return out
    device, precision = opened
    check_config(cfg)
    tokenizer = Tokenizer.load(cfg.policy)

    policy, reference, reward_model, value_model = load_models(cfg, device)
    prompts, encoded = read_prompts(cfg, tokenizer, policy.cfg.max_seq_len)
    reward = reward_source(cfg, reward_model, tokenizer, device, precision)
    # Under torchrun: the trained models go through DDP/FSDP2 for their updates; frozen ones are sharded
    # only under FSDP; the EMA is sharded like the policy. One process: all as they are.
    ema = copy.deepcopy(policy).requires_grad_(False) if cfg.ema_decay > 0 else None
    train_policy = distributed.wrap(policy, cfg.parallel, device)
    train_value = distributed.wrap(value_model, cfg.parallel, device) if value_model is not None else None
    for frozen in (reference, reward_model, ema):
        if frozen is not None:
            distributed.wrap(frozen, cfg.parallel, device, frozen=True)
    policy_opt = adamw(policy, cfg.lr, cfg)
    value_opt = adamw(value_model, cfg.value_lr or cfg.lr, cfg) if value_model is not None else None
    kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)

    ptx = ptx_windows(cfg, tokenizer, out) if cfg.ptx_data and cfg.ptx_coef > 0 else None
    ptx_per_minibatch = int(round(cfg.ptx_ratio * cfg.batch_size / cfg.minibatches)) if ptx else 0

    start, state, log = resume(out, device, policy, policy_opt, "ppo", cfg.iterations, ("policy", "policy_opt"),
                               "iteration")
    if state is not None:  # the policy and its optimizer are back; the rest of the state:
        restore(state, cfg, value_model, value_opt, kl_ctl, ema)
    generator = torch.Generator(device=device)
    mode = f"PPO-ptx (coef {cfg.ptx_coef:g}, {ptx_per_minibatch} pretraining sequences per minibatch)" if ptx else "PPO"
    print(f"ppo: {len(prompts)} prompts, {cfg.iterations} iterations x {cfg.batch_size} episodes, {mode}, "
          f"{device} {precision}")

    bar = tqdm(total=cfg.iterations, initial=start, disable=not cfg.progress or not distributed.is_main(), unit="it",
               dynamic_ncols=True)
    with StageGuard("ppo", out, cfg.on_nonfinite, "iteration") as guard:  # SIGTERM / SIGINT, non-finite numbers
        for iteration in range(start, cfg.iterations):
            t0 = time.perf_counter()
            lr = lr_for(iteration, cfg)
            set_lr(policy_opt, lr)
            if value_opt is not None:
                set_lr(value_opt, (cfg.value_lr or cfg.lr) * lr / cfg.lr)

            # step 1
            rows = prompt_rows(iteration, cfg, len(prompts))
            batch_prompts = [encoded[i] for i in rows]

            # step 2-6 (under torchrun each rank rolls out its share of the prompts with its own random stream)
            generator.manual_seed(cfg.seed * 1_000_003 + iteration + 7_919_000_003 * distributed.rank())
            batch = make_batch(policy, reference, reward, value_model, distributed.shard(batch_prompts),
                               distributed.shard([prompts[i] for i in rows]), tokenizer, cfg, kl_ctl.value, generator,
                               device, precision)
            t1 = time.perf_counter()

            # step 7 (a non-finite score stops the stage, or skips the iteration's update: StageGuard.finite)
            stats = {}
            if guard.at(iteration + 1).finite({"objective/scores": first_nonfinite(batch.scores)}):
                stats = ppo_update(train_policy, train_value, policy_opt, value_opt, batch, cfg, ptx,
                                   ptx_per_minibatch, iteration, device, precision, guard)
                guard.weights_finite(policy, "policy")  # the next rollout samples from it
            t2 = time.perf_counter()

            # step 8
            metrics = batch_metrics(batch, cfg, kl_ctl.value)  # the coefficient this batch's penalty used
            if cfg.adaptive_kl:
                kl_ctl.update(metrics["objective/kl"], cfg.batch_size)
            if ema is not None:
                with torch.no_grad():
                    for e, p in zip(ema.parameters(), policy.parameters()):
                        e.lerp_(p, 1 - cfg.ema_decay)

            # step 9
            done = iteration + 1
            metrics.update(stats)
            metrics["train/lr"] = lr
            metrics["perf/episodes_per_s"] = cfg.batch_size / (t2 - t0)
            metrics["perf/rollout_s"] = t1 - t0
            metrics["perf/update_s"] = t2 - t1
            if done % cfg.log_every == 0 or done == cfg.iterations:
                log.log(done, metrics)
            bar.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.2f}")
            if cfg.sample_every and (done % cfg.sample_every == 0 or done == cfg.iterations) and distributed.is_main():
                record_samples(out, done, batch, tokenizer, batch_prompts)
            guard.end_step(done, cfg.iterations, done % cfg.save_every == 0 or done == cfg.iterations,
                           lambda: train_state(policy, policy_opt, value_model, value_opt, kl_ctl, ema),
                           cfg.keep_states, bar, log)
    bar.close()
    log.close()
    save_policy(cfg, out, ema if ema is not None else policy, tokenizer, kl_ctl.value, ptx is not None)
    return out


def save_policy(cfg: PPOConfig, out: Path, policy: GPT, tokenizer: Tokenizer, kl_coef: float, ptx: bool) -> None:
    """The stage's checkpoint: the policy (its EMA where kept), whole, written by rank 0, with its lineage."""
    final = distributed.gathered(policy)  # the whole model, on rank 0 only
    if final is not None:
        lineage = {"stage": "ppo-ptx" if ptx else "ppo", "parent": cfg.policy, "reward_model": cfg.reward_model,
                   "data": data_record(cfg.prompts + cfg.ptx_data), "config": config_record(cfg),
                   "metrics": {"kl_coef": kl_coef, "ema": cfg.ema_decay > 0}}
        save_model(final, out, tokenizer, lineage=lineage)
    print(f"ppo: done -> {out}")


def reward_source(cfg: PPOConfig, reward_model: GPT | None, tokenizer: Tokenizer, device: torch.device,
                  precision: str) -> RewardSource:
    """Step 3's scorer: what --reward_fn names, else the reward model."""
    if cfg.reward_fn:
        return resolve_function(cfg.reward_fn, "--reward_fn")(cfg.reward_fn_arg, tokenizer, cfg.reward_scale)
    assert reward_model is not None
    return ModelReward(reward_model, device, precision)


def load_models(cfg: PPOConfig, device: torch.device) -> tuple[GPT, GPT, GPT | None, GPT | None]:
    """The policy, the frozen reference, the frozen reward model (if PPO scores with it) and the value model (with
    a critic); dropout off in all of them (Huang et al.: otherwise the ratio is not 1 at the first minibatch)."""
    policy = lora.attach(load_model(cfg.policy, device=device, dropout=0.0, grad_checkpoint=cfg.grad_checkpoint),
                         cfg, cfg.policy)
    if cfg.lora_rank and lora.same_checkpoint(cfg.reference or cfg.policy, cfg.policy):
        reference = lora.WithoutAdapter(policy)  # the same weights, adapter off: no second copy
    else:
        reference = load_model(cfg.reference or cfg.policy, device=device, dropout=0.0).eval().requires_grad_(False)
    reward_model = None
    if not cfg.reward_fn:
        reward_model = load_model(cfg.reward_model, device=device, dropout=0.0,
                                  grad_checkpoint=cfg.grad_checkpoint).eval().requires_grad_(False)
        if reward_model.score is None:
            raise UserError(f"--reward_model={cfg.reward_model}: not a reward model (no scalar head)")
    if cfg.lora_rank and cfg.critic and reward_model is not None and not cfg.value_model:
        # The value model is the reward model's weights with an adapter and a copy of its head; with the adapter
        # off it is the reward model again: one copy of those weights for both.
        value_model = lora.attach(reward_model.train(), cfg, cfg.reward_model, head_copy=True)
        return policy, reference, lora.WithoutAdapter(value_model), value_model
    value_model = lora.attach(load_model(cfg.value_model or cfg.reward_model, device=device, head="scalar",
                                         dropout=0.0, grad_checkpoint=cfg.grad_checkpoint),
                              cfg, cfg.value_model or cfg.reward_model) if cfg.critic else None
    return policy, reference, reward_model, value_model


def read_prompts(cfg: PPOConfig, tokenizer: Tokenizer, context: int) -> tuple[list[Prompt], list[list[int]]]:
    """The prompt records, and each rendered for generation (its last max_prompt_tokens tokens)."""
    prompts = [r["prompt"] for path in cfg.prompts for r in read_records(path, "prompt")]
    encoded = [tokenizer.render_chat(prompt_messages(p), add_generation_prompt=True)[0][-cfg.max_prompt_tokens:]
               for p in prompts]
    if max(len(e) for e in encoded) + cfg.max_new_tokens > context:
        raise UserError(f"--max_prompt_tokens + --max_new_tokens exceed the policy's context {context}")
    return prompts, encoded


def restore(state: dict, cfg: PPOConfig, value_model: GPT | None, value_opt: torch.optim.Optimizer | None,
            kl_ctl: AdaptiveKLController, ema: GPT | None) -> None:
    """What `train_state` saved besides the policy and its optimizer. The adaptive KL coefficient is state; a fixed
    one is config, so a resumed run penalises with the --kl_coef it is given."""
    if value_model is not None:
        distributed.load_model_state(value_model, state["value"])
        distributed.load_optimizer_state(value_model, value_opt, state["value_opt"])
    if cfg.adaptive_kl:
        kl_ctl.value = state["kl_coef"]
    if ema is not None:
        distributed.load_model_state(ema, state["ema"])


def train_state(policy: GPT, policy_opt: torch.optim.Optimizer, value_model: GPT | None,
                value_opt: torch.optim.Optimizer | None, kl_ctl: AdaptiveKLController, ema: GPT | None) -> dict:
    """Everything a resumed run needs besides the step (whole tensors, gathered under FSDP)."""
    return {"policy": distributed.model_state(policy), "policy_opt": distributed.optimizer_state(policy, policy_opt),
            **({"value": distributed.model_state(value_model),
                "value_opt": distributed.optimizer_state(value_model, value_opt)} if value_model else {}),
            "kl_coef": kl_ctl.value, **({"ema": distributed.model_state(ema)} if ema is not None else {})}


def adamw(model: GPT, lr: float, cfg: PPOConfig) -> torch.optim.AdamW:
    """AdamW over all of the model's parameters (PPO decays none unless weight_decay is set), fused as in
    trainer.make_optimizer."""
    device = next(model.parameters()).device
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, fused=device.type in ("cuda", "cpu"))


def ptx_windows(cfg: PPOConfig, tokenizer: Tokenizer, out: Path) -> TokenWindows:
    """PPO-ptx's pretraining data: cfg.ptx_data tokenized once into OUT/ptx_tokens, read in seeded windows."""
    with distributed.main_first():
        meta = build_shards(tokenizer, cfg.ptx_data, [], 0.05, "text", out / "ptx_tokens",
                            Path(cfg.policy) / "tokenizer.json")
    return TokenWindows(out / "ptx_tokens" / "train.bin", meta["dtype"], cfg.ptx_seq_len, cfg.seed)


def check_config(cfg: PPOConfig) -> None:
    if not cfg.policy or not (cfg.reward_model or cfg.reward_fn) or not cfg.prompts:
        raise UserError("--policy (SFT checkpoint), --reward_model (or --reward_fn) and --prompts are required")
    if cfg.reward_fn and cfg.reward_model:
        raise UserError("--reward_fn and --reward_model: give one of them (what scores the episodes)")
    if cfg.reward_fn and cfg.critic and not cfg.value_model:
        raise UserError("--reward_fn (a reward other than a reward model) needs --value_model (a reward-model "
                        "checkpoint to start the value model from) or a critic-free --algorithm (rloo, grpo, "
                        "reinforce++)")
    if cfg.batch_size % cfg.minibatches:
        raise UserError(f"--batch_size={cfg.batch_size} must be divisible by --minibatches={cfg.minibatches}")
    if cfg.samples_per_prompt < 1 or cfg.batch_size % cfg.samples_per_prompt:
        raise UserError(f"--samples_per_prompt={cfg.samples_per_prompt}: expected a divisor of --batch_size="
                        f"{cfg.batch_size}")
    if cfg.algorithm in ("rloo", "grpo") and cfg.samples_per_prompt < 2:
        raise UserError(f"--algorithm={cfg.algorithm} takes each score against its prompt's other samples: "
                        f"expected --samples_per_prompt >= 2, got {cfg.samples_per_prompt}")
    world = distributed.world_size()
    if (cfg.batch_size // cfg.minibatches) % world:
        raise UserError(f"--batch_size / --minibatches = {cfg.batch_size // cfg.minibatches} episodes per minibatch "
                        f"must be divisible by the number of processes ({world})")


def prompt_rows(iteration: int, cfg: PPOConfig, n_prompts: int) -> list[int]:
    """Step 1: the prompts (indices) of an iteration, each samples_per_prompt times: the next ones of a seeded
    order of all prompts, reshuffled every epoch, so that the iteration number is the data position."""
    per_batch = cfg.batch_size // cfg.samples_per_prompt
    epoch, within = divmod(iteration * per_batch, n_prompts)
    order = np.random.default_rng([cfg.seed, epoch]).permutation(n_prompts)
    idx = np.concatenate([order, np.random.default_rng([cfg.seed, epoch + 1]).permutation(n_prompts)])
    return [i for i in idx[within : within + per_batch] for _ in range(cfg.samples_per_prompt)]


def batch_metrics(batch: Batch, cfg: PPOConfig, kl_coef: float) -> dict[str, float]:
    """Step 9: the rollout's metrics (the module docstring lists them)."""
    mask = batch.rollout.mask.float()
    returns = batch.returns
    episode_rewards = (batch.rewards * mask).sum(1)
    return {
        "objective/kl": batch.kl.mean().item(), "objective/kl_coef": kl_coef,
        "objective/entropy": batch.entropy.item(), "objective/scores": batch.scores.mean().item(),
        "objective/rlhf_reward": (batch.scores - kl_coef * batch.kl).mean().item(),
        **({"value/explained_variance": explained_variance(batch.values, returns, mask)} if cfg.critic else {}),
        "returns/mean": masked_mean(returns, mask).item(), "returns/var": masked_var(returns, mask).item(),
        "response/length": mask.sum(1).mean().item(),
        "response/eos_fraction": batch.rollout.ended.float().mean().item(),
        "reward/mean": episode_rewards.mean().item(), "reward/std": episode_rewards.std().item(),
    }


def relative_scores(scores: torch.Tensor, group: int, algorithm: str) -> torch.Tensor:
    """(B,) scores of consecutive groups of `group` samples of one prompt, each taken relative to its group as
    `algorithm` does (PPOConfig.algorithm): less the mean of the group's others (ppo, rloo), less the group's mean
    (reinforce++), or standardised within the group (grpo). Unchanged for group 1."""
    if group == 1:
        return scores
    grouped = scores.view(-1, group)
    if algorithm == "grpo":
        return ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).flatten()
    if algorithm == "reinforce++":
        return (grouped - grouped.mean(1, keepdim=True)).flatten()
    return (grouped - (grouped.sum(1, keepdim=True) - grouped) / (group - 1)).flatten()


def lr_for(iteration: int, cfg: PPOConfig) -> float:
    """Linear warmup from lr/10 over warmup_steps iterations, then constant (or linear decay to 0)."""
    if iteration < cfg.warmup_steps:
        return cfg.lr * (0.1 + 0.9 * iteration / cfg.warmup_steps)
    if cfg.lr_decay:
        return cfg.lr * max(0.0, 1 - (iteration - cfg.warmup_steps) / max(1, cfg.iterations - cfg.warmup_steps))
    return cfg.lr


@torch.no_grad()
def make_batch(policy, reference, reward: RewardSource, value_model, prompts, records, tokenizer, cfg: PPOConfig,
               kl_coef: float, generator, device, precision) -> Batch:
    # step 2
    policy.eval()
    with distributed.whole_for_inference(policy) as whole:
        rollout = generate(whole, prompts, cfg.max_new_tokens, tokenizer.pad_id, tokenizer.stop_ids,
                           temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, generator=generator,
                           entropy=True)
    policy.train()
    mask = rollout.mask.float()
    # step 3 (this and step 4 on chunks of rows of similar length: see length_chunks)
    rows = torch.arange(mask.shape[0], device=mask.device)
    scores = reward.scores(records, rollout).to(device)
    # (a non-finite score stays, unhidden by no_eos_score: StageGuard stops or skips the iteration on it)
    scores = torch.where(rollout.ended | ~torch.isfinite(scores), scores, torch.full_like(scores, cfg.no_eos_score))
    # step 4
    def logprobs_of(model):
        return lambda t, a, p: (policy_logprobs(model, t, a, p, cfg.temperature, device, precision),)
    if cfg.sampling_logprobs:
        old_logprobs = rollout.logprobs
    else:
        (old_logprobs,) = chunked(logprobs_of(policy), rollout, rows)
    (ref_logprobs,) = chunked(logprobs_of(reference), rollout, rows)
    entropy = rollout.entropy
    values = (chunked(lambda t, a, p: (response_values(value_model, t, a, p, device, precision),), rollout, rows)[0]
              if value_model is not None else torch.zeros_like(old_logprobs))
    old_logprobs, ref_logprobs, values = old_logprobs * mask, ref_logprobs * mask, values * mask
    if distributed.active():  # each rank rolled out its share: the rest runs on the whole batch, on every rank
        rollout, (scores,), (old_logprobs, ref_logprobs, values, entropy) = distributed.gather_rollout(
            rollout, tokenizer.pad_id, [scores], [old_logprobs, ref_logprobs, values, entropy])
        mask = rollout.mask.float()
    # step 5 (GRPO: the KL goes into the loss instead, step 7)
    kl_per_token = (old_logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl_per_token if cfg.algorithm != "grpo" else torch.zeros_like(kl_per_token)
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(last)), last] += relative_scores(scores, cfg.samples_per_prompt, cfg.algorithm)
    if cfg.whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False)
    # step 6 (critic-free: values 0 and lam 1, so a token's advantage is the return that follows it)
    advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam if cfg.critic else 1.0)
    if cfg.algorithm != "grpo":  # GRPO's group standardisation is its only normalisation
        advantages = whiten(advantages, mask)
    return Batch(rollout, old_logprobs, ref_logprobs, values, rewards, advantages, returns, scores,
                 kl_per_token.sum(1), masked_mean(entropy, mask), kl_coef)


def first_nonfinite(x: torch.Tensor) -> float:
    """The first nan or inf of `x` (0.0 when every value is finite): what StageGuard.finite is shown."""
    bad = x[~torch.isfinite(x)]
    return float(bad[0]) if bad.numel() else 0.0


def ppo_update(policy, value_model, policy_opt, value_opt, batch: Batch, cfg: PPOConfig, ptx, ptx_per_minibatch,
               iteration, device, precision, guard: StageGuard | None = None) -> dict[str, float]:
    """Step 7: ppo_epochs passes of minibatch updates of the policy (and value model). With `guard`, a non-finite
    loss or gradient norm of a minibatch stops the stage or skips that update (StageGuard.finite)."""
    r = batch.rollout
    B = r.tokens.shape[0]
    size = B // cfg.minibatches
    mask_all = r.mask.float()
    sums: dict[str, list[float]] = {k: [] for k in ("policy/approxkl", "policy/clipfrac", "policy/ratio_mean",
                                                     "policy/ratio_var", "loss/policy", "loss/value", "value/clipfrac",
                                                     "loss/ptx", "loss/kl")}
    rng = np.random.default_rng([cfg.seed, iteration, 7])
    ptx_index = iteration * cfg.ppo_epochs * cfg.minibatches * ptx_per_minibatch
    for _ in range(cfg.ppo_epochs):
        order = rng.permutation(B)
        for m in range(cfg.minibatches):
            minibatch = order[m * size : (m + 1) * size]
            # Under torchrun each rank takes its share of the minibatch; `share` weighs its mean loss so that
            # the averaged gradient is the one of the whole minibatch's mean (1.0 in one process).
            sel = torch.as_tensor(distributed.shard(minibatch), device=r.tokens.device)
            share = distributed.share_weight(mask_all[sel].sum().item(), mask_all[minibatch].sum().item())
            mask = mask_all[sel]
            tokens_here = mask.sum().clamp(min=1)
            chunks = length_chunks(r, sel)  # the same number on every rank: each has the same number of rows
            policy_opt.zero_grad(set_to_none=True)
            if ptx is not None:
                ids = distributed.shard(ptx_index + np.arange(ptx_per_minibatch))
                ptx_index += ptx_per_minibatch
                x, y = ptx.batch(ids, device)
                # forward and backward inside no_sync (DDP decides at forward time): all-reduced with the last chunk
                with distributed.no_sync(policy), autocast(device, precision):
                    ptx_loss = lm_loss(policy(x), y)
                    (cfg.ptx_coef * ptx_loss * distributed.share_weight(len(ids), ptx_per_minibatch)).backward()
                sums["loss/ptx"].append(ptx_loss.item())
            # The minibatch's masked-mean loss, accumulated over its length chunks (one optimizer step).
            logp_all, pg_sum, kl_sum = torch.zeros_like(mask_all), 0.0, 0.0
            for j, chunk in enumerate(chunks):
                tokens, attention = chunk.cut(r.tokens, r.attention_mask, r.prompt_len)
                cols = slice(0, chunk.response)
                m = mask_all[chunk.rows, cols]
                with distributed.no_sync(policy, enabled=j < len(chunks) - 1):
                    logp = policy_logprobs(policy, tokens, attention, chunk.prompt, cfg.temperature, device,
                                           precision)
                    ratio = torch.exp((logp - batch.old_logprobs[chunk.rows, cols]) * m)
                    adv = batch.advantages[chunk.rows, cols]
                    pg_losses = torch.max(-adv * ratio, -adv * ratio.clamp(1 - cfg.cliprange, 1 + cfg.cliprange))
                    if cfg.algorithm == "grpo":  # the k3 estimate of KL(policy || reference), >= 0 per token
                        to_ref = (batch.ref_logprobs[chunk.rows, cols] - logp) * m
                        k3 = torch.exp(to_ref) - to_ref - 1
                        kl_sum += ((k3 * m).sum() / tokens_here).item()
                        pg_losses = pg_losses + batch.kl_coef * k3
                    pg_part = (pg_losses * m).sum() / tokens_here
                    (pg_part * share).backward()
                pg_sum += pg_part.item()
                logp_all[chunk.rows, cols] = logp.detach()
            ptx_part = cfg.ptx_coef * sums["loss/ptx"][-1] if ptx is not None else 0.0
            apply_update(policy_opt, policy.parameters(), cfg.grad_clip, pg_sum + ptx_part, guard, "policy/")

            with torch.no_grad():
                dlogp = (logp_all[sel] - batch.old_logprobs[sel]) * mask
                ratio = torch.exp(dlogp)
                sums["policy/approxkl"].append(0.5 * masked_mean(dlogp**2, mask).item())
                sums["policy/clipfrac"].append(masked_mean(((ratio - 1).abs() > cfg.cliprange).float(), mask).item())
                sums["policy/ratio_mean"].append(masked_mean(ratio, mask).item())
                sums["policy/ratio_var"].append(masked_var(ratio, mask).item())
                sums["loss/policy"].append(pg_sum)
                if cfg.algorithm == "grpo":
                    sums["loss/kl"].append(kl_sum)
            if value_model is None:
                continue
            value_opt.zero_grad(set_to_none=True)
            vf_sum, clipped_sum = 0.0, 0.0
            for j, chunk in enumerate(chunks):
                tokens, attention = chunk.cut(r.tokens, r.attention_mask, r.prompt_len)
                cols = slice(0, chunk.response)
                m = mask_all[chunk.rows, cols]
                old_values, returns = batch.values[chunk.rows, cols], batch.returns[chunk.rows, cols]
                with distributed.no_sync(value_model, enabled=j < len(chunks) - 1):
                    values = response_values(value_model, tokens, attention, chunk.prompt, device, precision)
                    clipped = old_values + (values - old_values).clamp(-cfg.cliprange_value, cfg.cliprange_value)
                    vf_losses = torch.max((values - returns) ** 2, (clipped - returns) ** 2)
                    vf_part = 0.5 * (vf_losses * m).sum() / tokens_here
                    (cfg.vf_coef * vf_part * share).backward()
                vf_sum += vf_part.item()
                outside = (values.detach() - old_values).abs() > cfg.cliprange_value
                clipped_sum += (outside.float() * m).sum().item()
            apply_update(value_opt, value_model.parameters(), cfg.grad_clip, vf_sum, guard, "value/")
            sums["loss/value"].append(vf_sum)
            sums["value/clipfrac"].append(clipped_sum / tokens_here.item())
    stats = distributed.mean_dict({k: float(np.mean(v)) for k, v in sums.items() if v})
    stats["policy/first_ratio_mean"] = sums["policy/ratio_mean"][0]
    stats["policy/first_approxkl"] = sums["policy/approxkl"][0]
    return stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    var_returns = masked_var(returns, mask)
    return float(1 - masked_var(returns - values, mask) / var_returns.clamp(min=1e-8))


def record_samples(out: Path, iteration: int, batch: Batch, tokenizer: Tokenizer, prompts: list[list[int]]) -> None:
    """Append a few samples to samples.jsonl and print the first."""
    rows = []
    for i, ids in enumerate(batch.rollout.response_ids()[:4]):
        rows.append({"iteration": iteration, "prompt": tokenizer.decode(prompts[i]).strip(),
                     "response": tokenizer.decode_reply(ids), "score": round(batch.scores[i].item(), 4),
                     "kl": round(batch.kl[i].item(), 4)})
    text = "".join(json.dumps(r) + "\n" for r in rows)
    try:
        with open(out / "samples.jsonl", "a", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        if no_room(e):
            raise disk_full(out / "samples.jsonl", len(text), e) from None
        raise
    tqdm.write(f"[{iteration}] {rows[0]['prompt'][-60:]!r} -> {rows[0]['response'][:80]!r} "
               f"(score {rows[0]['score']:.2f})")
