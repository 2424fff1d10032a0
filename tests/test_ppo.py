"""PPO: hand-computed pieces, the invariants of docs/RECIPE.md §5, and short real runs through the CLI."""

import json
import shutil

import pytest
import torch

from chatloop.checkpoint import load_model, save_model
from chatloop.engine import generate
from chatloop.model import GPT, GPTConfig, last_token_values, response_logprobs
from chatloop.tokenizer import Tokenizer
from chatloop.train.ppo import (
    AdaptiveKLController,
    ModelReward,
    PPOConfig,
    chunked,
    gae,
    length_chunks,
    make_batch,
    masked_mean,
    relative_scores,
    whiten,
)
from tests.conftest import FP32, run_cli


def test_gae_matches_a_hand_computed_example():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.4, 9.0]])  # the last position is padding
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    gamma, lam = 1.0, 0.95
    d2 = 1.0 + 0 - 0.4  # terminal: no value after the last real token
    d1 = 0.0 + 0.4 - 0.2
    d0 = 0.0 + 0.2 - 0.5
    a2, a1 = d2, d1 + gamma * lam * d2
    a0 = d0 + gamma * lam * a1
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(advantages, torch.tensor([[a0, a1, a2, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[a0 + 0.5, a1 + 0.2, a2 + 0.4, 0.0]]))


def test_each_algorithm_takes_a_score_against_its_prompts_group_as_its_paper_does():
    scores = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])  # two prompts, three samples each
    loo = torch.tensor([-1.5, 0.0, 1.5, -3.0, -3.0, 6.0])  # less the mean of the prompt's other samples
    assert torch.allclose(relative_scores(scores, 3, "rloo"), loo)
    assert torch.allclose(relative_scores(scores, 3, "ppo"), loo)
    assert torch.allclose(relative_scores(scores, 3, "reinforce++"), torch.tensor([-1.0, 0.0, 1.0, -2.0, -2.0, 4.0]))
    std = torch.tensor([1.0, 12.0]).sqrt()  # unbiased, per group
    grpo = torch.tensor([-1.0, 0.0, 1.0, -2.0, -2.0, 4.0]) / (std.repeat_interleave(3) + 1e-4)
    assert torch.allclose(relative_scores(scores, 3, "grpo"), grpo)
    for algorithm in ("ppo", "rloo", "grpo", "reinforce++"):
        assert torch.equal(relative_scores(scores, 1, algorithm), scores)


def test_masked_padding_changes_no_statistic():
    x = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 5.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    garbage = x + (1 - mask) * 1000
    assert masked_mean(x, mask) == masked_mean(garbage, mask) == 3.0
    torch.testing.assert_close(whiten(x, mask), whiten(garbage, mask))
    w = whiten(x, mask, shift_mean=False)
    # Unit variance, mean kept (as TRL / lm-human-preferences do for rewards).
    assert masked_mean(w, mask).item() == pytest.approx(3.0, abs=1e-5)
    assert w[mask.bool()].var().item() == pytest.approx(1.0, abs=1e-4)


def test_adaptive_controller_moves_beta_in_the_right_direction():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(kl=12.0, n_episodes=1000)  # too far from the reference: raise beta (clipped error 0.2)
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    before = ctl.value
    ctl.update(kl=3.0, n_episodes=1000)  # too close: lower beta
    assert ctl.value < before
    lowered = ctl.value
    ctl.update(kl=6.0, n_episodes=1000)  # on target: unchanged
    assert ctl.value == pytest.approx(lowered)


@pytest.fixture(scope="module")
def tiny_rl(tmp_path_factory, tokenizer_dir):
    """A random tiny policy, a reward model whose head rewards nothing (zero weights), and prompts."""
    root = tmp_path_factory.mktemp("rl")
    tok = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(0)
    policy = GPT(GPTConfig("llama", tok.vocab_size, 2, 4, 2, 64, max_seq_len=96))
    save_model(policy, root / "sft", tok)
    rm = GPT(GPTConfig("llama", tok.vocab_size, 2, 4, 2, 64, max_seq_len=96, head="scalar"))
    torch.nn.init.zeros_(rm.score.weight)
    save_model(rm, root / "rm_zero", tok)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Where does the {c} fox run?", "user_id": f"u{i}"}) + "\n"
                               for i, c in enumerate(["red", "blue", "green", "brown"] * 4)))
    return root, tok


