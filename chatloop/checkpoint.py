"""Checkpoints in Hugging Face format, imports of Llama / Mistral / Qwen2 / GPT-2, and lineage.

A checkpoint directory holds config.json + model.safetensors (Hugging Face names and layouts), the
tokenizer files, generation_config.json, and chatloop.json (lineage: stage, parent checkpoint, data files
with sha256, config, metrics; and `files`: the size and sha256 of the weights and tokenizer.json). chatloop.json is
written last: a directory without it is unfinished. A directory whose files differ from what chatloop.json records
(truncated, changed, missing) is corrupt: `load_model` refuses it naming the file and the stage that wrote it, and
`is_complete` counts it unfinished, so the stage runs again. Hashing costs about 1 s per 1.6 GB here (SmolLM2-360M
in fp32: 0.9 s); checkpoints written before `files` was recorded load unchecked.

Our own checkpoints and imported ones load through the same path (`load_model`): config.json is mapped to
a GPTConfig and the tensors are renamed (and, for GPT-2's Conv1D, transposed; for our fused q/k/v and
gate/up projections, concatenated). What cannot be represented exactly is refused with a clear error
rather than loaded approximately.

A LoRA stage writes an adapter checkpoint instead (chatloop.lora): adapter_model.safetensors + adapter_config.json in
peft's format beside config.json and the tokenizer files, chatloop.json naming the base; `load_model` loads the base
(itself possibly an adapter) and applies the adapter, merged unless asked not to.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from chatloop import __version__, lora
from chatloop.errors import Diverged, UserError
from chatloop.io import atomic_write_json, check_room, disk_full, no_room, sha256_file, utc_time
from chatloop.model import GPT, GPTConfig
from chatloop.tokenizer import Tokenizer

LINEAGE_FILE = "chatloop.json"
SUPPORTED = ("llama", "mistral", "qwen2", "gpt2")


# ---------------------------------------------------------------- config.json <-> GPTConfig


def hf_config(cfg: GPTConfig, tokenizer: Tokenizer | None, dtype: torch.dtype) -> dict[str, Any]:
    """config.json for the model: LlamaFor* (or Qwen2For* when q/k/v have a bias) or GPT2*."""
    seq_cls = cfg.head == "scalar"
    special: dict[str, Any] = {}
    if tokenizer is not None:
        special = {"eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id, "bos_token_id": None}
    common = {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
              "torch_dtype": str(dtype).removeprefix("torch."), "dtype": str(dtype).removeprefix("torch."),
              **special}
    if seq_cls:
        common.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    if cfg.style == "gpt2":
        arch = "GPT2ForSequenceClassification" if seq_cls else "GPT2LMHeadModel"
        return {"architectures": [arch], "model_type": "gpt2", "n_embd": cfg.d_model, "n_layer": cfg.n_layer,
                "n_head": cfg.n_head, "n_positions": cfg.max_seq_len, "n_inner": cfg.d_ff,
                "layer_norm_epsilon": cfg.norm_eps, "activation_function": "gelu_new",
                "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": 0.0, **common}
    model_type = "qwen2" if cfg.qkv_bias else "llama"
    prefix = "Qwen2" if cfg.qkv_bias else "Llama"
    arch = f"{prefix}ForSequenceClassification" if seq_cls else f"{prefix}ForCausalLM"
    out = {"architectures": [arch], "model_type": model_type, "hidden_size": cfg.d_model,
           "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
           "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim, "hidden_act": "silu",
           "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
           "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
           "attention_dropout": 0.0, **common}
    if model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    else:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer)
    return out


def gpt_config_from_hf(hf: dict[str, Any], where: str) -> GPTConfig:
    """Map a transformers config.json to GPTConfig, refusing what chatloop cannot reproduce exactly."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        raise UserError(f"{where}: model_type {model_type!r} cannot be imported; supported: {', '.join(SUPPORTED)}")
    archs = hf.get("architectures") or []
    head = "scalar" if any("SequenceClassification" in a for a in archs) else "lm"
    if head == "scalar" and hf.get("num_labels", len(hf.get("id2label", {}) or {0: 0})) != 1:
        raise UserError(f"{where}: a sequence-classification model must have num_labels = 1 (a scalar reward)")

    def need(key: str) -> Any:
        if key not in hf:
            raise UserError(f"{where}: missing field {key!r} (expected a {model_type} config)")
        return hf[key]

    def refuse(condition: bool, what: str) -> None:
        if condition:
            raise UserError(f"{where}: {what} is not supported by chatloop's decoder")

    if model_type == "gpt2":
        refuse(hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"),
               f"activation_function {hf.get('activation_function')!r}")
        refuse(bool(hf.get("scale_attn_by_inverse_layer_idx")), "scale_attn_by_inverse_layer_idx")
        refuse(hf.get("scale_attn_weights") is False, "scale_attn_weights = false")
        return GPTConfig(style="gpt2", vocab_size=need("vocab_size"), n_layer=need("n_layer"),
                         n_head=need("n_head"), d_model=need("n_embd"), d_ff=hf.get("n_inner"),
                         max_seq_len=need("n_positions"), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                         tie_embeddings=True, head=head)

    d_model, n_head = need("hidden_size"), need("num_attention_heads")
    refuse(hf.get("head_dim") not in (None, d_model // n_head), f"head_dim {hf.get('head_dim')} != hidden/heads")
    refuse(hf.get("hidden_act", "silu") != "silu", f"hidden_act {hf.get('hidden_act')!r}")
    refuse(bool(hf.get("attention_bias")) and model_type != "qwen2", "attention_bias (a bias on o_proj)")
    refuse(bool(hf.get("mlp_bias")), "mlp_bias")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    refuse(rope.get("rope_type", rope.get("type", "default")) != "default", f"rope scaling {rope}")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    max_len = need("max_position_embeddings")
    window = hf.get("sliding_window")
    if window and (model_type == "mistral" or hf.get("use_sliding_window")):
        # Within its window, sliding-window attention is full causal attention: cap the context there.
        max_len = min(max_len, window)
    return GPTConfig(style="llama", vocab_size=need("vocab_size"), n_layer=need("num_hidden_layers"),
                     n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head, d_model=d_model,
                     d_ff=need("intermediate_size"), max_seq_len=max_len, rope_theta=float(theta),
                     norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings")),
                     qkv_bias=model_type == "qwen2", head=head)


# ---------------------------------------------------------------- tensors: ours <-> Hugging Face names


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    cfg = model.cfg
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    q_size, kv_size = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    if cfg.style == "gpt2":
        base = "transformer."
        out[base + "wte.weight"] = sd["tok_emb.weight"]
        out[base + "wpe.weight"] = sd["pos_emb.weight"]
        for i in range(cfg.n_layer):
            b, h = f"blocks.{i}.", f"{base}h.{i}."
            for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                out[h + theirs + ".weight"] = sd[b + ours + ".weight"]
                out[h + theirs + ".bias"] = sd[b + ours + ".bias"]
            # Conv1D stores (in, out): the transpose of nn.Linear.
            for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                                 ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
                out[h + theirs + ".weight"] = sd[b + ours + ".weight"].t().contiguous()
                out[h + theirs + ".bias"] = sd[b + ours + ".bias"]
        out[base + "ln_f.weight"], out[base + "ln_f.bias"] = sd["norm.weight"], sd["norm.bias"]
    else:
        out["model.embed_tokens.weight"] = sd["tok_emb.weight"]
        for i in range(cfg.n_layer):
            b, h = f"blocks.{i}.", f"model.layers.{i}."
            out[h + "input_layernorm.weight"] = sd[b + "attn_norm.weight"]
            out[h + "post_attention_layernorm.weight"] = sd[b + "mlp_norm.weight"]
            for part in ("weight", "bias"):
                if b + "attn.qkv." + part not in sd:
                    continue
                q, k, v = sd[b + "attn.qkv." + part].split([q_size, kv_size, kv_size])
                out[h + f"self_attn.q_proj.{part}"] = q.contiguous()
                out[h + f"self_attn.k_proj.{part}"] = k.contiguous()
                out[h + f"self_attn.v_proj.{part}"] = v.contiguous()
            out[h + "self_attn.o_proj.weight"] = sd[b + "attn.proj.weight"]
            gate, up = sd[b + "mlp.gate_up.weight"].chunk(2)
            out[h + "mlp.gate_proj.weight"], out[h + "mlp.up_proj.weight"] = gate.contiguous(), up.contiguous()
            out[h + "mlp.down_proj.weight"] = sd[b + "mlp.down.weight"]
        out["model.norm.weight"] = sd["norm.weight"]
    if cfg.head == "scalar":
        out["score.weight"] = sd["score.weight"]
    elif not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def from_hf_state_dict(cfg: GPTConfig, hf: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Rename (and fuse, transpose) Hugging Face tensors into this package's names; refuse missing ones."""
    hf = dict(hf)
    # Tolerate the base-model layout (saved from GPT2Model / LlamaModel) and non-persistent mask buffers.
    if cfg.style == "gpt2" and "wte.weight" in hf:
        hf = {f"transformer.{k}": v for k, v in hf.items()}
    if cfg.style == "llama" and "embed_tokens.weight" in hf:
        hf = {(k if k.startswith(("lm_head", "score")) else f"model.{k}"): v for k, v in hf.items()}
    hf = {k: v for k, v in hf.items() if not k.endswith(("attn.bias", "attn.masked_bias", "rotary_emb.inv_freq"))
          or k.endswith("c_attn.bias")}

    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise UserError(f"{where}: missing tensor {name!r}")
        return hf.pop(name)

    sd: dict[str, torch.Tensor] = {}
    if cfg.style == "gpt2":
        sd["tok_emb.weight"] = take("transformer.wte.weight")
        sd["pos_emb.weight"] = take("transformer.wpe.weight")
        for i in range(cfg.n_layer):
            b, h = f"blocks.{i}.", f"transformer.h.{i}."
            for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                sd[b + ours + ".weight"] = take(h + theirs + ".weight")
                sd[b + ours + ".bias"] = take(h + theirs + ".bias")
            for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                                 ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
                sd[b + ours + ".weight"] = take(h + theirs + ".weight").t().contiguous()
                sd[b + ours + ".bias"] = take(h + theirs + ".bias")
        sd["norm.weight"], sd["norm.bias"] = take("transformer.ln_f.weight"), take("transformer.ln_f.bias")
        hf.pop("lm_head.weight", None)  # always tied to wte in GPT-2
    else:
        sd["tok_emb.weight"] = take("model.embed_tokens.weight")
        for i in range(cfg.n_layer):
            b, h = f"blocks.{i}.", f"model.layers.{i}."
            sd[b + "attn_norm.weight"] = take(h + "input_layernorm.weight")
            sd[b + "mlp_norm.weight"] = take(h + "post_attention_layernorm.weight")
            sd[b + "attn.qkv.weight"] = torch.cat([take(h + f"self_attn.{p}_proj.weight") for p in "qkv"])
            if cfg.qkv_bias:
                sd[b + "attn.qkv.bias"] = torch.cat([take(h + f"self_attn.{p}_proj.bias") for p in "qkv"])
            sd[b + "attn.proj.weight"] = take(h + "self_attn.o_proj.weight")
            sd[b + "mlp.gate_up.weight"] = torch.cat([take(h + "mlp.gate_proj.weight"),
                                                      take(h + "mlp.up_proj.weight")])
            sd[b + "mlp.down.weight"] = take(h + "mlp.down_proj.weight")
        sd["norm.weight"] = take("model.norm.weight")
        if cfg.head == "lm":
            if cfg.tie_embeddings:
                hf.pop("lm_head.weight", None)
            else:
                sd["lm_head.weight"] = take("lm_head.weight")
    if cfg.head == "scalar":
        sd["score.weight"] = take("score.weight")
    elif cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["tok_emb.weight"]
    if hf:
        extra = ", ".join(sorted(hf)[:5])
        raise UserError(f"{where}: unexpected tensors {extra}{' ...' if len(hf) > 5 else ''}")
    return sd


# ---------------------------------------------------------------- save / load


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except SafetensorError as e:  # e.g. "incomplete metadata, file not fully covered": a truncated file
        raise UserError(f"{path}: not a readable safetensors file ({e}): the checkpoint is damaged; delete "
                        f"{path.parent} and run the stage that wrote it again") from None


def _read_tensors(directory: Path) -> tuple[dict[str, torch.Tensor], str]:
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.is_file():
        return _load_safetensors(single), str(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors: dict[str, torch.Tensor] = {}
        for shard in shards:
            path = directory / shard
            if not path.is_file():
                raise UserError(f"{index}: shard {shard} is missing")
            tensors.update(_load_safetensors(path))
        return tensors, str(index)
    if (directory / "pytorch_model.bin").is_file():
        path = directory / "pytorch_model.bin"
        return torch.load(path, map_location="cpu", weights_only=True), str(path)
    raise UserError(f"{directory}: no model.safetensors (or sharded index, or pytorch_model.bin)")


def read_hf_config(directory: str | Path) -> tuple[dict[str, Any], Path]:
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory}: checkpoint directory not found")
    path = directory / "config.json"
    if not path.is_file():
        raise UserError(f"{directory}: no config.json (expected a Hugging Face-format checkpoint directory)")
    try:
        return json.loads(path.read_text(encoding="utf-8")), path
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def load_model(
    directory: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    head: str | None = None,
    merge: bool = True,
    **overrides: Any,
) -> GPT:
    """Load a chatloop or transformers checkpoint directory as a GPT.

    head: force "lm" or "scalar" (e.g. "scalar" turns an SFT model into a reward model: its new score head
    is freshly initialised and the unembedding is dropped). overrides: GPTConfig fields such as dropout.
    An adapter checkpoint (chatloop.lora) is its base with the adapter applied: merged into the weights, or with
    merge=False kept as an adapter (to be saved as one again).
    """
    directory = Path(directory)
    hf, config_path = read_hf_config(directory)
    verify(directory)
    cfg = gpt_config_from_hf(hf, str(config_path))
    base = lora.base_of(directory, read_lineage(directory))
    if base is not None:
        return _load_adapted(directory, base, cfg, hf, device, dtype, head, merge, overrides)
    tensors, weights_path = _read_tensors(directory)
    sd = from_hf_state_dict(cfg, tensors, weights_path)
    del tensors  # what was renamed is the weights now, what was fused is copied: free the file's own tensors
    fresh: dict[str, torch.Tensor] = {}
    if head is not None and head != cfg.head:
        sd.pop("lm_head.weight", None)
        cfg = GPTConfig(**{**cfg.__dict__, "head": head})
        new_head = GPT(GPTConfig(**{**cfg.__dict__, "n_layer": 0}))  # initialises just the new head
        fresh = {k: v for k, v in new_head.state_dict().items() if k.startswith(("score", "lm_head"))}
    if overrides:
        cfg = GPTConfig(**{**cfg.__dict__, **overrides})
    with torch.device("meta"):
        model = GPT(cfg)
    state = {k: sd.get(k, fresh.get(k)) for k in model.state_dict()}
    missing = [k for k, v in state.items() if v is None]
    if missing:
        raise UserError(f"{weights_path}: no tensor for {missing[0]}")
    del sd
    # assign: the loaded tensors become the parameters; copying them into new ones held the model twice while it
    # loaded (a 135M model: 1.1 GB instead of 0.54).
    model.load_state_dict({k: v.to(device) for k, v in state.items()}, assign=True)
    if cfg.tie_embeddings and model.lm_head is not None:
        model.lm_head.weight = model.tok_emb.weight
    if cfg.head == "scalar":
        # A reward model's normalisation (chatloop rm, step 6): rewards are raw scores + reward_bias.
        model.reward_bias = float(hf.get("reward_bias", 0.0)) if head in (None, "scalar") and fresh == {} else 0.0
    return model.to(dtype=dtype)


def _load_adapted(directory: Path, base: Path, cfg: GPTConfig, hf: dict[str, Any], device: str | torch.device,
                  dtype: torch.dtype, head: str | None, merge: bool, overrides: dict[str, Any]) -> GPT:
    """An adapter checkpoint: the base loaded (with the head asked for, its own by default), the adapter applied.
    The adapter adapts the blocks only, so a new head on the merged model is the same as a new head on the base."""
    head = head or cfg.head
    model = load_model(base, device=device, head=head, **overrides)
    own_head = head == cfg.head == "scalar"
    lora.apply_saved(model, directory, base, keep_head=own_head)
    if own_head:
        model.reward_bias = float(hf.get("reward_bias", 0.0))
    return (lora.merge(model) if merge else model).to(dtype=dtype)


def save_model(
    model: GPT,
    out_dir: str | Path,
    tokenizer: Tokenizer | None,
    lineage: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    extra_config: dict[str, Any] | None = None,
) -> None:
    """Write a Hugging Face-format checkpoint; each file lands atomically and chatloop.json comes last, with the
    size and sha256 of every file written. Non-finite weights are refused (a diverged run saves nothing), and so is
    a write that would not fit (DiskFull), before anything in `out_dir` changes."""
    out_dir = Path(out_dir)
    dtype = dtype or next(model.parameters()).dtype
    adapter: dict[str, Any] | None = None
    if lora.adapter_of(model) is not None:  # the adapter only, in peft's format; chatloop.json names its base
        adapter, tensors = lora.save_adapter(model, out_dir, dtype)
    else:
        tensors = {k: v.to("cpu", dtype).contiguous() for k, v in to_hf_state_dict(model).items()}
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise Diverged(f"{out_dir}: not saved: the weights hold nan or inf ({bad[0]}{more}): the training diverged")
    weights = out_dir / (lora.ADAPTER_WEIGHTS if adapter else "model.safetensors")
    needed = sum(t.nbytes for t in tensors.values())
    check_room(weights, needed)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / LINEAGE_FILE).unlink(missing_ok=True)  # the directory is unfinished until the lineage lands
    for stale in ("model.safetensors", lora.ADAPTER_WEIGHTS, lora.ADAPTER_CONFIG):  # of a run with(out) LoRA before
        if stale != weights.name:
            (out_dir / stale).unlink(missing_ok=True)
    tmp = out_dir / f".{weights.name}.tmp"
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, weights)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if no_room(e):
            raise disk_full(weights, needed, e) from None
        raise
    if adapter:
        atomic_write_json(out_dir / lora.ADAPTER_CONFIG, lora.hf_config(model))
    # extra_config: chatloop's additions that transformers carries along untouched (e.g. reward_bias).
    atomic_write_json(out_dir / "config.json", {**hf_config(model.cfg, tokenizer, dtype), **(extra_config or {})})
    if tokenizer is not None:
        tokenizer.save(out_dir)
        atomic_write_json(out_dir / "generation_config.json", {
            "eos_token_id": tokenizer.stop_ids, "pad_token_id": tokenizer.pad_id, "do_sample": True,
            "temperature": 1.0, "top_k": 0, "top_p": 1.0,
        })
    # The small JSON files are left out: people edit them by hand (eos, a chat template), and their readers
    # check them anyway.
    written = [weights.name] + (["tokenizer.json"] if tokenizer is not None else [])
    files = {name: {"bytes": (out_dir / name).stat().st_size, "sha256": sha256_file(out_dir / name)}
             for name in written}
    record = {"chatloop_version": __version__, "created_at": utc_time(), "status": "complete", **(lineage or {}),
              **({"adapter": adapter} if adapter else {}), "files": files}
    atomic_write_json(out_dir / LINEAGE_FILE, record)


def read_lineage(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / LINEAGE_FILE
    if not path.is_file():
        return None
    try:
        lineage = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}): the checkpoint is damaged; delete {path.parent} and run "
                        "the stage that wrote it again") from None
    if not isinstance(lineage, dict):
        raise UserError(f"{path}: expected a JSON object: the checkpoint is damaged")
    return lineage


