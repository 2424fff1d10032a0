"""LoRA adapters through peft (Hu et al. 2021): train a few low-rank matrices beside frozen weights.

A stage with `--lora_rank=r` (SFT, RM, DPO, PPO) freezes the model it starts from and trains rank-r adapters on
the blocks' linear layers (peft's LoraModel, injected into our GPT in place: each target nn.Linear becomes
peft's lora.Linear) and, for a reward model, its scalar head in full. What that buys:
  - AdamW's moments and the train states cover the adapters only (megabytes instead of 12 bytes a weight);
  - a reference that is the same weights with the adapter off (`WithoutAdapter`): DPO's and PPO's KL reference
    costs no second copy, and PPO's reward model is its value model's weights with the value adapter off;
  - a checkpoint of megabytes: the adapter in peft's own format and in Hugging Face's module names, so that
    `peft.PeftModel.from_pretrained(<transformers model of the base>, <checkpoint>)` opens it, beside config.json,
    the tokenizer files and chatloop.json, which names the base checkpoint (a relative path). `load_model` loads
    the base and applies the adapter (merged into the weights by default); a base that is itself an adapter
    (PPO's policy on an SFT adapter) loads the same way, down to a full checkpoint.

Our attention's fused q/k/v projection and the MLP's fused gate/up projection carry one adapter each: in Hugging
Face's names, the same A for q, k and v (gate and up) and B split by rows, which is exactly the same update.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peft
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import load_file

from chatloop.errors import UserError
from chatloop.model import GPT, GPTConfig

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # what peft.PeftModel puts before the base model's module names


@dataclass
class LoraFields:
    """The LoRA fields of the stages that fine-tune (SFT, RM, DPO, PPO)."""

    lora_rank: int = 0
    """LoRA rank r: 0 trains every weight; r > 0 freezes the starting model and trains rank-r adapters (peft) on
    lora_targets (a reward or value model's scalar head is trained in full): AdamW state and checkpoints of
    megabytes, and DPO's / PPO's reference is the same weights with the adapter off (one copy in memory)."""
    lora_alpha: float = 0.0
    """LoRA scale alpha (the update is alpha / r * B A); 0 means 2 x lora_rank."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input."""
    lora_targets: list[str] = field(default_factory=list)
    """Linear layers of each block that get an adapter: of attn.qkv, attn.proj, mlp.gate_up, mlp.down (llama
    style) or mlp.fc, mlp.proj (gpt2 style); empty means all of them."""


# Our module (within block i) -> its Hugging Face modules and how many of the fused rows each takes (None: all).
def hf_modules(cfg: GPTConfig) -> tuple[str, dict[str, list[tuple[str, int | None]]]]:
    """The Hugging Face prefix of block i's modules and, per adapted module of ours, its Hugging Face parts."""
    if cfg.style == "gpt2":
        return "transformer.h.{i}.", {"attn.qkv": [("attn.c_attn", None)], "attn.proj": [("attn.c_proj", None)],
                                      "mlp.fc": [("mlp.c_fc", None)], "mlp.proj": [("mlp.c_proj", None)]}
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    return "model.layers.{i}.", {
        "attn.qkv": [("self_attn.q_proj", q), ("self_attn.k_proj", kv), ("self_attn.v_proj", kv)],
        "attn.proj": [("self_attn.o_proj", None)],
        "mlp.gate_up": [("mlp.gate_proj", cfg.d_ff), ("mlp.up_proj", cfg.d_ff)],
        "mlp.down": [("mlp.down_proj", None)]}


def targets(cfg: GPTConfig, wanted: list[str]) -> list[str]:
    known = list(hf_modules(cfg)[1])
    unknown = [t for t in wanted if t not in known]
    if unknown:
        raise UserError(f"--lora_targets: {unknown[0]!r} is not a linear layer of a {cfg.style}-style block "
                        f"(expected some of {', '.join(known)})")
    return list(wanted) or known


@dataclass
class Adapter:
    """What a model with an adapter carries (as `model.adapter`): peft's tuner and the checkpoint it adapts."""

    tuner: peft.LoraModel
    base: Path
    """The checkpoint the adapter's frozen weights come from."""
    config: peft.LoraConfig


def adapter_of(model: torch.nn.Module) -> Adapter | None:
    return getattr(model, "adapter", None)


def attach(model: GPT, cfg: LoraFields, base: str | Path, head_copy: bool = False) -> GPT:
    """Freeze `model` (loaded from `base`) and give it a fresh adapter (B = 0: it starts as the base). A scalar head
    is trained in full; head_copy: as a copy beside the frozen original, which the adapter-off model keeps (PPO's
    value model, whose adapter-off self is the reward model)."""
    if cfg.lora_rank <= 0:
        return model
    if adapter_of(model) is not None:
        raise UserError(f"{base}: the model already has an adapter (merge it first)")
    config = peft.LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_rank,
                             lora_dropout=cfg.lora_dropout, target_modules=targets(model.cfg, cfg.lora_targets),
                             modules_to_save=["score"] if head_copy and model.score is not None else None)
    _inject(model, config, base)
    if model.score is not None and not head_copy:
        model.score.weight.requires_grad_(True)
    return model


