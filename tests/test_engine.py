import pytest
import torch

from chatloop.engine import filter_logits, generate
from chatloop.model import GPT, GPTConfig

PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9], [10, 11, 12]]


def random_model(style: str) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(style, vocab_size=50, n_layer=2, n_head=4, n_kv_head=2 if style == "llama" else None,
                          d_model=32, max_seq_len=64)).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_greedy_equals_argmax_of_full_forward_passes(style):
    model = random_model(style)
    rollout = generate(model, PROMPTS, 12, pad_id=0, stop_ids=[49], temperature=0)
    for i, prompt in enumerate(PROMPTS):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(int(rollout.mask[i].sum())):
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert seq[len(prompt):] == rollout.response_ids()[i]


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_logprobs_equal_a_full_forward_pass_over_the_sample(style):
    model = random_model(style)
    temperature = 0.7
    rollout = generate(model, PROMPTS, 12, pad_id=0, stop_ids=[3, 4, 5], temperature=temperature,
                       generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(rollout.tokens, attention_mask=rollout.attention_mask)
    P = rollout.prompt_len
    expected = torch.log_softmax(logits[:, P - 1 : -1] / temperature, -1)
    expected = expected.gather(-1, rollout.response[..., None]).squeeze(-1) * rollout.mask
    torch.testing.assert_close(rollout.logprobs, expected, atol=1e-5, rtol=1e-5)


def test_repeated_prompts_share_their_prefill_and_sample_as_if_run_apart():
    # PPO's samples per prompt and best-of-n repeat prompts: the engine prefills each once and copies its cache rows.
    model = random_model("llama")
    repeated = [p for p in PROMPTS for _ in range(3)]
    greedy = generate(model, repeated, 10, pad_id=0, stop_ids=[49], temperature=0)
    alone = generate(model, PROMPTS, 10, pad_id=0, stop_ids=[49], temperature=0)
    assert greedy.response_ids() == [r for r in alone.response_ids() for _ in range(3)]
    rollout = generate(model, repeated, 10, pad_id=0, stop_ids=[49], temperature=1.0,
                       generator=torch.Generator().manual_seed(2))
    assert len({tuple(r) for r in rollout.response_ids()}) > len(PROMPTS)  # the copies sample independently
    with torch.no_grad():
        logits = model(rollout.tokens, attention_mask=rollout.attention_mask)
    P = rollout.prompt_len
    expected = torch.log_softmax(logits[:, P - 1 : -1], -1).gather(-1, rollout.response[..., None]).squeeze(-1)
    torch.testing.assert_close(rollout.logprobs, expected * rollout.mask, atol=1e-5, rtol=1e-5)


def test_finished_sequences_are_padded_and_masked_after_their_stop_token():
    model = random_model("llama")
    stops = list(range(10, 25))  # frequent stops: rows finish at different steps
    rollout = generate(model, PROMPTS * 4, 20, pad_id=0, stop_ids=stops, temperature=1.0,
                       generator=torch.Generator().manual_seed(3))
    lengths = rollout.mask.sum(1)
    assert len(set(lengths.tolist())) > 1
    for row, mask, ended in zip(rollout.response, rollout.mask, rollout.ended):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()
        assert (row[n:] == 0).all()
        assert bool(ended) == (row[n - 1].item() in stops)
    assert (rollout.logprobs[~rollout.mask] == 0).all()


def test_same_seed_same_samples():
    model = random_model("llama")
    a = generate(model, PROMPTS, 8, 0, [49], generator=torch.Generator().manual_seed(7))
    b = generate(model, PROMPTS, 8, 0, [49], generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.tokens, b.tokens)


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(logits)).all()


def test_a_too_long_request_is_refused():
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        generate(random_model("llama"), [[1] * 60], 10, 0, [49])