def checkpoint_problem(directory: str | Path) -> str | None:
    """What is wrong with a checkpoint directory against its chatloop.json (a file missing, of another size, or of
    another sha256 than when it was written), naming the file and the stage that wrote it; None when nothing is,
    also for a directory without chatloop.json or with one written before files were recorded."""
    directory = Path(directory)
    try:
        lineage = read_lineage(directory)
    except UserError as e:
        return str(e)
    if not lineage or not isinstance(lineage.get("files"), dict):
        return None
    writer = f"the {lineage['stage']} stage" if lineage.get("stage") else "chatloop"
    for name, want in lineage["files"].items():
        path = directory / name
        if not path.is_file():
            return f"{path} is missing (written by {writer})"
        size = path.stat().st_size
        if size != want.get("bytes", size):
            return f"{path} is {size:,} bytes, not the {want['bytes']:,} {writer} wrote (truncated or changed)"
        if "sha256" in want and sha256_file(path) != want["sha256"]:
            return f"{path} differs from what {writer} wrote (its sha256 changed)"
    return None


def verify(directory: str | Path) -> None:
    """Refuse a corrupt checkpoint (`checkpoint_problem`) with what to do about it."""
    problem = checkpoint_problem(directory)
    if problem is not None:
        raise UserError(f"{problem}: the checkpoint {directory} is corrupt; delete it and run that stage again "
                        "(`chatloop run` does so by itself)")


def is_complete(directory: str | Path) -> bool:
    """Whether `directory` holds a finished checkpoint: chatloop.json says complete and the files are the ones it
    records (a corrupt checkpoint is unfinished: the stage that writes it runs again)."""
    try:
        lineage = read_lineage(directory)
    except UserError:
        return False
    return bool(lineage and lineage.get("status") == "complete") and checkpoint_problem(directory) is None


def data_record(paths: list[str | Path]) -> list[dict[str, str]]:
    """Lineage entries for data files: path and sha256."""
    return [{"path": str(p), "sha256": sha256_file(p)} for p in paths]


def load_tokenizer(directory: str | Path) -> Tokenizer:
    return Tokenizer.load(directory)
