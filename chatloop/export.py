"""`chatloop export`: a checkpoint as one GGUF file (llama.cpp, ollama) or as a merged safetensors directory.

Steps:
  1. Load the checkpoint through `load_model` / `load_tokenizer`, the path every stage loads through (so what is
     exported is exactly what chatloop itself runs), and refuse what the format cannot carry: a reward model's
     scalar head (llama.cpp and ollama run language models), a tokenizer GGUF cannot describe.
  2. safetensors: `save_model` into a temporary directory beside OUT (lineage stage "export" with the source
     path), then moved into place. Done.
  3. GGUF metadata, the inverse of `model_import.gguf_hf_config`: the architecture (llama, qwen2 when q/k/v have
     a bias, gpt2) with its context, widths, head counts, rope base and norm epsilon, and the file type.
  4. GGUF tensors, the inverse of `model_import.gguf_tensors`: Hugging Face's tensors (our fused q/k/v and
     gate/up split by `to_hf_state_dict`) under llama.cpp's names; llama's q/k rows interleaved into llama.cpp's
     rotary order (`permute_rotary`, the inverse of `unpermute_rotary`); no output tensor when the embedding is
     tied; 2-D tensors in the chosen dtype, 1-D ones (norms, biases) in F32 as llama.cpp's converter keeps them.
  5. GGUF tokenizer, the inverse of `model_import.gguf_tokenizer`: byte-level BPE as tokenizer.ggml.model "gpt2"
     (tokens, merges, token types: CONTROL for special tokens), the pre-tokenizer by its llama.cpp name
     (tokenizer.ggml.pre, from `PRE_TOKENIZERS`), bos / eos / padding ids, no BOS added, the chat template, and
     the stop tokens: eos is end of text, eot the chat's end of turn (both end generation in llama.cpp), and
     eos_token_ids lists every stop token (ollama's list).
  6. Write the file under a temporary name beside OUT, fsync, rename: OUT is never half-written.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from chatloop import __version__
from chatloop.checkpoint import load_model, load_tokenizer, save_model, to_hf_state_dict
from chatloop.errors import UserError
from chatloop.io import check_room, disk_full, no_room, replace_dir, temp_dir_beside
from chatloop.model import GPT
from chatloop.model_import import _GLOBAL, _LAYER, CONTROL, PRE_TOKENIZERS, USER_DEFINED
from chatloop.tokenizer import Tokenizer

GGUF_STYLES = ("llama", "qwen2 (llama style with q/k/v bias)", "gpt2")
NORMAL, UNUSED = 1, 5  # tokenizer.ggml.token_type values beside CONTROL and USER_DEFINED (llama.cpp's)
_TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ExportConfig:
    model: str = ""
    """Checkpoint directory to export: any stage's output (SFT, PPO, DPO, an import)."""
    out: str = "runs/export"
    """GGUF: the file to write (a path that does not end in .gguf is a directory, given model-DTYPE.gguf);
    safetensors: the checkpoint directory to write."""
    format: Literal["gguf", "safetensors"] = "gguf"
    """gguf: one file for llama.cpp and ollama (llama, qwen2 and gpt2 styles, language models only); safetensors:
    a full Hugging Face-format checkpoint (transformers, vLLM, or chatloop itself) with its own lineage."""
    dtype: Literal["f32", "f16", "bf16", "q8_0"] = "f16"
    """Weights' type. GGUF: of every 2-D tensor (norms and biases stay f32, as llama.cpp's converter keeps them;
    q8_0 is llama.cpp's 8-bit blocks, a tensor whose rows are no multiple of 32 falls back to f16); f16 is what
    llama.cpp's converter writes by default. safetensors: f32, f16 or bf16."""


# ---------------------------------------------------------------- step 3: metadata


def _arch(model: GPT) -> str:
    cfg = model.cfg
    return "gpt2" if cfg.style == "gpt2" else "qwen2" if cfg.qkv_bias else "llama"


def _file_type(gguf, dtype: str) -> int:
    kinds = gguf.LlamaFileType
    return {"f32": kinds.ALL_F32, "f16": kinds.MOSTLY_F16, "bf16": kinds.MOSTLY_BF16, "q8_0": kinds.MOSTLY_Q8_0}[dtype]