def _inject(model: GPT, config: peft.LoraConfig, base: str | Path) -> None:
    tuner = peft.LoraModel(model, config, "default")  # injects into `model` itself and freezes the rest
    # A plain attribute (Adapter is no Module): the tuner holds the model, so registering it would make a cycle.
    object.__setattr__(model, "adapter", Adapter(tuner, Path(base), config))


@contextmanager
def adapter_off(model: torch.nn.Module) -> Iterator[None]:
    """The model as its base, for the duration: every LoRA layer (and a copied head) bypassed."""
    layers = [m for m in model.modules() if isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper))]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


class WithoutAdapter:
    """A model with an adapter, seen as the base it adapts: the frozen reference of DPO and PPO, PPO's reward model
    beside its value model. It shares the weights (no copy) and is only evaluated."""

    def __init__(self, model: GPT) -> None:
        self.model = model

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        with adapter_off(self.model):
            return self.model(*args, **kwargs)

    def reward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        with adapter_off(self.model):
            return self.model.reward(*args, **kwargs)

    def eval(self) -> WithoutAdapter:
        return self  # it runs as the model it shares, dropout off in the stages that use it

    def requires_grad_(self, _: bool = False) -> WithoutAdapter:
        return self  # the base weights are frozen already; the adapter's trainable ones are not ours to freeze