def batch_for(root, tok, kl_coef=0.05, **kw):
    cfg = PPOConfig(max_new_tokens=16, **kw)
    policy = load_model(root / "sft", dropout=0.0)
    reference = load_model(root / "sft").eval()
    rm = load_model(root / "rm_zero").eval()
    value = load_model(root / "rm_zero", head="scalar") if cfg.critic else None
    texts = [f"The {c} dog?" for c in ("red", "blue") * 8]
    prompts = [tok.render_chat([{"role": "user", "content": t}], True)[0] for t in texts]
    g = torch.Generator().manual_seed(0)
    cpu = torch.device("cpu")
    reward = ModelReward(rm, cpu, "fp32")
    return policy, value, make_batch(policy, reference, reward, value, prompts, texts, tok, cfg, kl_coef, g, cpu,
                                     "fp32"), cfg


def test_reward_is_the_score_at_the_last_token_and_kl_is_zero_against_itself(tiny_rl):
    root, tok = tiny_rl
    _, _, batch, cfg = batch_for(root, tok, no_eos_score=-3.0)
    mask = batch.rollout.mask.float()
    assert batch.kl.abs().max().item() < 1e-5  # policy == reference at the start
    last = mask.sum(1).long() - 1
    for i in range(mask.shape[0]):
        expected = 0.0 if batch.rollout.ended[i] else -3.0  # zero RM; no stop token -> the fixed penalty
        assert batch.rewards[i, last[i]].item() == pytest.approx(expected, abs=1e-5)
        assert batch.rewards[i, : last[i]].abs().max().item() < 1e-5 if last[i] > 0 else True
        assert (batch.rewards[i, last[i] + 1 :] == 0).all()


def test_with_two_samples_per_prompt_each_score_is_taken_against_the_other(tiny_rl):
    root, tok = tiny_rl
    _, _, batch, _ = batch_for(root, tok, no_eos_score=-3.0, samples_per_prompt=2)
    last = batch.rollout.mask.sum(1).long() - 1
    terminal = batch.rewards[torch.arange(len(last)), last]
    pairs = batch.scores.view(-1, 2)
    assert torch.allclose(terminal.view(-1, 2), pairs - pairs.flip(1), atol=1e-5)  # zero RM: only the penalties


def test_without_a_critic_each_tokens_advantage_is_the_return_that_follows_it(tiny_rl):
    """--algorithm=rloo: no values; the return at token t is the sum of the rewards from t on (the leave-one-out
    score at the last token, KL penalties before it), and the advantages are those returns whitened over the batch."""
    root, tok = tiny_rl
    policy, value, batch, cfg = batch_for(root, tok, kl_coef=0.3, algorithm="rloo", no_eos_score=-3.0,
                                          samples_per_prompt=2)
    assert value is None and (batch.values == 0).all()
    with torch.no_grad():  # a policy that differs from the reference, so the KL penalties are not all zero
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    reference = load_model(root / "sft").eval()
    rm = load_model(root / "rm_zero").eval()
    texts = [f"The {c} dog?" for c in ("red", "blue") * 8]
    prompts = [tok.render_chat([{"role": "user", "content": t}], True)[0] for t in texts]
    batch = make_batch(policy, reference, ModelReward(rm, torch.device("cpu"), "fp32"), None, prompts, texts, tok, cfg,
                       0.3, torch.Generator().manual_seed(1), torch.device("cpu"), "fp32")
    mask = batch.rollout.mask.float()
    assert batch.rewards[mask.bool()].abs().sum() > 0
    to_go = batch.rewards.flip(1).cumsum(1).flip(1) * mask
    assert torch.allclose(batch.returns, to_go, atol=1e-5)
    mean = to_go.sum() / mask.sum()
    std = (((to_go - mean) ** 2 * mask).sum() / (mask.sum() - 1)).sqrt()
    assert torch.allclose(batch.advantages, (to_go - mean) / std * mask, atol=1e-4)


