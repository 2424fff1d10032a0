"""The world's gold judge as the loop's plug-ins: evaluation's `Judge` (`chatloop eval
--judge=chatloop.world.gold:gold_judge --judge_arg=WORLD_DIR`) and PPO's `RewardSource`, an oracle for experiments
(Gao et al.'s gold reward: what PPO reaches with a perfect reward model; `chatloop ppo
--reward_fn=chatloop.world.gold:gold_reward --reward_fn_arg=WORLD_DIR --reward_scale=3`). The loop names them only
by these strings: it never imports the world."""

from __future__ import annotations

from collections.abc import Callable

import torch

from chatloop.data.formats import Prompt
from chatloop.engine import Rollout
from chatloop.evaluate import Verdict
from chatloop.tokenizer import Tokenizer
from chatloop.world.judge import Judgement
from chatloop.world.world import World

# What the judge marks an answer down for (the report card's "why" table), in the table's order.
MARKS: dict[str, Callable[[Judgement], bool]] = {
    "ideal": lambda j: j.score >= 1.0,
    "false_claim": lambda j: j.details["false_claims"] > 0,
    "wrong_form": lambda j: j.flags["fails_to_follow"],
    "pleasantry": lambda j: j.details["pleasantries"] > 0,
    "too_long": lambda j: j.details["ended"] and j.details["finished"] and j.details["concise"] < 1.0,
    "no_stop": lambda j: not j.details["ended"],
}


class GoldJudge:
    """The world's judge as evaluation's `Judge` (chatloop.evaluate)."""

    def __init__(self, world: World) -> None:
        self.world = world

    def verdict(self, prompt: Prompt, answer: str, ended: bool = True) -> Verdict:
        j = self.world.judge(prompt, answer, ended=ended)
        return Verdict(j.score, j.likert, j.flags, {mark: has(j) for mark, has in MARKS.items()},
                       refused=j.details["refusal"], false_claim=j.details["false_claims"] > 0)

    def harmful(self, prompt: Prompt) -> bool:
        task = self.world.parse(prompt)
        return task is not None and task.harmful

    def kind(self, prompt: Prompt) -> str:
        task = self.world.parse(prompt)
        return task.kind if task is not None else "unparsed"


def gold_judge(world_dir: str) -> GoldJudge:
    """`--judge=chatloop.world.gold:gold_judge --judge_arg=WORLD_DIR`."""
    return GoldJudge(World.load(world_dir))


class GoldReward:
    """scale * the gold judge's score of each response (a `RewardSource` of chatloop.train.ppo)."""

    def __init__(self, world: World, tokenizer: Tokenizer, scale: float) -> None:
        self.world, self.tokenizer, self.scale = world, tokenizer, scale

    def scores(self, prompts: list[Prompt], rollout: Rollout) -> torch.Tensor:
        texts = [self.tokenizer.decode_reply(r) for r in rollout.response_ids()]
        return torch.tensor([self.scale * self.world.judge(p, t, ended=e).score
                             for p, t, e in zip(prompts, texts, rollout.ended.tolist())])


def gold_reward(world_dir: str, tokenizer: Tokenizer, scale: float) -> GoldReward:
    """`--reward_fn=chatloop.world.gold:gold_reward --reward_fn_arg=WORLD_DIR --reward_scale=SCALE`."""
    return GoldReward(World.load(world_dir), tokenizer, scale)
