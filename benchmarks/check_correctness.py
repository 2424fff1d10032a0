"""The checks to rerun after a speed change to the model or the engine (about 20 s on a CPU).

    .venv/bin/python benchmarks/check_correctness.py

1. Export parity: our `save_model` checkpoint loaded by transformers gives our logits (Llama, Qwen2, GPT-2;
   LM and scalar heads), and `load_model` gives them back exactly.
2. Engine: greedy decoding equals step-by-step argmax of full forwards per prompt alone; the recorded
   sampled log-probs equal a full forward's over the rollout.
3. Packed prefill: the cache and next-token logits equal the left-padded prefill's.
4. Sampler: `engine.sample` draws from the given distribution (also after top-k / top-p filtering) and
   never picks a token of probability 0.

Exits non-zero on the first failure.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import transformers  # noqa: E402

from chatloop.checkpoint import load_model, save_model  # noqa: E402
from chatloop.engine import filter_logits, generate, prefill, sample  # noqa: E402
from chatloop.model import GPT, GPTConfig, KVCache  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


def check(name: str, ok: bool, detail: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
    if not ok:
        raise SystemExit(1)


def random_model(cfg: GPTConfig, std: float) -> GPT:
    model = GPT(cfg).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=std)
    return model


def export_parity() -> None:
    configs = {
        "llama lm": GPTConfig("llama", 300, 2, 4, 2, 64, max_seq_len=64),
        "qwen2 lm": GPTConfig("llama", 300, 2, 4, 2, 64, max_seq_len=64, qkv_bias=True, tie_embeddings=False),
        "gpt2 lm": GPTConfig("gpt2", 300, 2, 4, None, 64, max_seq_len=64),
        "llama scalar": GPTConfig("llama", 300, 2, 4, 2, 64, max_seq_len=64, head="scalar"),
        "gpt2 scalar": GPTConfig("gpt2", 300, 2, 4, None, 64, max_seq_len=64, head="scalar"),
    }
    x = torch.randint(0, 299, (2, 20))  # 299, never in x, is the pad id a sequence classifier needs
    for name, cfg in configs.items():
        model = random_model(cfg, 0.1)
        with tempfile.TemporaryDirectory() as d:
            save_model(model, d, None)
            cls = (transformers.AutoModelForSequenceClassification if cfg.head == "scalar"
                   else transformers.AutoModelForCausalLM)
            hf = cls.from_pretrained(d).eval()
            hf.config.pad_token_id = 299  # the classifier scores the last token that is not pad
            back = load_model(d)
        with torch.no_grad():
            ours, theirs, again = model(x), hf(x).logits, back(x)
        if cfg.head == "scalar":
            ours = ours[:, -1:]  # transformers reads the score at the last token
        diff = (ours - theirs).abs().max().item()
        check(f"export parity, {name}", diff < 1e-5 and torch.equal(model(x), again),
              f"max |ours - transformers| = {diff:.1e}, reload exact")


def engine() -> None:
    for style in ("llama", "gpt2"):
        model = random_model(GPTConfig(style, 100, 2, 4, 2 if style == "llama" else None, 64, max_seq_len=64), 0.3)
        prompts = [[1, 2, 3, 4, 5], [7, 8], [9]]
        rollout = generate(model, prompts, 10, pad_id=0, stop_ids=[99], temperature=0)
        for i, prompt in enumerate(prompts):
            seq = list(prompt)
            with torch.no_grad():
                for _ in range(int(rollout.mask[i].sum())):
                    seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
            check(f"greedy == step-by-step argmax, {style} row {i}",
                  seq[len(prompt):] == rollout.response_ids()[i], str(seq[len(prompt):]))
        rollout = generate(model, prompts, 10, pad_id=0, stop_ids=[5, 6, 7], temperature=0.7,
                           generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            full = model(rollout.tokens, attention_mask=rollout.attention_mask)
        logp = torch.log_softmax(full[:, rollout.prompt_len - 1 : -1].float() / 0.7, -1)
        logp = logp.gather(-1, rollout.response[..., None]).squeeze(-1) * rollout.mask
        diff = (logp - rollout.logprobs).abs().max().item()
        check(f"sampled log-probs == full forward, {style}", diff < 1e-4, f"max diff {diff:.1e}")


def packed_prefill() -> None:
    for style in ("llama", "gpt2"):
        cfg = GPTConfig(style, 300, 2, 4, 2 if style == "llama" else None, 64, max_seq_len=128)
        model = random_model(cfg, 0.1)
        lengths = [3, 17, 40, 5, 1, 22, 40, 9]
        prompts = [torch.randint(1, 300, (n,)).tolist() for n in lengths]
        B, P = len(prompts), max(lengths)
        tokens = torch.zeros(B, P, dtype=torch.long)
        mask = torch.zeros(B, P, dtype=torch.bool)
        for i, p in enumerate(prompts):
            tokens[i, P - len(p):] = torch.tensor(p)
            mask[i, P - len(p):] = True
        padded, packed = KVCache(cfg, B, P + 4, "cpu", torch.float32), KVCache(cfg, B, P + 4, "cpu", torch.float32)
        with torch.no_grad():
            want = model(tokens, attention_mask=mask, cache=padded)[:, -1]
            got = prefill(model, prompts, tokens, mask, packed)
        real = torch.cat([mask, torch.zeros(B, 4, dtype=torch.bool)], 1)[None, :, None, :, None]
        diffs = [(want - got).abs().max().item(), ((padded.k - packed.k) * real).abs().max().item(),
                 ((padded.v - packed.v) * real).abs().max().item()]
        check(f"packed prefill == padded prefill, {style}", max(diffs) < 1e-5 and packed.length == P,
              f"logits / keys / values max diff {diffs[0]:.1e} / {diffs[1]:.1e} / {diffs[2]:.1e}")


def sampler() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=gen) * 2
    draws = 200_000
    for top_k, top_p in ((0, 1.0), (5, 1.0), (0, 0.7)):
        probs = filter_logits(logits, top_k, top_p).softmax(-1)
        counts = torch.zeros_like(probs)
        for _ in range(draws // 1000):
            index = sample(probs.repeat_interleave(1000, 0), gen).view(4, 1000)
            counts.scatter_add_(1, index, torch.ones(4, 1000))
        freq = counts / draws
        err = (freq - probs).abs().max().item()
        check(f"sampler frequencies, top_k={top_k} top_p={top_p}", err < 0.01 and freq[probs == 0].sum() == 0,
              f"max |frequency - probability| = {err:.4f} over {draws:,} draws, none of probability 0")


if __name__ == "__main__":
    torch.manual_seed(0)
    export_parity()
    engine()
    packed_prefill()
    sampler()
    print("all checks passed")
