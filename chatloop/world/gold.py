"""The world's gold judge as PPO's reward: an oracle for experiments (Gao et al.'s gold reward), what PPO reaches
with a perfect reward model. `chatloop ppo --gold_world DIR` (the verb's config is `GoldPPOConfig`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from chatloop.data.formats import Prompt
from chatloop.engine import Rollout
from chatloop.errors import UserError
from chatloop.tokenizer import Tokenizer
from chatloop.train.ppo import PPOConfig, ppo
from chatloop.world.world import World


class GoldReward:
    """scale * the gold judge's score of each response (a `RewardSource` of chatloop.train.ppo)."""

    def __init__(self, world: World, tokenizer: Tokenizer, scale: float) -> None:
        self.world, self.tokenizer, self.scale = world, tokenizer, scale

    def scores(self, prompts: list[Prompt], rollout: Rollout) -> torch.Tensor:
        texts = [self.tokenizer.decode_reply(r) for r in rollout.response_ids()]
        return torch.tensor([self.scale * self.world.judge(p, t, ended=e).score
                             for p, t, e in zip(prompts, texts, rollout.ended.tolist())])


@dataclass
class GoldPPOConfig(PPOConfig):
    gold_world: str = ""
    """A synthetic world's directory: reward each episode with gold_scale times its gold-judge score instead of a
    reward model. An oracle for experiments (Gao et al.'s gold reward): what PPO reaches with a perfect RM.
    Needs --value_model."""
    gold_scale: float = 3.0
    """Multiplier of the gold score (in [0, 1]) when gold_world is set: 3 gives about the spread of an RM's
    scores against the KL penalty."""


def gold_ppo(cfg: GoldPPOConfig) -> Path:
    """`chatloop ppo`: against the gold judge with --gold_world, else against --reward_model."""
    if not cfg.gold_world:
        return ppo(cfg)
    if not cfg.policy:
        raise UserError("--policy (SFT checkpoint) is required")
    return ppo(cfg, GoldReward(World.load(cfg.gold_world), Tokenizer.load(cfg.policy), cfg.gold_scale))