def add_architecture(gguf, w, model: GPT, name: str, dtype: str) -> None:
    """What llama.cpp reads to build the graph (the keys `model_import.gguf_hf_config` reads back)."""
    cfg = model.cfg
    w.add_type("model")
    w.add_name(name)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_head)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.style == "gpt2":
        w.add_layer_norm_eps(cfg.norm_eps)
    else:
        w.add_head_count_kv(cfg.n_kv_head)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_file_type(_file_type(gguf, dtype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


# ---------------------------------------------------------------- step 4: tensors


def permute_rotary(w: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face's q/k row order to llama.cpp's: per head the two rotary halves interleaved ([x0, x_d/2, x1,
    ...]), as llama.cpp's converter writes them; the inverse of `model_import.unpermute_rotary`."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_GLOBAL = {hf: ours for ours, hf in _GLOBAL.items()}
_GGUF_LAYER = {hf: ours for ours, hf in _LAYER.items()}
# gpt2 style, from our own tensors: ours -> llama.cpp's. They are nn.Linear's (out, in), which is what llama.cpp's
# converter writes after transposing GPT-2's Conv1D; the tied unembedding is written out too, as it does.
_GPT2_GLOBAL = {"tok_emb.weight": "token_embd.weight", "pos_emb.weight": "position_embd.weight",
                "norm.weight": "output_norm.weight", "norm.bias": "output_norm.bias", "lm_head.weight": "output.weight"}
_GPT2_LAYER = {"attn_norm": "attn_norm", "mlp_norm": "ffn_norm", "attn.qkv": "attn_qkv", "attn.proj": "attn_output",
               "mlp.fc": "ffn_up", "mlp.proj": "ffn_down"}


def gguf_named_tensors(model: GPT) -> dict[str, np.ndarray]:
    """Every tensor as float32 under llama.cpp's name, in llama.cpp's layout."""
    cfg = model.cfg
    out: dict[str, np.ndarray] = {}
    if cfg.style == "gpt2":
        for name, tensor in model.state_dict().items():
            if name in _GPT2_GLOBAL:
                out[_GPT2_GLOBAL[name]] = tensor.float().numpy()
                continue
            _, i, *module, part = name.split(".")
            out[f"blk.{i}.{_GPT2_LAYER['.'.join(module)]}.{part}"] = tensor.float().numpy()
        return out
    heads = {"self_attn.q_proj.weight": cfg.n_head, "self_attn.k_proj.weight": cfg.n_kv_head}
    for name, tensor in to_hf_state_dict(model).items():
        data = tensor.float().numpy()
        if name in _GGUF_GLOBAL:
            out[_GGUF_GLOBAL[name]] = data
            continue
        _, _, i, rest = name.split(".", 3)  # model.layers.I.REST
        if _arch(model) == "llama" and rest in heads:
            data = permute_rotary(data, heads[rest])  # llama.cpp's llama graph expects this order (qwen2's does not)
        out[f"blk.{i}.{_GGUF_LAYER[rest]}"] = data
    return out


def add_tensors(gguf, w, tensors: dict[str, np.ndarray], dtype: str) -> dict[str, int]:
    """Each tensor in its GGUF type (quantized by the gguf package); returns how many of each type."""
    wanted = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[dtype]
    types: dict[str, int] = {}
    for name, data in tensors.items():
        # 1-D tensors (norms, biases) and learned positions stay F32, as in llama.cpp's converter: they are tiny,
        # and llama.cpp adds them to F32 activations.
        kind = wanted if data.ndim == 2 and name != "position_embd.weight" else "F32"
        qtype = gguf.GGMLQuantizationType[kind]
        try:
            raw = gguf.quants.quantize(np.ascontiguousarray(data), qtype)
        except gguf.quants.QuantError:  # rows no multiple of Q8_0's 32-value blocks: as llama.cpp's converter does
            kind, qtype = "F16", gguf.GGMLQuantizationType.F16
            raw = gguf.quants.quantize(np.ascontiguousarray(data), qtype)
        # F32 / F16 come back as float arrays the writer types itself; BF16 / Q8_0 as bytes with their type named.
        w.add_tensor(name, raw, raw_dtype=None if kind in ("F32", "F16") else qtype)
        types[kind] = types.get(kind, 0) + 1
    return types


# ---------------------------------------------------------------- step 5: tokenizer


def _pre_tokenizer_name(spec: dict[str, Any], where: str) -> str:
    """The llama.cpp name (tokenizer.ggml.pre) of a tokenizer.json's pre-tokenizer: its steps are read as
    (split digits one by one first, regex), the form `PRE_TOKENIZERS` gives each name, so that `chatloop import`
    rebuilds the same tokenizer."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    digits, regex, byte_level = False, None, False
    for step in steps:
        kind = step.get("type")
        if kind == "Digits" and step.get("individual_digits") and regex is None:
            digits = True
        elif kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert") and regex is None \
                and "Regex" in (step.get("pattern") or {}):
            regex = step["pattern"]["Regex"]
        elif kind == "ByteLevel" and not step.get("add_prefix_space") and not byte_level:
            byte_level = True
            if step.get("use_regex", True):  # ByteLevel's own regex is GPT-2's
                regex = regex or PRE_TOKENIZERS["gpt-2"][1]
        else:
            raise UserError(f"{where}: pre-tokenizer step {json.dumps(step)[:120]} has no GGUF equivalent; "
                            f"supported: {', '.join(PRE_TOKENIZERS)} (tokenizer.ggml.pre)")
    for name, form in PRE_TOKENIZERS.items():
        if byte_level and form == (digits, regex):
            return name
    raise UserError(f"{where}: the pre-tokenizer (digits one by one: {digits}, regex {regex!r}) is none of GGUF's "
                    f"that chatloop writes: {', '.join(PRE_TOKENIZERS)} (tokenizer.ggml.pre)")


def gguf_vocabulary(tokenizer: Tokenizer, vocab_size: int, where: str) -> tuple[list[str], list[int], list[str], str]:
    """Tokens (by id, padded to the model's embedding rows), their types, merges and the pre-tokenizer's name."""
    spec = json.loads(tokenizer.hf.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or spec.get("normalizer") \
            or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        parts = {k: (spec.get(k) or {}).get("type") for k in ("model", "normalizer", "decoder")}
        raise UserError(f"{where}: the tokenizer is not a plain byte-level BPE ({parts}); GGUF's tokenizer.ggml.model "
                        "'gpt2' (byte-level BPE) is the only tokenizer chatloop writes")
    pre = _pre_tokenizer_name(spec, where)
    if bool(model.get("ignore_merges")) != (pre == "llama-bpe"):  # llama.cpp ties ignore_merges to the pre-tokenizer
        raise UserError(f"{where}: ignore_merges={model.get('ignore_merges')} with pre-tokenizer {pre!r}: GGUF cannot "
                        "say that (llama.cpp ignores merges for 'llama-bpe' only)")
    vocab = tokenizer.hf.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    if sorted(by_id) != list(range(len(by_id))) or len(by_id) > vocab_size:
        raise UserError(f"{where}: token ids are not 0..{len(by_id) - 1} within the model's {vocab_size} embeddings")
    added = {t.content: t.special for t in tokenizer.hf.get_added_tokens_decoder().values()}
    tokens = [by_id[i] for i in range(len(by_id))]
    types = [(CONTROL if added[t] else USER_DEFINED) if t in added else NORMAL for t in tokens]
    # Embedding rows past the vocabulary (a size rounded up) get placeholder tokens that no merge produces, as
    # llama.cpp's converter writes them: GGUF needs one token per row.
    pads = [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens + pads, types + [UNUSED] * len(pads), merges, pre


def add_tokenizer(w, tokenizer: Tokenizer, vocab_size: int, where: str) -> str:
    tokens, types, merges, pre = gguf_vocabulary(tokenizer, vocab_size, where)
    w.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    # chatloop never adds BOS or EOS when it encodes (a template writes what it needs); ollama adds a BOS unless told.
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    if tokenizer.bos_token is not None:
        w.add_bos_token_id(tokenizer.hf.token_to_id(tokenizer.bos_token))
    w.add_eos_token_id(tokenizer.eos_id)
    w.add_pad_token_id(tokenizer.pad_id)
    if tokenizer.end_of_turn_id is not None and tokenizer.end_of_turn_id != tokenizer.eos_id:
        w.add_eot_token_id(tokenizer.end_of_turn_id)  # llama.cpp stops at eos, eot and eom
    w.add_array("tokenizer.ggml.eos_token_ids", tokenizer.stop_ids)  # ollama stops at eos_token_id and these
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)
    return pre


# ---------------------------------------------------------------- step 6: the file, atomically


def write_gguf(model: GPT, tokenizer: Tokenizer, out: Path, dtype: str, name: str, where: str) -> dict[str, Any]:
    """The GGUF file at `out` (a temporary name beside it until it is whole); what was written."""
    try:
        import gguf
    except ImportError:
        raise UserError("writing GGUF needs the `gguf` package: pip install gguf") from None
    arch = _arch(model)
    tensors = gguf_named_tensors(model)  # step 4 (first: its errors come before any file is opened)
    tmp = out.with_name(f".{out.name}.tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    check_room(tmp, sum(t.nbytes for t in tensors.values()) // (1 if dtype == "f32" else 2))
    w = gguf.GGUFWriter(str(tmp), arch)
    try:
        add_architecture(gguf, w, model, name, dtype)  # step 3
        pre = add_tokenizer(w, tokenizer, model.cfg.vocab_size, where)  # step 5
        types = add_tensors(gguf, w, tensors, dtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException as e:
        w.close()
        tmp.unlink(missing_ok=True)
        if no_room(e):
            raise disk_full(out, None, e) from None
        raise
    return {"architecture": arch, "tensor_types": types, "pre_tokenizer": pre}


# ---------------------------------------------------------------- the verb


def gguf_path(out: Path, dtype: str) -> Path:
    return out if out.suffix == ".gguf" else out / f"model-{dtype}.gguf"


def refuse_for_gguf(model: GPT, where: str) -> None:
    if model.cfg.head == "scalar":
        raise UserError(f"{where}: a reward model (a scalar head, not next-token logits) cannot be exported as GGUF: "
                        "llama.cpp and ollama run language models; export the policy (an SFT, PPO or DPO "
                        "checkpoint), or this one with --format=safetensors")
    if model.cfg.style not in ("llama", "gpt2"):
        raise UserError(f"{where}: style {model.cfg.style!r} cannot be exported as GGUF; supported: "
                        f"{', '.join(GGUF_STYLES)}")


def export(cfg: ExportConfig) -> Path:
    if not cfg.model:
        raise UserError("--model: give a checkpoint directory to export")
    src = Path(cfg.model)
    start = time.perf_counter()
    model, tokenizer = load_model(src).eval(), load_tokenizer(src)  # step 1
    where = str(src)
    if cfg.format == "safetensors":  # step 2
        if cfg.dtype not in _TORCH_DTYPES:
            raise UserError(f"--dtype={cfg.dtype}: safetensors takes f32, f16 or bf16 (q8_0 is GGUF's)")
        out = Path(cfg.out)
        if out.suffix == ".gguf":
            raise UserError(f"--out={out}: a safetensors export is a directory, not a .gguf file")
        tmp = temp_dir_beside(out)
        extra = {"reward_bias": model.reward_bias} if model.cfg.head == "scalar" else None
        save_model(model, tmp, tokenizer, dtype=_TORCH_DTYPES[cfg.dtype], extra_config=extra, lineage={
            "stage": "export", "parent": str(src), "config": dict(cfg.__dict__), "parameters": model.num_params()})
        replace_dir(tmp, out)
        info: dict[str, Any] = {"architecture": json.loads((out / "config.json").read_text())["model_type"]}
    else:
        refuse_for_gguf(model, where)
        out = gguf_path(Path(cfg.out), cfg.dtype)
        info = write_gguf(model, tokenizer, out, cfg.dtype, name=src.resolve().name or "chatloop", where=where)
    size = sum(p.stat().st_size for p in ([out] if out.is_file() else out.iterdir()))
    print(f"export: {info['architecture']} model, {model.num_params() / 1e6:.1f}M parameters, {cfg.dtype}, "
          f"{tokenizer.vocab_size} tokens, chat template {'yes' if tokenizer.chat_template else 'no'}, stop tokens "
          f"{[tokenizer.hf.id_to_token(i) for i in tokenizer.stop_ids]} -> {out} ({size / 1e6:.1f} MB, "
          f"{time.perf_counter() - start:.1f}s; chatloop {__version__})")
    return out