def test_grpo_gives_every_token_its_group_standardised_score_and_keeps_the_kl_out_of_the_reward(tiny_rl):
    root, tok = tiny_rl
    cfg = PPOConfig(max_new_tokens=16, algorithm="grpo", samples_per_prompt=4, kl_coef=0.3)
    policy = load_model(root / "sft", dropout=0.0)
    with torch.no_grad():  # a policy that differs from the reference, and an RM whose scores differ
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
        rm = load_model(root / "rm_zero").eval()
        rm.score.weight.normal_(std=1.0)
    texts = [f"The {c} dog?" for c in ("red", "blue") * 8]
    prompts = [tok.render_chat([{"role": "user", "content": t}], True)[0] for t in texts]
    batch = make_batch(policy, load_model(root / "sft").eval(), ModelReward(rm, torch.device("cpu"), "fp32"), None,
                       prompts, texts, tok, cfg, 0.3, torch.Generator().manual_seed(1), torch.device("cpu"), "fp32")
    mask = batch.rollout.mask.float()
    standardised = relative_scores(batch.scores, 4, "grpo")
    assert standardised.abs().max() > 0.5 and batch.kl.abs().sum() > 0.1
    assert torch.allclose(batch.advantages, standardised[:, None] * mask, atol=1e-5)  # not whitened
    last = mask.sum(1).long() - 1
    expected = torch.zeros_like(batch.rewards)
    expected[torch.arange(len(last)), last] = standardised
    assert torch.allclose(batch.rewards, expected, atol=1e-6)  # no KL penalty in the reward
    assert batch.kl_coef == 0.3  # it weighs the loss's KL term instead


def test_length_chunks_give_every_row_the_results_of_the_whole_padded_batch(tiny_rl):
    """Scores, log-probs and entropies computed per chunk of similar lengths (trimmed padding) equal the ones of one
    forward pass over the whole left/right-padded batch, row for row, in the order asked."""
    root, tok = tiny_rl
    torch.manual_seed(1)
    policy = load_model(root / "sft", dropout=0.0).eval()
    rm = GPT(GPTConfig("llama", tok.vocab_size, 2, 4, 2, 64, max_seq_len=96, head="scalar")).eval()
    questions = ["Hi?", "Where does the very long and winding river of the north run to in the end?", "Why?",
                 "Name three red things that are not apples and say why.", "Ok", "What is two plus two?"] * 3
    prompts = [tok.render_chat([{"role": "user", "content": q}], True)[0] for q in questions]
    rollout = generate(policy, prompts, 12, tok.pad_id, tok.stop_ids, temperature=1.0,
                       generator=torch.Generator().manual_seed(0), entropy=True)
    mask = rollout.mask.float()
    with torch.no_grad():
        whole_lp, whole_ent = response_logprobs(policy, rollout.tokens, rollout.attention_mask, rollout.prompt_len,
                                                1.0, entropy=True)
        whole_scores = last_token_values(rm(rollout.tokens, attention_mask=rollout.attention_mask).float(),
                                         rollout.attention_mask)
        rows = torch.tensor([5, 0, 17, 3, 9, 1, 12])
        lp, ent = chunked(lambda t, a, p: response_logprobs(policy, t, a, p, 1.0, entropy=True), rollout, rows)
        (scores,) = chunked(lambda t, a, p: (last_token_values(rm(t, attention_mask=a).float(), a)[:, None],),
                            rollout, rows)
    assert len(length_chunks(rollout, torch.arange(len(prompts)), max_rows=4)) == 5
    assert torch.allclose(lp * mask[rows], whole_lp[rows] * mask[rows], atol=1e-5)
    assert torch.allclose(ent * mask[rows], whole_ent[rows] * mask[rows], atol=1e-4)
    assert torch.allclose(scores[:, 0], whole_scores[rows], atol=1e-5)
    assert whole_scores.std() > 1e-3  # a random head: the scores differ between rows
    # The sampling pass's own log-probs and entropies (KV cache, PPO's step 4 in fp32) are the forward's.
    assert (rollout.logprobs - whole_lp * mask).abs().max() < 1e-5
    assert (rollout.entropy - whole_ent * mask).abs().max() < 1e-4