def same_checkpoint(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def merge(model: GPT) -> GPT:
    """The adapter folded into the weights: a plain GPT again (peft's merge_and_unload)."""
    adapter = adapter_of(model)
    if adapter is None:
        return model
    merged = adapter.tuner.merge_and_unload()
    object.__delattr__(merged, "adapter")
    return merged


# ---------------------------------------------------------------- peft's files <-> ours


def adapter_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """The adapter (and a trained head) in peft's file layout with Hugging Face's module names."""
    prefix, parts = hf_modules(model.cfg)
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if "lora_" not in key:
            continue
        _, i, module = key.split(".", 2)  # blocks, N, attn.qkv.lora_A.default.weight
        ours, rest = module.split(".lora_")
        kind = rest.split(".")[0]  # A or B
        rows = [n for _, n in parts[ours]]
        pieces = value.split([n or value.shape[0] for n in rows]) if kind == "B" else [value] * len(rows)
        for (hf, _), piece in zip(parts[ours], pieces):
            out[f"{PEFT_PREFIX}{prefix.format(i=i)}{hf}.lora_{kind}.weight"] = piece.detach().contiguous()
    if model.score is not None:
        out[PEFT_PREFIX + "score.weight"] = head(model).weight.detach()
    return out


def head(model: GPT) -> torch.nn.Linear:
    """The scalar head that is trained (the copy, where peft keeps one beside the original)."""
    score = model.score
    return score.modules_to_save["default"] if isinstance(score, ModulesToSaveWrapper) else score


def hf_config(model: GPT) -> dict[str, Any]:
    """adapter_config.json: peft's LoraConfig in Hugging Face's module names, with the base's absolute path."""
    adapter = adapter_of(model)
    assert adapter is not None
    _, parts = hf_modules(model.cfg)
    names = sorted({hf for ours in adapter.config.target_modules for hf, _ in parts[ours]})
    config = peft.LoraConfig(r=adapter.config.r, lora_alpha=adapter.config.lora_alpha,
                             lora_dropout=adapter.config.lora_dropout, target_modules=names,
                             modules_to_save=["score"] if model.score is not None else None,
                             task_type="SEQ_CLS" if model.score is not None else "CAUSAL_LM",
                             base_model_name_or_path=str(adapter.base.resolve()))
    return config.to_dict() | {"target_modules": names}  # a list, as peft writes it, not a set


def save_adapter(model: GPT, out_dir: Path, dtype: torch.dtype) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """adapter_config.json, and the tensors to write; what chatloop.json records of the adapter."""
    adapter = adapter_of(model)
    assert adapter is not None
    tensors = {k: v.to("cpu", dtype).clone() for k, v in adapter_tensors(model).items()}  # q, k, v share A
    record = {"base": os.path.relpath(adapter.base.resolve(), out_dir.resolve()), "rank": adapter.config.r,
              "alpha": adapter.config.lora_alpha, "targets": sorted(adapter.config.target_modules)}
    return record, tensors


def base_of(directory: Path, lineage: dict[str, Any] | None) -> Path | None:
    """The base checkpoint of an adapter directory (None for a full checkpoint)."""
    if not (directory / ADAPTER_CONFIG).is_file():
        return None
    record = (lineage or {}).get("adapter")
    if not isinstance(record, dict) or not isinstance(record.get("base"), str):
        raise UserError(f"{directory / 'chatloop.json'}: an adapter checkpoint whose field adapter.base (the path of "
                        "the checkpoint it adapts) is missing")
    base = directory / record["base"]
    if not (base / "config.json").is_file():
        raise UserError(f"{directory}: its base checkpoint {base} (chatloop.json adapter.base) is not there: an "
                        "adapter needs the checkpoint it was trained on; move them together")
    return base


def apply_saved(model: GPT, directory: Path, base: Path, keep_head: bool) -> None:
    """Give `model` (the base, loaded) the adapter saved in `directory`; keep_head: also its trained scalar head."""
    config = peft.LoraConfig.from_pretrained(str(directory))
    prefix, parts = hf_modules(model.cfg)
    back = {hf: ours for ours, hfs in parts.items() for hf, _ in hfs}
    wanted = {back[name] for name in config.target_modules if name in back}
    if len(wanted) != len({back.get(n) for n in config.target_modules}):
        raise UserError(f"{directory / ADAPTER_CONFIG}: target_modules {sorted(config.target_modules)} are not "
                        f"Hugging Face names of a {model.cfg.style}-style model this checkpoint can hold")
    _inject(model, peft.LoraConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                   target_modules=sorted(wanted)), base)
    saved = load_file(str(directory / ADAPTER_WEIGHTS))
    state = {}
    for i in range(model.cfg.n_layer):
        for ours in wanted:
            hf = [f"{PEFT_PREFIX}{prefix.format(i=i)}{name}" for name, _ in parts[ours]]
            a = [_take(saved, f"{h}.lora_A.weight", directory) for h in hf]
            if any(not torch.equal(a[0], x) for x in a[1:]):
                raise UserError(f"{directory / ADAPTER_WEIGHTS}: block {i}: the parts of {ours} have different "
                                "lora_A matrices (an adapter trained outside chatloop on separate projections)")
            state[f"blocks.{i}.{ours}.lora_A.default.weight"] = a[0]
            state[f"blocks.{i}.{ours}.lora_B.default.weight"] = torch.cat(
                [_take(saved, f"{h}.lora_B.weight", directory) for h in hf])
    score = saved.pop(PEFT_PREFIX + "score.weight", None)
    if keep_head and score is not None and model.score is not None:
        state["score.weight"] = score
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    model.requires_grad_(False)


def _take(saved: dict[str, torch.Tensor], key: str, directory: Path) -> torch.Tensor:
    if key not in saved:
        raise UserError(f"{directory / ADAPTER_WEIGHTS}: missing tensor {key!r}")
    return saved[key]