@pytest.mark.slow
def test_first_minibatch_has_ratio_one_and_runs_keep_kl_near_zero_without_reward(tiny_rl, tmp_path):
    root, tok = tiny_rl
    out = tmp_path / "ppo"
    result = run_cli("ppo", f"--policy={root / 'sft'}", f"--reward_model={root / 'rm_zero'}",
                     f"--prompts={root / 'prompts.jsonl'}", f"--out={out}", "--iterations=4", "--batch_size=16",
                     "--minibatches=2", "--ppo_epochs=2", "--max_new_tokens=16", "--max_prompt_tokens=40",
                     "--kl_coef=0.1", "--lr=1e-4", "--warmup_steps=0", "--progress=false", "--sample_every=2", FP32)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    for row in rows:  # the old log-probs came from the sampling pass (fp32): 1 within 1e-5
        assert row["policy/first_ratio_mean"] == pytest.approx(1.0, abs=1e-5)
        assert row["policy/first_approxkl"] == pytest.approx(0.0, abs=1e-9)
        assert row["objective/kl"] >= -0.05  # untruncated sampling: the KL estimate is not negative
        assert abs(row["objective/kl"]) < 1.0  # nothing to gain: the policy stays at the reference
    assert (out / "samples.jsonl").is_file() and (out / "chatloop.json").is_file()
    # GRPO (no critic): the same, its KL in the loss, no value metrics, and no value model in the saved state. The
    # old log-probs from a forward pass (--sampling_logprobs=false): the first ratio is exactly 1.
    out = tmp_path / "grpo"
    result = run_cli("ppo", f"--policy={root / 'sft'}", f"--reward_model={root / 'rm_zero'}",
                     f"--prompts={root / 'prompts.jsonl'}", f"--out={out}", "--iterations=2", "--batch_size=16",
                     "--samples_per_prompt=4", "--minibatches=2", "--max_new_tokens=16", "--max_prompt_tokens=40",
                     "--algorithm=grpo", "--sampling_logprobs=false", "--lr=1e-4", "--warmup_steps=0",
                     "--progress=false", FP32)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["policy/first_ratio_mean"] == pytest.approx(1.0, abs=1e-7)
    assert all(0 <= row["loss/kl"] < 0.05 for row in rows)  # k3 >= 0 per token; near the reference
    assert not any(k.startswith(("value/", "loss/value")) for row in rows for k in row)


@pytest.mark.slow
def test_gold_reward_scores_each_response_by_the_world_judge(tiny_rl, tmp_path):
    """--reward_fn=chatloop.world.gold:gold_reward: each episode's score is reward_scale x the judge's score of its
    own prompt and response."""
    import random

    from chatloop.engine import Rollout
    from chatloop.world.gold import GoldReward
    from chatloop.world.judge import Task, ideal
    from chatloop.world.world import World

    root, tok = tiny_rl
    world = World.generate(0)
    rng = random.Random(0)
    tasks = [Task(kind, world.sample_slots(kind, rng) or {}) for kind in ("qa_color", "gen_sentence", "oth_math")]
    prompts = [world.render_core(t, rng) for t in tasks]
    answers = [ideal(world, tasks[0]), ideal(world, tasks[1]), "Hello there."]  # the last answers nothing
    stop = tok.stop_ids[0]
    ids = [tok.encode_reply(a) + [stop] for a in answers]  # as the model writes them
    width = max(map(len, ids))
    response = torch.tensor([i + [tok.pad_id] * (width - len(i)) for i in ids])
    mask = response != tok.pad_id
    rollout = Rollout(tokens=response, attention_mask=mask, prompt_len=0, response=response,
                      logprobs=torch.zeros(response.shape), mask=mask, ended=torch.tensor([True, True, False]))
    gold = GoldReward(world, tok, 3.0)
    scores = gold.scores(prompts, rollout)
    expected = [3.0 * world.judge(p, a, ended=e).score for p, a, e in zip(prompts, answers, [True, True, False])]
    assert scores.tolist() == pytest.approx(expected)
    assert scores[0] > 2.5 and scores[1] > 2.5 and scores[2] < 1.5  # ideal answers score ~1, a non-answer less
    # Swapping the prompts changes the scores: each response is judged against its own prompt.
    swapped = gold.scores([prompts[1], prompts[0], prompts[2]], rollout)
    assert swapped[0] < scores[0] and swapped[1] < scores[1]

    # Through the CLI: a short run scores with the judge (no reward model); its samples carry 3 x gold.
    (tmp_path / "world").mkdir()
    (tmp_path / "world" / "world.json").write_text(json.dumps(world.to_json()))
    world_prompts = tmp_path / "prompts.jsonl"
    world_prompts.write_text("".join(json.dumps({"prompt": p, "user_id": "u1"}) + "\n" for p in prompts * 4))
    out = tmp_path / "ppo"
    result = run_cli("ppo", f"--policy={root / 'sft'}", "--reward_fn=chatloop.world.gold:gold_reward",
                     f"--reward_fn_arg={tmp_path / 'world'}", "--reward_scale=3",
                     f"--value_model={root / 'rm_zero'}", f"--prompts={world_prompts}", f"--out={out}",
                     "--iterations=2", "--batch_size=6", "--minibatches=2", "--ppo_epochs=1", "--max_new_tokens=8",
                     "--max_prompt_tokens=40", "--progress=false", "--sample_every=1")
    assert result.returncode == 0, result.stderr
    for row in map(json.loads, (out / "samples.jsonl").read_text().splitlines()):
        prompt = next(p for p in prompts if row["prompt"].endswith(p))
        assert row["score"] in (pytest.approx(3.0 * world.judge(prompt, row["response"]).score, abs=1e-3), -1.0)
    missing = run_cli("ppo", f"--policy={root / 'sft'}", "--reward_fn=chatloop.world.gold:gold_reward",
                      f"--reward_fn_arg={tmp_path / 'world'}", f"--prompts={world_prompts}",
                      f"--out={tmp_path / 'no_value'}")
    assert missing.returncode == 2 and "--value_model" in missing.stderr
    unknown = run_cli("ppo", f"--policy={root / 'sft'}", "--reward_fn=chatloop.world.gold:no_such_reward",
                      f"--value_model={root / 'rm_zero'}", f"--prompts={world_prompts}",
                      f"--out={tmp_path / 'unknown'}")
    assert unknown.returncode == 2 and "--reward_fn=chatloop.world.gold:no_such_reward" in unknown.stderr


@pytest.mark.slow
def test_a_resumed_run_penalises_with_the_kl_coef_it_is_given(tiny_rl, tmp_path):
    """With adaptive KL off the coefficient is config, not state: a run resumed with another --kl_coef penalises
    with that one and logs it (the saved coefficient is the adaptive controller's)."""
    root, _ = tiny_rl
    common = [f"--policy={root / 'sft'}", f"--reward_model={root / 'rm_zero'}", f"--prompts={root / 'prompts.jsonl'}",
              "--batch_size=8", "--minibatches=2", "--ppo_epochs=1", "--max_new_tokens=12", "--max_prompt_tokens=40",
              "--lr=3e-3", "--warmup_steps=0", "--progress=false", "--sample_every=0", "--save_every=2", FP32]
    first = tmp_path / "first"
    assert run_cli("ppo", *common, f"--out={first}", "--iterations=2", "--kl_coef=0.02").returncode == 0
    resumed = tmp_path / "resumed"  # the first run's state at iteration 2, as a run of 4 iterations left it
    resumed.mkdir()
    shutil.copytree(first / "train_state", resumed / "train_state")
    shutil.copy(first / "metrics.jsonl", resumed / "metrics.jsonl")
    result = run_cli("ppo", *common, f"--out={resumed}", "--iterations=4", "--kl_coef=0.5")
    assert result.returncode == 0, result.stderr
    assert "resuming from iteration 2 of 4" in result.stdout
    rows = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    for row in rows[2:]:
        assert row["objective/kl_coef"] == 0.5
        assert abs(row["objective/kl"]) > 0.01  # the policy has moved: 0.5 and 0.02 penalise apart
        # The episode rewards (score, less the penalty summed over tokens) are the penalty of the coefficient logged.
        assert row["reward/mean"] == pytest.approx(row["objective/scores"] - 0.5 * row["objective/kl"], abs=1e-4)
    assert json.loads((resumed / "chatloop.json").read_text())["metrics"]["kl_coef"] == 0.5
